"""Which processes memtrace follows: a pid reused by a new process, a target
that exits while being attached, children forked without exec in agent mode."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.root.harness import MEMTRACE, REPO_ROOT, TIMEOUT_SCALE

LOAD_TIMEOUT = 90.0 * TIMEOUT_SCALE      # BCC compiles the program on a loaded machine
STEP_TIMEOUT = 20.0 * TIMEOUT_SCALE


class Run:
    """memtrace in the background, stdout (JSON Lines) and stderr to files."""

    def __init__(self, args: list[str], tmp: Path) -> None:
        self.out_path, self.err_path = tmp / "out.jsonl", tmp / "err.log"
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(MEMTRACE + args, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, cwd=REPO_ROOT, env=env)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def snapshots(self) -> list[dict]:
        snaps = []
        for line in self.out_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):     # a line being written
                snaps.append(json.loads(line))
        return snaps

    def wait_for(self, what: str, cond, timeout: float = STEP_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = cond()
            if got:
                return got
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        got = cond()
        if got:
            return got
        pytest.fail(f"timed out waiting for {what}; memtrace exit {self.proc.poll()}, "
                    f"stderr:\n{self.stderr()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _bcc_loaded(pid: int) -> bool:
    """memtrace has passed its argument checks and is compiling the BPF program."""
    try:
        return b"libbcc" in Path(f"/proc/{pid}/maps").read_bytes()
    except OSError:
        return False


def _start_time(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat.rsplit(b")", 1)[1].split()[19])


def _spawn_with_pid(pid: int, argv: list[str], attempts: int = 200) -> subprocess.Popen | None:
    """Start argv as process `pid` (just freed): ns_last_pid = pid - 1, then fork.
    Other processes may take the pid first on a busy machine: retried."""
    for _ in range(attempts):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
        if os.path.exists(f"/proc/{pid}"):
            return None     # someone else has it now
    return None


def test_reused_pid_is_reported_as_exited_and_never_followed(tmp_path):
    """Target A dies and B (another program, started with an exec) gets its pid:
    memtrace says A exited and never reports B as A. Before, B's exec was taken
    for A's and start_time re-read from B, so B was followed silently."""
    a = subprocess.Popen(["sleep", "600"])
    run = Run(["watch", str(a.pid), "--format", "json", "--interval", "0.2",
               "--reconcile-interval", "0", "--no-serve"], tmp_path)
    b = None
    try:
        run.wait_for("A's first snapshot",
                     lambda: any(s["pid"] == a.pid for s in run.snapshots()), LOAD_TIMEOUT)
        a.kill()
        a.wait()
        b = _spawn_with_pid(a.pid, ["cat"])
        if b is None:
            pytest.skip(f"pid {a.pid} was taken by another process before the test's")
        b_start = _start_time(b.pid)
        rc = run.wait_for("memtrace to exit (A gone, nothing else watched)",
                          lambda: run.proc.poll() is not None, STEP_TIMEOUT)
        assert rc is not None
        assert run.proc.returncode == 0, run.stderr()
        assert f"pid {a.pid} exited" in run.stderr()
        assert b.poll() is None and _start_time(b.pid) == b_start     # B still there
        assert not [s for s in run.snapshots() if s["pid"] == a.pid and s["comm"] != "sleep"]
    finally:
        run.stop()
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_watch_goes_on_when_one_pid_exits_while_attaching(tmp_path):
    """`watch L S`, S exits before it is attached: S is reported gone, L is
    watched (was: `error: process S exited while attaching`, exit 6)."""
    long = subprocess.Popen(["sleep", "600"])
    short = subprocess.Popen(["sleep", "600"])
    run = Run(["watch", str(long.pid), str(short.pid), "--format", "json",
               "--interval", "0.2", "--no-serve"], tmp_path)
    try:
        run.wait_for("BPF compile", lambda: _bcc_loaded(run.proc.pid), LOAD_TIMEOUT)
        short.kill()
        short.wait()
        run.wait_for("a snapshot of L after S's exit",
                     lambda: sum(s["pid"] == long.pid for s in run.snapshots()) >= 3,
                     LOAD_TIMEOUT)
        assert run.proc.poll() is None, run.stderr()
        assert f"pid {short.pid} exited while attaching" in run.stderr()
        assert "error" not in run.stderr()
        assert not [s for s in run.snapshots() if s["pid"] == short.pid]
        long.kill()
        long.wait()
        run.wait_for("memtrace to exit", lambda: run.proc.poll() is not None)
        assert run.proc.returncode == 0, run.stderr()
    finally:
        run.stop()
        for p in (long, short):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_watch_survives_fifty_targets_exiting_at_random(tmp_path):
    rng = random.Random(16)
    long = subprocess.Popen(["sleep", "600"])
    shorts = [subprocess.Popen(["sleep", f"{rng.uniform(1.5, 10):.2f}"]) for _ in range(50)]
    reapers = [threading.Thread(target=p.wait) for p in shorts]   # no zombies left around
    for t in reapers:
        t.start()
    run = Run(["watch", str(long.pid), *(str(p.pid) for p in shorts), "--format", "json",
               "--interval", "0.2", "--no-serve"], tmp_path)
    try:
        for t in reapers:
            t.join(timeout=30)
        # each one: attached then exited, or gone while attaching (or before)
        run.wait_for("every short-lived target reported gone",
                     lambda: all(f"pid {p.pid} exited" in run.stderr()
                                 or f"no such process: {p.pid}" in run.stderr()
                                 for p in shorts),
                     LOAD_TIMEOUT)
        t_all_gone = time.time()
        run.wait_for("a snapshot of L after every other target was reported gone",
                     lambda: any(s["pid"] == long.pid and s["ts"] > t_all_gone
                                 for s in run.snapshots()))
        assert run.proc.poll() is None, run.stderr()
        assert "error" not in run.stderr()
    finally:
        run.stop()
        for p in (long, *shorts):
            if p.poll() is None:
                p.kill()
                p.wait()


