"""How smaps accounts one set of pagemap entries: PSS shares, private (USS)
pages and swap, PMD mappings, and which PFNs need a kpagecount read. Pure: no
I/O but `precise_mapcount_kernel` (reads the kernel's config once). The rules
and their sources are in memtrace/pss/reader.py's docstring and docs/pss.md."""

from __future__ import annotations

import contextlib
import functools
import gzip
import os
import re
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from memtrace.trace.pagemap import PFNMAP_NAMES, PM_PFN_MASK, drop_zero_pages
from memtrace.trace.procfs import PAGE_SIZE

PSS_SHIFT = 12
PM_SWAP = 1 << 62
PM_EXCLUSIVE = 1 << 56
PAGE_IS_SWAPPED = 1 << 4
ENTRY_SIZE = 8
# Not in the mm's VMA tree (the gate area) or PFN-mapped: never resident to smaps.
SKIP_NAMES = (*PFNMAP_NAMES, b"[vsyscall]")


@dataclass(slots=True)
class Usage:
    """Resident, proportional, private and swapped bytes of a set of pages.
    `pss_fixed` keeps the kernel's fixed-point fractions (bytes << PSS_SHIFT)
    so that sums round like smaps and smaps_rollup do."""

    rss: int = 0
    pss_fixed: int = 0
    uss: int = 0
    swap: int = 0

    @property
    def pss(self) -> int:
        """PSS in bytes, rounded down (smaps: pss >> PSS_SHIFT)."""
        return self.pss_fixed >> PSS_SHIFT

    @property
    def pss_kib(self) -> int:
        """PSS as smaps prints it: kB, rounded down."""
        return self.pss_fixed >> (PSS_SHIFT + 10)

    def add(self, other: Usage) -> None:
        self.rss += other.rss
        self.pss_fixed += other.pss_fixed
        self.uss += other.uss
        self.swap += other.swap

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.rss + other.rss, self.pss_fixed + other.pss_fixed,
                     self.uss + other.uss, self.swap + other.swap)


def page_share(mapcount: int, page_size: int = PAGE_SIZE) -> int:
    """Fixed-point PSS of one page mapped `mapcount` times (smaps_account)."""
    full = page_size << PSS_SHIFT
    return full // mapcount if mapcount >= 2 else full


PMD_PAGES = 512   # pages per PMD mapping (x86-64, arm64 with 4 KiB pages)

# Raw pagemap entries: bytes as read from /proc/PID/pagemap, or a list of u64.
Entries = bytes | bytearray | memoryview | Sequence[int]


def _flag_class_table() -> bytes:
    """Byte 7 of an entry (bits 56..63) -> X present and exclusive, S present
    and not exclusive, W swapped, . none."""
    table = bytearray(256)
    for b in range(256):
        if b & 0x80:
            table[b] = ord("X") if b & 0x01 else ord("S")
        elif b & 0x40:
            table[b] = ord("W")
        else:
            table[b] = ord(".")
    return bytes(table)


_CLASS = _flag_class_table()
_SLOW_PRECISE = re.compile(rb"[SH]+")
_SLOW_AVERAGE = re.compile(rb"[XSH]+")


def _raw(entries: Entries) -> bytes:
    if isinstance(entries, bytes):
        return entries
    if isinstance(entries, (bytearray, memoryview)):
        return bytes(entries)
    return array("Q", entries).tobytes()


def _classes(raw: bytes) -> bytes:
    return raw[7::ENTRY_SIZE].translate(_CLASS)


def pmd_blocks(entries: Entries, first_vpn: int | None,
               pmd_pages: int = PMD_PAGES) -> list[int]:
    """Indices of the blocks of `entries` that may be one PMD mapping: aligned
    in virtual and physical address, all present, PFNs contiguous. The
    pagemap's exclusive bit of a PMD-mapped THP is that of the folio's first
    page for all its pages (measured on 6.18: a parent's THP whose first pages
    its children had copied showed all 512 pages exclusive, smaps 8), so
    these pages are looked up one by one. Without `first_vpn` (alignment
    unknown) every index counts as such a block."""
    raw = _raw(entries)
    return _pmd_blocks(raw, memoryview(raw).cast("Q"), _classes(raw), first_vpn, pmd_pages)


