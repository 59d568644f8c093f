"""PSS/USS/swap (memtrace.pss.reader) and `memtrace libs` against the kernel's own
smaps, on stopped processes that share libraries: python3 interpreters and a
forked C program whose copy-on-write children share small pages, a THP (PMD-
mapped in the parent, PTE-mapped in children that wrote to it) and file pages.

Tolerance: none beyond smaps' own rounding. smaps prints kB; memtrace keeps
the kernel's fixed-point PSS sum (bytes << 12) and rounds it the same way
(floor(sum / 2**22) kB per mapping, and over all mappings for smaps_rollup),
so Rss, Pss, Private_Clean + Private_Dirty and Swap are compared for
equality in kB. What can differ is time: pages of widely shared libraries
(libc) change their map count whenever any process on the machine starts or
exits (other work on this machine starts and ends processes all the time).
So smaps is read before and after memtrace's reading, and a process passes
when one attempt (of up to ATTEMPTS) finds both smaps reads equal and every
mapping and the smaps_rollup totals equal to memtrace's figures. A count that
changed and changed back between the two smaps reads can make one attempt
differ; a real error makes every attempt differ, and the last differences
are reported.

Exact comparisons run memtrace's walk in this test process: a separate
`memtrace libs` process maps python3, libc and more itself while it runs,
which raises the map counts of those pages (and lowers other processes'
PSS) for exactly that time. The CLI is run for its output and exit code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from memtrace.commands import libs as libs_mod
from memtrace.pss.accounting import PSS_SHIFT
from memtrace.pss.reader import KPageCounts, PssReader
from memtrace.trace.attribution import classify
from memtrace.trace.procfs import ProcFS
from tests import groundtruth as gt
from tests.root.harness import WORKLOADS_DIR

ATTEMPTS = 20
NCHILDREN = 3
NPYTHON = 3
PY_CODE = ("import sys, json, decimal, ssl, hashlib, sqlite3\n"
           "print('READY', flush=True)\nsys.stdin.read()\n")


def _wait_stopped(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = gt.task_states(pid)
        if states and all(s == "T" for s in states.values()):
            return
        time.sleep(0.01)
    raise AssertionError(f"{pid} did not stop: {gt.task_states(pid)}")


@pytest.fixture(scope="module")
def sharing_processes(tmp_path_factory):
    """Stopped processes: NPYTHON python3 interpreters, and pssfork's parent
    with NCHILDREN copy-on-write children. Yields their pids."""
    tmp = tmp_path_factory.mktemp("pss")
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        pytest.fail("no C compiler (gcc) found: needed to build tests/workloads/pssfork.c")
    exe = tmp / "pssfork"
    subprocess.run([cc, "-O1", "-Wall", "-o", str(exe), str(WORKLOADS_DIR / "pssfork.c")],
                   check=True)
    data = tmp / "data.bin"
    data.write_bytes(os.urandom(8 << 20))
    procs: list[subprocess.Popen[bytes]] = []
    pids: dict[str, list[int]] = {"python": [], "fork": []}
    try:
        for _ in range(NPYTHON):
            p = subprocess.Popen(["/usr/bin/python3", "-c", PY_CODE], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE)
            procs.append(p)
            assert p.stdout is not None
            assert p.stdout.readline().strip() == b"READY"
            os.kill(p.pid, signal.SIGSTOP)
            pids["python"].append(p.pid)
        p = subprocess.Popen([str(exe), str(NCHILDREN), str(data)], stdout=subprocess.PIPE)
        procs.append(p)
        assert p.stdout is not None
        for _ in range(NCHILDREN + 1):
            word, pid = p.stdout.readline().split()
            assert word == b"READY"
            pids["fork"].append(int(pid))
        for pid in pids["python"] + pids["fork"]:
            _wait_stopped(pid)
        yield pids
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()     # SIGKILL ends stopped processes too; pssfork's children die with it
            p.wait()


def _smaps_key(m: dict) -> tuple[int, int, int, int]:
    priv = m.get("private_clean_bytes", 0) + m.get("private_dirty_bytes", 0)
    return (m["rss_bytes"] // 1024, m["pss_bytes"] // 1024, priv // 1024,
            m["swap_bytes"] // 1024)


def _rollup(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
        for line in f.read().splitlines()[1:]:
            key, _, rest = line.partition(b":")
            if rest.endswith(b" kB"):
                out[key.decode()] = int(rest[:-3])
    return out


def _rollup_key(r: dict[str, int]) -> tuple[int, int, int, int]:
    return (r["Rss"], r["Pss"], r["Private_Clean"] + r["Private_Dirty"], r["Swap"])


def _compare_once(pid: int, use_scan: bool) -> tuple[list[str], int, int]:
    """(differences, mappings compared, mappings that changed under us)."""
    procfs = ProcFS()
    vmas = procfs.maps(pid)
    before = {m["start"]: _smaps_key(m) for m in gt.read_smaps(pid)}
    roll_before = _rollup_key(_rollup(pid))
    kpc = KPageCounts()
    try:
        with PssReader(pid, counts=kpc, use_scan=use_scan) as reader:
            usages = reader.usage(vmas)
    finally:
        kpc.close()
    after = {m["start"]: _smaps_key(m) for m in gt.read_smaps(pid)}
    roll_after = _rollup_key(_rollup(pid))
    diffs, compared, unstable = [], 0, 0
    for vma, u in zip(vmas, usages, strict=True):
        want = before.get(vma.start)
        if want is None or want != after.get(vma.start):
            unstable += 1
            continue
        compared += 1
        got = (u.rss // 1024, u.pss_kib, u.uss // 1024, u.swap // 1024)
        if got != want:
            diffs.append(f"{pid} {vma.start:x}-{vma.end:x} {vma.perms} {vma.display_path}: "
                         f"memtrace (rss, pss, uss, swap) kB {got} != smaps {want}")
    if roll_before == roll_after:
        fixed = sum(u.pss_fixed for u in usages)
        got_total = (sum(u.rss for u in usages) // 1024, fixed >> (PSS_SHIFT + 10),
                     sum(u.uss for u in usages) // 1024, sum(u.swap for u in usages) // 1024)
        if got_total != roll_before:
            diffs.append(f"{pid} process total (rss, pss, uss, swap) kB {got_total} "
                         f"!= smaps_rollup {roll_before}")
    else:
        unstable += 1
    return diffs, compared, unstable


def _compare_exactly(pid: int, use_scan: bool) -> int:
    diffs: list[str] = []
    unstable = 0
    for _ in range(ATTEMPTS):
        diffs, compared, unstable = _compare_once(pid, use_scan)
        if not diffs and unstable == 0:
            return compared
        time.sleep(0.05)
    raise AssertionError(f"{pid}: no clean attempt in {ATTEMPTS}; last one: {unstable} "
                         "mappings changed during the reads, differences:\n" + "\n".join(diffs))


@pytest.mark.parametrize("use_scan", [True, False], ids=["pagemap_scan", "raw_pagemap"])
def test_per_mapping_and_process_pss_uss_equal_smaps(sharing_processes, use_scan):
    compared = 0
    for pid in sharing_processes["python"] + sharing_processes["fork"]:
        compared += _compare_exactly(pid, use_scan)
    assert compared > 100


def test_the_fork_workload_exercises_sharing_thp_and_cow(sharing_processes):
    """The comparison above covers what it claims: the parent maps THPs by
    PMD, shared with the children, and children hold private CoW copies."""
    rollups = {pid: _rollup(pid) for pid in sharing_processes["fork"]}
    if all(r.get("AnonHugePages", 0) == 0 for r in rollups.values()):
        pytest.skip("no THP on this machine: the PMD path is not exercised")
    assert any(r["AnonHugePages"] >= 2048 for r in rollups.values())
    assert all(r["Shared_Dirty"] > 0 for r in rollups.values())
    assert all(r["Private_Dirty"] > 0 for r in rollups.values())


def _libs_cli(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "memtrace", "libs", *args, "--format", "json"],
                         check=True, capture_output=True, timeout=120)
    return json.loads(out.stdout)


def _libs(pids: list[int] | None) -> dict:
    """The JSON of `memtrace libs`, computed in this process."""
    return json.loads(libs_mod.render_json(libs_mod.collect(pids, ProcFS()), "pss"))


def _library_inodes(pid: int) -> dict[tuple[str, int], str]:
    procfs = ProcFS()
    exe = procfs.exe(pid)
    return {(v.dev, v.inode): v.display_path for v in procfs.maps(pid)
            if v.inode and classify(v, exe) == "library"}


def _process_key(p: dict) -> tuple[int, int, int, int]:
    # pss_bytes is floor(sum / 2**12): its kB floor is smaps_rollup's Pss
    return (p["rss_bytes"] // 1024, p["pss_bytes"] // 1024, p["uss_bytes"] // 1024,
            p["swap_bytes"] // 1024)


def test_libs_for_named_processes(sharing_processes):
    pids = sharing_processes["python"] + sharing_processes["fork"]
    diffs: list[str] = []
    for _ in range(ATTEMPTS):
        before = {pid: _rollup_key(_rollup(pid)) for pid in pids}
        doc = _libs(pids)
        after = {pid: _rollup_key(_rollup(pid)) for pid in pids}
        procs = {p["pid"]: p for p in doc["processes"]}
        assert sorted(procs) == sorted(pids)
        diffs = [f"{pid}: {_process_key(procs[pid])} vs smaps_rollup {before[pid]}"
                 for pid in pids if _process_key(procs[pid]) != before[pid]]
        if before == after and not diffs:
            break
    else:
        pytest.fail("no clean attempt; last differences:\n" + "\n".join(diffs))
    libraries = {(lib["dev"], lib["inode"]): lib for lib in doc["libraries"]}
    for pid in pids:
        for key, path in _library_inodes(pid).items():
            assert key in libraries, f"{path} mapped by {pid} missing"
            assert pid in {q["pid"] for q in libraries[key]["processes"]}
    for lib in doc["libraries"]:
        assert lib["pss_bytes"] <= lib["rss_bytes"]
        assert 0 <= lib["pss_bytes"] - sum(q["pss_bytes"] for q in lib["processes"]) \
            < len(lib["processes"])     # per-process floors of one fixed-point sum
    libc = [lib for lib in doc["libraries"] if "/libc.so" in lib["path"]]
    assert libc and {q["pid"] for q in libc[0]["processes"]} == set(pids)
    totals = doc["totals"]
    assert totals["process_count"] == len(pids)


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[11]) + int(fields[12])     # utime + stime


def _rollups(pids) -> dict[int, tuple[tuple[int, int, int, int], int]]:
    """smaps_rollup figures and CPU time of each process."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError, KeyError, ValueError, IndexError):
            out[pid] = (_rollup_key(_rollup(pid)), _cpu_ticks(pid))
    return out


