"""One range merger: half-open [start, end) integer ranges (addresses, chunk
numbers) sorted and joined where they overlap, touch, or lie at most `max_gap`
apart. Used for the chunks a tick rescans (tracker, livepss), the
resident runs of a heap (heap.ResidentMap), the free chunks malloc_trim would
release (heap) and the pagemap reads of PSS and its
PAGEMAP_SCAN runs (pss, livepss)."""

from __future__ import annotations

from collections.abc import Iterable


def merge_ranges(ranges: Iterable[tuple[int, int]], max_gap: int = 0,
                 presorted: bool = False) -> list[tuple[int, int]]:
    """The ranges in address order, each run of ranges that overlap, touch or
    are at most `max_gap` apart joined into one; an empty range is kept (joined
    with a range it lies in or next to). presorted: the ranges already come by
    start (a hot path saves the sort; the result is the same)."""
    out: list[tuple[int, int]] = []
    for start, end in (ranges if presorted else sorted(ranges)):
        if out and start - out[-1][1] <= max_gap:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out