def _pmd_blocks(raw: bytes, q: memoryview, cls: bytes, first_vpn: int | None,
                pmd_pages: int) -> list[int]:
    n = len(q)
    if first_vpn is None:
        return [0] if n else []
    out = []
    i = (-first_vpn) % pmd_pages
    while i + pmd_pages <= n:
        block = cls[i:i + pmd_pages]
        if b"." not in block and b"W" not in block:
            pfn = q[i] & PM_PFN_MASK
            if (pfn % pmd_pages == 0 and (q[i + pmd_pages - 1] & PM_PFN_MASK) == pfn + pmd_pages - 1
                    and [e & PM_PFN_MASK for e in q[i:i + pmd_pages]]
                    == list(range(pfn, pfn + pmd_pages))):
                out.append(i)
        i += pmd_pages
    return out


@dataclass
class _Plan:
    q: memoryview         # the entries as u64
    fast_private: int     # present pages known private with a full share, no count needed
    slow: list[range]     # indices to account page by page (with a count)
    swap: int             # swapped entries


_Prep = tuple[memoryview, bytes, list[int]]


def _prepare(entries: Entries, first_vpn: int | None, pmd_pages: int) -> _Prep:
    raw = _raw(entries)
    q = memoryview(raw).cast("Q")
    cls = _classes(raw)
    return q, cls, _pmd_blocks(raw, q, cls, first_vpn, pmd_pages)


def _plan(entries: Entries, precise_mapcount: bool, first_vpn: int | None,
          pmd_pages: int, prep: _Prep | None = None) -> _Plan:
    q, cls, blocks = prep if prep is not None else _prepare(entries, first_vpn, pmd_pages)
    if blocks:
        marked = bytearray(cls)
        if first_vpn is None:
            marked[:] = bytes(c if c in b".W" else ord("H") for c in cls)
        else:
            for b in blocks:
                marked[b:b + pmd_pages] = b"H" * pmd_pages
        cls = bytes(marked)
    pattern = _SLOW_PRECISE if precise_mapcount else _SLOW_AVERAGE
    slow = [range(m.start(), m.end()) for m in pattern.finditer(cls)]
    fast = cls.count(b"X") if precise_mapcount else 0
    return _Plan(q, fast, slow, cls.count(b"W"))


def wanted_pfns(entries: Entries, zero_pfns: frozenset[int] = frozenset(),
                precise_mapcount: bool = True, first_vpn: int | None = None,
                pmd_pages: int = PMD_PAGES) -> list[int]:
    """PFNs of `entries` whose /proc/kpagecount `account` needs: every present
    page but the zero pages and, with a precise mapcount, pages whose exclusive
    bit says mapcount 1 outside a possible PMD mapping."""
    raw = drop_zero_pages(_raw(entries), zero_pfns)
    return _wanted(_plan(raw, precise_mapcount, first_vpn, pmd_pages))


def _wanted(plan: _Plan) -> list[int]:
    q = plan.q
    return [q[i] & PM_PFN_MASK for r in plan.slow for i in r]


