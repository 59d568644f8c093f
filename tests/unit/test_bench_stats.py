"""The benchmarks' verdicts: the median's distribution-free interval
(benchmarks/benchcommon.py) and how overhead.py reads a goal against it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import benchcommon as bc  # noqa: E402
import overhead  # noqa: E402


def coverage(n: int, k: int) -> float:
    """P(x_(k) <= median <= x_(n-k+1)) for n draws of a continuous distribution."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n


@pytest.mark.parametrize("n", [5, 7, 9, 11, 15, 21, 25, 31])
def test_interval_is_the_narrowest_with_90_percent(n):
    xs = [float(i) for i in range(1, n + 1)]
    lo, hi = bc.median_ci(list(reversed(xs)))       # order of the input does not matter
    k = int(lo)
    assert hi == n - k + 1
    assert coverage(n, k) >= 0.90
    assert coverage(n, k + 1) < 0.90                # one narrower would not hold 90 %


def test_too_few_rounds_give_no_interval():
    assert bc.median_ci([1.0, 2.0, 3.0, 4.0]) is None
    assert bc.median_ci([]) is None


def test_verdict_needs_the_whole_interval_on_one_side():
    assert overhead.verdict((1.02, 1.04), 1.03, 1.05) == "met"
    assert overhead.verdict((1.051, 1.07), 1.06, 1.05) == "MISSED"
    assert overhead.verdict((1.03, 1.07), 1.048, 1.05) == "not decided"
    assert overhead.verdict(None, 1.048, 1.05) == "met"


def test_memtrace_against_the_peer_round_by_round():
    def run(kind: str, rep: int, s: float) -> dict[str, object]:
        return {"kind": kind, "rep": rep, "elapsed_s": s, "loop_cpu_s": s, "disturbed": False,
                "cpu_loop_s": 0.0, "loop_wall_s": s, "memtrace": kind == "memtrace",
                "peer": "p", "peer_events": 1, "foreign_cpu_s": 0.0}
    runs = []
    for rep in range(9):                 # the host slows down round by round
        slow = 1 + rep / 10
        runs += [run("baseline", rep, 1.0 * slow), run("memtrace", rep, 1.02 * slow),
                 run("stackcount", rep, 1.10 * slow)]
    for r in runs:
        if r["memtrace"]:
            r.update(memtrace_exit=0, first_snapshot_wall_s=0.1, cpu_to_first_snapshot_s=0.1,
                     vm_hwm_kib=1)
    s = overhead.summarise("fault", runs)
    assert s["kinds"]["memtrace"]["paired_ratio"] == pytest.approx(1.02)
    assert s["kinds"]["memtrace"]["paired_ci90"] == pytest.approx((1.02, 1.02))
    assert "ahead" in overhead._against_peer(s)
