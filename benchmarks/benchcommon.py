"""Helpers shared by the benchmark drivers: building the C workloads, reading
/proc for CPU time and peak RSS, running memtrace with its output drained on
threads, and killing every child on the way out (even on failure)."""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORKLOAD_SRC = BENCH_DIR / "workloads"
WORKLOAD_BIN = WORKLOAD_SRC / "bin"
DEFAULT_MEMTRACE = REPO / ".venv" / "bin" / "memtrace"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_children: list[subprocess.Popen[bytes]] = []


def build(name: str) -> Path:
    """Compile benchmarks/workloads/NAME.c with gcc -O2 (when the binary is stale)."""
    src = WORKLOAD_SRC / f"{name}.c"
    out = WORKLOAD_BIN / name
    WORKLOAD_BIN.mkdir(exist_ok=True)
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(out), str(src)], check=True)
    return out


def spawn(argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
    """Popen that is registered for cleanup."""
    p: subprocess.Popen[bytes] = subprocess.Popen(list(argv), **kw)  # type: ignore[call-overload]
    _children.append(p)
    return p


def kill(p: subprocess.Popen[bytes], term_first: bool = False, grace: float = 10.0) -> None:
    """End one child we started (by its pid), stopped or not, and reap it."""
    if p.poll() is not None:
        return
    if term_first:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(grace)
            return
    with contextlib.suppress(ProcessLookupError):
        p.kill()  # SIGKILL also ends a SIGSTOPped process
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(10)


def cleanup() -> None:
    for p in reversed(_children):
        with contextlib.suppress(Exception):
            kill(p, term_first=True, grace=5.0)
    _children.clear()


atexit.register(cleanup)


def _on_signal(signum: int, _frame: object) -> None:
    cleanup()
    sys.exit(128 + signum)


signal.signal(signal.SIGTERM, _on_signal)
signal.signal(signal.SIGHUP, _on_signal)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    data = Path(f"/proc/{pid}/stat").read_bytes()
    fields = data[data.rindex(b")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _stat_fields(pid: int) -> list[bytes]:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return data[data.rindex(b")") + 2:].split()


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and all its descendants: its own utime + stime, its
    reaped children's (cutime + cstime), and every live descendant's (e.g.
    memtrace's heap walker process)."""
    fields = _stat_fields(pid)
    total = sum(int(f) for f in fields[11:15]) / CLK_TCK
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            total += sum(int(f) for f in _stat_fields(child)[11:13]) / CLK_TCK
        except (OSError, ValueError, IndexError):
            continue
        todo += children.get(child, [])
    return total


def status_kb(pid: int, key: str) -> int:
    """A 'kB' line of /proc/PID/status, e.g. VmHWM, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def system_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle (user..softirq plus steal), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_cpu_seconds() -> float:
    """This driver's CPU (all threads) plus its reaped children's (not counted)."""
    return cpu_seconds(os.getpid())


def foreign_memtraces(exclude: set[int]) -> list[int]:
    """Pids of memtrace watch/run processes we did not start (e.g. another test
    session on this machine): their BPF probes fire for every process."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in exclude:
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        is_mt = any(a == b"memtrace" or a.endswith(b"/memtrace") for a in argv)
        if is_mt and (b"watch" in argv or b"run" in argv):
            found.append(int(d))
    return found


class Interference:
    """How much CPU the rest of the machine used over a window: system busy time
    minus the CPU of the processes we account for (and of this driver)."""

    def __init__(self, ours: list[int]) -> None:
        self.ours = ours
        self.sys0 = system_busy_seconds()
        self.ours0 = sum(_cpu_or_zero(p) for p in ours) + own_cpu_seconds()
        self.foreign_mt = set(foreign_memtraces(set(ours) | {os.getpid()}))

    def stop(self) -> float:
        """Foreign CPU seconds since construction (call while `ours` still run)."""
        ours1 = sum(_cpu_or_zero(p) for p in self.ours) + own_cpu_seconds()
        self.foreign_mt |= set(foreign_memtraces(set(self.ours) | {os.getpid()}))
        return (system_busy_seconds() - self.sys0) - (ours1 - self.ours0)


def _cpu_or_zero(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


def wait_quiet(max_wait: float, busy_limit: float = 0.10) -> tuple[float, list[int]]:
    """Wait (at most max_wait s) until no foreign memtrace runs and the machine's
    busy CPU over one second is below busy_limit cores. Returns (waited s, foreign)."""
    t0 = time.monotonic()
    while True:
        foreign = foreign_memtraces({os.getpid()} | {p.pid for p in _children})
        b0 = system_busy_seconds()
        time.sleep(1.0)
        busy = system_busy_seconds() - b0
        waited = time.monotonic() - t0
        if (not foreign and busy < busy_limit) or waited >= max_wait:
            return waited, foreign


def statm_rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


def read_line(stream: object, timeout: float, what: str) -> str:
    """One line from a child's stdout pipe, with a deadline (via a helper thread)."""
    box: list[bytes] = []
    t = threading.Thread(target=lambda: box.append(stream.readline()),  # type: ignore[attr-defined]
                         daemon=True)
    t.start()
    t.join(timeout)
    if not box:
        raise TimeoutError(f"no line from {what} within {timeout:.0f}s")
    if not box[0]:
        raise EOFError(f"{what} closed its output")
    return box[0].decode().rstrip("\n")


_TS_RE = re.compile(rb'^\{"ts":([0-9.]+),')
_FIRST_SNAPSHOT_RE = re.compile(r"first snapshot ([0-9.]+)s after start")


class Memtrace:
    """`memtrace watch PID --format json ...` with stdout and stderr drained on threads.

    Keeps the number of snapshot lines, the wall-clock time of the first one,
    the last raw line and its "ts", and all of stderr."""

    def __init__(self, exe: Path, pid: int, interval: float = 1.0,
                 listen: str | None = None, extra: Sequence[str] = (),
                 keep_lines: bool = False) -> None:
        """listen: instead of JSON on stdout, `--format none` and /metrics on
        this address (the first snapshot is then taken from memtrace's log).
        keep_lines: keep every line (--changed-only: whole snapshots are
        rebuilt from all of them)."""
        self.argv = [str(exe), "watch", str(pid), "--interval", str(interval),
                     "--reconcile-interval", "0"]
        self.argv += (["--format", "none", "--web.listen-address", listen] if listen
                      else ["--format", "json", "--no-serve"])
        self.argv += list(extra)
        self.interval = interval
        self.lines = 0
        self.bytes = 0                  # bytes of JSON written so far
        self.first_line_bytes = 0
        self.keep_lines = keep_lines
        self.all_lines: list[bytes] = []
        self.last_line = b""
        self.last_ts = 0.0
        self.first_line_at: float | None = None
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self.started_at = time.monotonic()
        self.proc = spawn(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        self._threads = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._threads:
            t.start()

    @property
    def command(self) -> str:
        return " ".join(self.argv)

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.monotonic()
            m = _TS_RE.match(line)
            with self._cond:
                if self.first_line_at is None:
                    self.first_line_at = now
                if self.lines == 0:
                    self.first_line_bytes = len(line)
                self.lines += 1
                self.bytes += len(line)
                if self.keep_lines:
                    self.all_lines.append(line)
                self.last_line = line
                if m:
                    self.last_ts = float(m.group(1))
                self._cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            text = line.decode(errors="replace").rstrip("\n")
            self.stderr.append(text)
            if _FIRST_SNAPSHOT_RE.search(text):
                with self._cond:
                    if self.first_line_at is None and self.lines == 0 and \
                            "--no-serve" not in self.argv:
                        self.first_line_at = time.monotonic()
                    self._cond.notify_all()

    def wait_first_snapshot(self, timeout: float) -> float:
        """Block until the first snapshot line; return seconds since spawn (wall clock)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.first_line_at is None:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    break
                self._cond.wait(min(left, 0.5))
            if self.first_line_at is None:
                raise RuntimeError(self.failure("no snapshot"))
            return self.first_line_at - self.started_at

    def wait_snapshot_after(self, wall_ts: float, timeout: float) -> bytes:
        """Block until a snapshot whose "ts" is >= wall_ts; return its raw line."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.last_ts < wall_ts:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(self.failure(f"no snapshot with ts >= {wall_ts:.3f}"))
                self._cond.wait(min(left, 0.5))
            return self.last_line

    def logged_first_snapshot(self) -> float | None:
        for line in self.stderr:
            m = _FIRST_SNAPSHOT_RE.search(line)
            if m:
                return float(m.group(1))
        return None

    def failure(self, what: str) -> str:
        rc = self.proc.poll()
        tail = "\n    ".join(self.stderr[-20:])
        return (f"memtrace misbehaved: {what} (exit status {rc})\n  command: {self.command}\n"
                f"  stderr:\n    {tail}")

    def wait_exit(self, timeout: float) -> int | None:
        """Wait for memtrace to exit by itself; None if it did not (then it is killed)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill(self.proc, term_first=True)
            return None
        for t in self._threads:
            t.join(5)
        return rc

    def unexpected_stderr(self) -> list[str]:
        """stderr lines other than memtrace's normal progress messages."""
        normal = ("probes loaded in", "first snapshot", "exited", "--changed-only writes")
        return [ln for ln in self.stderr if not any(n in ln for n in normal)]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def median_ci(xs: Sequence[float], level: float = 0.90) -> tuple[float, float] | None:
    """A distribution-free confidence interval for the median of xs: the order
    statistics x_(k) and x_(n-k+1) with the largest k for which
    P(Binomial(n, 1/2) < k) <= (1 - level) / 2, so that the interval holds
    the true median with probability >= level whatever the distribution.
    None when n is too small for that level (n < 5 at 90 %)."""
    n = len(xs)
    tail = (1 - level) / 2
    k, below = 0, 0.0           # below: P(Binomial(n, 1/2) < k + 1)
    while k < n // 2:
        below += math.comb(n, k) / 2 ** n
        if below > tail:
            break
        k += 1
    if k == 0:
        return None
    ordered = sorted(xs)
    return ordered[k - 1], ordered[n - k]


def ratio_text(ratio: float, ci: tuple[float, float] | None, unit: str = "x") -> str:
    """"1.040x, 90 % 1.037-1.066": a paired ratio and its interval (median_ci)."""
    return f"{ratio:.3f}{unit}" + (f", 90 % {ci[0]:.3f}-{ci[1]:.3f}" if ci else "")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for n, r in enumerate(cells):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def git_commit() -> str:
    """The checkout's commit (with '+dirty' when its tracked files differ)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
