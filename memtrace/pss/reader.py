"""PSS, USS and swap per mapping, computed as /proc/PID/smaps computes them.

Per resident page, smaps (fs/proc/task_mmu.c: smaps_account, Linux 6.15-6.18
with CONFIG_PAGE_MAPCOUNT, the default) adds to Pss a fixed-point share
``(PAGE_SIZE << PSS_SHIFT) // mapcount`` (the whole page when the mapcount is
below 2), and counts the page as private (Private_Clean + Private_Dirty, here
"USS") when its mapcount is below 2. The mapcount is the page's own one
(``folio_precise_page_mapcount``: PTE mappings of that page plus the PMD
mappings of its folio), which is exactly what /proc/kpagecount reports on such
kernels, for small pages, large folios mapped by PTEs and PMD-mapped THP alike.
Fractions are kept in the sum and the byte count is ``sum >> PSS_SHIFT``;
smaps prints ``sum >> (PSS_SHIFT + 10)`` kB per mapping, smaps_rollup the same
shift over the sum of all mappings. The shared zero pages are not counted
(not "normal" pages to smaps): every raw entry read goes through
memtrace.trace.pagemap.drop_zero_pages first, whatever found the runs, and pages
outside the runs a reader is given are not counted either (`PssReader.usage`).

Private is mapcount < 2, as smaps has it. A page whose pagemap "exclusively
mapped" bit (56) is set has mapcount 1 and needs no kpagecount read, except in
a possible PMD mapping: there pagemap gives all 512 entries the bit of the
folio's first page (measured on 6.18), so such pages are looked up one by one.
On kernels built with CONFIG_NO_PAGE_MAPCOUNT smaps uses the folio's average
mapcount (which kpagecount then reports) and folio-level exclusivity (which the
exclusive bit then reports), and so does this module. Shared pages are looked
up in PFN-sorted ranges.

Swap is the pagemap's swapped entries (smaps "Swap" for private memory;
shmem pages swapped out from the page cache, which smaps also adds, are not
seen in page tables and are not counted). Reading PFNs and kpagecount needs
root (CAP_SYS_ADMIN); without it the kernel reports PFN 0 and PssReader raises
PermissionError.

Pure core (memtrace/pss/accounting.py): `account`, `wanted_pfns`, `pmd_blocks`,
`pfn_ranges`; I/O here: `KPageCounts`, `PssReader`, `vma_usage`. The /proc root
is injectable for tests on fixture files."""

from __future__ import annotations

import errno
import os
import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence

from memtrace.pss.accounting import (
    ENTRY_SIZE,
    PAGE_IS_SWAPPED,
    PMD_PAGES,
    SKIP_NAMES,
    Usage,
    _account,
    _classes,
    _Plan,
    _plan,
    _prepare,
    _private_only,
    _running_kernel_precise,
    _wanted,
    pfn_ranges,
    private_only_classes,
)
from memtrace.trace.pagemap import (
    _VEC_LEN,
    PAGE_IS_FILE,
    PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT,
    ScanUnsupported,
    _PageRegion,
    _PmScanArg,
    drop_zero_pages,
    pagemap_scan,
    zero_page_pfns,
)
from memtrace.trace.procfs import PAGE_SIZE, Vma
from memtrace.util.ints import shared
from memtrace.util.ranges import merge_ranges

USAGE_BATCH = 4096      # VMAs accounted per pass (PssReader.usage)


class _Overlapping:
    """Sorted, disjoint ranges, sliced to those overlapping [start, end)."""

    def __init__(self, ranges: Sequence[Sequence[int]]) -> None:
        self.ranges = ranges
        self.starts = [r[0] for r in ranges]
        self.ends = [r[1] for r in ranges]

    def __call__(self, start: int, end: int) -> Sequence[Sequence[int]]:
        return self.ranges[bisect_right(self.ends, start):bisect_left(self.starts, end)]

# the memo key of a piece whose pages are all private (its figures need no lookup)
_NO_KEY: tuple[bytes, tuple[int, ...]] = (b"", ())


class KPageCounts:
    """Batched reads of /proc/kpagecount (8 bytes per PFN). Values read are
    kept until `clear()`, so that processes sharing pages in one walk read each
    page's count once."""

    def __init__(self, proc_root: str = "/proc", max_gap: int = 128) -> None:
        self.fd = os.open(f"{proc_root}/kpagecount", os.O_RDONLY | os.O_CLOEXEC)
        self.max_gap = max_gap
        self.cache: dict[int, int] = {}
        # (entries, PMD blocks) -> Usage of ranges with shared pages: the same
        # library pages mapped by many processes read as the same bytes, and
        # with the same counts they account the same.
        self.memo: dict[tuple[bytes, tuple[int, ...]], Usage] = {}
        self.reads = 0

    def lookup(self, pfns: Iterable[int]) -> dict[int, int]:
        """Counts of `pfns` (from the cache, or read now)."""
        cache = self.cache
        missing = [p for p in pfns if p not in cache]
        for first, last in pfn_ranges(missing, self.max_gap):
            data = os.pread(self.fd, (last - first) * ENTRY_SIZE, first * ENTRY_SIZE)
            self.reads += 1
            for i, value in enumerate(memoryview(data).cast("Q")):
                cache[first + i] = value
        return cache

    def clear(self) -> None:
        """Forget counts (and results built on them): call once per walk/tick."""
        self.cache.clear()
        self.memo.clear()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


