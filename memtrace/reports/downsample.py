"""Fewer points for long series, keeping what matters: every series of a
chart is cut at the same ticks (so stacked areas still add up), chosen per
bucket as the ticks of the lowest and highest total and the highest of each
other measure. The peak of every measure is therefore a point of the chart,
with its exact value; counts between kept ticks are summed onto the next one."""

from __future__ import annotations

from collections.abc import Sequence


def pick(n: int, measures: Sequence[Sequence[int | None]], max_points: int) -> list[int]:
    """Indices (ascending) of the ticks to keep out of `n`: all when n <=
    max_points (or max_points <= 0); else per bucket the argmin and argmax of the
    first measure and the argmax of the others, at most max_points in all. The
    global maximum of every measure is always kept."""
    if max_points <= 0 or n <= max_points:
        return list(range(n))
    peaks = {p for p in (argmax(values) for values in measures) if p is not None}
    per_bucket = 1 + len(measures)              # argmin of the first + argmax of each
    buckets = max(1, max_points // per_bucket)
    out = sorted(_extremes(n, measures, buckets) | peaks)
    if len(out) < 0.6 * max_points:             # the extremes often coincide: finer buckets
        finer = sorted(_extremes(n, measures, int(buckets * 0.9 * max_points / len(out)))
                       | peaks)
        if len(finer) <= max_points:
            out = finer
    if len(out) > max_points:                   # thin evenly, never the peaks or the ends
        must = {0, n - 1} | peaks
        rest = [i for i in out if i not in must]
        step = len(rest) / max(1, max_points - len(must))
        thinned = {rest[int(j * step)] for j in range(max_points - len(must))
                   if int(j * step) < len(rest)}
        out = sorted(must | thinned)
    return out


def _extremes(n: int, measures: Sequence[Sequence[int | None]], buckets: int) -> set[int]:
    keep: set[int] = {0, n - 1}
    for b in range(buckets):
        lo, hi = b * n // buckets, (b + 1) * n // buckets
        if lo >= hi:
            continue
        for k, values in enumerate(measures):
            window = [(v, i) for i, v in enumerate(values[lo:hi], lo) if v is not None]
            if not window:
                continue
            keep.add(max(window)[1])
            if k == 0:
                keep.add(min(window)[1])
    return keep


def argmax(values: Sequence[int | None]) -> int | None:
    """The first index of the largest value (None when there is none)."""
    best: int | None = None
    for i, v in enumerate(values):
        if v is not None and (best is None or v > values[best]):  # type: ignore[operator]
            best = i
    return best


def take(values: Sequence[int | float | None], idx: Sequence[int]) -> list[int | float | None]:
    return [values[i] for i in idx]


def summed(counts: Sequence[int], idx: Sequence[int]) -> list[int]:
    """Counts per kept tick: each the sum since the previous kept tick (the
    first: since the start), so the total stays the same."""
    out, prev = [], -1
    for i in idx:
        out.append(sum(counts[prev + 1:i + 1]))
        prev = i
    return out