def test_libs_all(sharing_processes):
    """`memtrace libs --all` (its walk): every library of every process whose
    maps did not change during the walk is listed with that process. Every
    process whose smaps_rollup was the same before and after the walk (quiet)
    has exactly smaps_rollup's Rss, Pss, private and swap, so the sums over
    them are equal (up to the kB rounding of each rollup). Over all processes
    the difference is only printed: processes of other work on this machine
    whose rollup changed during the walk can be anything (44 MB measured once,
    a process freeing memory), so no bound holds for them."""
    ours = sharing_processes["python"] + sharing_processes["fork"]
    procfs = ProcFS()
    pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
    diffs: list[str] = []
    for _ in range(ATTEMPTS):
        maps_before = {}
        for pid in pids:
            with contextlib.suppress(OSError):
                maps_before[pid] = procfs.maps(pid)
        before = _rollups(pids)
        doc = _libs(None)
        procs = {p["pid"]: p for p in doc["processes"]}
        after = _rollups(procs)
        quiet = [pid for pid in procs if pid in before and before[pid] == after.get(pid)]
        diffs = [f"{pid}: {_process_key(procs[pid])} vs smaps_rollup {before[pid][0]}"
                 for pid in quiet if _process_key(procs[pid]) != before[pid][0]]
        if not diffs and set(ours) <= set(quiet):
            break
    else:
        pytest.fail("no clean attempt; last differences:\n" + "\n".join(diffs))
    ours_sum = sum(procs[pid]["pss_bytes"] for pid in quiet)
    smaps_sum = sum(before[pid][0][1] * 1024 for pid in quiet)
    # each process's pss_bytes floors to the kB smaps_rollup prints: < 1 KiB each
    assert 0 <= ours_sum - smaps_sum < 1024 * len(quiet)
    common = [pid for pid in procs if pid in after]
    all_ours = sum(procs[pid]["pss_bytes"] for pid in common)
    all_smaps = sum(after[pid][0][1] * 1024 for pid in common)
    print(f"\nlibs --all: {len(procs)} processes, {len(doc['libraries'])} libraries, "
          f"skipped {doc['skipped']}; {len(quiet)} quiet processes: sum PSS {ours_sum} B "
          f"= sum smaps_rollup Pss {smaps_sum} B + {ours_sum - smaps_sum} B of kB rounding; "
          f"all {len(common)} processes: sum PSS {all_ours} B vs smaps_rollup after "
          f"{all_smaps} B ({all_ours - all_smaps:+d} B)")
    libraries = {(lib["dev"], lib["inode"]): lib for lib in doc["libraries"]}
    checked = 0
    for pid in quiet:
        try:
            unchanged = maps_before.get(pid) == procfs.maps(pid)
        except OSError:
            continue
        if not unchanged:
            continue
        for key, path in _library_inodes(pid).items():
            checked += 1
            assert key in libraries, f"{path} of {pid} missing from libs --all"
            assert pid in {q["pid"] for q in libraries[key]["processes"]}
    assert checked > 0
    for lib in doc["libraries"]:
        assert lib["process_count"] == len(lib["processes"]) > 0