Range = tuple[int, int]


def clip(runs: Sequence[Sequence[int]], start: int, end: int, first: int = 0) -> list[Range]:
    """The parts of sorted, disjoint `runs` (from index `first` on) inside
    [start, end). A run is (start, end, ...): the model's (start, end, anon)
    runs work as they are."""
    out = []
    for i in range(first, len(runs)):
        r_start, r_end = runs[i][0], runs[i][1]
        if r_end <= start:
            continue
        if r_start >= end:
            break
        out.append((max(r_start, start), min(r_end, end)))
    return out


class PssReader:
    """PSS/USS/swap of the mappings of one process. Raises ProcessLookupError
    once the process has gone. One `KPageCounts` may be shared by readers."""

    def __init__(self, pid: int, proc_root: str = "/proc",
                 counts: KPageCounts | None = None,
                 zero_pfns: frozenset[int] | None = None,
                 precise_mapcount: bool | None = None,
                 use_scan: bool | None = None) -> None:
        self.pid = pid
        self.proc_root = proc_root
        self._own_counts = counts is None
        self.counts = counts if counts is not None else KPageCounts(proc_root)
        try:
            self.fd = os.open(f"{proc_root}/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.close()
            raise ProcessLookupError(pid) from None
        self.precise = (precise_mapcount if precise_mapcount is not None
                        else _running_kernel_precise())
        if use_scan is None:
            from memtrace.trace.pagemap import PagemapScanner, scan_mechanism
            use_scan = scan_mechanism() == PagemapScanner.mechanism
        self.use_scan = use_scan
        # Known whichever way the runs are found: a read spans the gaps
        # between nearby runs, and runs given by a caller may hold zero pages.
        self.zero_pfns = zero_pfns if zero_pfns is not None else zero_page_pfns()
        self._vec = (_PageRegion * _VEC_LEN)()
        self._arg = _PmScanArg()
        self.syscalls = 0

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._own_counts:
            self.counts.close()

    def __enter__(self) -> PssReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- where to read --------------------------------------------------
    def scan(self, start: int, end: int) -> list[Range]:
        """Runs in [start, end) with pages present (not the zero page) or
        swapped out, from PAGEMAP_SCAN; coalesced across VMAs by the kernel."""
        regions, ioctls = pagemap_scan(
            self.fd, self.pid, self._arg, self._vec, start, end,
            category_mask=PAGE_IS_PFNZERO,
            category_anyof_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_FILE)
        self.syscalls += ioctls
        # regions of other categories side by side make one run
        return merge_ranges(((r_start, r_end) for r_start, r_end, _ in regions),
                            presorted=True)

    def entries(self, start: int, end: int) -> bytes:
        """Raw pagemap entries of [start, end), as read (8 bytes each)."""
        first = start // PAGE_SIZE
        n = (end - start) // PAGE_SIZE
        try:
            data = os.pread(self.fd, n * ENTRY_SIZE, first * ENTRY_SIZE)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise ProcessLookupError(self.pid) from e
            raise
        self.syscalls += 1
        if len(data) < n * ENTRY_SIZE:
            raise ProcessLookupError(self.pid)
        return data

    # -- what to count ----------------------------------------------------
    def usage(self, vmas: Sequence[Vma], runs: Sequence[Sequence[int]] | None = None,
              max_gap: int = 16 * 4096,
              resident: Sequence[Sequence[int]] | None = None) -> list[Usage]:
        """One Usage per VMA of `vmas` (sorted by address, of this process).
        Many VMAs are accounted USAGE_BATCH at a time (the same figures): what a
        pass holds per VMA (entries, plans) is ~400 bytes, 24 MB at 60k
        mappings, and memory Python takes for a moment stays memtrace's.
        See _usage for the arguments."""
        if len(vmas) <= USAGE_BATCH:
            return self._usage(vmas, runs, max_gap, resident)
        if runs is None:
            runs = self.find_runs(vmas)
        in_runs = _Overlapping(runs)
        in_resident = _Overlapping(resident) if resident is not None else None
        out: list[Usage] = []
        for i in range(0, len(vmas), USAGE_BATCH):
            part = vmas[i:i + USAGE_BATCH]
            lo, hi = part[0].start, part[-1].end
            out += self._usage(part, in_runs(lo, hi), max_gap,
                               in_resident(lo, hi) if in_resident is not None else None)
        return out

    def _usage(self, vmas: Sequence[Vma], runs: Sequence[Sequence[int]] | None = None,
               max_gap: int = 16 * 4096,
               resident: Sequence[Sequence[int]] | None = None) -> list[Usage]:
        """One Usage per VMA of `vmas` (sorted by address, of this process).

        `runs`: sorted, disjoint address ranges (start, end, ...) to restrict
        the reading to (e.g. the resident runs the address-space model already
        holds, as (start, end, anon)); they must cover whole resident runs;
        pages outside them count as not resident, so swap is counted only
        inside them. Without runs: PAGEMAP_SCAN finds the present and swapped
        pages, or, on kernels without it, whole VMAs are read.

        `resident`: sorted, disjoint ranges outside which no present page
        counts (swapped entries still do): the model's resident runs, so that
        PSS never counts a page its RSS does not.

        Nearby runs are read in one pread (gaps up to `max_gap` bytes), but
        only the entries inside the runs are accounted, and zero-page entries
        never are (memtrace.trace.pagemap.drop_zero_pages)."""
        if runs is None:
            runs = self.find_runs(vmas)
        ends = [r[1] for r in runs]
        per_vma: list[list[tuple[Range, list[Range]]]] = []
        for vma in vmas:
            if vma.path in SKIP_NAMES:
                per_vma.append([])
                continue
            exact = clip(runs, vma.start, vma.end, bisect_right(ends, vma.start))
            if len(exact) <= 1:     # most mappings: what _group would give, 3x faster
                per_vma.append([(exact[0], exact)] if exact else [])
            else:
                per_vma.append(_group(exact, merge_ranges(exact, max_gap, presorted=True)))
        res_ends = [r[1] for r in resident] if resident is not None else []
        # One read per span of nearby runs, even across VMAs (the kernel
        # coalesces runs across VMAs too); each VMA takes its slices.
        spans = merge_ranges([r for ranges in per_vma for r, _ in ranges], max_gap,
                             presorted=True)
        data = [self.entries(start, end) for start, end in spans]
        # Pass 1: entries, and the PFNs that need a count.
        memo = self.counts.memo
        chunks: list[list[tuple[tuple[bytes, tuple[int, ...]], _Plan | Usage | None]]] = []
        wanted: list[int] = []
        zero, precise = self.zero_pfns, self.precise
        k = 0
        # the entries' classes per span, made once (not per mapping)
        classes: list[bytes | None] = [None] * len(spans)
        for ranges in per_vma:
            got: list[tuple[tuple[bytes, tuple[int, ...]], _Plan | Usage | None]] = []
            for (start, end), inside in ranges:
                while spans[k][1] < end:
                    k += 1
                base = spans[k][0]
                if (resident is None and precise and end - start < PMD_PAGES * PAGE_SIZE
                        and len(inside) == 1 and inside[0][0] == start
                        and inside[0][1] == end):
                    # _keep keeps these entries as read: _private_only of a slice
                    # of the span's classes is that of the sliced entries
                    cls = classes[k]
                    if cls is None:
                        cls = classes[k] = _classes(data[k])
                    private = private_only_classes(
                        cls[(start - base) // PAGE_SIZE:(end - base) // PAGE_SIZE])
                    if private is not None:
                        got.append((_NO_KEY, private))
                        continue
                ents = data[k][(start - base) // PAGE_SIZE * ENTRY_SIZE:
                               (end - base) // PAGE_SIZE * ENTRY_SIZE]
                ents = _keep(ents, start, inside)
                if resident is not None:
                    ents = _drop_present_outside(
                        ents, start, clip(resident, start, end, bisect_right(res_ends, start)))
                if precise and end - start < PMD_PAGES * PAGE_SIZE:
                    # only exclusive pages: no zero page among them (the
                    # zero pages are never marked exclusive)
                    private = _private_only(ents)
                    if private is not None:
                        got.append((_NO_KEY, private))
                        continue
                vpn = start // PAGE_SIZE
                prep = _prepare(ents, vpn, PMD_PAGES)
                # the PMD blocks found decide the plan: same bytes + same
                # blocks = same result (libraries sit at different alignments)
                key = (ents, tuple(prep[2]))
                if key in memo:
                    # memo keys hold no zero page: neither do these bytes
                    got.append((key, None))
                    continue
                if b"S" in prep[1]:      # zero pages are present, never exclusive
                    dropped = drop_zero_pages(ents, zero)
                    if dropped is not ents:
                        ents = dropped
                        prep = _prepare(ents, vpn, PMD_PAGES)
                        key = (ents, tuple(prep[2]))
                        if key in memo:
                            got.append((key, None))
                            continue
                new_plan = _plan(ents, precise, vpn, PMD_PAGES, prep)
                got.append((key, new_plan))
                wanted += _wanted(new_plan)
            chunks.append(got)
        if wanted and 0 in wanted:
            # PFN 0 is never a mapped user page: the kernel hid the PFNs
            raise PermissionError(errno.EPERM, "page frame numbers hidden: PSS needs "
                                  "CAP_SYS_ADMIN (root)")
        counts = self.counts.lookup(wanted) if wanted else {}
        # Pass 2: account.
        out = []
        for got in chunks:
            u = Usage()
            for key, maybe_plan in got:
                if maybe_plan is None:
                    u.add(memo[key])
                    continue
                if isinstance(maybe_plan, Usage):
                    u.add(maybe_plan)
                    continue
                piece = _account(maybe_plan, counts, PAGE_SIZE, precise, None)
                if maybe_plan.slow:
                    memo[key] = piece
                u.add(piece)
            # kept per mapping; equal figures share one int (util/ints.py)
            u.rss, u.pss_fixed = shared(u.rss, u.rss), shared(u.pss_fixed, u.pss_fixed)
            u.uss, u.swap = shared(u.uss, u.uss), shared(u.swap, u.swap)
            out.append(u)
        return out

    def find_runs(self, vmas: Sequence[Vma]) -> list[Range]:
        vmas = [v for v in vmas if v.path not in SKIP_NAMES]
        if not vmas:
            return []
        if self.use_scan:
            try:
                return self.scan(vmas[0].start, vmas[-1].end)
            except ScanUnsupported:
                self.use_scan = False
        return [(v.start, v.end) for v in vmas]


def _group(exact: list[Range], ranges: list[Range]) -> list[tuple[Range, list[Range]]]:
    """Each of `ranges` (the coalesced `exact` runs) with the exact runs in it."""
    out: list[tuple[Range, list[Range]]] = []
    i = 0
    for start, end in ranges:
        inside = []
        while i < len(exact) and exact[i][1] <= end:
            inside.append(exact[i])
            i += 1
        out.append(((start, end), inside))
    return out


def _keep(raw: bytes, base: int, inside: Sequence[Range]) -> bytes:
    """The entries of `raw` (pages from address `base`) with every entry
    outside `inside` emptied: gaps read through between nearby runs are not
    resident to the reader (PAGEMAP_SCAN left them out: not present, or the
    zero page), whatever their entries say."""
    if len(inside) == 1:
        covered = inside[0][1] - inside[0][0]
    else:
        covered = sum(end - start for start, end in inside)
    if covered // PAGE_SIZE * ENTRY_SIZE == len(raw):
        return raw          # the runs (disjoint, inside raw's range) cover it all
    out = bytearray(len(raw))
    for start, end in inside:
        lo = (start - base) // PAGE_SIZE * ENTRY_SIZE
        hi = (end - base) // PAGE_SIZE * ENTRY_SIZE
        out[lo:hi] = raw[lo:hi]
    return bytes(out)


_PRESENT_RUN = re.compile(rb"[XS]+")


def _drop_present_outside(raw: bytes, base: int, resident: Sequence[Range]) -> bytes:
    """`raw` with every present entry outside the `resident` ranges emptied
    (swapped entries are kept)."""
    cls = _classes(raw)
    out: bytearray | None = None
    pos = 0
    n = len(cls)
    for start, end in [*resident, (base + n * PAGE_SIZE, 0)]:
        gap_end = min((start - base) // PAGE_SIZE, n)
        for m in _PRESENT_RUN.finditer(cls, pos, gap_end):
            if out is None:
                out = bytearray(raw)
            out[m.start() * ENTRY_SIZE:m.end() * ENTRY_SIZE] = bytes((m.end() - m.start())
                                                                     * ENTRY_SIZE)
        pos = max(pos, (end - base) // PAGE_SIZE)
    return raw if out is None else bytes(out)


def vma_usage(pid: int, vmas: Sequence[Vma], runs: Sequence[Sequence[int]] | None = None,
              proc_root: str = "/proc", counts: KPageCounts | None = None) -> list[Usage]:
    """PSS/USS/swap for `vmas` of process `pid` (one Usage per VMA, same order),
    optionally restricted to address `runs` (see PssReader.usage). Raises
    ProcessLookupError if the process has gone."""
    with PssReader(pid, proc_root, counts) as reader:
        return reader.usage(vmas, runs)


def total(usages: Iterable[Usage]) -> Usage:
    out = Usage()
    for u in usages:
        out.add(u)
    return out

