"""The memory budget gate (docs/gate.md): fed the snapshots of a process tree
tick by tick, it says which budget broke, when, and which mappings held or grew
the most. Pure (no I/O, no clock): `run` feeds it live, `check` from a recording.

Budgets, all on the tree (the sum over the processes alive at one tick, as
run's summary counts it):

- max_rss, max_pss: the total exceeds the budget at any tick (the first such
  tick is the breach; the largest value is kept too).
- max_growth (bytes per second): a *sustained* growth rate. After the warm-up,
  the least-squares slope of the total RSS over the last `growth_window`
  seconds exceeds the budget, and the slope over each half of that window is
  at least half the budget: a leak grows in both halves, while a one-off step
  (a cache filled once, a burst of start-up) lies in one half and leaves the
  other flat. A run shorter than warm-up + window is judged once at its end,
  over everything after the warm-up (MIN_POINTS samples at least)."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from memtrace.util.units import fmt_bytes, fmt_delta

TOP = 3                 # mappings named in a breach (held most, grew most)
MIN_POINTS = 6          # samples a growth slope needs (3 per half)

Snapshots = Mapping[int, Mapping[str, Any]]
GroupKey = tuple[str, str]          # (mapping identity, kind)


@dataclass(frozen=True)
class Budgets:
    """What the gate checks; None: not checked."""

    max_rss: int | None = None
    max_pss: int | None = None
    max_growth: float | None = None     # bytes per second
    growth_window: float = 60.0         # seconds
    warm_up: float = 10.0               # seconds after the first tick not judged for growth

    def any(self) -> bool:
        return any(v is not None for v in (self.max_rss, self.max_pss, self.max_growth))


@dataclass
class Breach:
    """The first tick a budget broke: its value, when, and who held or grew most
    (`held`, `grew`: (mapping, kind, bytes), largest first)."""

    ts: float
    elapsed: float                      # seconds since the gate's first tick
    value: float
    held: list[tuple[str, str, int]]
    grew: list[tuple[str, str, int]]
    since_ts: float                     # grew: since this tick
    message: str = ""


@dataclass
class BudgetResult:
    """One budget's verdict: "passed", "failed" or "unchecked" (no data: PSS
    off, a run too short to judge a growth rate; `note` says why)."""

    name: str                           # "max-rss", "max-pss", "max-growth"
    limit: float
    unit: str                           # "bytes" or "bytes_per_second"
    status: str = "unchecked"
    worst: float | None = None          # largest total (or slope) seen
    worst_ts: float | None = None
    breach: Breach | None = None
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def group_totals(snaps: Iterable[Mapping[str, Any]], field_name: str = "rss_bytes",
                 ) -> dict[GroupKey, int]:
    """Bytes per mapping identity and kind, summed over the processes (the
    segments of one library are one row; so are all anonymous mappings)."""
    sums: dict[GroupKey, int] = {}
    for snap in snaps:
        for m in snap.get("mappings") or ():
            key = (str(m.get("mapping") or m.get("path") or "[anon]"), str(m.get("kind", "")))
            sums[key] = sums.get(key, 0) + int(m.get(field_name) or 0)
    return sums


def top_held(groups: Mapping[GroupKey, int], n: int = TOP) -> list[tuple[str, str, int]]:
    rows = sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))
    return [(k[0], k[1], v) for k, v in rows[:n] if v > 0]


def top_grew(now: Mapping[GroupKey, int], before: Mapping[GroupKey, int], n: int = TOP,
             ) -> list[tuple[str, str, int]]:
    deltas = {k: now.get(k, 0) - before.get(k, 0) for k in set(now) | set(before)}
    rows = sorted(deltas.items(), key=lambda kv: (-kv[1], kv[0]))
    return [(k[0], k[1], v) for k, v in rows[:n] if v > 0]


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t, y); None for fewer than 2 distinct times."""
    n = len(points)
    if n < 2:
        return None
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var <= 0:
        return None
    return sum((t - mt) * (y - my) for t, y in points) / var