def account(entries: Entries, counts: Mapping[int, int],
            zero_pfns: frozenset[int] = frozenset(), page_size: int = PAGE_SIZE,
            precise_mapcount: bool = True, usage: Usage | None = None,
            first_vpn: int | None = None, pmd_pages: int = PMD_PAGES) -> Usage:
    """Add the pages of raw pagemap `entries` (u64 each, or the bytes read;
    the first one is virtual page `first_vpn`) to `usage`, as smaps_account
    does.

    `counts` maps PFN -> /proc/kpagecount for every PFN `wanted_pfns` names; a
    missing PFN counts as mapped once. With a precise mapcount (the default
    kernel config) a page is private when its count is below 2, and pages
    whose exclusive bit is set outside a possible PMD mapping are private
    without a count; otherwise (CONFIG_NO_PAGE_MAPCOUNT) private is the
    exclusive bit. Zero pages (`zero_pfns`) are skipped, as smaps skips them
    (memtrace.trace.pagemap.drop_zero_pages). Swapped entries add to swap only."""
    raw = drop_zero_pages(_raw(entries), zero_pfns)
    return _account(_plan(raw, precise_mapcount, first_vpn, pmd_pages), counts,
                    page_size, precise_mapcount, usage)


def _account(plan: _Plan, counts: Mapping[int, int], page_size: int,
             precise_mapcount: bool, usage: Usage | None) -> Usage:
    """Account a plan of entries from which the zero pages were dropped."""
    u = usage if usage is not None else Usage()
    full = page_size << PSS_SHIFT
    q = plan.q
    pages = shared = pss = 0
    for r in plan.slow:
        for i in r:
            entry = q[i]
            pfn = entry & PM_PFN_MASK
            pages += 1
            n = counts.get(pfn, 1)
            if n >= 2:
                pss += full // n
                if precise_mapcount or not entry & PM_EXCLUSIVE:
                    shared += 1
            else:
                pss += full
                if not precise_mapcount and not entry & PM_EXCLUSIVE:
                    shared += 1
    pages += plan.fast_private
    u.rss += pages * page_size
    u.pss_fixed += pss + plan.fast_private * full
    u.uss += (pages - shared) * page_size
    u.swap += plan.swap * page_size
    return u


def _private_only(raw: bytes) -> Usage | None:
    """The Usage of raw entries (fewer than a PMD's worth: no PMD mapping
    among them) whose present pages are all exclusive, with a precise
    mapcount: each is private with a full share, no kpagecount needed; None
    when some present page may be shared."""
    return private_only_classes(raw[7::ENTRY_SIZE].translate(_CLASS))


def private_only_classes(cls: bytes) -> Usage | None:
    """_private_only of entries given by their classes (_classes: one byte each)."""
    if b"S" in cls:
        return None
    pages = cls.count(b"X")
    return Usage(rss=pages * PAGE_SIZE, pss_fixed=(pages * PAGE_SIZE) << PSS_SHIFT,
                 uss=pages * PAGE_SIZE, swap=cls.count(b"W") * PAGE_SIZE)


def pfn_ranges(pfns: Iterable[int], max_gap: int = 32) -> list[tuple[int, int]]:
    """Sorted [first, last) PFN ranges covering `pfns`, merging ranges whose gap
    is at most `max_gap` PFNs (one read of a few extra entries beats a syscall)."""
    ranges: list[tuple[int, int]] = []
    for pfn in sorted(set(pfns)):
        if ranges and pfn - ranges[-1][1] <= max_gap:
            ranges[-1] = (ranges[-1][0], pfn + 1)
        else:
            ranges.append((pfn, pfn + 1))
    return ranges


def precise_mapcount_kernel(proc_root: str = "/proc", boot: str = "/boot") -> bool:
    """False when the running kernel was built with CONFIG_NO_PAGE_MAPCOUNT
    (6.15+, optional): then kpagecount is a per-folio average and the
    exclusive bit no longer implies a mapcount of 1. Unknown config: True."""
    text = b""
    with contextlib.suppress(OSError), gzip.open(f"{proc_root}/config.gz", "rb") as f:
        text = f.read()
    if not text:
        with contextlib.suppress(OSError), open(f"{boot}/config-{os.uname().release}",
                                                "rb") as g:
            text = g.read()
    return b"\nCONFIG_NO_PAGE_MAPCOUNT=y" not in text


@functools.cache
def _running_kernel_precise() -> bool:
    return precise_mapcount_kernel()
