"""The whole-process analysis on any AddressSpace: one consistent read of every
arena (walks, tcaches, fastbins, then the arenas read again to see that nothing
moved) and the chunks that have their own mmap. Pure: unit tests run it on
synthetic heap images."""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from memtrace.heap.cached import ChunkIndex, read_fastbins, read_tcache
from memtrace.heap.figures import ArenaReport, arena_figures
from memtrace.heap.layout import (
    CHUNK_HDR_SZ,
    HEAP_MAX_SIZE,
    IS_MMAPPED,
    MALLOC_ALIGNMENT,
    QWORD_PAIR,
    SIZE_BITS,
    GlibcLayout,
    HeapError,
)
from memtrace.heap.memory import AddressSpace, ResidentMap, u64
from memtrace.heap.structures import (
    ArenaState,
    MallocPar,
    arena_chain,
    find_main_arena,
    find_mp,
    libc_data_regions,
    read_arena,
)
from memtrace.heap.walk import Walk, walk_segment
from memtrace.trace.procfs import Vma
from memtrace.util.ranges import merge_ranges


@dataclass
class WalkMemo:
    """What one walk of a process leaves for the next (the background walker
    walks the same processes every 30 s): the maps text and its parse (reused
    while the text is the same: 0.1 s at 60k mappings) and where the mmapped
    chunks were (looked at first: found there, the search of every mapping,
    0.2 s at 60k, is not needed). Hints only: every chunk is read again."""
    maps_text: bytes = b""
    maps: list[Vma] = field(default_factory=list)
    mmapped_at: list[int] = field(default_factory=list)
    # the watch loop's token of the VMA list `maps` was read under (0: none): the
    # same token again, and the maps are not read again (a 3 MB read at 60k)
    layout: int = 0
    # (executable, mapped file paths) -> what was learnt from reading those files
    # (the allocator, glibc's version): read again only when the files mapped change
    files_key: tuple[bytes, tuple[bytes, ...]] | None = None
    files_learnt: Any = None
    files_key_of: list[Vma] | None = None      # the maps files_key was made from


def _align_chunk(addr: int) -> int:
    """First chunk at or after addr whose user pointer is MALLOC_ALIGNMENT aligned."""
    mis = (addr + CHUNK_HDR_SZ) & (MALLOC_ALIGNMENT - 1)
    return addr + (MALLOC_ALIGNMENT - mis if mis else 0)


def _reader(space: AddressSpace, res: ResidentMap) -> Callable[[int, int], bytes]:
    read_resident = getattr(space, "read_resident", None)
    if read_resident is None:
        return space.read
    return lambda addr, n: read_resident(addr, n, res.runs_in(addr, addr + n))  # type: ignore[no-any-return]


def brk_heap(vmas: list[Vma]) -> tuple[int, int] | None:
    """(start, end) of the brk heap: the first [heap] VMA and the ones right
    after it. The kernel may split [heap] into VMAs of the same permissions
    (Debian's nginx workers have two), and the main arena runs across them."""
    start = end = None
    for v in vmas:
        if v.path != b"[heap]":
            continue
        if start is None:
            start, end = v.start, v.end
        elif v.start == end:
            end = v.end
        else:
            break
    return None if start is None or end is None else (start, end)


