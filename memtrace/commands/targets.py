"""Which processes `watch` and `run` follow: PIDs or process names given to
`watch` (matched like pgrep), and the process tree a `run` command starts."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from memtrace.errors import ExitCode, MemtraceError, OutputError
from memtrace.trace.procfs import PF_KTHREAD, ProcFS, ProcStat

if TYPE_CHECKING:
    from memtrace.session import Session
    from memtrace.trace.events import Drained

MAX_TREE = 1000      # processes of a `run` tree watched at once (the BPF maps hold 1024)
COMM_LEN = 15        # the kernel keeps at most 15 bytes of a process name (TASK_COMM_LEN - 1)


def _processes(procfs: ProcFS) -> list[ProcStat]:
    """Every process's stat, skipping those that vanish while read."""
    out: list[ProcStat] = []
    try:
        names = [p.name for p in procfs.root.iterdir() if p.name.isdigit()]
    except OSError:
        return out
    for name in sorted(names, key=int):
        try:
            out.append(procfs.stat(int(name)))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _watchable(st: ProcStat, own_pid: int) -> bool:
    """Not memtrace itself or a child of it, not a kernel thread, not a zombie."""
    return (st.pid != own_pid and st.ppid != own_pid and not st.flags & PF_KTHREAD
            and st.state not in ("Z", "X"))


def _exact(name: str, comm: str) -> bool:
    """comm is name, or name cut to the 15 bytes the kernel keeps."""
    if comm == name:
        return True
    return (len(name.encode()) > COMM_LEN and len(comm.encode()) == COMM_LEN
            and name.encode()[:COMM_LEN] == comm.encode())


def pids_named(procfs: ProcFS, name: str, own_pid: int | None = None) -> list[int]:
    """The processes whose name (comm, as /proc/PID/stat shows it) is `name`;
    if none, those whose name the regular expression `name` matches anywhere
    (as pgrep). memtrace itself, its children, kernel threads and zombies are
    left out. MemtraceError (usage) for a bad regular expression."""
    own = os.getpid() if own_pid is None else own_pid
    procs = [st for st in _processes(procfs) if _watchable(st, own)]
    exact = [st.pid for st in procs if _exact(name, st.comm)]
    if exact:
        return exact
    try:
        pattern = re.compile(name)
    except re.error as e:
        raise MemtraceError(f"{name!r} is neither a PID nor a valid process-name "
                            f"pattern: {e}", ExitCode.USAGE) from None
    return [st.pid for st in procs if pattern.search(st.comm)]


def resolve_targets(procfs: ProcFS, args: Iterable[str],
                    own_pid: int | None = None) -> tuple[int, ...]:
    """`watch` arguments as PIDs: a number is a PID (checked later, with its own
    errors), anything else a process name (pids_named). A name that matches
    nothing is an error (exit 6), naming it."""
    pids: list[int] = []
    for arg in args:
        text = arg.strip()
        if text.isdigit():
            pids.append(int(text))
            continue
        if text.startswith("-") and text[1:].isdigit():
            raise MemtraceError(f"invalid PID {text}", ExitCode.NO_SUCH_PROCESS)
        if not text:
            raise MemtraceError("empty process name", ExitCode.USAGE)
        found = pids_named(procfs, text, own_pid)
        if not found:
            raise MemtraceError(f"no process named {text!r}", ExitCode.NO_SUCH_PROCESS)
        pids.extend(found)
    return tuple(dict.fromkeys(pids))


def in_tree(procfs: ProcFS, pid: int, tree: set[int], max_depth: int = 64) -> bool:
    """Whether pid is one of `tree` or descends from one of them (the parent
    chain read from /proc/PID/stat). A process whose parent exited was
    reparented (to init or a subreaper) and is no longer seen as in the tree."""
    for _ in range(max_depth):
        if pid in tree:
            return True
        if pid <= 1:
            return False
        try:
            pid = procfs.stat(pid).ppid
        except (OSError, ValueError, IndexError):
            return False
    return False


class TreeFollower:
    """`run`: attach to every process the command's tree gains: children forked
    by a watched process (the BPF fork notices) and any exec by a descendant of
    the command (exec notices, checked against the parent chain)."""

    def __init__(self, session: Session, root: int, limit: int = MAX_TREE) -> None:
        self.session = session
        self.root = root
        self.limit = limit
        self.followed = 0
        self.skipped = 0
        self._lost: dict[str, int] = {}

    def on_tick(self, drained: Drained) -> None:
        session = self.session
        for pid in dict.fromkeys(drained.forks + drained.execs):
            if pid in session.trackers:
                continue
            if not in_tree(session.procfs, pid, set(session.trackers) | {self.root}):
                continue
            if len(session.trackers) >= self.limit:
                if not self.skipped:
                    session.reporter.message(f"{self.limit} processes of the tree watched: "
                                             "more are not followed until some exit")
                self.skipped += 1
                continue
            try:
                st = session.procfs.check_target(pid)
                session.add_target(pid)
                session.attach(pid)
            except OutputError:
                raise
            except MemtraceError:
                session.detach_quietly(pid)     # gone already, or not ours to read
                continue
            self.followed += 1
            session.reporter.message(f"following pid {pid} ({st.comm}), child of {st.ppid}")
        for ring, total in drained.notices_lost.items():
            new = total - self._lost.get(ring, 0)
            if new > 0:
                session.reporter.message(f"{new} {ring[:-1]} notice(s) lost (ring full): "
                                         "processes of the tree may be missed")
            self._lost[ring] = total
