"""The figures of a heap report: per arena (in use, free, resident, cached, the
top chunk, the pin, what malloc_trim(0) would return, the free-size histogram),
their totals, and the one-line verdict."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import compress
from typing import Any

from memtrace.heap.layout import MALLOC_CHUNK_SIZE, MINSIZE, SIZE_SZ
from memtrace.heap.memory import ResidentMap
from memtrace.heap.walk import Walk
from memtrace.util.ranges import merge_ranges
from memtrace.util.units import fmt_bytes

HISTOGRAM_EDGES = [32 << k for k in range(0, 26)]  # 32 B .. 1 GiB, powers of two


def histogram(sizes: Iterable[int]) -> list[dict[str, int]]:
    chunks = [0] * len(HISTOGRAM_EDGES)
    total = [0] * len(HISTOGRAM_EDGES)
    for s, n in Counter(sizes).items():
        k = min(max(s.bit_length() - 6, 0), len(HISTOGRAM_EDGES) - 1)
        chunks[k] += n
        total[k] += s * n
    return [{"min_bytes": HISTOGRAM_EDGES[k], "max_bytes": HISTOGRAM_EDGES[k] * 2 - 1,
             "chunks": chunks[k], "bytes": total[k]} for k in range(len(chunks)) if chunks[k]]


def trim_ranges(free_runs: list[tuple[int, int]], top: int, top_end: int, page: int,
                main: bool, thp_pagesize: int = 0) -> tuple[list[tuple[int, int]], int]:
    """Address ranges malloc_trim(0) releases: MADV_DONTNEED of the whole pages
    inside every free chunk of the unsorted and large bins (mtrim) and, for the
    main arena, the sbrk shrink of the top chunk (systrim). `free_runs` are the
    chunks free after malloc_consolidate (fastbin chunks merged into neighbours);
    a run ending at `top` merges into it. Returns (ranges, new top start)."""
    out = []
    psm1 = page - 1
    for p, size in free_runs:
        if p + size == top:
            top = p
            continue
        if size > psm1 + MALLOC_CHUNK_SIZE:
            paligned = (p + MALLOC_CHUNK_SIZE + psm1) & ~psm1
            rest = p + size - paligned
            if rest > psm1:
                out.append((paligned, paligned + (rest & ~psm1)))
    if main:
        top_area = top_end - top - MINSIZE - 1
        if top_area > 0:
            unit = thp_pagesize or page
            extra = top_area // unit * unit
            if extra:
                out.append((top_end - extra, top_end))
    return out, top


def merge_runs(chunks: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(address, size) chunks merged where one ends where the next begins (the
    chunks of a heap never overlap)."""
    return [(s, e - s) for s, e in merge_ranges((p, p + z) for p, z in chunks)]


@dataclass
class ArenaReport:
    kind: str
    addr: int
    start: int
    end: int
    heaps: list[tuple[int, int]]
    walks: list[Walk]
    resident: ResidentMap
    system_mem: int
    attached_threads: int
    figures: dict[str, Any] = field(default_factory=dict)


