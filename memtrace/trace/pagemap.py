"""Exact resident pages of an address range, from the kernel's page tables.

Uses the PAGEMAP_SCAN ioctl (Linux 6.7+) on /proc/PID/pagemap, asking for pages
that are present and not the shared zero page, which is exactly what smaps Rss
counts. Each returned run says whether its pages are anonymous (PAGE_IS_FILE
clear) or file/shmem backed.

What smaps counts as resident, for every reader of raw pagemap entries (the
fallback below, and memtrace.pss.reader): a present entry, except one that maps the
shared zero page or the huge zero page. Those are present in the page tables
(pagemap sets PM_PRESENT and shows their PFN) but smaps skips them, because
vm_normal_page() is NULL for them (the huge zero page: the PMD walk's
is_huge_zero_pmd() test). `drop_zero_pages` turns such entries into empty ones;
PAGEMAP_SCAN readers exclude them with the PAGE_IS_PFNZERO category."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
from collections.abc import Callable

PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6


class _PmScanArg(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("walk_end", ctypes.c_uint64),
        ("vec", ctypes.c_uint64),
        ("vec_len", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("category_inverted", ctypes.c_uint64),
        ("category_mask", ctypes.c_uint64),
        ("category_anyof_mask", ctypes.c_uint64),
        ("return_mask", ctypes.c_uint64),
    ]


class _PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("categories", ctypes.c_uint64)]


# _IOWR('f', 16, struct pm_scan_arg)
PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(_PmScanArg) << 16) | (ord("f") << 8) | 16
_VEC_LEN = 2048

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int

# (start, end, anon): one run of resident pages of one kind
Run = tuple[int, int, bool]
# (start, end) -> the VMAs overlapping it, as (start, end, path)
VmaSource = Callable[[int, int], list[tuple[int, int, bytes]]]


class ScanUnsupported(OSError):
    pass


class _PagemapFile:
    """An open /proc/PID/pagemap (bound to the address space it was opened on)."""

    def __init__(self, pid: int, proc_root: str) -> None:
        self.pid = pid
        self.fd = os.open(f"{proc_root}/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self.ioctls = 0     # kernel calls made: ioctls, or preads for the fallback

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PagemapScanner(_PagemapFile):
    """PAGEMAP_SCAN on one process. Raises ProcessLookupError once it has gone."""

    mechanism = "PAGEMAP_SCAN"

    def __init__(self, pid: int, proc_root: str = "/proc") -> None:
        super().__init__(pid, proc_root)
        self._vec = (_PageRegion * _VEC_LEN)()
        self._arg = _PmScanArg()


    def scan(self, start: int, end: int) -> list[Run]:
        """Resident runs in [start, end), in address order. Runs are coalesced
        by the kernel across adjacent VMAs: callers clip them to VMA bounds."""
        regions, ioctls = pagemap_scan(
            self.fd, self.pid, self._arg, self._vec, start, end,
            category_mask=PAGE_IS_PRESENT | PAGE_IS_PFNZERO, category_anyof_mask=0,
            return_mask=PAGE_IS_PRESENT | PAGE_IS_FILE)
        self.ioctls += ioctls
        return [(r_start, r_end, not (cats & PAGE_IS_FILE)) for r_start, r_end, cats in regions]

    def huge(self, addr: int) -> bool | None:
        """Whether a huge page (a PMD mapping) holds the page at addr; None if
        no page is mapped there."""
        page = addr & ~4095
        regions, ioctls = pagemap_scan(
            self.fd, self.pid, self._arg, self._vec, page, page + 4096,
            category_mask=PAGE_IS_PRESENT | PAGE_IS_PFNZERO, category_anyof_mask=0,
            return_mask=PAGE_IS_HUGE)
        self.ioctls += ioctls
        if not regions:
            return None
        return any(cats & PAGE_IS_HUGE for _, _, cats in regions)


def pagemap_scan(fd: int, pid: int, arg: _PmScanArg, vec: ctypes.Array[_PageRegion],
                 start: int, end: int, category_mask: int, category_anyof_mask: int,
                 return_mask: int) -> tuple[list[tuple[int, int, int]], int]:
    """PAGEMAP_SCAN over [start, end) of pid's pagemap fd, never the zero page:
    the (start, end, categories) regions in address order, and the number of
    ioctls it took."""
    regions: list[tuple[int, int, int]] = []
    ioctls = 0
    cursor = start
    while cursor < end:
        arg.size = ctypes.sizeof(_PmScanArg)
        arg.flags = 0
        arg.start = cursor
        arg.end = end
        arg.walk_end = 0
        arg.vec = ctypes.addressof(vec)
        arg.vec_len = _VEC_LEN
        arg.max_pages = 0
        arg.category_inverted = PAGE_IS_PFNZERO
        arg.category_mask = category_mask
        arg.category_anyof_mask = category_anyof_mask
        arg.return_mask = return_mask
        n = _libc.ioctl(fd, PAGEMAP_SCAN, ctypes.byref(arg))
        ioctls += 1
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.ESRCH:
                raise ProcessLookupError(pid)
            if err in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                raise ScanUnsupported(err, "PAGEMAP_SCAN not supported by this kernel")
            raise OSError(err, os.strerror(err))
        for i in range(n):
            r = vec[i]
            regions.append((r.start, r.end, r.categories))
        # Resume only when the vector was full: walk_end can stop short of
        # `end` with everything delivered, and resuming then double counts.
        if n < _VEC_LEN or arg.walk_end <= cursor:
            break
        cursor = arg.walk_end
    return regions, ioctls


def probe_pagemap_scan() -> tuple[bool, str]:
    """Try PAGEMAP_SCAN on our own address space."""
    try:
        scanner = PagemapScanner(os.getpid())
    except OSError as e:
        return False, f"cannot open /proc/self/pagemap: {e.strerror}"
    try:
        buf = ctypes.create_string_buffer(4096)
        addr = ctypes.addressof(buf)
        runs = scanner.scan(addr & ~4095, (addr & ~4095) + 4096)
        return bool(runs), "ok" if runs else "returned no resident page for a touched page"
    except ScanUnsupported:
        return False, "ioctl not supported (needs Linux 6.7+)"
    except OSError as e:
        return False, f"ioctl failed: {e.strerror}"
    finally:
        scanner.close()


# -- fallback for kernels without PAGEMAP_SCAN (before 6.7) ------------------------
PM_PRESENT = 1 << 63
PM_FILE = 1 << 61           # file page or shared anonymous (i.e. not PageAnon)
PM_PFN_MASK = (1 << 55) - 1
KPF_ZERO_PAGE = 1 << 24
KPF_THP = 1 << 22
HPAGE_PAGES = 512
# VMAs whose pages are PFN-mapped: pagemap reports them present, smaps Rss does not.
PFNMAP_NAMES = (b"[vvar]", b"[vvar_vclock]")


@functools.lru_cache(maxsize=8)
def _zero_patterns(zero_pfns: frozenset[int]) -> tuple[tuple[bytes, ...], bool]:
    """Bytes 1..5 of the entries of `zero_pfns` (PFN bits 8..47): one pattern
    per 256 PFNs, so one for the zero page and two for the 512 pages of the
    huge zero page; found with bytes.find, at C speed. And whether one of
    them is all zeros (a PFN below 256: every entry must be looked at)."""
    patterns = tuple(sorted({((pfn >> 8) & (1 << 40) - 1).to_bytes(5, "little")
                             for pfn in zero_pfns}))
    return tuple(p for p in patterns if p.strip(b"\0")), any(not p.strip(b"\0")
                                                              for p in patterns)


def drop_zero_pages(raw: bytes, zero_pfns: frozenset[int]) -> bytes:
    """Raw pagemap entries (8 bytes each) with every present entry that maps a
    zero page (`zero_pfns`) turned into an empty entry (0): what is left
    present is what smaps counts as resident. Returns `raw` itself when
    nothing changes."""
    if not zero_pfns:
        return raw
    patterns, low = _zero_patterns(zero_pfns)
    out: bytearray | None = None
    hits: list[int] = list(range(len(raw) // 8)) if low else []
    for pattern in patterns:
        pos = raw.find(pattern, 1)
        while pos >= 0:
            if pos & 7 == 1:
                hits.append(pos >> 3)
                pos = raw.find(pattern, pos + 8)
            else:
                pos = raw.find(pattern, pos + 1)
    for i in hits:
        entry = int.from_bytes(raw[i * 8:i * 8 + 8], "little")
        if entry & PM_PRESENT and entry & PM_PFN_MASK in zero_pfns:
            if out is None:
                out = bytearray(raw)
            out[i * 8:i * 8 + 8] = bytes(8)
    return raw if out is None else bytes(out)


def _pfn_of_own_page(addr: int) -> int:
    with open("/proc/self/pagemap", "rb") as f:
        f.seek((addr >> 12) * 8)
        entry = int.from_bytes(f.read(8), "little")
    return entry & PM_PFN_MASK if entry & PM_PRESENT else 0


def _page_flags(pfn: int) -> int:
    """The page's /proc/kpageflags word (root only; 0 when unreadable)."""
    try:
        with open("/proc/kpageflags", "rb") as f:
            f.seek(pfn * 8)
            return int.from_bytes(f.read(8), "little")
    except OSError:
        return 0