def analyse_glibc(space: AddressSpace, layout: GlibcLayout, libc: bytes,
                  memo: WalkMemo | None = None) -> dict[str, Any]:
    """One consistent read of every arena; raises HeapError if anything disagrees.
    `memo`: where the last walk found mmapped chunks (updated)."""
    page = space.page_size
    vmas = space.maps()
    regions = libc_data_regions(vmas, libc)
    if not regions:
        raise HeapError("unsupported glibc layout: libc has no writable data mapping",
                        "unsupported")
    main_addr = find_main_arena(space, layout, regions)
    arenas = arena_chain(space, layout, main_addr)
    heap_vma = brk_heap(vmas)
    mp = find_mp(space, layout, regions, heap_vma[0] if heap_vma else None)
    max_count = mp.tcache_count if mp else 65535
    counts_fmt = struct.Struct(
        f"<{layout.tcache_bins}{'H' if layout.tcache_count_size == 2 else 'B'}")

    def tcache_like(buf: bytes, off: int) -> bool:
        return max(counts_fmt.unpack_from(buf, off + CHUNK_HDR_SZ)) <= max_count

    reports: list[ArenaReport] = []
    tcache_candidates: list[tuple[int, bool]] = []
    tcache_size = layout.tcache_chunk_size
    for a in arenas:
        if a.main:
            if a.top == a.addr + layout.top:  # initial_top: the main heap was never used
                continue
            if heap_vma is None or not heap_vma[0] <= a.top < heap_vma[1]:
                raise HeapError(f"main arena top {a.top:#x} is not in [heap] "
                                "(non-contiguous main arena)", "unsupported")
            base = mp.sbrk_base if mp else heap_vma[0]
            first = _align_chunk(base)
            end = base + a.system_mem
            res = ResidentMap(space.resident_runs(*heap_vma))
            w = walk_segment(_reader(space, res), first, end, a.top, True, space.read,
                             tcache_size, tcache_like)
            segs = [(base, end)]
            walks = [w]
            if w.starts and w.sizes[0] == tcache_size:
                tcache_candidates.append((w.starts[0], True))
        else:
            walks, segs, res = _walk_thread_arena(space, layout, a, tcache_size, tcache_like)
        for w in walks:
            tcache_candidates += ((p, False) for p in w.candidates
                                  if not (a.main and p == w.start))
        reports.append(ArenaReport(
            kind="main" if a.main else "thread", addr=a.addr,
            start=min(s for s, _ in segs), end=max(e for _, e in segs), heaps=segs,
            walks=walks, resident=res, system_mem=a.system_mem,
            attached_threads=a.attached_threads))
    index = ChunkIndex([w for r in reports for w in r.walks])
    tcached: dict[int, int] = {}
    tcaches = 0
    for chunk, expected in tcache_candidates:
        got = read_tcache(space, layout, index, chunk, max_count)
        if got is None:
            if expected and any(u64(space, chunk + CHUNK_HDR_SZ + 8 * k) for k in range(2)):
                raise HeapError(f"the main thread's tcache at {chunk:#x} is inconsistent")
            continue
        if set(got) & set(tcached):
            raise HeapError("a chunk is in two tcaches")
        tcaches += 1
        tcached.update(got)
    fast: dict[int, int] = {}
    for a in arenas:
        fast.update(read_fastbins(space, layout, index, a))
    thp = mp.thp_pagesize if mp else 0
    out_arenas = []
    owner = {id(w): k for k, r in enumerate(reports) for w in r.walks}
    split_t: list[dict[int, int]] = [{} for _ in reports]
    split_f: list[dict[int, int]] = [{} for _ in reports]
    for table, split in ((tcached, split_t), (fast, split_f)):
        for p, s in table.items():
            hit = index.walk_of(p)
            assert hit is not None  # validated by read_tcache/read_fastbins
            split[owner[id(hit)]][p] = s
    for k, rep in enumerate(reports):
        rep.figures = arena_figures(rep, split_t[k], split_f[k], page, thp)
        out_arenas.append(rep.figures)
    # the walk raced nothing if the arenas still say the same
    for a in arenas:
        again = read_arena(space, layout, a.addr, a.main)
        if (again.top, again.system_mem, again.next) != (a.top, a.system_mem, a.next):
            raise HeapError(f"arena {a.addr:#x} changed during the walk")
    heap_ranges = [(h[0], h[0] + HEAP_MAX_SIZE) for r in reports if r.kind == "thread"
                   for h in r.heaps]
    mmapped = find_mmapped_chunks(space, vmas, heap_ranges, mp.n_mmaps if mp else None,
                                  smallest_chunk(mp), memo.mmapped_at if memo else ())
    if memo is not None:
        memo.mmapped_at = [p for p, _, _ in mmapped]
    return {
        "allocator": "glibc",
        "supported": True,
        "glibc_version": f"{layout.version[0]}.{layout.version[1]}",
        "main_arena_address": main_addr,
        "malloc_par_address": mp.addr if mp else None,
        "tcaches": tcaches,
        "arenas": out_arenas,
        "mmapped": _mmapped_figures(mmapped, mp),
        "thresholds": {
            "mmap_threshold_bytes": mp.mmap_threshold if mp else None,
            "mmap_threshold_dynamic": (not mp.no_dyn_threshold) if mp else None,
            "trim_threshold_bytes": mp.trim_threshold if mp else None,
            "top_pad_bytes": mp.top_pad if mp else None,
            "tcache_count": mp.tcache_count if mp else None,
        },
    }