def arena_figures(rep: ArenaReport, tcached: dict[int, int], fastbin: dict[int, int],
                  page: int, thp_pagesize: int) -> dict[str, Any]:
    res = rep.resident
    in_use = in_use_n = 0
    free_sizes: list[int] = []
    free_chunks: list[tuple[int, int]] = []  # truly free (in bins), address order
    free_res = 0
    cached_t = cached_f = 0
    for w in rep.walks:
        starts, sizes, free = w.starts, w.sizes, w.free
        fs = list(compress(starts, free))
        fz = list(compress(sizes, free))
        free_chunks += zip(fs, fz)
        free_sizes += fz
        free_total = sum(fz)
        last = w.top if w.top is not None else w.end
        if res.bytes_in(w.start, last) == last - w.start:  # all chunks resident
            free_res += free_total
        else:
            free_res += sum(res.bytes_in(p, p + z) for p, z in zip(fs, fz))
        in_use += sum(sizes) - free_total
        in_use_n += len(starts) - len(fs)
    for table, is_t in ((tcached, True), (fastbin, False)):
        for p, z in table.items():
            free_sizes.append(z)
            free_res += res.bytes_in(p, p + z)
            in_use -= z
            in_use_n -= 1
            if is_t:
                cached_t += z
            else:
                cached_f += z
    top_walk = next(w for w in rep.walks if w.top is not None)
    top, top_size = top_walk.top or 0, top_walk.top_size
    top_end = top + top_size
    top_res = res.bytes_in(top, top_end)
    free_bytes = sum(free_sizes) + top_size
    free_res += top_res
    overhead = rep.system_mem - sum(sum(w.sizes) for w in rep.walks) - top_size
    # what malloc_trim(0) returns: resident pages in the released ranges. Free
    # chunks in bins are never adjacent (free() coalesces): only fastbin chunks
    # merge with neighbours in malloc_consolidate.
    runs = merge_runs(free_chunks + list(fastbin.items())) if fastbin else free_chunks
    run_starts = [p for p, _ in runs]
    ranges: list[tuple[int, int]] = []
    for w in rep.walks:
        seg_runs = runs[bisect.bisect_left(run_starts, w.start):
                        bisect.bisect_left(run_starts, w.end)]
        if w.top is not None:
            r, _ = trim_ranges(seg_runs, top, top_end, page, rep.kind == "main", thp_pagesize)
        else:
            r, _ = trim_ranges(seg_runs, -1, -1, page, False)
        ranges += r
    trimmable = sum(res.bytes_in(a, b) for a, b in ranges)
    trim_top = 0
    if rep.kind == "main" and ranges and ranges[-1][1] == top_end:
        trim_top = res.bytes_in(*ranges[-1])
    # the pin: live chunks between the top chunk and the highest free chunk
    # (chunks cached in a tcache pin too: the arena sees them allocated)
    pin_bytes = pin_chunks = hole = hole_res = 0
    j = len(top_walk.starts) - 1
    while j >= 0 and not top_walk.free[j] and top_walk.starts[j] not in fastbin:
        pin_bytes += top_walk.sizes[j]
        pin_chunks += 1
        j -= 1
    if j >= 0:
        end_free = top_walk.starts[j] + top_walk.sizes[j]
        k = bisect.bisect_right(run_starts, top_walk.starts[j]) - 1
        if k >= 0 and runs[k][0] + runs[k][1] == end_free:
            hole = runs[k][1]
            hole_res = res.bytes_in(runs[k][0], end_free)
    top_pinned = bool(pin_chunks) and hole >= page and hole > pin_bytes
    largest = max(free_sizes, default=0)
    binned = sum(z for _, z in free_chunks)
    return {
        "kind": rep.kind,
        "arena_address": rep.addr,
        "start": rep.start,
        "end": rep.end,
        "heaps": [{"start": a, "end": b} for a, b in rep.heaps],
        "size_bytes": sum(b - a for a, b in rep.heaps),
        "system_mem_bytes": rep.system_mem,
        "attached_threads": rep.attached_threads,
        "resident_bytes": sum(res.bytes_in(a, b) for a, b in rep.heaps),
        "in_use_bytes": in_use,
        "in_use_chunks": in_use_n,
        # malloc's own count (mallinfo2().uordblks): chunks cached in a tcache are
        # allocated to the arena, and so are the headers of thread heaps
        "malloc_in_use_bytes": in_use + cached_t + overhead,
        "header_overhead_bytes": in_use_n * SIZE_SZ,
        "arena_overhead_bytes": overhead,
        "free_bytes": free_bytes,
        "free_chunks": len(free_sizes),
        "free_resident_bytes": free_res,
        "binned_free_bytes": binned,
        "cached_bytes": cached_t + cached_f,
        "tcache_bytes": cached_t,
        "fastbin_bytes": cached_f,
        "largest_free_chunk_bytes": largest,
        "top_chunk": top,
        "top_chunk_bytes": top_size,
        "top_resident_bytes": top_res,
        "top_pinned": top_pinned,
        "pin_bytes": pin_bytes,
        "pin_chunks": pin_chunks,
        "hole_bytes": hole,
        "hole_resident_bytes": hole_res,
        "trimmable_bytes": trimmable,
        "trimmable_top_bytes": trim_top,
        "trim_ranges": len(ranges),
        "free_histogram": histogram(free_sizes),
    }


