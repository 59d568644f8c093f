"""The budget gate (memtrace.reports.gate) on synthetic snapshot sequences: a
steady leak fails --max-growth, noise, a one-off step and start-up do not;
--max-rss and --max-pss name when and which mapping; short runs."""

from __future__ import annotations

import random

import pytest

from memtrace.reports.gate import Budgets, Gate, slope, sustained_slope

from .synth import LIBC, MiB, series, snap

PER_MIN = 1 / 60            # bytes/min -> bytes/s
BUDGET = 20 * MiB * PER_MIN  # 20 MiB/min


def run(ticks, budgets):    # type: ignore[no-untyped-def]
    gate = Gate(budgets)
    broke_at = []
    for i, tick in enumerate(ticks):
        if gate.observe(tick):
            broke_at.append(i)
    return gate, gate.finish(), broke_at


def leak(seconds: int, per_second: int, base: int = 50 * MiB, start: float = 1000.0):  # type: ignore[no-untyped-def]
    return series((start + t, {"[heap]": base + per_second * t, LIBC: 2 * MiB})
                  for t in range(seconds))


def test_least_squares_slope_is_exact_on_a_line():
    assert slope([(t, 3.0 * t + 7) for t in range(10)]) == pytest.approx(3.0)
    assert slope([(1.0, 5.0)]) is None and slope([(1.0, 5.0), (1.0, 6.0)]) is None


def test_a_leak_of_1_mib_per_second_fails_20_mib_per_minute():
    gate, [r], broke_at = run(leak(120, MiB), Budgets(max_growth=BUDGET))
    assert r.status == "failed" and gate.failed
    # judged first when a whole window (60 s) after the warm-up (10 s) is in
    assert broke_at == [70]
    b = r.breach
    assert b is not None and b.value == pytest.approx(MiB)
    assert b.ts - b.since_ts == pytest.approx(60)
    assert b.grew[0] == ("[heap]", "heap", 60 * MiB)      # over the window
    assert "[heap] +60.0 MiB" in b.message and "60.0 MiB/min > 20.0 MiB/min" in b.message


