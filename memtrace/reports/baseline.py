"""`memtrace check --baseline`: a recording's peaks against a baseline
recording's (docs/gate.md). Compared: the tree's peak RSS, its peak PSS (when
both recorded it), each process name's peak and each library's peak (by file
name). One breaks when it is more than `max_increase` (a fraction) above the
baseline and at least `ignore_below` bytes more; a process or library the
baseline did not have counts from 0."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from memtrace.reports.gate import clock
from memtrace.reports.profile import Peak, RunProfile
from memtrace.reports.results import Verdict
from memtrace.util.units import fmt_bytes, fmt_delta


@dataclass
class Increase:
    what: str           # "tree RSS", "tree PSS", "process", "library"
    key: str
    baseline: int
    value: int
    ts: float
    elapsed: float

    def line(self, max_increase: float) -> str:
        name = self.what if self.what.startswith("tree") else f"{self.what} {self.key}"
        limit = self.baseline * (1 + max_increase)
        base = (f"baseline {fmt_bytes(self.baseline)} + {max_increase * 100:g}% = "
                f"{fmt_bytes(limit)}" if self.baseline else "not in the baseline")
        grew = fmt_delta(self.value - self.baseline)
        return (f"budget: {name} peak {fmt_bytes(self.value)} ({grew}) > {base}, "
                f"at {clock(self.ts)} (+{self.elapsed:.1f} s)")


def _broke(base: int, value: int, max_increase: float, ignore_below: int) -> bool:
    return value > base * (1 + max_increase) and value - base >= ignore_below


def _compare(what: str, runs: Mapping[str, Peak], bases: Mapping[str, Peak], first_ts: float,
             max_increase: float, ignore_below: int) -> list[Increase]:
    out = []
    for key, peak in runs.items():
        base = bases[key].bytes if key in bases else 0
        if _broke(base, peak.bytes, max_increase, ignore_below):
            out.append(Increase(what, key, base, peak.bytes, peak.ts, peak.ts - first_ts))
    out.sort(key=lambda i: (-(i.value - i.baseline), i.key))
    return out


def _verdict(name: str, found: list[Increase], checked: int, max_increase: float,
             ) -> Verdict:
    details = {"max_increase": max_increase, "compared": checked,
               "increases": [{"what": i.what, "name": i.key, "baseline_bytes": i.baseline,
                              "bytes": i.value, "ts": i.ts,
                              "elapsed_seconds": round(i.elapsed, 3)} for i in found]}
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        return Verdict(name, "max-increase", "failed", found[0].line(max_increase) + more,
                       details)
    if not checked:
        return Verdict(name, "max-increase", "unchecked",
                       f"{name}: not checked: nothing to compare", details)
    return Verdict(name, "max-increase", "passed",
                   f"{name}: passed: {checked} compared, none above the baseline "
                   f"+ {max_increase * 100:g}%", details)


def compare_to_baseline(run: RunProfile, base: RunProfile, max_increase: float,
                        ignore_below: int) -> list[Verdict]:
    """Four verdicts: tree peak RSS, tree peak PSS, processes, libraries."""
    first = run.first_ts if run.first_ts is not None else 0.0
    pct = f"{max_increase * 100:g}%"
    tree = {"tree": Peak(run.peak.rss, run.peak.ts)} if run.ticks else {}
    base_tree = {"tree": Peak(base.peak.rss, base.peak.ts)} if base.ticks else {}
    found = _compare("tree RSS", tree, base_tree, first, max_increase,
                     ignore_below) if base_tree else []
    verdicts = [_verdict(f"max-increase {pct}: tree peak RSS", found,
                         len(tree) * len(base_tree), max_increase)]
    if run.peak_pss is not None and base.peak_pss is not None:
        found = _compare("tree PSS", {"tree": run.peak_pss}, {"tree": base.peak_pss}, first,
                         max_increase, ignore_below)
        verdicts.append(_verdict(f"max-increase {pct}: tree peak PSS", found, 1, max_increase))
    else:
        verdicts.append(Verdict(f"max-increase {pct}: tree peak PSS", "max-increase",
                                "unchecked", f"max-increase {pct}: tree peak PSS: not checked: "
                                "not recorded in both recordings", {"max_increase": max_increase}))
    verdicts.append(_verdict(f"max-increase {pct}: processes",
                             _compare("process", run.processes, base.processes, first,
                                      max_increase, ignore_below),
                             len(run.processes), max_increase))
    verdicts.append(_verdict(f"max-increase {pct}: libraries",
                             _compare("library", run.libraries, base.libraries, first,
                                      max_increase, ignore_below),
                             len(run.libraries), max_increase))
    return verdicts