def totals(arenas: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ["size_bytes", "resident_bytes", "in_use_bytes", "malloc_in_use_bytes",
            "in_use_chunks",
            "header_overhead_bytes", "arena_overhead_bytes", "free_bytes", "free_chunks",
            "free_resident_bytes", "cached_bytes", "tcache_bytes", "fastbin_bytes",
            "top_chunk_bytes", "top_resident_bytes", "trimmable_bytes"]
    return {k: sum(a[k] for a in arenas) for k in keys}


def verdict(report: dict[str, Any]) -> str:
    if not report.get("supported"):
        return str(report.get("reason", "not supported"))
    arenas = report["arenas"]
    mm = report["mmapped"]
    if not arenas:
        return (f"the heap is unused; {mm['count']} allocation(s) of {fmt_bytes(mm['bytes'])} "
                "have their own mmap")
    t = report["totals"]
    trim = t["trimmable_bytes"]
    hole_free = t["free_resident_bytes"] - t["top_resident_bytes"]
    resident = max(t["resident_bytes"], 1)
    pinned = [a for a in arenas if a["top_pinned"] and a["hole_resident_bytes"] >= (1 << 20)]
    parts = []
    if pinned:
        a = max(pinned, key=lambda x: x["hole_resident_bytes"])
        where = "the heap top" if a["kind"] == "main" else "the top of a thread arena"
        pin = (f"a live {a['pin_bytes']}-byte chunk" if a["pin_chunks"] == 1 else
               f"{a['pin_chunks']} live chunks ({fmt_bytes(a['pin_bytes'])})")
        parts.append(f"{fmt_bytes(a['hole_resident_bytes'])} free but resident below {pin} at "
                     f"{where}")
    elif hole_free >= max(1 << 20, resident // 10):
        parts.append(f"{fmt_bytes(hole_free)} free but resident in {t['free_chunks']} chunks "
                     f"between live ones (fragmentation: largest free chunk "
                     f"{fmt_bytes(max(a['largest_free_chunk_bytes'] for a in arenas))})")
    else:
        thr = report.get("thresholds", {}).get("trim_threshold_bytes")
        kept = (f" (the top chunk is kept while below the trim threshold, {fmt_bytes(thr)})"
                if thr else "")
        if t["top_resident_bytes"] >= max(1 << 20, resident // 10):
            parts.append(f"{fmt_bytes(t['top_resident_bytes'])} resident in the free top chunk"
                         + kept)
        elif t["in_use_bytes"] * 2 >= t["resident_bytes"]:
            parts.append(f"{fmt_bytes(t['in_use_bytes'])} of "
                         f"{fmt_bytes(t['resident_bytes'])} resident "
                         "heap bytes are in use: the memory is held by live allocations")
        else:
            parts.append(f"small heap: {fmt_bytes(t['in_use_bytes'])} of "
                         f"{fmt_bytes(t['resident_bytes'])} resident bytes in use, "
                         f"{fmt_bytes(t['top_resident_bytes'])} in the top chunk" + kept)
    parts.append(f"malloc_trim(0) would return {fmt_bytes(trim)}")
    if mm["bytes"] >= max(1 << 20, resident // 10):
        parts.append(f"{mm['count']} allocation(s) of {fmt_bytes(mm['bytes'])} have their own "
                     "mmap (returned to the system by free)")
    return "; ".join(parts)
