"""Live PSS in `memtrace watch` (memtrace/pss/live.py) against smaps, on stopped
processes that share libraries: python3 interpreters and pssfork's parent with
copy-on-write children (THP and small pages, file pages), from test_pss.py.

Tolerance: smaps' kB rounding only. memtrace's per-mapping `pss_bytes` is the
kernel's fixed-point sum >> 12 (bytes, floored) and smaps prints that sum
>> 22 (kB, floored), so pss_bytes // 1024 must EQUAL smaps Pss. uss_bytes and
swap_bytes are whole pages: uss_bytes // 1024 must equal Private_Clean +
Private_Dirty, swap_bytes // 1024 Swap. The process's pss_bytes is the sum of
the fixed-point values of all mappings >> 12, so pss_bytes // 1024 must equal
smaps_rollup Pss (not the sum of per-mapping kB).

What can differ is time: libc and python3 pages change their map count
whenever any process on the machine starts or exits, and watch refreshes
shares of pages its targets did not touch only every --pss-interval. So an
attempt reads smaps, waits for a snapshot whose last full refresh
(pss_refreshed_ts) came after that read, reads smaps again, and compares the
mappings whose smaps lines were equal in both reads; a process passes when one
attempt (of up to ATTEMPTS) is clean."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

from tests import groundtruth as gt
from tests.root.harness import Memtrace, wait_stopped

from .test_pss import _rollup, _rollup_key, _smaps_key, sharing_processes  # noqa: F401 (fixture)

ATTEMPTS = 30
PSS_INTERVAL = 0.5


def _want(pid: int) -> dict[int, tuple[int, int, int]]:
    return {m["start"]: _smaps_key(m)[1:] for m in gt.read_smaps(pid)}


def _got(m: dict) -> tuple[int, int, int]:
    return (m["pss_bytes"] // 1024, m["uss_bytes"] // 1024, m["swap_bytes"] // 1024)


def _fresh_snapshot(mt: Memtrace, pid: int, after: float) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        snap = mt.stream.wait_snapshot(pid, after, timeout=30, context=mt.stderr_tail)
        if (snap.get("pss_refreshed_ts") or 0) >= after:
            return snap
    raise AssertionError(f"{pid}: no snapshot after a PSS refresh\n{mt.stderr_tail()}")


def _compare(snap: dict, pid: int, before: dict, after: dict,
             roll_before: dict, roll_after: dict) -> tuple[list[str], int, int]:
    diffs, compared, unstable = [], 0, 0
    for m in snap["mappings"]:
        want = before.get(m["start"])
        if want is None or want != after.get(m["start"]):
            unstable += 1
            diffs.append(f"(unstable: {m['start']:x} {m['path']}: smaps {want} then "
                         f"{after.get(m['start'])})")
            continue
        compared += 1
        if _got(m) != want:
            diffs.append(f"{pid} {m['start']:x}-{m['end']:x} {m['perms']} {m['path']}: "
                         f"watch (pss, uss, swap) kB {_got(m)} != smaps {want}")
    # Only the checked fields decide stability: others (Referenced) move on a
    # stopped process when other processes touch the file pages it shares.
    if _rollup_key(roll_before) == _rollup_key(roll_after):
        got = (snap["pss_bytes"] // 1024, snap["uss_bytes"] // 1024, snap["swap_bytes"] // 1024)
        want_total = _rollup_key(roll_before)[1:]
        if got != want_total:
            diffs.append(f"{pid} process (pss, uss, swap) kB {got} != smaps_rollup "
                         f"{want_total}")
    else:
        unstable += 1
        diffs.append(f"(unstable: smaps_rollup {roll_before} then {roll_after})")
    return diffs, compared, unstable


def test_watch_live_pss_uss_equal_smaps(sharing_processes, tmp_path):  # noqa: F811
    pids = sharing_processes["python"] + sharing_processes["fork"]
    mt = Memtrace(["watch", "--format", "json", "--interval", "0.25", "--pss-interval",
                   str(PSS_INTERVAL), "--no-serve", "--heap-interval", "0",
                   *map(str, pids)], tmp_path / "watch.log")
    try:
        for pid in pids:
            mt.stream.wait_snapshot(pid, 0, timeout=60, context=mt.stderr_tail)
        passed: dict[int, int] = {}
        last: dict[int, str] = {}
        for _ in range(ATTEMPTS):
            todo = [p for p in pids if p not in passed]
            if not todo:
                break
            t0 = time.time()
            before = {p: _want(p) for p in todo}
            roll_before = {p: _rollup(p) for p in todo}
            snaps = {p: _fresh_snapshot(mt, p, t0) for p in todo}
            after = {p: _want(p) for p in todo}
            roll_after = {p: _rollup(p) for p in todo}
            for p in todo:
                diffs, compared, unstable = _compare(snaps[p], p, before[p], after[p],
                                                     roll_before[p], roll_after[p])
                if not diffs:
                    passed[p] = compared
                else:
                    last[p] = f"{unstable} unstable; " + "\n".join(diffs[:20])
        missing = [p for p in pids if p not in passed]
        assert not missing, "no clean attempt for " + "\n".join(
            f"{p}: {last.get(p)}" for p in missing)
        print("compared mappings per pid:", passed)
        assert sum(passed.values()) > 100
        log = (tmp_path / "watch.log").read_text()
        assert "PSS off" not in log and "PSS unavailable" not in log
    finally:
        mt.stop()


def test_watch_pss_off_gives_null_and_says_so(sharing_processes, tmp_path):  # noqa: F811
    pid = sharing_processes["python"][0]
    mt = Memtrace(["watch", "--format", "json", "--interval", "0.25", "--pss-interval", "0",
                   "--no-serve", "--heap-interval", "0", str(pid)], tmp_path / "watch.log")
    try:
        snap = mt.stream.wait_snapshot(pid, 0, timeout=60, context=mt.stderr_tail)
        assert snap["pss_bytes"] is None and snap["uss_bytes"] is None
        assert all(m["pss_bytes"] is None for m in snap["mappings"])
    finally:
        mt.stop()
    log = (tmp_path / "watch.log").read_text()
    assert log.count("PSS off (--pss-interval 0)") == 1, log


# An 8 MiB private anonymous region, every page written, at `addr`.
REGION_CODE = """
import ctypes, mmap, os, signal, sys
n = 8 << 20
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_NOHUGEPAGE)
for i in range(0, n, 4096):
    m[i] = 1
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
"""

COW_CODE = REGION_CODE + """pid = os.fork()
if pid == 0:
    os.write(1, f"CHILD {os.getpid()} {addr}\\n".encode())   # one write: no interleaving
    sys.stdin.readline()
    for i in range(0, n // 2, 4096):
        m[i] = 2
    os.write(1, b"WROTE\\n")
    os.kill(os.getpid(), signal.SIGSTOP)
    os._exit(0)
os.write(1, f"PARENT {os.getpid()} {addr}\\n".encode())
os.kill(os.getpid(), signal.SIGSTOP)
os.waitpid(pid, 0)
"""


def _end(mt: Memtrace | None, child: int, proc: subprocess.Popen[bytes]) -> None:
    """Stop memtrace, the forked child (stopped, not ours to wait for) and the
    python3 workload."""
    if mt is not None:
        mt.stop()
    if child:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    proc.kill()
    proc.wait()


def _vma_key(pid: int, addr: int) -> tuple[int, int, int]:
    m = next(m for m in gt.read_smaps(pid) if m["start"] <= addr < m["end"])
    return _smaps_key(m)[1:]


def _snap_vma(snap: dict, addr: int) -> dict:
    return next(m for m in snap["mappings"] if m["start"] <= addr < m["end"])


def test_copy_on_write_in_a_watched_child_is_seen_in_the_next_tick(tmp_path):
    """The incremental path alone (no refresh: --pss-interval 3600): a forked
    child writes half of an 8 MiB region it shares with its parent; the next
    snapshot of the child gives that mapping's PSS/USS as smaps does. (The
    parent's figures for the same pages wait for the next refresh: its pages
    became private without any event in the parent; docs/output.md.)"""
    proc = subprocess.Popen(["/usr/bin/python3", "-c", COW_CODE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    mt = None
    child = 0
    try:
        assert proc.stdout is not None and proc.stdin is not None
        got = {}
        for _ in range(2):
            line = proc.stdout.readline()
            assert len(line.split()) == 3, line
            word, pid, addr = line.split()
            got[word.decode()] = (int(pid), int(addr))
        (parent, addr), (child, _) = got["PARENT"], got["CHILD"]
        wait_stopped(parent)
        mt = Memtrace(["watch", "--format", "json", "--interval", "0.25", "--pss-interval",
                       "3600", "--no-serve", "--heap-interval", "0", str(parent), str(child)],
                      tmp_path / "watch.log")
        first = mt.stream.wait_snapshot(child, 0, timeout=60, context=mt.stderr_tail)
        m = _snap_vma(first, addr)
        assert _got(m) == _vma_key(child, addr) == (4096, 0, 0)   # all shared by two
        proc.stdin.write(b"write\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == b"WROTE"
        wait_stopped(child)
        t = time.time()
        mt.stream.wait_snapshot(child, t, timeout=30, context=mt.stderr_tail)
        snap = mt.stream.wait_snapshot(child, time.time(), timeout=30, context=mt.stderr_tail)
        assert snap["pss_refreshed_ts"] < t         # no refresh: the incremental path
        want = _vma_key(child, addr)
        assert want == (6144, 4096, 0)              # half copied: private; half shared
        assert _got(_snap_vma(snap, addr)) == want
    finally:
        _end(mt, child, proc)


FORK_LATER_CODE = REGION_CODE + """os.write(1, f"READY {os.getpid()} {addr}\\n".encode())
sys.stdin.readline()
pid = os.fork()
if pid == 0:
    os.kill(os.getpid(), signal.SIGSTOP)
    os._exit(0)