def test_libs_cli(sharing_processes):
    """The command: JSON for named processes, table and CSV for --all, and
    one-line errors with the documented exit codes."""
    pids = sharing_processes["python"][:2]
    doc = _libs_cli([str(p) for p in pids])
    assert sorted(p["pid"] for p in doc["processes"]) == sorted(pids)
    assert any("/libc.so" in lib["path"] for lib in doc["libraries"])
    table = subprocess.run([sys.executable, "-m", "memtrace", "libs", "--all", "--sort", "uss"],
                           check=True, capture_output=True, text=True, timeout=120).stdout
    assert "PROCESS TOTALS" in table and "libc.so" in table
    csv_text = subprocess.run([sys.executable, "-m", "memtrace", "libs", "--all", "--format",
                               "csv", "--sort", "name"], check=True, capture_output=True,
                              text=True, timeout=120).stdout
    assert csv_text.startswith("library,pid,comm,rss_bytes,pss_bytes,uss_bytes,swap_bytes\n")
    for args, code in ((["999999999"], 6), (["2"], 7), ([], 2), (["--all", "1"], 2)):
        r = subprocess.run([sys.executable, "-m", "memtrace", "libs", *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr


def test_libs_skips_and_counts_processes_that_exit():
    """Processes named, then gone before or while they are read: skipped and
    counted, never an error."""
    gone = subprocess.Popen(["sleep", "30"])
    alive = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.1)
        gone.kill()
        gone.wait()
        report = libs_mod.collect([gone.pid, alive.pid], ProcFS(), strict=True)
        assert [p.pid for p in report.processes] == [alive.pid]
        assert report.skipped == {"exited": 1}
    finally:
        alive.kill()
        alive.wait()