def sustained_slope(points: Sequence[tuple[float, float]]) -> tuple[float, float, float] | None:
    """(whole, first half, second half) slopes, the halves split at the middle
    time; None without MIN_POINTS samples or 3 in each half."""
    if len(points) < MIN_POINTS:
        return None
    mid = (points[0][0] + points[-1][0]) / 2
    first = [p for p in points if p[0] <= mid]
    second = [p for p in points if p[0] >= mid]
    if len(first) < 3 or len(second) < 3:
        return None
    whole, a, b = slope(points), slope(first), slope(second)
    if whole is None or a is None or b is None:
        return None
    return whole, a, b


def is_sustained(slopes: tuple[float, float, float], limit: float) -> bool:
    whole, a, b = slopes
    return whole > limit and a >= limit / 2 and b >= limit / 2


# ---- how a breach is said


def clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def short_name(mapping: str, kind: str) -> str:
    """A mapping as a breach line names it: a file's base name, else the identity."""
    if kind in ("library", "executable", "file", "shmem") and "/" in mapping:
        return os.path.basename(mapping) or mapping
    return mapping


def fmt_rate(bytes_per_second: float) -> str:
    """A growth rate per minute: `60.0 MiB/min`."""
    return f"{fmt_bytes(bytes_per_second * 60)}/min"


def _list(rows: Sequence[tuple[str, str, int]], delta: bool) -> str:
    if not rows:
        return "nothing"
    f = fmt_delta if delta else fmt_bytes
    return ", ".join(f"{short_name(m, k)} {f(v)}" for m, k, v in rows)


def describe(result: BudgetResult) -> str:
    """The one line that names a breach (without the `memtrace: ` prefix)."""
    b = result.breach
    assert b is not None
    when = f"at {clock(b.ts)} (+{b.elapsed:.1f} s)"
    if result.name == "max-growth":
        span = b.ts - b.since_ts
        return (f"budget: rss growth {fmt_rate(b.value)} > {fmt_rate(result.limit)} over "
                f"{span:.1f} s {when}: grew most {_list(b.grew, True)}")
    what = "rss" if result.name == "max-rss" else "pss"
    return (f"budget: {what} {fmt_bytes(b.value)} > {fmt_bytes(result.limit)} {when}: "
            f"largest growth since the start {_list(b.grew, True)}; "
            f"held most {_list(b.held, False)}")


# ---- the gate


@dataclass
class _Sample:
    ts: float
    rss: int
    groups: dict[GroupKey, int] = field(default_factory=dict)