os.write(1, f"FORKED {pid}\\n".encode())
os.kill(os.getpid(), signal.SIGSTOP)
os.waitpid(pid, 0)
"""


def test_a_fork_of_a_watched_process_updates_its_pss_without_a_refresh(tmp_path):
    """The parent's 8 MiB region is private when watching starts, so full
    refreshes leave it out; then it forks (no fault, no address-space call
    in the parent). BPF counts the fork and the next tick recomputes every
    mapping: the region is shared by two, as smaps says, long before
    --pss-interval (3600 s) would refresh it."""
    proc = subprocess.Popen(["/usr/bin/python3", "-c", FORK_LATER_CODE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    mt = None
    child = 0
    try:
        assert proc.stdout is not None and proc.stdin is not None
        word, pid_text, addr_text = proc.stdout.readline().split()
        assert word == b"READY"
        parent, addr = int(pid_text), int(addr_text)
        mt = Memtrace(["watch", "--format", "json", "--interval", "0.25", "--pss-interval",
                       "3600", "--no-serve", "--heap-interval", "0", str(parent)],
                      tmp_path / "watch.log")
        first = mt.stream.wait_snapshot(parent, 0, timeout=60, context=mt.stderr_tail)
        assert _got(_snap_vma(first, addr)) == (8192, 8192, 0)
        proc.stdin.write(b"fork\n")
        proc.stdin.flush()
        word, child_text = proc.stdout.readline().split()
        assert word == b"FORKED"
        child = int(child_text)
        wait_stopped(parent)
        wait_stopped(child)
        want = _vma_key(parent, addr)
        assert want == (4096, 0, 0)                  # shared by two: half each
        t = time.time()
        mt.stream.wait_snapshot(parent, t, timeout=30, context=mt.stderr_tail)
        snap = mt.stream.wait_snapshot(parent, time.time(), timeout=30, context=mt.stderr_tail)
        assert _got(_snap_vma(snap, addr)) == want, mt.stderr_tail()
    finally:
        _end(mt, child, proc)