def _is_zero_pfn(pfn: int) -> bool:
    return bool(_page_flags(pfn) & KPF_ZERO_PAGE)


def learn_zero_pfns() -> frozenset[int]:
    """PFNs of the shared zero page and the huge zero page, found by reading fresh
    anonymous memory of our own (needs root to see PFNs; without it: empty).
    The huge zero page is checked with /proc/kpageflags (KPF_ZERO_PAGE). Once
    our own process has mapped the huge zero folio, the kernel keeps it (the
    mm's MMF_HUGE_ZERO_PAGE reference, dropped at our exit), so its PFNs stay
    valid as long as we run. Without THP (or with use_zero_page 0) there is no
    huge zero page to find."""
    import mmap

    zero: set[int] = set()
    small = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        _ = small[0]
        addr = ctypes.addressof(ctypes.c_char.from_buffer(small))
        pfn = _pfn_of_own_page(addr)
        if pfn:
            zero.add(pfn)
        del addr
    finally:
        small.close()
    size = 4 * HPAGE_PAGES * 4096
    big = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(big))
        aligned = (base + (2 << 20) - 1) & ~((2 << 20) - 1)
        with contextlib.suppress(OSError, AttributeError):
            big.madvise(mmap.MADV_HUGEPAGE, aligned - base, 2 << 20)
        _ = big[aligned - base]
        pfn = _pfn_of_own_page(aligned)
        if pfn and pfn not in zero and _is_zero_pfn(pfn):
            zero.update(range(pfn, pfn + HPAGE_PAGES))
    finally:
        del base
        big.close()
    return frozenset(zero)