def test_a_slow_leak_below_the_budget_passes():
    _, [r], _ = run(leak(200, MiB // 4), Budgets(max_growth=BUDGET))   # 15 MiB/min
    assert r.status == "passed" and r.worst == pytest.approx(MiB / 4)


def test_noise_around_a_steady_footprint_passes():
    rng = random.Random(14)
    ticks = series((1000.0 + t, {"[heap]": 100 * MiB + rng.randint(-20, 20) * MiB})
                   for t in range(300))
    _, [r], _ = run(ticks, Budgets(max_growth=BUDGET))
    assert r.status == "passed"
    assert r.worst is not None and r.worst < BUDGET


def test_a_leak_hidden_in_noise_still_fails():
    rng = random.Random(15)
    ticks = series((1000.0 + t, {"[heap]": 100 * MiB + t * MiB + rng.randint(-10, 10) * MiB})
                   for t in range(150))
    _, [r], _ = run(ticks, Budgets(max_growth=BUDGET))
    assert r.status == "failed"


def test_a_one_off_step_is_not_a_sustained_growth():
    ticks = series((1000.0 + t, {"[heap]": (50 if t < 40 else 150) * MiB})
                   for t in range(200))
    _, [r], _ = run(ticks, Budgets(max_growth=BUDGET))
    assert r.status == "passed"
    # the whole-window slope alone would have failed it: the halves are what pass it
    assert r.worst is not None and r.worst > BUDGET


def test_a_staircase_leak_fails():
    ticks = series((1000.0 + t, {"[heap]": 50 * MiB + (t // 5) * 5 * MiB})   # 60 MiB/min
                   for t in range(150))
    _, [r], _ = run(ticks, Budgets(max_growth=BUDGET))
    assert r.status == "failed"


def test_start_up_growth_is_not_judged_during_the_warm_up():
    def ticks():  # type: ignore[no-untyped-def]
        # start-up: 25 MiB/s for 12 s, then a steady 300 MiB
        return series((1000.0 + t, {"[heap]": min(t, 12) * 25 * MiB}) for t in range(60))
    budgets = Budgets(max_growth=BUDGET, growth_window=10, warm_up=15)
    _, [r], _ = run(ticks(), budgets)
    assert r.status == "passed"
    _, [r0], _ = run(ticks(), Budgets(max_growth=BUDGET, growth_window=10, warm_up=0))
    assert r0.status == "failed"                # the same run without the warm-up


def test_a_run_shorter_than_the_window_is_judged_at_its_end():
    _, [r], broke_at = run(leak(15, MiB), Budgets(max_growth=BUDGET, warm_up=2))
    assert broke_at == [] and r.status == "failed"
    assert "judged once over the 12.0 s after the warm-up" in r.note


def test_a_run_too_short_to_judge_is_unchecked():
    _, [r], _ = run(leak(5, MiB), Budgets(max_growth=BUDGET, warm_up=2))
    assert r.status == "unchecked" and "too short" in r.note


def test_max_rss_names_when_and_what_grew_in_the_tree():
    ticks = []
    for t in range(10):
        a = snap(1, 1000.0 + t, {"[heap]": 10 * MiB + t * 30 * MiB, LIBC: 2 * MiB})
        b = snap(2, 1000.2 + t, {"[anon]": 100 * MiB, LIBC: 2 * MiB + t * MiB}, comm="child")
        ticks.append({1: a, 2: b})
    gate, [r], broke_at = run(ticks, Budgets(max_rss=300 * MiB))
    # tick t: 114 + 31 t MiB > 300 MiB first at t = 7 (331 MiB)
    assert broke_at == [7] and r.status == "failed"
    b = r.breach
    assert b is not None and b.value == 331 * MiB and b.ts == pytest.approx(1007.2)
    assert b.elapsed == pytest.approx(7.0)
    assert b.grew == [("[heap]", "heap", 210 * MiB), (LIBC, "library", 7 * MiB)]
    assert b.held[0] == ("[heap]", "heap", 220 * MiB)
    assert "rss 331.0 MiB > 300.0 MiB" in b.message and "libc.so.6 +7.0 MiB" in b.message
    assert r.worst == 114 * MiB + 9 * 31 * MiB             # the peak is kept too


def test_max_pss_uses_pss_and_is_unchecked_without_it():
    ticks = series(((1000.0 + t, {"[heap]": (100 + 10 * t) * MiB}) for t in range(10)),
                   pss=0.5)
    _, [r], broke_at = run(ticks, Budgets(max_pss=80 * MiB))
    # PSS is half the RSS: 50 + 5 t MiB > 80 MiB first at t = 7
    assert broke_at == [7] and r.breach is not None and r.breach.value == 85 * MiB
    _, [r2], _ = run(leak(10, MiB), Budgets(max_pss=80 * MiB))
    assert r2.status == "unchecked" and "PSS" in r2.note


def test_a_budget_breaks_once_and_the_rest_go_on():
    ticks = leak(100, MiB)
    gate, results, broke_at = run(ticks, Budgets(max_rss=60 * MiB, max_growth=BUDGET))
    rss, growth = results
    assert rss.breach is not None and growth.breach is not None
    assert broke_at == [9, 70]          # 52 + 9 = 61 MiB > 60 MiB at tick 9
    assert rss.breach.ts == 1009.0


def test_sustained_slope_needs_points_in_both_halves():
    assert sustained_slope([(float(t), 0.0) for t in range(5)]) is None
    assert sustained_slope([(float(t), 2.0 * t) for t in range(6)]) == pytest.approx(
        (2.0, 2.0, 2.0))


def test_pss_growth_counts_from_the_first_tick_with_pss():
    ticks = series(((1000.0 + t, {"[heap]": (100 + 10 * t) * MiB}) for t in range(10)),
                   pss=0.5)
    ticks[0][100]["pss_bytes"] = None       # PSS not computed yet at the first tick
    _, [r], _ = run(ticks, Budgets(max_pss=80 * MiB))
    b = r.breach
    assert b is not None and b.since_ts == 1001.0
    assert b.grew == [("[heap]", "heap", 30 * MiB)]     # (170 - 110) / 2
