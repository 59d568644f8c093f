"""Sampling page faults by bytes for --stacks: the gap table BPF draws from and
the weight of a sample. Pure (docs/stacks.md, "Capture (BPF)").

BPF counts the bytes of watched faults down from a gap and samples the fault
that exhausts it; the gaps follow an exponential distribution of mean
`period` bytes, so whether a fault is sampled does not depend on any earlier
fault (the scheme of jemalloc, tcmalloc and heapprofd). BPF has no floating
point: user space fills a table with the distribution's quantiles and BPF
picks an entry with bpf_get_prandom_u32()."""

from __future__ import annotations

import math

GAP_TABLE_SIZE = 4096           # MT_STACK_GAPS in bpf/memtrace.h
DEFAULT_STACK_PERIOD = 512 * 1024   # mean bytes between samples (jemalloc's default)


def exponential_gaps(period: int, n: int = GAP_TABLE_SIZE) -> list[int]:
    """n gaps in bytes, the midpoint quantiles of an exponential distribution
    of mean `period`: an index drawn uniformly gives that distribution, with
    the table's mean equal to the period (random draws would miss it by
    period / sqrt(n), 1.6 % for 4096). Every gap is at least 1 (BPF reads 0 as
    "table not filled")."""
    if period <= 0 or n <= 0:
        raise ValueError("period and table size must be positive")
    return [max(1, round(-period * math.log1p(-(i + 0.5) / n))) for i in range(n)]


def sample_probability(period: int, event_bytes: int) -> float:
    """Chance that an event of `event_bytes` is sampled: it holds at least
    one point of a Poisson process of rate 1/period."""
    return -math.expm1(-event_bytes / period)


def sample_weight(period: int, event_bytes: int) -> int:
    """Bytes a sampled event stands for (its expected bytes): event_bytes
    divided by its chance of being sampled, so sums of weights are unbiased.
    For a page and a period much larger than it, about period + page / 2."""
    return round(event_bytes / sample_probability(period, event_bytes))
