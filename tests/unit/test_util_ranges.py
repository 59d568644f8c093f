"""memtrace.util.ranges: the one range merger, checked on random ranges against a
naive reference (the set of covered points) and against the routines it
replaced (model.merge_spans, heap.ResidentMap's loop, heap.merge_runs,
pss.coalesce, the run joining of PssReader.scan), copied here as they were."""

from __future__ import annotations

import random

import pytest

from memtrace.heap.figures import merge_runs
from memtrace.heap.memory import ResidentMap
from memtrace.util.ranges import merge_ranges


# -- the replaced routines, as they were --------------------------------------------
def old_merge_spans(spans):            # model.merge_spans, heap.ResidentMap.__init__
    merged = []
    for first, last in sorted(spans):
        if merged and first <= merged[-1][1]:
            if last > merged[-1][1]:
                merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return merged


def old_coalesce(runs, max_gap):       # pss.coalesce (sorted input)
    out = []
    for start, end in runs:
        if out and start - out[-1][1] <= max_gap:
            out[-1] = (out[-1][0], max(end, out[-1][1]))
        else:
            out.append((start, end))
    return out


def old_merge_runs(chunks):            # heap.merge_runs, (address, size)
    out = []
    for p, s in sorted(chunks):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + s)
        else:
            out.append((p, s))
    return out


def naive(ranges, max_gap=0):
    """Covered points, with gaps of at most max_gap between ranges filled."""
    pts = sorted({i for a, b in ranges for i in range(a, b)})
    out = []
    for i in pts:
        if out and i - out[-1][1] <= max_gap:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def random_ranges(rng, n_max=14, span=80, length=9, empty=False):
    out = []
    for _ in range(rng.randrange(0, n_max)):
        a = rng.randrange(0, span)
        out.append((a, a + rng.randrange(0 if empty else 1, length)))
    return out


SEEDS = range(400)


@pytest.mark.parametrize("max_gap", [0, 1, 3, 10])
def test_merge_is_the_covered_set(max_gap):
    rng = random.Random(max_gap)
    for _ in SEEDS:
        ranges = random_ranges(rng)
        merged = merge_ranges(ranges, max_gap)
        assert merged == naive(ranges, max_gap), ranges
        for (_, b), (c, _) in zip(merged, merged[1:]):
            assert c - b > max_gap          # sorted, apart by more than max_gap


def test_same_as_merge_spans_and_resident_map():
    rng = random.Random(1)
    for _ in SEEDS:
        ranges = random_ranges(rng, empty=True)
        assert merge_ranges(ranges) == old_merge_spans(ranges), ranges
        assert merge_ranges(iter(ranges)) == old_merge_spans(ranges)
        m = ResidentMap(ranges)
        assert list(zip(m.starts, m.ends)) == old_merge_spans(ranges)


@pytest.mark.parametrize("max_gap", [0, 2, 4096])
def test_same_as_coalesce_on_sorted_runs(max_gap):
    rng = random.Random(2)
    for _ in SEEDS:
        runs = sorted(random_ranges(rng, empty=True))
        assert merge_ranges(runs, max_gap, presorted=True) == old_coalesce(runs, max_gap)
        assert merge_ranges(runs, max_gap) == old_coalesce(runs, max_gap)


def test_same_as_merge_runs_on_chunks_that_do_not_overlap():
    rng = random.Random(3)
    for _ in SEEDS:
        chunks, p = [], 0
        for _ in range(rng.randrange(0, 14)):      # chunks tile a heap, some apart
            p += rng.choice((0, 0, 16, 32))
            size = rng.choice((16, 32, 48, 4096))
            chunks.append((p, size))
            p += size
        rng.shuffle(chunks)
        assert merge_runs(chunks) == old_merge_runs(chunks), chunks


def test_examples():
    assert merge_ranges([]) == []
    assert merge_ranges([(5, 6), (1, 2), (2, 3), (10, 12), (11, 11), (4, 5)]) == [
        (1, 3), (4, 6), (10, 12)]
    assert merge_ranges([(7, 7)]) == [(7, 7)]                  # an empty range stays
    assert merge_ranges([(0, 10), (12, 20), (40, 50)], 2) == [(0, 20), (40, 50)]


def old_scan_runs(regions):            # pss.PssReader.scan: kernel regions, side by side
    runs = []
    for r_start, r_end, _ in regions:
        if runs and runs[-1][1] == r_start:
            runs[-1] = (runs[-1][0], r_end)
        else:
            runs.append((r_start, r_end))
    return runs


def test_same_as_pss_scan_on_kernel_regions():
    """PAGEMAP_SCAN gives disjoint regions in address order."""
    rng = random.Random(4)
    for _ in SEEDS:
        regions, p = [], 0
        for _ in range(rng.randrange(0, 14)):
            p += rng.choice((0, 0, 4096))
            size = rng.choice((4096, 8192, 1 << 21))
            regions.append((p, p + size, rng.randrange(4)))
            p += size
        got = merge_ranges(((s, e) for s, e, _ in regions), presorted=True)
        assert got == old_scan_runs(regions)