def _walk_thread_arena(space: AddressSpace, layout: GlibcLayout, a: ArenaState,
                       keep_size: int, keep: Callable[[bytes, int], bool]
                       ) -> tuple[list[Walk], list[tuple[int, int]], ResidentMap]:
    heaps = []
    h = a.top & ~(HEAP_MAX_SIZE - 1)
    while h:
        ar_ptr, prev, size = struct.unpack("<QQQ", space.read(h, 24))
        if ar_ptr != a.addr:
            raise HeapError(f"heap_info at {h:#x} does not point to its arena {a.addr:#x}")
        if size > HEAP_MAX_SIZE or size & 15:
            raise HeapError(f"heap_info at {h:#x} has size {size:#x}")
        heaps.append((h, size, prev))
        if len(heaps) > 1 << 16:
            raise HeapError("heap_info chain does not end")
        h = prev
    heaps.reverse()
    first_h = heaps[0][0]
    if a.addr != first_h + layout.heap_info_size:
        raise HeapError(f"unsupported glibc layout: arena {a.addr:#x} is not right after its "
                        f"heap_info at {first_h:#x} (+{layout.heap_info_size})", "unsupported")
    runs: list[tuple[int, int]] = []
    for h, size, _ in heaps:
        runs += space.resident_runs(h, h + size)
    res = ResidentMap(runs)
    walks = []
    segs = []
    for k, (h, size, _) in enumerate(heaps):
        first = _align_chunk(a.addr + layout.state_size if k == 0 else h + layout.heap_info_size)
        newest = k == len(heaps) - 1
        walks.append(walk_segment(_reader(space, res), first, h + size,
                                  a.top if newest else None, False, space.read, keep_size, keep))
        segs.append((h, h + size))
    if sum(s for _, s, _ in heaps) != a.system_mem:
        raise HeapError(f"arena {a.addr:#x}: heaps total {sum(s for _, s, _ in heaps):#x}, "
                        f"system_mem {a.system_mem:#x}")
    return walks, segs, res


# Candidate pages closer than this are looked up in one PAGEMAP_SCAN (the
# kernel walks the page tables in between too: at most this many bytes a gap).
SCAN_GAP = 1 << 20
HEADS_BATCH = 1 << 16       # chunk heads read per batch of the page-by-page search
DEFAULT_MMAP_THRESHOLD_MIN = 128 << 10      # glibc's: the dynamic threshold starts here


def smallest_chunk(mp: MallocPar | None) -> int:
    """The size below which an mmapped chunk is unlikely: the threshold set
    with mallopt, else the lowest the dynamic one starts from (it only grows).
    An order of search, not a filter (an arena that cannot grow mmaps smaller
    chunks)."""
    if mp is None:
        return 0
    return mp.mmap_threshold if mp.no_dyn_threshold else min(mp.mmap_threshold,
                                                              DEFAULT_MMAP_THRESHOLD_MIN)


def _resident_in(space: AddressSpace, ranges: list[tuple[int, int]]) -> ResidentMap:
    """The resident runs of `ranges` (sorted), one scan per cluster of ranges
    at most SCAN_GAP apart rather than one per range (60k mappings: 60k scans)."""
    runs: list[tuple[int, int]] = []
    for start, end in merge_ranges(ranges, SCAN_GAP, presorted=True):
        runs += space.resident_runs(start, end)
    return ResidentMap(runs)


def _heads(space: AddressSpace, addrs: list[int]) -> list[bytes | None]:
    """The 16 bytes at each address (None: unreadable), in batched reads where
    the reader has them (process_vm_readv, 1024 addresses a call)."""
    read_heads = getattr(space, "read_heads", None)
    if read_heads is not None:
        try:
            data = read_heads(addrs, 16)
            return [data[16 * k:16 * k + 16] for k in range(len(addrs))]
        except OSError:
            pass            # one of them unreadable: each on its own
    out: list[bytes | None] = []
    for a in addrs:
        try:
            out.append(space.read(a, 16))
        except OSError:
            out.append(None)
    return out


def _vma_start(v: Vma) -> int:
    return v.start


