"""memtrace.pss.reader and memtrace.commands.libs on fixtures: pagemap entries, kpagecount and
fake /proc trees (no root needed)."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from memtrace.commands import libs as libs_mod
from memtrace.errors import ExitCode, MemtraceError
from memtrace.pss.accounting import (
    PM_EXCLUSIVE,
    PM_SWAP,
    PMD_PAGES,
    PSS_SHIFT,
    Usage,
    account,
    page_share,
    pfn_ranges,
    pmd_blocks,
    precise_mapcount_kernel,
    wanted_pfns,
)
from memtrace.pss.reader import KPageCounts, PssReader, clip
from memtrace.trace.procfs import ProcFS, Vma
from memtrace.util.elf import load_span
from memtrace.util.ranges import merge_ranges as coalesce

P = 4096
PRESENT = 1 << 63
FILE = 1 << 61


def present(pfn: int, exclusive: bool = False, file: bool = False) -> int:
    return PRESENT | pfn | (PM_EXCLUSIVE if exclusive else 0) | (FILE if file else 0)


# -- the pure core ---------------------------------------------------------------
def test_page_share_is_the_kernels_fixed_point_division():
    assert page_share(1, P) == P << PSS_SHIFT
    assert page_share(0, P) == P << PSS_SHIFT
    assert page_share(2, P) == (P << PSS_SHIFT) // 2
    assert page_share(3, P) == 5592405          # 2**24 // 3, truncated


def test_exclusive_small_pages_are_private_without_a_count():
    entries = [present(10, exclusive=True), present(11, exclusive=True)]
    assert wanted_pfns(entries, first_vpn=0) == []
    u = account(entries, {}, first_vpn=0)
    assert (u.rss, u.pss, u.uss, u.swap) == (2 * P, 2 * P, 2 * P, 0)


def test_shared_pages_divide_by_their_map_count_and_round_like_smaps():
    entries = [present(20, file=True), present(21, file=True), present(22, file=True)]
    counts = {20: 3, 21: 3, 22: 1}
    assert wanted_pfns(entries, first_vpn=0) == [20, 21, 22]
    u = account(entries, counts, first_vpn=0)
    assert u.rss == 3 * P
    assert u.pss_fixed == 2 * ((P << PSS_SHIFT) // 3) + (P << PSS_SHIFT)
    assert u.pss == u.pss_fixed >> PSS_SHIFT == 6826
    assert u.pss_kib == 6                      # smaps prints floor(6826.66 / 1024)
    assert u.uss == P                          # the page mapped once is private


def test_zero_pages_and_holes_do_not_count_and_swap_is_separate():
    entries = [present(7), 0, PM_SWAP | 123, present(8, exclusive=True)]
    u = account(entries, {}, zero_pfns=frozenset({7}), first_vpn=0)
    assert (u.rss, u.pss, u.uss, u.swap) == (P, P, P, P)
    assert wanted_pfns(entries, frozenset({7}), first_vpn=0) == []


def test_pmd_mapped_block_is_looked_up_page_by_page():
    # A PMD-mapped THP whose exclusive bit (the head page's) says "private"
    # although its other pages are mapped by 3 processes.
    base = 512 * 100
    entries = [present(base + i, exclusive=True) for i in range(PMD_PAGES)]
    counts = {base + i: (1 if i < 8 else 3) for i in range(PMD_PAGES)}
    assert pmd_blocks(entries, first_vpn=512 * 7) == [0]
    assert len(wanted_pfns(entries, first_vpn=512 * 7)) == PMD_PAGES
    u = account(entries, counts, first_vpn=512 * 7)
    assert u.uss == 8 * P
    assert u.pss_fixed == 8 * (P << PSS_SHIFT) + 504 * ((P << PSS_SHIFT) // 3)
    # Not aligned in virtual memory: cannot be one PMD mapping; trusted bit.
    assert pmd_blocks(entries, first_vpn=512 * 7 + 1) == []
    assert account(entries, counts, first_vpn=512 * 7 + 1).uss == PMD_PAGES * P
    # Alignment unknown: everything is looked up.
    assert account(entries, counts).uss == 8 * P


def test_not_contiguous_in_physical_memory_is_not_a_pmd_block():
    entries = [present(512 * 4 + i, exclusive=True) for i in range(PMD_PAGES)]
    entries[100] = present(9, exclusive=True)
    assert pmd_blocks(entries, first_vpn=0) == []


def test_without_precise_mapcount_private_is_the_exclusive_bit():
    # CONFIG_NO_PAGE_MAPCOUNT: kpagecount is a folio average, exclusivity folio-wide
    entries = [present(30, exclusive=True), present(31)]
    counts = {30: 2, 31: 1}
    assert wanted_pfns(entries, precise_mapcount=False, first_vpn=0) == [30, 31]
    u = account(entries, counts, precise_mapcount=False, first_vpn=0)
    assert u.uss == P
    assert u.pss_fixed == (P << PSS_SHIFT) // 2 + (P << PSS_SHIFT)


def test_usage_sums_keep_fractions():
    a = account([present(1)], {1: 3}, first_vpn=0)
    b = account([present(2)], {2: 3}, first_vpn=0)
    both = a + b
    assert both.pss_fixed == a.pss_fixed + b.pss_fixed
    assert both.pss == (2 * ((P << PSS_SHIFT) // 3)) >> PSS_SHIFT
    a.add(b)
    assert a == both


def test_pfn_ranges_merge_small_gaps():
    assert pfn_ranges([5, 3, 4, 100, 40], max_gap=32) == [(3, 6), (40, 41), (100, 101)]
    assert pfn_ranges([1, 10], max_gap=9) == [(1, 11)]
    assert pfn_ranges([]) == []


def test_clip_and_coalesce():
    runs = [(0, 10), (20, 30), (40, 50)]
    assert clip(runs, 5, 45) == [(5, 10), (20, 30), (40, 45)]
    assert clip(runs, 10, 20) == []
    assert coalesce([(0, 10), (12, 20), (40, 50)], max_gap=2) == [(0, 20), (40, 50)]


def test_precise_mapcount_from_kernel_config(tmp_path):
    (tmp_path / "config.gz").write_bytes(gzip.compress(b"#\nCONFIG_PAGE_MAPCOUNT=y\n"))
    assert precise_mapcount_kernel(str(tmp_path), str(tmp_path))
    (tmp_path / "config.gz").write_bytes(gzip.compress(b"#\nCONFIG_NO_PAGE_MAPCOUNT=y\n"))
    assert not precise_mapcount_kernel(str(tmp_path), str(tmp_path))
    assert precise_mapcount_kernel(str(tmp_path / "none"), str(tmp_path / "none"))


# -- fixture /proc trees ---------------------------------------------------------
def write_u64s(path: Path, values: dict[int, int], size: int = 0) -> None:
    """A sparse file of u64 values at index -> value, at least `size` entries."""
    with open(path, "wb") as f:
        for index, value in sorted(values.items()):
            f.seek(index * 8)
            f.write(struct.pack("<Q", value))
        last = max(values) if values else 0
        f.truncate(max(last + 1, size) * 8)


def write_kpagecount(root: Path, counts: dict[int, int]) -> None:
    write_u64s(root / "kpagecount", counts)


def maps_line(v: Vma) -> str:
    return (f"{v.start:x}-{v.end:x} {v.perms} {v.offset:08x} {v.dev} {v.inode}"
            f"{'                 ' + v.path.decode() if v.path else ''}\n")


def make_proc(root: Path, pid: int, comm: str, vmas: list[Vma], entries: dict[int, int],
              flags: int = 0, state: str = "S") -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "maps").write_text("".join(maps_line(v) for v in vmas))
    fields = [state, "1", "1", "1", "0", "-1", str(flags)] + ["0"] * 12 + ["12345"]
    (d / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)} 0 0\n")
    (d / "status").write_text(f"Name:\t{comm}\nTgid:\t{pid}\n")
    write_u64s(d / "pagemap", {addr // P: e for addr, e in entries.items()},
               max((v.end // P for v in vmas), default=0))


LIBC = b"/usr/lib/libc.so.6"
BASE = 0x7F0000000000


def libc_vmas(base: int = BASE) -> list[Vma]:
    return [
        Vma(base, base + 2 * P, "r--p", 0, "08:01", 77, LIBC),
        Vma(base + 2 * P, base + 4 * P, "r-xp", 2 * P, "08:01", 77, LIBC),
        Vma(base + 4 * P, base + 5 * P, "rw-p", 4 * P, "08:01", 77, LIBC),
        Vma(base + 5 * P, base + 8 * P, "rw-p", 0, "00:00", 0, b""),   # bss + more anon
    ]


def test_reader_on_a_fixture_tree(tmp_path):
    vmas = libc_vmas()
    entries = {BASE: present(100, file=True), BASE + P: present(101, file=True),
               BASE + 2 * P: present(102, file=True),
               BASE + 4 * P: present(300, exclusive=True),
               BASE + 5 * P: present(400, exclusive=True), BASE + 6 * P: PM_SWAP | 5,
               BASE + 7 * P: present(1)}   # the zero page
    make_proc(tmp_path, 42, "app", vmas, entries)
    write_kpagecount(tmp_path, {100: 2, 101: 4, 102: 1})
    counts = KPageCounts(str(tmp_path))
    with PssReader(42, str(tmp_path), counts, zero_pfns=frozenset({1}), precise_mapcount=True,
                   use_scan=False) as r:
        got = r.usage(vmas)
    full = P << PSS_SHIFT
    assert got[0] == Usage(2 * P, full // 2 + full // 4, 0, 0)
    assert got[1] == Usage(P, full, P, 0)
    assert got[2] == Usage(P, full, P, 0)
    assert got[3] == Usage(P, full, P, P)
    assert counts.reads == 1                  # PFNs 100..102: one read
    # Restricted to runs: only what is inside them counts.
    with PssReader(42, str(tmp_path), counts, zero_pfns=frozenset({1}), use_scan=False) as r:
        got = r.usage(vmas, runs=[(BASE + P, BASE + 2 * P)])
    assert [u.rss for u in got] == [P, 0, 0, 0]
    # the address-space model's runs, (start, end, anon), work as they are
    with PssReader(42, str(tmp_path), counts, zero_pfns=frozenset({1}), use_scan=False) as r:
        got = r.usage(vmas, runs=[(BASE, BASE + 2 * P, False), (BASE + 4 * P, BASE + 6 * P, True)])
    assert [u.rss for u in got] == [2 * P, 0, P, P]
    counts.close()


def test_hidden_pfns_are_an_error_not_wrong_figures(tmp_path):
    vmas = libc_vmas()
    make_proc(tmp_path, 43, "app", vmas, {BASE: present(0, file=True)})
    write_kpagecount(tmp_path, {0: 5})
    with PssReader(43, str(tmp_path), zero_pfns=frozenset(), use_scan=False) as r, \
            pytest.raises(PermissionError):
        r.usage(vmas)


def test_reader_of_a_process_that_has_gone(tmp_path):
    write_kpagecount(tmp_path, {})
    with pytest.raises(ProcessLookupError):
        PssReader(4242, str(tmp_path), use_scan=False, zero_pfns=frozenset())


def elf_header(lo: int, hi: int) -> bytes:
    """A minimal ELF64 header with two PT_LOADs spanning [lo, hi)."""
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 32, 64)               # e_phoff
    struct.pack_into("<HH", ehdr, 54, 56, 2)           # e_phentsize, e_phnum
    ph1 = struct.pack("<IIQQQQQQ", 1, 5, 0, lo, lo, 0x1000, 0x1000, 0x1000)
    ph2 = struct.pack("<IIQQQQQQ", 1, 6, 0x1000, lo + 0x4000, lo + 0x4000, 0x100,
                      hi - lo - 0x4000, 0x1000)
    return bytes(ehdr) + ph1 + ph2


def test_elf_load_span():
    assert load_span(elf_header(0, 0x5800)) == (0, 0x5800)
    assert load_span(b"not an elf") is None


def test_library_of_splits_the_bss_from_later_anonymous_memory():
    vmas = libc_vmas()
    # PT_LOADs end 1.5 pages after the data segment's file page: bss = 2 pages
    pieces = libs_mod.library_of(vmas, b"/bin/app", elf_span=lambda v: (0, 6 * P + 0x800))
    keys = [(p.start - BASE, p.end - BASE, k) for p, k in pieces]
    lib = ("08:01", 77)
    assert keys == [(0, 2 * P, lib), (2 * P, 4 * P, lib), (4 * P, 5 * P, lib),
                    (5 * P, 7 * P, lib), (7 * P, 8 * P, None)]
    # ELF unknown: no bss, the anonymous mapping stays the process's own
    pieces = libs_mod.library_of(vmas, b"/bin/app", elf_span=lambda v: None)
    assert [k for _, k in pieces] == [lib, lib, lib, None]


def fixture_machine(tmp_path: Path) -> ProcFS:
    # Two processes map libc; page 100 is shared by both (count 2), 101 by 2
    # processes and a third mapping elsewhere (count 3).
    for pid, private_pfn in ((10, 500), (11, 600)):
        vmas = libc_vmas()
        entries = {BASE: present(100, file=True), BASE + P: present(101, file=True),
                   BASE + 4 * P: present(private_pfn, exclusive=True),
                   BASE + 5 * P: present(private_pfn + 1, exclusive=True)}
        make_proc(tmp_path, pid, f"app{pid}", vmas, entries)
    make_proc(tmp_path, 2, "kthreadd", [], {}, flags=0x00200000)
    write_kpagecount(tmp_path, {100: 2, 101: 3})
    return ProcFS(tmp_path)


def test_collect_and_render(tmp_path, monkeypatch):
    procfs = fixture_machine(tmp_path)
    monkeypatch.setattr(libs_mod, "_read_elf_span", lambda pid, root, v: (0, 6 * P))
    monkeypatch.setattr("memtrace.pss.reader.PssReader.find_runs",
                        lambda self, vmas: [(v.start, v.end) for v in vmas])
    report = libs_mod.collect(None, procfs)
    assert report.skipped["kernel_threads"] == 1
    assert [p.pid for p in report.processes] == [10, 11]
    lib = report.libraries[("08:01", 77)]
    full = P << PSS_SHIFT
    per_pid = full // 2 + full // 3 + 2 * full     # shared, shared, data page, bss page
    assert lib.per_pid[10] == Usage(4 * P, per_pid, 2 * P, 0)
    assert lib.total.pss_fixed == 2 * per_pid
    doc = json.loads(libs_mod.render_json(report, "pss"))
    assert doc["libraries"][0]["path"] == LIBC.decode()
    assert doc["libraries"][0]["process_count"] == 2
    assert doc["libraries"][0]["pss_bytes"] == (2 * per_pid) >> PSS_SHIFT
    assert doc["totals"]["pss_bytes"] == (2 * per_pid) >> PSS_SHIFT
    assert doc["skipped"] == {"kernel_threads": 1}
    csv_text = libs_mod.render_csv(report, "name")
    assert csv_text.splitlines()[0].startswith("library,pid,comm,rss_bytes")
    assert f"{LIBC.decode()},10,app10,{4 * P}," in csv_text
    table = libs_mod.render_table(report, "rss")
    assert "(2 processes)" in table and "app11 [11]" in table
    assert "skipped: 1 kernel threads" in table
    # one unit style (issue 11): IEC units, or exact bytes with --bytes
    from memtrace.util.units import fmt_bytes
    row = next(line for line in table.splitlines() if line.endswith("app10 [10]"))
    assert row.split()[:2] == fmt_bytes(4 * P).split() == ["16.0", "KiB"]
    exact = libs_mod.render_table(report, "rss", exact=True)
    row = next(line for line in exact.splitlines() if line.endswith("app10 [10]"))
    assert row.split()[0] == str(4 * P)


def test_a_process_that_exits_mid_walk_is_skipped_and_counted(tmp_path, monkeypatch):
    procfs = fixture_machine(tmp_path)
    monkeypatch.setattr(libs_mod, "_read_elf_span", lambda pid, root, v: None)
    real_maps = ProcFS.maps

    def maps(self, pid):
        if pid == 11:
            raise FileNotFoundError(pid)
        return real_maps(self, pid)

    monkeypatch.setattr(ProcFS, "maps", maps)
    monkeypatch.setattr("memtrace.pss.reader.PssReader.find_runs",
                        lambda self, vmas: [(v.start, v.end) for v in vmas])
    report = libs_mod.collect([10, 11], procfs)
    assert [p.pid for p in report.processes] == [10]
    assert report.skipped == {"exited": 1}


def test_libs_command_errors(tmp_path, monkeypatch):
    procfs = fixture_machine(tmp_path)
    with pytest.raises(MemtraceError) as e:
        libs_mod.libs_command((), False, "pss", "table", procfs=procfs)
    assert e.value.code == ExitCode.USAGE
    with pytest.raises(MemtraceError) as e:
        libs_mod.libs_command((10,), True, "pss", "table", procfs=procfs)
    assert e.value.code == ExitCode.USAGE
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(MemtraceError) as e:
        libs_mod.libs_command((10,), False, "pss", "table", procfs=procfs)
    assert e.value.code == ExitCode.NOT_ROOT
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(MemtraceError) as e:
        libs_mod.libs_command((99,), False, "pss", "table", procfs=procfs)
    assert e.value.code == ExitCode.NO_SUCH_PROCESS
    with pytest.raises(MemtraceError) as e:
        libs_mod.libs_command((2,), False, "pss", "table", procfs=procfs)
    assert e.value.code == ExitCode.KERNEL_THREAD


def test_libs_cli_usage_error_exit_code(monkeypatch, capsys):
    from memtrace.commands import main as cli

    monkeypatch.setattr("sys.argv", ["memtrace", "libs", "--sort", "bogus", "1"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == ExitCode.USAGE


def test_private_only_fast_path_agrees_with_account():
    """Runs below a PMD with only exclusive (and swapped) pages need no
    kpagecount: the shortcut gives what account gives; a possibly shared
    page sends the run to the slow path."""
    from array import array

    from memtrace.pss.accounting import PM_EXCLUSIVE, PM_SWAP, _private_only, account

    present = 1 << 63
    exclusive = [present | PM_EXCLUSIVE | (0x1000 + i) for i in range(5)] + [0, PM_SWAP | 7]
    raw = array("Q", exclusive).tobytes()
    assert _private_only(raw) == account(exclusive, {}, first_vpn=0)
    assert _private_only(raw) == Usage(rss=5 * 4096, pss_fixed=(5 * 4096) << 12,
                                       uss=5 * 4096, swap=4096)
    shared = exclusive + [present | 0x2000]
    assert _private_only(array("Q", shared).tobytes()) is None


# -- zero-page PTEs (issue 16, items 1 and 2) --------------------------------------
ZERO = 0x9999     # the zero page's PFN in these fixtures


def test_drop_zero_pages_empties_only_zero_page_entries():
    from array import array

    from memtrace.trace.pagemap import drop_zero_pages

    entries = [present(10, exclusive=True), present(ZERO), present(ZERO + 1, file=True),
               PM_SWAP | ZERO, 0, present(11)]
    raw = array("Q", entries).tobytes()
    got = list(memoryview(drop_zero_pages(raw, frozenset({ZERO, ZERO + 1}))).cast("Q"))
    # the small zero page (anonymous-looking) and the huge zero page (PM_FILE
    # set: a folio not anon) go; a swap entry whose offset looks like the PFN stays
    assert got == [entries[0], 0, 0, PM_SWAP | ZERO, 0, entries[5]]
    assert drop_zero_pages(raw, frozenset()) is raw
    # a neighbour of the zero page's PFN (same PFN bits 8..47) is not one
    near = array("Q", [present(ZERO - 1), present(ZERO + 2)]).tobytes()
    assert drop_zero_pages(near, frozenset({ZERO, ZERO + 1})) is near
    # the huge zero page: 512 PFNs from a 512-aligned head, mapped by a PMD
    head = 0x166E00
    huge = frozenset(range(head, head + PMD_PAGES)) | {ZERO}
    block = array("Q", [0] + [present(head + i, file=True) for i in range(PMD_PAGES)]
                  + [present(head + PMD_PAGES, file=True)]).tobytes()
    got = list(memoryview(drop_zero_pages(block, huge)).cast("Q"))
    assert got == [0] * (PMD_PAGES + 1) + [present(head + PMD_PAGES, file=True)]
    # a zero page below PFN 256 (all-zero pattern bytes) is still found
    low = array("Q", [0, present(3), present(4)]).tobytes()
    assert list(memoryview(drop_zero_pages(low, frozenset({3}))).cast("Q")) == [0, 0, present(4)]
    clean = array("Q", [entries[0], entries[5]]).tobytes()
    assert drop_zero_pages(clean, frozenset({ZERO})) is clean


def bss_fixture(tmp_path: Path, pid: int) -> tuple[list[Vma], dict[int, int]]:
    """libc's segments and a 13-page bss whose never-written pages map the zero
    page (read after a fork, as in nginx workers): pages 0, 3, 6, 9, 12
    resident, the 8 others zero-page PTEs, all within 16 pages of each other."""
    vmas = libc_vmas()[:3] + [Vma(BASE + 5 * P, BASE + 18 * P, "rw-p", 0, "00:00", 0, b"")]
    entries = {BASE: present(100, file=True)}
    for i in range(13):
        entries[BASE + (5 + i) * P] = (present(500 + i, exclusive=True) if i % 3 == 0
                                       else present(ZERO))
    make_proc(tmp_path, pid, "worker", vmas, entries)
    write_kpagecount(tmp_path, {100: 2, **{500 + i: 1 for i in range(13)}})
    return vmas, entries


BSS_WANT = Usage(5 * P, (5 * P) << PSS_SHIFT, 5 * P, 0)


def test_zero_page_ptes_between_scanned_runs_do_not_count(tmp_path):
    """PAGEMAP_SCAN leaves the zero pages out of its runs, but one pread spans
    nearby runs: the entries read in between are not resident, whatever they
    say, even when the zero page's PFN is not known (the scan path never
    needed it). Before the fix the bss had RSS, PSS and USS of 13 pages, and
    smaps 5."""
    vmas, _ = bss_fixture(tmp_path, 50)
    runs = [(BASE, BASE + P)] + [(BASE + (5 + i) * P, BASE + (6 + i) * P) for i in range(0, 13, 3)]
    with PssReader(50, str(tmp_path), zero_pfns=frozenset(), use_scan=False) as r:
        got = r.usage(vmas, runs)
    assert got[3] == BSS_WANT
    assert got[0] == Usage(P, (P << PSS_SHIFT) // 2, 0, 0)
    assert all(u.pss <= u.rss and u.uss <= u.rss for u in got)


def test_zero_page_ptes_are_dropped_by_pfn_when_whole_mappings_are_read(tmp_path):
    """The fallback without PAGEMAP_SCAN reads whole VMAs: the zero page is
    recognised by its PFN, in the same place (drop_zero_pages)."""
    vmas, _ = bss_fixture(tmp_path, 51)
    with PssReader(51, str(tmp_path), zero_pfns=frozenset({ZERO}), use_scan=False) as r:
        got = r.usage(vmas)
    assert got[3] == BSS_WANT
    # and the public core agrees
    entries = [present(ZERO), present(7, exclusive=True)]
    assert account(entries, {}, zero_pfns=frozenset({ZERO}), first_vpn=0) == \
        Usage(P, P << PSS_SHIFT, P, 0)
    assert wanted_pfns(entries, frozenset({ZERO}), first_vpn=0) == []


def test_present_pages_outside_the_resident_runs_do_not_count(tmp_path):
    """`resident` (the live model's runs): PSS never counts a page the RSS
    does not, even when the runs read cover it; swapped entries still count."""
    vmas, entries = bss_fixture(tmp_path, 52)
    entries[BASE + 7 * P] = PM_SWAP | 77
    make_proc(tmp_path, 53, "worker", vmas, entries)
    resident = [(BASE + 5 * P, BASE + 6 * P), (BASE + 11 * P, BASE + 12 * P)]
    with PssReader(53, str(tmp_path), zero_pfns=frozenset(), use_scan=False) as r:
        got = r.usage(vmas, [(v.start, v.end) for v in vmas], resident=resident)
    assert got[3] == Usage(2 * P, (2 * P) << PSS_SHIFT, 2 * P, P)
    assert [u.rss for u in got[:3]] == [0, 0, 0]


def test_mappings_accounted_in_batches_give_the_same_figures(tmp_path, monkeypatch):
    """PssReader.usage accounts many VMAs USAGE_BATCH at a time (bounded memory
    at 60k mappings): with a batch of 1, 2 or 3, runs that span two mappings
    (PAGEMAP_SCAN coalesces them) and resident runs cut at batch borders give
    exactly what one pass gives, with and without runs."""
    import memtrace.pss.reader as reader

    vmas, _ = bss_fixture(tmp_path, 54)
    spanning = [(BASE, BASE + 5 * P)] + [(BASE + (5 + i) * P, BASE + (6 + i) * P)
                                         for i in range(0, 13, 3)]
    resident = [(BASE, BASE + 3 * P), (BASE + 4 * P, BASE + 12 * P)]
    cases: list[dict[str, Any]] = [{}, {"runs": spanning}, {"runs": spanning,
                                                              "resident": resident}]
    with PssReader(54, str(tmp_path), zero_pfns=frozenset({ZERO}), use_scan=False) as r:
        want = [r.usage(vmas, **kw) for kw in cases]
        for batch in (1, 2, 3):
            monkeypatch.setattr(reader, "USAGE_BATCH", batch)
            assert [r.usage(vmas, **kw) for kw in cases] == want, batch
    assert want[0][3] == want[1][3] == BSS_WANT
    assert want[2][0].rss == P and want[2][3].rss == 3 * P     # bss pages 0, 3, 6 resident