class RawPagemapScanner(_PagemapFile):
    """Resident runs from raw /proc/PID/pagemap entries, for kernels without
    PAGEMAP_SCAN. Zero-page mappings are recognised by PFN (root only); reads are
    limited to the VMAs `vmas_in(start, end)` names, skipping PFN-mapped ones."""

    mechanism = "pagemap read + zero-page PFNs"

    def __init__(self, pid: int, proc_root: str, vmas_in: VmaSource,
                 zero_pfns: frozenset[int]) -> None:
        super().__init__(pid, proc_root)
        self.vmas_in = vmas_in
        self.zero_pfns = zero_pfns


    def scan(self, start: int, end: int) -> list[Run]:
        runs: list[Run] = []
        for v_start, v_end, path in self.vmas_in(start, end):
            if path in PFNMAP_NAMES:
                continue
            lo, hi = max(start, v_start), min(end, v_end)
            if lo < hi:
                self._scan_one(lo, hi, runs)
        return runs

    def huge(self, addr: int) -> bool | None:
        """Whether a transparent huge page holds the page at addr (its PFN's
        KPF_THP in /proc/kpageflags; root only, else False); None if no page
        is mapped there."""
        try:
            entry = int.from_bytes(os.pread(self.fd, 8, (addr >> 12) * 8), "little")
        except OSError:
            return False
        self.ioctls += 1
        if not entry & PM_PRESENT:
            return None
        pfn = entry & PM_PFN_MASK
        return bool(pfn and _page_flags(pfn) & KPF_THP)

    def _scan_one(self, start: int, end: int, runs: list[Run]) -> None:
        step = 512 * 64  # pages per read: 256 KiB of entries
        page = start >> 12
        last = end >> 12
        zero = self.zero_pfns
        while page < last:
            n = min(step, last - page)
            try:
                data = os.pread(self.fd, n * 8, page * 8)
            except OSError as e:
                if e.errno == errno.ESRCH:
                    raise ProcessLookupError(self.pid) from e
                raise
            self.ioctls += 1
            if not data:
                raise ProcessLookupError(self.pid)
            entries = memoryview(drop_zero_pages(data, zero)).cast("Q")
            for i, entry in enumerate(entries):
                if not entry & PM_PRESENT:
                    continue
                addr = (page + i) << 12
                anon = not entry & PM_FILE
                if runs and runs[-1][1] == addr and runs[-1][2] == anon:
                    runs[-1] = (runs[-1][0], addr + 4096, anon)
                else:
                    runs.append((addr, addr + 4096, anon))
            page += len(entries)


