"""The heap walk: every chunk header of one heap segment, in address order, with
the checks that make a walk of a changing heap fail instead of giving numbers
(the walk must land exactly on the top chunk, or on a thread heap's fencepost)."""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate

from memtrace.heap.layout import (
    CHUNK_HDR_SZ,
    IS_MMAPPED,
    MINSIZE,
    NON_MAIN_ARENA,
    PREV_INUSE,
    QWORD_PAIR,
    SIZE_BITS,
    HeapError,
)

WINDOW = 4 << 20  # bytes of chunk headers and contents read at once


@dataclass
class Walk:
    """Chunks of one heap segment in address order (top and fenceposts excluded)."""

    start: int  # first chunk
    end: int  # end of the segment's chunk area (top end, or fencepost end)
    starts: array = field(default_factory=lambda: array("Q"))
    sizes: array = field(default_factory=lambda: array("Q"))
    free: bytearray = field(default_factory=bytearray)  # 1: in a bin (next PREV_INUSE clear)
    top: int | None = None
    top_size: int = 0
    fence_bytes: int = 0
    candidates: list[int] = field(default_factory=list)  # allocated chunks of keep_size


def walk_segment(read: Callable[[int, int], bytes], first: int, end: int, top: int | None,
                 main: bool, direct: Callable[[int, int], bytes] | None = None,
                 keep_size: int = 0,
                 keep: Callable[[bytes, int], bool] | None = None) -> Walk:
    """Walk chunk headers from `first`. With `top`, the walk must land exactly on it
    and top must end at `end`; without, it ends at the fencepost (a header of size
    0 after a 16-byte chunk) of a heap that is no longer the arena's newest.
    Chunks of `keep_size` whose contents pass `keep(window, offset of the chunk)`
    (or lie past the window) are listed in `candidates` (tcache structs)."""
    w = Walk(first, end)
    sizes = w.sizes
    free_idx: list[int] = []
    limit = top if top is not None else end
    bad = IS_MMAPPED | (NON_MAIN_ARENA if main else 0)
    pos = first
    base = first
    buf = b""
    blen = 0
    n = 0
    prev_size = -1  # the first chunk must have PREV_INUSE
    unpack = QWORD_PAIR.unpack_from
    append = sizes.append
    mark_free = free_idx.append
    while True:
        off = pos - base
        if off + 16 > blen:
            base, off = pos, 0
            buf = read(pos, min(WINDOW, end - pos))
            blen = len(buf)
            if blen < 16:
                raise HeapError(f"chunk header at {pos:#x} is outside the heap")
        psz, field_ = unpack(buf, off)
        size = field_ & ~SIZE_BITS
        if not field_ & PREV_INUSE:
            if psz != prev_size:
                if size == 0 and direct is not None:  # in a page the window skipped
                    psz, field_ = QWORD_PAIR.unpack(direct(pos, 16))
                    size = field_ & ~SIZE_BITS
                if not field_ & PREV_INUSE and psz != prev_size:
                    raise HeapError(f"chunk at {pos:#x}: PREV_INUSE clear but prev_size "
                                    f"{psz:#x} is not the previous chunk's size {prev_size:#x}")
            if not field_ & PREV_INUSE:
                mark_free(n - 1)
        if size < MINSIZE or size & 15 or field_ & bad or pos + size > limit:
            # the rare cases: the top, a fencepost, a header in a skipped page, or an error
            if size == 0 and direct is not None and field_ == 0:
                psz, field_ = QWORD_PAIR.unpack(direct(pos, 16))
                size = field_ & ~SIZE_BITS
            if pos == top:
                if field_ & (IS_MMAPPED | NON_MAIN_ARENA) or size < MINSIZE or size & 15:
                    raise HeapError(f"top chunk at {pos:#x} has an invalid header {field_:#x}")
                if not field_ & PREV_INUSE:  # free() merges a chunk into the top
                    raise HeapError(f"a free chunk lies right before the top at {pos:#x}")
                if pos + size != end:
                    raise HeapError(f"top chunk {pos:#x}+{size:#x} does not end at {end:#x}")
                w.top, w.top_size = pos, size
                break
            if top is None and size == 0:
                # fencepost: [chunk of size 16 | PREV_INUSE][header 0 | PREV_INUSE]
                if n and sizes[-1] == CHUNK_HDR_SZ:
                    sizes.pop()
                    n -= 1
                    pos -= CHUNK_HDR_SZ
                w.fence_bytes = end - pos
                w.end = pos
                break
            if size == CHUNK_HDR_SZ and top is None and not field_ & bad:
                pass  # maybe the 16-byte fencepost chunk; the 0 header must follow
            elif size & 15 or field_ & bad or size < MINSIZE:
                raise HeapError(f"chunk at {pos:#x} has an invalid header {field_:#x}")
            if pos + size > limit:
                raise HeapError(f"chunk at {pos:#x} of size {size:#x} runs past {limit:#x}")
        elif size == keep_size and (keep is None or off + size > blen or keep(buf, off)):
            w.candidates.append(pos)
        append(size)
        n += 1
        prev_size = size
        pos += size
    starts = w.starts
    starts.append(first)
    starts.extend(accumulate(sizes, initial=first))
    del starts[0]
    del starts[-1]
    free = bytearray(n)
    for j in free_idx:
        if j >= n:
            raise HeapError("the chunk before a fencepost is free")
        free[j] = 1
    k = free.find(b"\x01\x01")
    if k >= 0:  # free() coalesces: two free chunks side by side are a free in progress
        raise HeapError(f"two free chunks side by side at {starts[k]:#x}")
    w.free = free
    return w
