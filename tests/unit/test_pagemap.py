"""memtrace.trace.pagemap.PagemapScanner on our own address space (no root needed;
skipped on kernels without PAGEMAP_SCAN)."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from memtrace.trace.pagemap import _VEC_LEN, PagemapScanner, ScanUnsupported, probe_pagemap_scan

P = mmap.PAGESIZE


@pytest.fixture(scope="module")
def scanner():
    ok, why = probe_pagemap_scan()
    if not ok:
        pytest.skip(f"PAGEMAP_SCAN unavailable: {why}")
    s = PagemapScanner(os.getpid())
    yield s
    s.close()


def anon_region(npages: int) -> tuple[mmap.mmap, int]:
    m = mmap.mmap(-1, npages * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        m.madvise(mmap.MADV_NOHUGEPAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    return m, addr


def test_exact_runs_of_touched_pages(scanner):
    m, addr = anon_region(16)
    for i in (0, 1, 2, 5, 9, 15):
        m[i * P] = 1
    runs = scanner.scan(addr, addr + 16 * P)
    assert runs == [
        (addr, addr + 3 * P, True),
        (addr + 5 * P, addr + 6 * P, True),
        (addr + 9 * P, addr + 10 * P, True),
        (addr + 15 * P, addr + 16 * P, True),
    ]
    # a read of an untouched page maps the zero page, which is not counted
    _ = m[7 * P]
    assert scanner.scan(addr + 6 * P, addr + 9 * P) == []


def test_file_pages_are_not_anon(scanner, tmp_path):
    f = tmp_path / "data"
    f.write_bytes(b"x" * (4 * P))
    with open(f, "r+b") as fh:
        m = mmap.mmap(fh.fileno(), 4 * P, flags=mmap.MAP_SHARED)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    _ = m[0]
    _ = m[2 * P]
    runs = scanner.scan(addr, addr + 4 * P)
    assert [r for r in runs if not r[2]] == runs
    # fault-around may map more cached pages than were read, never fewer
    covered = {a for s, e, _ in runs for a in range(s, e, P)}
    assert {addr, addr + 2 * P} <= covered
    assert all(addr <= s < e <= addr + 4 * P for s, e, _ in runs)


def test_more_runs_than_one_vector(scanner):
    """More regions than one ioctl returns: the scanner resumes without loss or overlap."""
    n = _VEC_LEN + 300
    m, addr = anon_region(2 * n)
    for i in range(n):
        m[2 * i * P] = 1
    runs = scanner.scan(addr, addr + 2 * n * P)
    assert len(runs) == n
    assert runs == [(addr + 2 * i * P, addr + (2 * i + 1) * P, True) for i in range(n)]
    assert scanner.ioctls >= 2


def test_unknown_pid():
    with pytest.raises(FileNotFoundError):
        PagemapScanner(2**22 + 12345)


def test_scan_unsupported_is_oserror():
    assert issubclass(ScanUnsupported, OSError)


def test_thp_mode_and_huge_page_size_from_sysfs(tmp_path):
    from memtrace.trace.pagemap import huge_page_size, thp_mode

    (tmp_path / "enabled").write_text("always [madvise] never\n")
    (tmp_path / "hpage_pmd_size").write_text("2097152\n")
    assert thp_mode(str(tmp_path)) == "madvise"
    assert huge_page_size(str(tmp_path)) == 2 << 20
    (tmp_path / "enabled").write_text("[always] madvise never\n")
    assert thp_mode(str(tmp_path)) == "always"
    assert thp_mode(str(tmp_path / "absent")) == "never"
    assert huge_page_size(str(tmp_path / "absent")) == 2 << 20
