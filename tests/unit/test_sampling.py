"""memtrace.trace.sampling: the exponential gap table BPF draws from, the weight
of a sample, and the countdown of bpf/memtrace.bpf.c replayed in Python."""

from __future__ import annotations

import math
import random

import pytest

from memtrace.trace.sampling import (
    GAP_TABLE_SIZE,
    exponential_gaps,
    sample_probability,
    sample_weight,
)

PAGE = 4096
KIB = 1024


@pytest.mark.parametrize("period", [4 * KIB, 256 * KIB, 512 * KIB, 8 << 20])
def test_table_mean_is_the_period(period):
    gaps = exponential_gaps(period)
    assert len(gaps) == GAP_TABLE_SIZE
    assert abs(sum(gaps) / len(gaps) - period) <= 0.02 * period


@pytest.mark.parametrize("period", [256 * KIB, 512 * KIB])
def test_table_has_the_exponential_shape(period):
    """The share of gaps above t is exp(-t / period), within one table entry,
    from the body to the far tail; and the spread equals the mean."""
    gaps = exponential_gaps(period)
    n = len(gaps)
    for t in (0.01, 0.1, 0.5, 1.0, 2.0, 3.0, 5.0, 7.0):
        above = sum(1 for g in gaps if g > t * period) / n
        assert abs(above - math.exp(-t)) <= 1.5 / n, t
    mean = sum(gaps) / n
    sd = math.sqrt(sum((g - mean) ** 2 for g in gaps) / n)
    assert abs(sd / mean - 1) < 0.02        # coefficient of variation of an exponential
    assert max(gaps) > 8 * period           # the tail is there


def test_table_gaps_are_positive():
    assert min(exponential_gaps(1)) >= 1     # 0 would read as "table not filled" in BPF
    with pytest.raises(ValueError):
        exponential_gaps(0)


def test_weight_is_expected_bytes():
    period = 256 * KIB
    w = sample_weight(period, PAGE)
    assert w == round(PAGE / (1 - math.exp(-PAGE / period)))
    assert abs(w - (period + PAGE / 2)) < 64         # about P + page/2 for P >> page
    assert abs(sample_probability(period, PAGE) * w - PAGE) < 1
    # an event as large as the period: sampled more often than not, weight above it
    assert sample_probability(period, period) == pytest.approx(1 - math.exp(-1))


class Countdown:
    """One CPU's countdown as bpf/memtrace.bpf.c keeps it (count_down)."""

    def __init__(self, gaps: list[int], rng: random.Random) -> None:
        self.gaps, self.rng = gaps, rng
        self.left, self.armed = 0, False

    def fault(self) -> bool:
        self.left -= PAGE
        if self.left > 0:
            return False
        armed = self.armed
        self.left = self.gaps[self.rng.getrandbits(32) & (GAP_TABLE_SIZE - 1)]
        self.armed = self.left > 0
        return armed


def test_countdown_shared_by_two_processes_is_unbiased():
    """Two processes interleaving faults on one countdown each get sums of
    weights close to their own bytes (exponential gaps are memoryless), and
    a fresh countdown does not sample its first fault."""
    period = 256 * KIB
    rng = random.Random(13)
    cpu = Countdown(exponential_gaps(period), rng)
    assert cpu.fault() is False and cpu.armed
    weight = sample_weight(period, PAGE)
    pages = {"a": 3 * 65536, "b": 65536}                # 768 MiB and 256 MiB
    left = dict(pages)
    sums = {"a": 0, "b": 0}
    while left["a"] or left["b"]:
        who = "a" if rng.random() < left["a"] / (left["a"] + left["b"]) else "b"
        left[who] -= 1
        if cpu.fault():
            sums[who] += weight
    for who, n in pages.items():
        true = n * PAGE
        samples = true / period
        # four standard deviations of a Poisson count of `samples`
        assert abs(sums[who] - true) <= 4 * true / math.sqrt(samples), who