class Gate:
    """Feed it the latest snapshot of every process of the tree once per tick
    (observe); it returns the budgets that broke at that tick. finish() judges
    what can only be judged at the end and returns every budget's result."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets
        self.results: dict[str, BudgetResult] = {}
        if budgets.max_rss is not None:
            self.results["max-rss"] = BudgetResult("max-rss", budgets.max_rss, "bytes")
        if budgets.max_pss is not None:
            self.results["max-pss"] = BudgetResult("max-pss", budgets.max_pss, "bytes")
        if budgets.max_growth is not None:
            self.results["max-growth"] = BudgetResult(
                "max-growth", budgets.max_growth, "bytes_per_second")
        self.start_ts: float | None = None
        self.last_ts: float | None = None
        self.ticks = 0
        self._start_groups: dict[str, dict[GroupKey, int]] = {}
        self._start_ts: dict[str, float] = {}
        self._window: deque[_Sample] = deque()
        self._judged_growth = False

    def observe(self, snapshots: Snapshots) -> list[BudgetResult]:
        snaps = list(snapshots.values())
        if not snaps:
            return []
        ts = max(float(s["ts"]) for s in snaps)
        self.ticks += 1
        if self.start_ts is None:
            self.start_ts = ts
            self._start_groups["rss_bytes"] = group_totals(snaps)
            self._start_ts["rss_bytes"] = ts
        self.last_ts = ts
        broke: list[BudgetResult] = []
        rss = sum(int(s.get("rss_bytes") or 0) for s in snaps)
        if self._total(self.results.get("max-rss"), snaps, ts, rss, "rss_bytes"):
            broke.append(self.results["max-rss"])
        pss_values = [s.get("pss_bytes") for s in snaps]
        if None not in pss_values:
            if "max-pss" in self.results and "pss_bytes" not in self._start_groups:
                # growth is counted from the first tick with PSS figures
                self._start_groups["pss_bytes"] = group_totals(snaps, "pss_bytes")
                self._start_ts["pss_bytes"] = ts
            pss = sum(int(v or 0) for v in pss_values)
            if self._total(self.results.get("max-pss"), snaps, ts, pss, "pss_bytes"):
                broke.append(self.results["max-pss"])
        growth = self.results.get("max-growth")
        if growth is not None and self._growth(growth, snaps, ts, rss, final=False):
            broke.append(growth)
        return broke

    def _total(self, result: BudgetResult | None, snaps: list[Mapping[str, Any]], ts: float,
               value: int, field_name: str) -> bool:
        """Whether `result`'s budget broke for the first time at this tick."""
        if result is None:
            return False
        if result.worst is None or value > result.worst:
            result.worst, result.worst_ts = value, ts
        if result.status == "unchecked":
            result.status = "passed"
        if value <= result.limit or result.breach is not None:
            return False
        groups = group_totals(snaps, field_name)
        assert self.start_ts is not None
        result.status = "failed"
        result.breach = Breach(ts, ts - self.start_ts, value, top_held(groups),
                               top_grew(groups, self._start_groups[field_name]),
                               self._start_ts[field_name])
        result.breach.message = describe(result)
        return True

    def _growth(self, result: BudgetResult, snaps: list[Mapping[str, Any]], ts: float,
                rss: int, final: bool) -> bool:
        assert self.start_ts is not None
        if not final:
            if ts - self.start_ts < self.budgets.warm_up:
                return False
            self._window.append(_Sample(ts, rss, group_totals(snaps)))
            window = self.budgets.growth_window
            while len(self._window) > 1 and self._window[1].ts <= ts - window:
                self._window.popleft()
            if ts - self._window[0].ts < window * 0.999:
                return False        # not a whole window yet (finish judges a short run)
        slopes = sustained_slope([(s.ts, s.rss) for s in self._window])
        if slopes is None:
            return False
        self._judged_growth = True
        if result.status == "unchecked":
            result.status = "passed"
        if result.worst is None or slopes[0] > result.worst:
            result.worst, result.worst_ts = slopes[0], ts
        if result.breach is not None or not is_sustained(slopes, result.limit):
            return False
        first, last = self._window[0], self._window[-1]
        result.status = "failed"
        result.breach = Breach(last.ts, last.ts - self.start_ts, slopes[0],
                               top_held(last.groups), top_grew(last.groups, first.groups),
                               first.ts)
        result.breach.message = describe(result)
        return True

    def finish(self) -> list[BudgetResult]:
        """Every budget's result; a growth budget that no whole window judged is
        judged once over the samples after the warm-up."""
        growth = self.results.get("max-growth")
        if growth is not None and not self._judged_growth and self._window:
            self._growth(growth, [], self._window[-1].ts, self._window[-1].rss, final=True)
            if self._judged_growth:
                span = self._window[-1].ts - self._window[0].ts
                growth.note = (f"judged once over the {span:.1f} s after the warm-up "
                               f"(shorter than the {self.budgets.growth_window:g} s window)")
        for r in self.results.values():
            if r.status == "unchecked" and not r.note:
                r.note = self._why_unchecked(r)
        return list(self.results.values())

    def _why_unchecked(self, r: BudgetResult) -> str:
        if self.ticks == 0:
            return "no snapshot was taken"
        if r.name == "max-pss":
            return "no PSS figures (PSS off or unavailable: --pss-interval)"
        return (f"too short to judge a growth rate: {MIN_POINTS} snapshots after the "
                f"{self.budgets.warm_up:g} s warm-up are needed ({len(self._window)} taken)")

    @property
    def failed(self) -> bool:
        return any(r.failed for r in self.results.values())