Scanner = PagemapScanner | RawPagemapScanner
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage"


def thp_mode(sysfs: str = THP_SYSFS) -> str:
    """Transparent huge pages for anonymous memory: "always", "madvise" or
    "never" (the bracketed word of `enabled`; "never" when absent)."""
    try:
        with open(f"{sysfs}/enabled") as f:
            text = f.read()
    except OSError:
        return "never"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "never"


def huge_page_size(sysfs: str = THP_SYSFS) -> int:
    """Bytes of a PMD-mapped transparent huge page (2 MiB on x86-64)."""
    try:
        with open(f"{sysfs}/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return HPAGE_PAGES * 4096
FORCE_FALLBACK_ENV = "MEMTRACE_NO_PAGEMAP_SCAN"
_mechanism: str | None = None
_zero_pfns: frozenset[int] | None = None


def zero_page_pfns() -> frozenset[int]:
    """The zero pages' PFNs, learned once per memtrace process and shared by
    every reader of raw pagemap entries (the fallback scanner, PSS)."""
    global _zero_pfns
    if _zero_pfns is None:
        _zero_pfns = learn_zero_pfns()
    return _zero_pfns


def scan_mechanism() -> str:
    """The mechanism this kernel supports, decided once by trying it (never from
    the version string); MEMTRACE_NO_PAGEMAP_SCAN=1 forces the fallback."""
    global _mechanism
    if _mechanism is None:
        if os.environ.get(FORCE_FALLBACK_ENV) == "1":
            _mechanism = RawPagemapScanner.mechanism
        else:
            ok, _ = probe_pagemap_scan()
            _mechanism = PagemapScanner.mechanism if ok else RawPagemapScanner.mechanism
    return _mechanism


def open_scanner(pid: int, proc_root: str, vmas_in: VmaSource) -> Scanner:
    if scan_mechanism() == PagemapScanner.mechanism:
        return PagemapScanner(pid, proc_root)
    return RawPagemapScanner(pid, proc_root, vmas_in, zero_page_pfns())