def find_mmapped_chunks(space: AddressSpace, vmas: list[Vma], exclude: list[tuple[int, int]],
                        expected: int | None = None, likely_size: int = 0,
                        hints: Sequence[int] = ()) -> list[tuple[int, int, int]]:
    """Chunks served by their own mmap: (address, size, resident bytes). A chunk
    starts a page with prev_size 0 and flags exactly IS_MMAPPED, its size a page
    multiple within the mapping. Adjacent anonymous mappings merge into one VMA,
    so the chunks are looked for at VMA starts (and after each chunk found) and,
    when malloc_par says some are still missing, at every resident page start,
    first in the mappings of at least `likely_size` bytes. Pages are found
    resident and their heads read in batches: at 60k mappings, one scan and
    ~30 reads rather than 60k of each."""
    page = space.page_size

    def is_anon(v: Vma) -> bool:
        return (not v.path and not v.inode and v.perms == "rw-p"
                and not any(s <= v.start < e for s, e in exclude))

    found: dict[int, tuple[int, int]] = {}

    def chunk_at(p: int, head: bytes | None, v: Vma) -> int:
        if head is None:
            return 0
        psz, f = QWORD_PAIR.unpack(head)
        size = f & ~SIZE_BITS
        if psz != 0 or f & SIZE_BITS != IS_MMAPPED or not size or size % page or p + size > v.end:
            return 0
        return int(size)

    def follow(p: int, v: Vma) -> None:
        while p + page <= v.end and p not in found:
            if not space.resident_runs(p, p + page):
                return
            try:
                size = chunk_at(p, space.read(p, 16), v)
            except OSError:
                return
            if not size:
                return
            found[p] = (size, ResidentMap(space.resident_runs(p, p + size)).bytes_in(p, p + size))
            p += size

    if expected == 0:
        return []
    if hints:
        hinted = []
        for p in sorted(set(hints)):
            k = bisect.bisect_right(vmas, p, key=_vma_start) - 1
            if k >= 0 and p < vmas[k].end and is_anon(vmas[k]):
                hinted.append((p, vmas[k]))
        live = _resident_in(space, [(p, p + page) for p, _ in hinted])
        hinted = [(p, v) for p, v in hinted if live.bytes_in(p, p + page)]
        for (p, v), head in zip(hinted, _heads(space, [p for p, _ in hinted])):
            if p not in found and chunk_at(p, head, v):
                follow(p, v)
        if expected is not None and len(found) >= expected:
            return sorted((p, s, r) for p, (s, r) in found.items())
    anon = [v for v in vmas if not v.path and not v.inode and v.perms == "rw-p"]
    if exclude:
        anon = [v for v in anon if is_anon(v)]
    # VMA starts: the resident ones whose head reads as a chunk are followed
    firsts = _resident_in(space, [(v.start, v.start + page) for v in anon])
    at_start = [v for v in anon if firsts.bytes_in(v.start, v.start + page)]
    for v, head in zip(at_start, _heads(space, [v.start for v in at_start])):
        if chunk_at(v.start, head, v):
            follow(v.start, v)
    if expected is None or len(found) >= expected:
        return sorted((p, s, r) for p, (s, r) in found.items())
    # every resident page, mapping by mapping (those that can hold a chunk of
    # likely_size beside another first), until malloc_par's count is found
    resident = _resident_in(space, [(v.start, v.end) for v in anon])
    unlikely = [v.end - v.start < likely_size for v in anon]
    order = [v for _, v in sorted(zip(unlikely, anon), key=lambda x: x[0])]     # stable
    unlikely.sort()
    i = 0
    while i < len(order) and len(found) < expected:
        group: list[tuple[Vma, list[int]]] = []
        n = 0
        while i < len(order) and (not group or (n < HEADS_BATCH
                                                and unlikely[i] == unlikely[i - 1])):
            v = order[i]
            pages = [a for s, e in resident.runs_in(v.start, v.end) for a in range(s, e, page)]
            group.append((v, pages))
            n += len(pages)
            i += 1
        heads = _heads(space, [a for _, pages in group for a in pages])
        k = 0
        for v, pages in group:
            covered = ResidentMap((p, p + s) for p, (s, _) in found.items())
            for a in pages:
                if (a not in found and not covered.bytes_in(a, a + 1)
                        and chunk_at(a, heads[k], v)):
                    follow(a, v)
                k += 1
            if len(found) >= expected:
                break
    return sorted((p, s, r) for p, (s, r) in found.items())


def _mmapped_figures(chunks: list[tuple[int, int, int]], mp: MallocPar | None) -> dict[str, Any]:
    found_bytes = sum(s for _, s, _ in chunks)
    return {
        "count": mp.n_mmaps if mp else len(chunks),
        "bytes": mp.mmapped_mem if mp else found_bytes,
        "located_count": len(chunks),
        "located_bytes": found_bytes,
        "resident_bytes": sum(r for _, _, r in chunks),
        "threshold_bytes": mp.mmap_threshold if mp else None,
        "threshold_dynamic": (not mp.no_dyn_threshold) if mp else None,
        "source": "malloc_par" if mp else "mappings",
        "largest": sorted(({"address": p, "bytes": s, "resident_bytes": r}
                           for p, s, r in chunks), key=lambda c: -c["bytes"])[:10],
    }