FORKER = r"""
import ctypes, os, sys, time
ctypes.CDLL(None).prctl(15, b"mtforkparent", 0, 0, 0)     # PR_SET_NAME: the agent's rule
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()                                      # the agent watches us now
kids = []
for i in range(3):
    pid = os.fork()
    if pid == 0:                                          # no exec: only a fork notice
        if i == 0:                                        # and a grandchild, forked by
            time.sleep(2.0)                               # a child once that is watched
            if os.fork() == 0:
                buf = b"g" * (8 << 20)
                time.sleep(600)
                os._exit(0)
        buf = b"c" * (4 << 20)
        time.sleep(600)
        os._exit(0)
    kids.append(pid)
sys.stdout.write(" ".join(map(str, kids)) + "\n"); sys.stdout.flush()
sys.stdin.readline()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def test_agent_follows_children_forked_without_exec(tmp_path):
    """A matching process forks children that never exec (postgres backends,
    nginx workers): the agent attaches to them and to their own children.
    Before, only execs were seen: the children were never attached."""
    forker = subprocess.Popen([sys.executable, "-c", FORKER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert forker.stdout is not None and forker.stdin is not None
    assert forker.stdout.readline() == "ready\n"
    run = Run(["agent", "--comm", "^mtforkparent$", "--format", "json", "--interval", "0.2",
               "--web.listen-address", f"127.0.0.1:{_free_port()}"], tmp_path)
    family: list[int] = [forker.pid]
    try:
        run.wait_for("the parent attached",
                     lambda: f"attached to pid {forker.pid} " in run.stderr(), LOAD_TIMEOUT)
        forker.stdin.write("go\n")
        forker.stdin.flush()
        kids = [int(x) for x in forker.stdout.readline().split()]
        family += kids
        assert len(kids) == 3
        grandchild = run.wait_for("the grandchild", lambda: _children(kids[0]), STEP_TIMEOUT)[0]
        family.append(grandchild)
        followed = [*kids, grandchild]

        def all_seen() -> bool:
            seen = {s["pid"]: s for s in run.snapshots()}
            return all(p in seen and seen[p]["comm"] == "mtforkparent" for p in followed)
        run.wait_for(f"snapshots of the forked children {followed}", all_seen, STEP_TIMEOUT)
        err = run.stderr()
        for p in followed:
            assert f"attached to pid {p} (mtforkparent, comm=^mtforkparent$)" in err
        big = max((s for s in run.snapshots() if s["pid"] == grandchild),
                  key=lambda s: s["ts"])
        assert big["anon_bytes"] >= 8 << 20   # its own memory, not the parent's
    finally:
        run.stop()
        for pid in reversed(family):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        forker.wait()
