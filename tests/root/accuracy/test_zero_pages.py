"""Zero-page PTEs (issue 16, items 1 and 2): `memtrace libs` and live PSS in
`memtrace watch` against smaps when page tables map the shared zero page (or
the huge zero page) next to ordinary pages.

The workload (tests/workloads/zeropage.c) reads never-written pages of libc's
bss, of an anonymous region whose every 4th page it wrote, and of a
MADV_HUGEPAGE region, then forks. smaps counts none of the zero-page PTEs
(vm_normal_page() is NULL for them); raw pagemap shows them present. The
fixture checks with /proc/PID/pagemap and /proc/kpageflags (KPF_ZERO_PAGE)
that such PTEs really are there, next to resident pages, and skips (with the
reason) otherwise.

It runs on a private copy of libc and of the dynamic loader (other inodes
than the ones every process, memtrace included, maps), so the map counts of
its pages change only with the parent and the child, and PSS can be compared
exactly: memtrace's pss_bytes // 1024 equals smaps Pss per mapping and
smaps_rollup Pss per process; rss_bytes and uss_bytes are whole pages and
equal Rss and Private_Clean + Private_Dirty. Only [vdso] (mapped by every
process) can change under us: smaps is read before and after, and an attempt
counts when both reads agree (up to ATTEMPTS attempts). Both page-table
readers are covered: PAGEMAP_SCAN and the raw pagemap fallback
(MEMTRACE_NO_PAGEMAP_SCAN=1)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest

from memtrace.trace.procfs import ProcFS
from memtrace.util.elf import load_span
from tests import groundtruth as gt
from tests.root.harness import REPO_ROOT, WORKLOADS_DIR, Memtrace, wait_stopped

from .test_pss import _rollup, _rollup_key

ATTEMPTS = 20
PAGE = 4096
KPF_ZERO_PAGE = 1 << 24
PM_PRESENT = 1 << 63
PM_PFN_MASK = (1 << 55) - 1
REGION_PAGES = 64
MECHANISMS = pytest.mark.parametrize("no_scan", ["0", "1"], ids=["pagemap_scan", "raw_pagemap"])


def _own_mapping(name: str) -> str:
    """The path of a file this process maps whose base name starts with `name`."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and os.path.basename(parts[5]).startswith(name):
                return parts[5]
    raise AssertionError(f"python3 maps no {name}*")


