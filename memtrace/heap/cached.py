"""Chunks that look allocated to the arena but are free to the program: those
cached in the per-thread tcaches and in the fastbins, each list entry checked to
be a walked chunk of its bin's size."""

from __future__ import annotations

import bisect
import struct

from memtrace.heap.layout import CHUNK_HDR_SZ, QWORD, GlibcLayout, HeapError
from memtrace.heap.memory import AddressSpace, u64
from memtrace.heap.structures import ArenaState
from memtrace.heap.walk import Walk


class ChunkIndex:
    """Every walked chunk of every arena, to validate list pointers."""

    def __init__(self, walks: list[Walk]) -> None:
        self.walks = sorted(walks, key=lambda w: w.start)
        self.bounds = [w.start for w in self.walks]

    def walk_of(self, addr: int) -> Walk | None:
        i = bisect.bisect_right(self.bounds, addr) - 1
        if i >= 0 and addr < self.walks[i].end:
            return self.walks[i]
        return None

    def find(self, chunk: int) -> tuple[Walk, int] | None:
        i = bisect.bisect_right(self.bounds, chunk) - 1
        if i < 0:
            return None
        w = self.walks[i]
        j = bisect.bisect_left(w.starts, chunk)
        if j < len(w.starts) and w.starts[j] == chunk:
            return w, j
        return None


def _demangle(layout: GlibcLayout, pos: int, stored: int) -> int:
    return stored ^ (pos >> 12) if layout.safe_linking else stored


def read_tcache(space: AddressSpace, layout: GlibcLayout, index: ChunkIndex, chunk: int,
                max_count: int) -> dict[int, int] | None:
    """Cached chunks {chunk address: size} of the tcache_perthread_struct in the
    chunk at `chunk`, or None if it is not one (every list must have exactly
    `counts[i]` entries, each an allocated chunk of bin i's size).

    A tcache whose thread was caught inside tcache_put or tcache_get (no lock:
    the list head and the count are two stores) has exactly one list, of valid
    entries, one longer or shorter than its count: that raises HeapError
    "inconsistent" (take the snapshot again) rather than dropping the tcache,
    which would count its chunks as in use."""
    mem = chunk + CHUNK_HDR_SZ
    raw = space.read(mem, layout.tcache_entries + 8 * layout.tcache_bins)
    fmt = "<64H" if layout.tcache_count_size == 2 else "<64B"
    counts = struct.unpack_from(fmt.replace("64", str(layout.tcache_bins)), raw, 0)
    entries = struct.unpack_from(f"<{layout.tcache_bins}Q", raw, layout.tcache_entries)
    out: dict[int, int] = {}
    torn: tuple[int, int, int] | None = None  # (bin, entries, count)
    for i in range(layout.tcache_bins):
        want = 32 + 16 * i
        count, e = counts[i], entries[i]
        if count > max_count:
            return None
        n = 0
        while e:
            if e & 15 or n > count:
                return None
            hit = index.find(e - CHUNK_HDR_SZ)
            if hit is None:
                return None
            w, j = hit
            if w.sizes[j] != want or w.free[j] or (e - CHUNK_HDR_SZ) in out:
                return None
            out[e - CHUNK_HDR_SZ] = want
            n += 1
            e = _demangle(layout, e, u64(space, e))
        if n != count:
            if n == 0 or abs(n - count) != 1 or torn is not None:
                return None
            torn = (i, n, count)
    if torn is not None:
        raise HeapError(f"the tcache at {chunk:#x} is half-updated (list {torn[0]} has "
                        f"{torn[1]} entries, its count says {torn[2]}: a thread is inside "
                        "malloc or free)")
    return out


def read_fastbins(space: AddressSpace, layout: GlibcLayout, index: ChunkIndex,
                  arena: ArenaState) -> dict[int, int]:
    """Chunks {address: size} in the arena's fastbin lists, each checked to be a
    walked, allocated-looking chunk of its bin's size. The loop is written out
    (no helper calls per entry, pages read once): a heap can hold millions."""
    out: dict[int, int] = {}
    pages: dict[int, bytes] = {}
    bounds, walks = index.bounds, index.walks
    unpack = QWORD.unpack_from
    safe = layout.safe_linking
    for i, head in enumerate(arena.fastbins):
        want = 32 + 16 * i
        p = head
        while p:
            if p & 15 or p in out:
                raise HeapError(f"fastbin {i} of arena {arena.addr:#x} is corrupt at {p:#x}")
            k = bisect.bisect_right(bounds, p) - 1
            ok = False
            if k >= 0:
                w = walks[k]
                j = bisect.bisect_left(w.starts, p)
                ok = (j < len(w.starts) and w.starts[j] == p and w.sizes[j] == want
                      and not w.free[j])
            if not ok:
                raise HeapError(f"fastbin {i} entry {p:#x} is not an allocated chunk of "
                                f"{want} bytes")
            out[p] = want
            fd = p + 16  # 16-aligned: the 8 bytes never cross a page
            page = pages.get(fd >> 12)
            if page is None:
                page = pages[fd >> 12] = space.read(fd & ~4095, 4096)
            stored = unpack(page, fd & 4095)[0]
            p = stored ^ (fd >> 12) if safe else stored
    return out