def _entries(pid: int, start: int, end: int) -> list[int]:
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PAGE * 8)
        data = f.read((end - start) // PAGE * 8)
    return list(struct.unpack(f"{len(data) // 8}Q", data))


def _kpageflags(pfn: int) -> int:
    with open("/proc/kpageflags", "rb") as f:
        f.seek(pfn * 8)
        return int.from_bytes(f.read(8), "little")


def zero_ptes(pid: int, start: int, end: int) -> tuple[int, int]:
    """(zero-page PTEs, zero-page PTEs within 16 pages of a resident page) in
    [start, end): the latter are what a reader that reads the gaps between
    nearby resident runs meets."""
    entries = _entries(pid, start, end)
    zero = [bool(e & PM_PRESENT and _kpageflags(e & PM_PFN_MASK) & KPF_ZERO_PAGE)
            for e in entries]
    resident = [i for i, e in enumerate(entries) if e & PM_PRESENT and not zero[i]]
    near = sum(1 for i, z in enumerate(zero)
               if z and any(abs(i - r) <= 16 for r in resident))
    return sum(zero), near


@pytest.fixture(scope="module")
def zero_page_procs(tmp_path_factory):
    """The stopped parent and child of zeropage.c, on a private libc copy."""
    tmp = tmp_path_factory.mktemp("zeropage")
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        pytest.fail("no C compiler (gcc) found: needed to build tests/workloads/zeropage.c")
    libc = tmp / "libc.so.6"
    loader = tmp / os.path.basename(_own_mapping("ld-linux"))
    shutil.copyfile(_own_mapping("libc.so"), libc)
    shutil.copyfile(_own_mapping("ld-linux"), loader)
    loader.chmod(0o755)
    exe = tmp / "zeropage"
    subprocess.run([cc, "-O1", "-Wall", "-o", str(exe), str(WORKLOADS_DIR / "zeropage.c"),
                    f"-Wl,-rpath,{tmp}", f"-Wl,--dynamic-linker={loader}"], check=True)
    proc = subprocess.Popen([str(exe)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        ready = {}
        for who in ("child", "parent"):
            line = proc.stdout.readline().split()
            assert len(line) == 6 and line[0] == b"READY", line
            ready[who] = (int(line[1]), *(int(x, 16) for x in line[2:]))
        parent, region, bss_start, bss_end, huge = ready["parent"]
        child = ready["child"][0]
        wait_stopped(parent)
        wait_stopped(child)
        maps = ProcFS().maps(parent)
        assert any(v.path == str(libc).encode() for v in maps), "the libc copy is not mapped"
        assert bss_end > bss_start, "libc's bss not found in the workload's maps"
        found = {}
        for pid in (parent, child):
            found[pid] = {"region": zero_ptes(pid, region, region + REGION_PAGES * PAGE),
                          "libc bss": zero_ptes(pid, bss_start, bss_end),
                          "huge": zero_ptes(pid, huge, huge + (2 << 20))}
        if not all(f["region"][1] for f in found.values()):
            pytest.skip(f"no zero-page PTE next to resident pages (pagemap + kpageflags: "
                        f"{found}): needs root and the zero page for anonymous read faults")
        print(f"\nzero-page PTEs (all, near resident pages): {found}")
        yield {"parent": parent, "child": child, "region": region,
               "bss": (bss_start, bss_end), "libc": str(libc), "found": found}
    finally:
        if proc.poll() is None:
            proc.kill()      # SIGKILL ends the stopped parent; the child dies with it
        proc.wait()


def test_libc_bss_and_the_region_hold_zero_page_ptes_in_parent_and_child(zero_page_procs):
    """What the tests below exercise: zero-page PTEs among resident pages in
    the anonymous region of both processes and, here, in libc's bss too, and
    the (huge) zero page over the whole read-only 2 MiB region."""
    for pid, f in zero_page_procs["found"].items():
        assert f["region"][1] > 0, (pid, f)
        assert f["libc bss"][0] > 0, (pid, f, "libc's bss has no zero-page PTE")
        assert f["huge"][0] == 512, (pid, f)


def _smaps(pid: int) -> dict[int, dict]:
    return {m["start"]: m for m in gt.read_smaps(pid)}


def _unchanged(before: tuple[dict, dict], after: tuple[dict, dict]) -> bool:
    """smaps and smaps_rollup the same in what is compared: other fields
    (Referenced) move on a stopped process whose file pages others touch."""
    (smaps_a, roll_a), (smaps_b, roll_b) = before, after
    return ({s: _key(m) for s, m in smaps_a.items()} == {s: _key(m) for s, m in smaps_b.items()}
            and _rollup_key(roll_a) == _rollup_key(roll_b))


def _key(m: dict) -> tuple[int, int, int, int]:
    """(rss, pss, uss, swap) in kB, as smaps prints them."""
    return (m["rss_bytes"] // 1024, m["pss_bytes"] // 1024,
            (m.get("private_clean_bytes", 0) + m.get("private_dirty_bytes", 0)) // 1024,
            m["swap_bytes"] // 1024)


def _env(no_scan: str) -> dict[str, str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["MEMTRACE_NO_PAGEMAP_SCAN"] = no_scan
    return env


def _libc_pieces(smaps: dict[int, dict], libc: str, bss: tuple[int, int]) -> list[dict]:
    return [m for start, m in sorted(smaps.items())
            if m["path"] == libc or start == bss[0]]


def _past_bss(pid: int, libc: str, smaps: dict[int, dict], bss: tuple[int, int]
              ) -> tuple[int, int, int]:
    """(rss, pss, uss) bytes of the part of the bss mapping past the end of
    libc's last PT_LOAD (the loader's own anonymous memory, merged with the
    bss into one VMA; not libc's): computed here from pagemap, kpageflags and
    kpagecount as smaps computes them."""
    with open(libc, "rb") as f:
        span = load_span(f.read(4096))
    assert span is not None
    base = min(start for start, m in smaps.items() if m["path"] == libc)
    end = (base + span[1] + PAGE - 1) & ~(PAGE - 1)
    rss = pss_fixed = uss = 0
    if end < bss[1]:
        for e in _entries(pid, max(end, bss[0]), bss[1]):
            pfn = e & PM_PFN_MASK
            if not e & PM_PRESENT or _kpageflags(pfn) & KPF_ZERO_PAGE:
                continue
            with open("/proc/kpagecount", "rb") as f:
                f.seek(pfn * 8)
                count = int.from_bytes(f.read(8), "little")
            rss += PAGE
            pss_fixed += (PAGE << 12) // count if count >= 2 else PAGE << 12
            uss += PAGE if count < 2 else 0
    return rss, pss_fixed >> 12, uss


def _libs_diffs(doc: dict, pid: int, smaps: dict[int, dict], roll: dict[str, int],
                libc: str, bss: tuple[int, int]) -> list[str]:
    diffs = []
    proc = {p["pid"]: p for p in doc["processes"]}[pid]
    got = (proc["rss_bytes"] // 1024, proc["pss_bytes"] // 1024, proc["uss_bytes"] // 1024,
           proc["swap_bytes"] // 1024)
    if got != _rollup_key(roll):
        diffs.append(f"{pid} process (rss, pss, uss, swap) kB {got} != smaps_rollup "
                     f"{_rollup_key(roll)}")
    lib = [q for lib in doc["libraries"] if lib["path"] == libc
           for q in lib["processes"] if q["pid"] == pid]
    assert len(lib) == 1, doc["libraries"]
    pieces = _libc_pieces(smaps, libc, bss)
    assert pieces and pieces[-1]["start"] == bss[0] and pieces[-1]["end"] == bss[1], pieces
    want = [sum(_key(m)[i] * 1024 for m in pieces) for i in range(4)]
    past = _past_bss(pid, libc, smaps, bss)
    want = [want[0] - past[0], want[1] - past[1], want[2] - past[2], want[3]]
    q = lib[0]
    # rss, uss, swap: whole pages, exact; pss: smaps floors each mapping's kB,
    # and the part past the bss (if any) has its own byte floor
    exact = (q["rss_bytes"], q["uss_bytes"], q["swap_bytes"])
    if exact != (want[0], want[2], want[3]) or not (
            want[1] - 1024 <= q["pss_bytes"] < want[1] + 1024 * len(pieces)):
        diffs.append(f"{pid} {libc} (rss, pss, uss, swap) bytes "
                     f"{(q['rss_bytes'], q['pss_bytes'], q['uss_bytes'], q['swap_bytes'])} "
                     f"vs smaps {want} over {len(pieces)} mappings (less {past} past the "
                     "bss)")
    return diffs


@MECHANISMS
def test_libs_counts_no_zero_page(zero_page_procs, no_scan):
    """`memtrace libs PARENT CHILD --format json`: each process's totals equal
    smaps_rollup and its libc (segments and bss) equals the sum of smaps over
    those mappings. Before the fix the zero-page PTEs in the gaps between
    nearby resident pages counted as resident, private pages."""
    procs = zero_page_procs
    pids = [procs["parent"], procs["child"]]
    diffs: list[str] = []
    for _ in range(ATTEMPTS):
        before = {p: (_smaps(p), _rollup(p)) for p in pids}
        out = subprocess.run([sys.executable, "-m", "memtrace", "libs", *map(str, pids),
                              "--format", "json"], capture_output=True, timeout=120,
                             env=_env(no_scan), cwd=str(REPO_ROOT))
        assert out.returncode == 0, out.stderr.decode()
        doc = json.loads(out.stdout)
        after = {p: (_smaps(p), _rollup(p)) for p in pids}
        diffs = [d for p in pids for d in _libs_diffs(doc, p, *before[p], procs["libc"],
                                                       procs["bss"])]
        for lib in doc["libraries"]:
            for q in lib["processes"]:
                assert q["pss_bytes"] <= q["rss_bytes"] and q["uss_bytes"] <= q["rss_bytes"], lib
        if all(_unchanged(before[p], after[p]) for p in pids) and not diffs:
            return
        time.sleep(0.05)
    pytest.fail("no clean attempt; last differences:\n" + "\n".join(diffs))


def _watch_diffs(snap: dict, pid: int, smaps: dict[int, dict], roll: dict[str, int]) -> list[str]:
    diffs = []
    for m in snap["mappings"]:
        want = smaps.get(m["start"])
        if want is None:
            diffs.append(f"{pid} {m['start']:x} {m['path']}: not in smaps")
            continue
        got = (m["rss_bytes"] // 1024, m["pss_bytes"] // 1024, m["uss_bytes"] // 1024,
               m["swap_bytes"] // 1024)
        if got != _key(want):
            diffs.append(f"{pid} {m['start']:x}-{m['end']:x} {m['perms']} {m['path']}: "
                         f"watch (rss, pss, uss, swap) kB {got} != smaps {_key(want)}")
    got_total = (snap["rss_bytes"] // 1024, snap["pss_bytes"] // 1024,
                 snap["uss_bytes"] // 1024, snap["swap_bytes"] // 1024)
    if got_total != _rollup_key(roll):
        diffs.append(f"{pid} process (rss, pss, uss, swap) kB {got_total} != smaps_rollup "
                     f"{_rollup_key(roll)}")
    return diffs


@MECHANISMS
def test_watch_live_pss_counts_no_zero_page(zero_page_procs, tmp_path, no_scan):
    """`memtrace watch PARENT CHILD --format json` (PSS refreshed every
    0.5 s): in every snapshot no mapping has PSS or USS above its RSS, and
    snapshots taken after a refresh, on several refreshes, give every mapping
    and the process totals as smaps and smaps_rollup do. Before the fix the
    libc bss and the region had PSS and USS above RSS after a full refresh."""
    procs = zero_page_procs
    pids = [procs["parent"], procs["child"]]
    mt = Memtrace(["watch", "--format", "json", "--interval", "0.25", "--pss-interval", "0.5",
                   "--no-serve", "--heap-interval", "0", *map(str, pids)],
                  tmp_path / "watch.log", env={"MEMTRACE_NO_PAGEMAP_SCAN": no_scan})
    try:
        for pid in pids:
            mt.stream.wait_snapshot(pid, 0, timeout=60, context=mt.stderr_tail)
        for pid in pids:
            clean_refreshes: set[float] = set()
            diffs: list[str] = []
            for _ in range(ATTEMPTS * 3):
                if len(clean_refreshes) >= 3:
                    break
                t0 = time.time()
                before = (_smaps(pid), _rollup(pid))
                snap = mt.stream.wait_snapshot(pid, t0, timeout=30, context=mt.stderr_tail)
                after = (_smaps(pid), _rollup(pid))
                for m in snap["mappings"]:
                    assert m["pss_bytes"] is not None, (m, mt.stderr_tail())
                    assert m["pss_bytes"] <= m["rss_bytes"] and m["uss_bytes"] <= m["rss_bytes"], \
                        (pid, m)
                refreshed = snap.get("pss_refreshed_ts") or 0
                if refreshed < t0 or not _unchanged(before, after):
                    continue
                diffs = _watch_diffs(snap, pid, *before)
                if not diffs:
                    clean_refreshes.add(refreshed)
            assert len(clean_refreshes) >= 3, (
                f"{pid}: {len(clean_refreshes)} clean refreshes; last differences:\n"
                + "\n".join(diffs) + "\n" + mt.stderr_tail())
        log = (tmp_path / "watch.log").read_text()
        assert "PSS off" not in log and "PSS unavailable" not in log
    finally:
        mt.stop()
