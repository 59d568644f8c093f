"""memtrace.trace.model: chunked runs, VMA lookup and incremental attribution,
checked against brute force."""

from __future__ import annotations

import random
import re

import pytest

from memtrace.trace.events import CHUNK_SHIFT, CHUNK_SIZE
from memtrace.trace.model import AddressSpace, Resident, chunk_span
from memtrace.trace.procfs import Vma
from memtrace.util.ranges import merge_ranges as merge_spans

P = 4096
C = CHUNK_SIZE
BASE = 0x7F0000000000  # chunk aligned
assert BASE % C == 0


def vma(start: int, end: int, path: bytes = b"", perms: str = "rw-p") -> Vma:
    return Vma(start, end, perms, 0, "00:00", 0, path)


def brute(runs, v: Vma) -> tuple[int, int]:
    """Independent reference: overlap of every run with the VMA."""
    anon = other = 0
    for s, e, is_anon in runs:
        n = max(0, min(e, v.end) - max(s, v.start))
        if is_anon:
            anon += n
        else:
            other += n
    return anon, other


def assert_consistent(space: AddressSpace) -> None:
    """resident has exactly one entry per VMA and totals() is their sum."""
    assert set(space.resident) == {v.start for v in space.vmas}
    anon = sum(r.anon for r in space.resident.values())
    other = sum(r.other for r in space.resident.values())
    t = space.totals()
    assert (t.anon, t.other) == (anon, other)


# -- helpers ------------------------------------------------------------------
def test_chunk_span():
    assert chunk_span(0, 1) == (0, 1)
    assert chunk_span(0, C) == (0, 1)
    assert chunk_span(0, C + 1) == (0, 2)
    assert chunk_span(C - P, C + P) == (0, 2)
    assert chunk_span(BASE + 3 * C, BASE + 3 * C + P) == (
        (BASE >> CHUNK_SHIFT) + 3,
        (BASE >> CHUNK_SHIFT) + 4,
    )
    first, last = chunk_span(0x7FFFFFFDE000, 0x7FFFFFFFF000)
    assert (first, last) == (0x3FFFFFF, 0x4000000)


def test_merge_spans():
    assert merge_spans([]) == []
    assert merge_spans([(5, 6), (1, 2), (2, 3), (10, 12), (11, 11), (4, 5)]) == [
        (1, 3),
        (4, 6),
        (10, 12),
    ]
    assert merge_spans([(0, 10), (2, 3), (3, 4)]) == [(0, 10)]
    assert merge_spans(iter([(3, 4), (3, 4)])) == [(3, 4)]


def test_merge_spans_random():
    rng = random.Random(7)
    for _ in range(300):
        spans = []
        for _ in range(rng.randrange(0, 12)):
            a = rng.randrange(0, 60)
            spans.append((a, a + rng.randrange(1, 8)))
        covered = {i for a, b in spans for i in range(a, b)}
        merged = merge_spans(spans)
        assert {i for a, b in merged for i in range(a, b)} == covered
        for (_, b), (c, _) in zip(merged, merged[1:]):
            assert b < c  # disjoint, sorted, and not adjacent


def test_resident_total():
    assert Resident(3, 4).total == 7
    assert Resident().total == 0


# -- replace_chunks ---------------------------------------------------------------
def test_replace_chunks_splits_runs_at_chunk_boundaries():
    s = AddressSpace()
    c0 = BASE >> CHUNK_SHIFT
    s.replace_chunks(
        c0,
        c0 + 3,
        [
            (BASE + C - P, BASE + 2 * C + 2 * P, True),
            (BASE + 2 * C + 4 * P, BASE + 2 * C + 5 * P, False),
        ],
    )
    assert sorted(s.chunks) == [c0, c0 + 1, c0 + 2]
    assert s.chunks[c0].runs == [(BASE + C - P, BASE + C, True)]
    assert (s.chunks[c0].anon, s.chunks[c0].other) == (P, 0)
    assert s.chunks[c0 + 1].runs == [(BASE + C, BASE + 2 * C, True)]
    assert s.chunks[c0 + 1].anon == C
    assert s.chunks[c0 + 2].runs == [
        (BASE + 2 * C, BASE + 2 * C + 2 * P, True),
        (BASE + 2 * C + 4 * P, BASE + 2 * C + 5 * P, False),
    ]
    assert (s.chunks[c0 + 2].anon, s.chunks[c0 + 2].other) == (2 * P, P)


def test_replace_chunks_replaces_only_its_span():
    s = AddressSpace()
    c0 = BASE >> CHUNK_SHIFT
    s.replace_chunks(c0, c0 + 4, [(BASE, BASE + 4 * C, True)])
    s.replace_chunks(c0 + 1, c0 + 3, [(BASE + C + P, BASE + C + 2 * P, False)])
    assert sorted(s.chunks) == [c0, c0 + 1, c0 + 3]
    assert s.chunks[c0].anon == C and s.chunks[c0 + 3].anon == C
    assert (s.chunks[c0 + 1].anon, s.chunks[c0 + 1].other) == (0, P)
    # an empty scan of a big span (bigger than the chunk dict) empties it
    s.replace_chunks(0, c0 + 100, [])
    assert s.chunks == {}


# -- VMAs -------------------------------------------------------------------------
def test_set_vmas_returns_new_identities():
    s = AddressSpace()
    a, b = vma(BASE, BASE + P), vma(BASE + 2 * P, BASE + 3 * P)
    assert s.set_vmas([a, b]) == [a, b]
    assert s.set_vmas([a, b]) == []
    b2 = vma(BASE + 2 * P, BASE + 4 * P)  # same start, grown
    c = Vma(BASE + 5 * P, BASE + 6 * P, "r--p", 0, "fe:00", 9, b"/lib/x.so")
    assert s.set_vmas([a, b2, c]) == [b2, c]
    c_moved_offset = Vma(c.start, c.end, "r--p", 4096, "fe:00", 9, b"/lib/x.so")
    assert s.set_vmas([a, b2, c_moved_offset]) == [c_moved_offset]
    c_newdev = Vma(c.start, c.end, "r--p", 4096, "fe:01", 9, b"/lib/x.so")
    assert s.set_vmas([a, b2, c_newdev]) == []  # dev is not part of the identity


def test_vma_lookup():
    s = AddressSpace()
    vs = [vma(0x1000, 0x3000), vma(0x3000, 0x4000), vma(0x8000, 0x9000)]
    s.set_vmas(vs)
    assert s.vma_at(0xFFF) is None
    assert s.vma_at(0x1000) == vs[0]
    assert s.vma_at(0x2FFF) == vs[0]
    assert s.vma_at(0x3000) == vs[1]
    assert s.vma_at(0x4000) is None
    assert s.vma_at(0x8FFF) == vs[2]
    assert s.vma_at(0x9000) is None
    assert s.vmas_overlapping(0, 0x1000) == []
    assert s.vmas_overlapping(0, 0x1001) == [vs[0]]
    assert s.vmas_overlapping(0x2FFF, 0x3001) == vs[:2]
    assert s.vmas_overlapping(0x4000, 0x8000) == []
    assert s.vmas_overlapping(0, 1 << 48) == vs
    assert s.vmas_overlapping(0x9000, 0xA000) == []
    assert s.vma_from(0) == vs[0] and s.vma_from(0x2FFF) == vs[0]
    assert s.vma_from(0x4000) == vs[2] and s.vma_from(0x8FFF) == vs[2]
    assert s.vma_from(0x9000) is None


def test_vma_lookup_random_against_brute_force():
    rng = random.Random(11)
    for _ in range(50):
        vs, addr = [], 0
        for _ in range(rng.randrange(0, 15)):
            addr += rng.choice([0, 0, P, 5 * P])
            end = addr + rng.randrange(1, 6) * P
            vs.append(vma(addr, end))
            addr = end
        s = AddressSpace()
        s.set_vmas(vs)
        top = addr + 3 * P
        for _ in range(60):
            a = rng.randrange(0, top)
            b = a + rng.randrange(1, 8 * P)
            assert s.vma_at(a) == next((v for v in vs if v.start <= a < v.end), None)
            assert s.vmas_overlapping(a, b) == [v for v in vs if v.start < b and a < v.end]


# -- attribution --------------------------------------------------------------------
def test_attribute_all_exact_across_chunks_and_vma_boundaries():
    c0 = BASE >> CHUNK_SHIFT
    # runs that cross chunk and VMA boundaries, as the kernel returns them
    runs = [
        (BASE + C - 3 * P, BASE + 3 * C + 5 * P, True),  # 3 chunk boundaries
        (BASE + 3 * C + 5 * P, BASE + 3 * C + 9 * P, False),
        (BASE + 5 * C, BASE + 6 * C, False),  # exactly one whole chunk
    ]
    vs = [
        vma(BASE, BASE + C - P),  # partial chunk
        vma(BASE + C - P, BASE + 2 * C + 7 * P),  # spans 3 chunks
        vma(BASE + 2 * C + 7 * P, BASE + 3 * C + 6 * P),  # ends mid-run of other
        vma(BASE + 3 * C + 6 * P, BASE + 3 * C + 7 * P),  # one page
        vma(BASE + 4 * C, BASE + 7 * C),  # holds a whole chunk
    ]
    s = AddressSpace()
    s.set_vmas(vs)
    s.replace_chunks(c0, c0 + 8, runs)
    s.attribute_all()
    for v in vs:
        r = s.resident_of(v)
        assert (r.anon, r.other) == brute(runs, v), v
    assert (s.resident_of(vs[1]).anon) == C + 8 * P
    assert (s.resident_of(vs[2]).anon, s.resident_of(vs[2]).other) == (C - 7 * P + 5 * P, P)
    assert s.resident_of(vs[4]).other == C
    assert_consistent(s)
    t = s.totals()
    assert t.total == sum(brute(runs, v)[0] + brute(runs, v)[1] for v in vs)


def test_attribute_ignores_runs_outside_any_vma():
    s = AddressSpace()
    v = vma(BASE + 10 * P, BASE + 20 * P)
    s.set_vmas([v])
    c0 = BASE >> CHUNK_SHIFT
    s.replace_chunks(c0, c0 + 1, [(BASE, BASE + 100 * P, True)])
    s.attribute_all()
    assert s.resident_of(v).anon == 10 * P
    assert s.totals().total == 10 * P


def test_resident_of_unknown_vma_is_zero():
    s = AddressSpace()
    r = s.resident_of(vma(BASE, BASE + P))
    assert (r.anon, r.other) == (0, 0)


def test_set_vmas_drops_removed_vmas_from_totals():
    s = AddressSpace()
    a, b = vma(BASE, BASE + 4 * P), vma(BASE + 8 * P, BASE + 12 * P)
    c0 = BASE >> CHUNK_SHIFT
    s.set_vmas([a, b])
    s.replace_chunks(c0, c0 + 1, [(BASE, BASE + 12 * P, True)])
    s.attribute_all()
    assert s.totals().anon == 8 * P
    new = s.set_vmas([b])
    assert new == []
    assert s.totals().anon == 4 * P
    assert_consistent(s)


def test_attribute_recomputes_only_requested_spans():
    """Documented contract: VMAs outside the spans keep their old value."""
    s = AddressSpace()
    c0 = BASE >> CHUNK_SHIFT
    a, b = vma(BASE, BASE + C), vma(BASE + 4 * C, BASE + 5 * C)
    s.set_vmas([a, b])
    s.replace_chunks(c0, c0 + 5, [(BASE, BASE + P, True), (BASE + 4 * C, BASE + 4 * C + P, True)])
    s.attribute_all()
    s.replace_chunks(
        c0, c0 + 5, [(BASE, BASE + 2 * P, True), (BASE + 4 * C, BASE + 4 * C + 3 * P, True)]
    )
    s.attribute([(c0, c0 + 1)])
    assert s.resident_of(a).anon == 2 * P
    assert s.resident_of(b).anon == P  # not recomputed
    s.attribute([(c0 + 4, c0 + 5)])
    assert s.resident_of(b).anon == 3 * P
    assert s.totals().anon == 5 * P


# -- randomized property test: incremental == brute force ------------------------------
N_CHUNKS = 8
N_PAGES = N_CHUNKS * (C // P)
C0 = BASE >> CHUNK_SHIFT
_RUN = re.compile(rb"\x01+|\x02+")


def table_runs(pt: bytearray, first: int, last: int) -> list[tuple[int, int, bool]]:
    """Coalesced runs of chunks [first, last) of the page table (0 absent,
    1 anon, 2 file), in the kernel's form: one run across chunk borders."""
    lo, hi = (first - C0) * (C // P), (last - C0) * (C // P)
    return [
        (BASE + m.start() * P, BASE + m.end() * P, m.group()[0] == 1)
        for m in _RUN.finditer(pt, lo, hi)
    ]


def expected(pt: bytearray, v: Vma) -> tuple[int, int]:
    lo, hi = (v.start - BASE) // P, (v.end - BASE) // P
    part = pt[lo:hi]
    return part.count(1) * P, part.count(2) * P


def cut(rng: random.Random) -> int:
    """A page index for a VMA boundary, often on or next to a chunk boundary."""
    if rng.random() < 0.5:
        return rng.randrange(0, N_PAGES + 1)
    return min(N_PAGES, max(0, rng.randrange(N_CHUNKS + 1) * (C // P) + rng.choice([-1, 0, 1])))


def random_vmas(rng: random.Random, old: list[Vma]) -> list[Vma]:
    """A new layout: keep, split, grow or drop old VMAs and add new ones."""
    mode = rng.random()
    if mode < 0.2 or not old:
        cuts = sorted({cut(rng) for _ in range(rng.randrange(2, 14))})
        out = []
        for a, b in zip(cuts, cuts[1:]):
            if rng.random() < 0.75:
                out.append(vma(BASE + a * P, BASE + b * P, rng.choice([b"", b"/lib/x.so"])))
        return out
    out = []
    for v in old:
        r = rng.random()
        if r < 0.55:
            out.append(v)
        elif r < 0.7 and v.size > P:
            mid = BASE + cut(rng) * P
            if not v.start < mid < v.end:
                mid = v.start + rng.randrange(1, v.size // P) * P
            out += [vma(v.start, mid, v.path), vma(mid, v.end, v.path, "r--p")]
        elif r < 0.85:
            out.append(vma(v.start, v.start + rng.randrange(1, v.size // P + 1) * P, v.path))
        # else dropped
    # maybe add one in a gap
    gaps, prev = [], BASE
    for v in out:
        if v.start > prev:
            gaps.append((prev, v.start))
        prev = v.end
    if prev < BASE + N_PAGES * P:
        gaps.append((prev, BASE + N_PAGES * P))
    if gaps and rng.random() < 0.7:
        a, b = rng.choice(gaps)
        s = a + rng.randrange(0, (b - a) // P) * P
        e = s + rng.randrange(1, (b - s) // P + 1) * P
        out.append(vma(s, e))
        out.sort(key=lambda x: x.start)
    return out


def mutate(rng: random.Random, pt: bytearray) -> tuple[int, int]:
    """Change pages; return the chunk span [first, last) that changed."""
    kind = rng.random()
    if kind < 0.15:  # a whole, aligned chunk (THP-like)
        c = rng.randrange(N_CHUNKS)
        lo, n = c * (C // P), C // P
    else:
        lo = rng.randrange(N_PAGES)
        n = rng.choice([1, 2, 7, 64, 511, 513, 1500])
    hi = min(N_PAGES, lo + n)
    val = rng.choice([0, 1, 1, 2])
    if rng.random() < 0.3:  # sparse
        for i in range(lo, hi, rng.choice([2, 3, 5])):
            pt[i] = val
    else:
        pt[lo:hi] = bytes([val]) * (hi - lo)
    return C0 + lo * P // C, C0 + ((hi - 1) * P) // C + 1


@pytest.mark.parametrize("seed", range(12))
def test_incremental_attribution_matches_brute_force(seed):
    rng = random.Random(seed)
    pt = bytearray(N_PAGES)
    s = AddressSpace()
    vmas: list[Vma] = []
    s.set_vmas(vmas)
    s.attribute_all()
    for step in range(120):
        op = rng.random()
        if op < 0.5:
            spans = [mutate(rng, pt) for _ in range(rng.choice([1, 1, 2, 3]))]
            if rng.random() < 0.3:  # a scan wider than the change
                first, last = spans[0]
                spans.append((max(C0, first - 1), min(C0 + N_CHUNKS, last + 2)))
            merged = merge_spans(spans)
            for first, last in merged:
                s.replace_chunks(first, last, table_runs(pt, first, last))
            s.attribute(merged)
        elif op < 0.85:
            vmas = random_vmas(rng, vmas)
            new = s.set_vmas(vmas)
            assert {v.identity for v in new} <= {v.identity for v in vmas}
            s.attribute([], new)
        elif op < 0.95:
            # layout change and page change in one tick, like a targeted update
            first, last = mutate(rng, pt)
            vmas = random_vmas(rng, vmas)
            new = s.set_vmas(vmas)
            spans = merge_spans([(first, last)] + [chunk_span(v.start, v.end) for v in new])
            for f, la in spans:
                s.replace_chunks(f, la, table_runs(pt, f, la))
            s.attribute(spans, new)
        else:
            before = {k: (r.anon, r.other) for k, r in s.resident.items()}
            tot = s.totals()
            s.attribute_all()
            assert before == {k: (r.anon, r.other) for k, r in s.resident.items()}
            assert (tot.anon, tot.other) == (s.totals().anon, s.totals().other)

        exp_anon = exp_other = 0
        for v in vmas:
            r = s.resident_of(v)
            e = expected(pt, v)
            assert (r.anon, r.other) == e, (seed, step, v)
            exp_anon += e[0]
            exp_other += e[1]
        t = s.totals()
        assert (t.anon, t.other) == (exp_anon, exp_other), (seed, step)
        assert_consistent(s)


@pytest.mark.parametrize("seed", range(4))
def test_runs_overlap_reference_agrees(seed):
    """The count-based reference and the run-overlap reference agree (guards the
    property test's own helpers)."""
    rng = random.Random(100 + seed)
    pt = bytearray(N_PAGES)
    for _ in range(20):
        mutate(rng, pt)
    runs = table_runs(pt, C0, C0 + N_CHUNKS)
    for v in random_vmas(rng, []):
        assert brute(runs, v) == expected(pt, v)


# -- is_resident / resident_flags (--stacks netting) ---------------------------------
def test_is_resident_matches_brute_force_over_random_runs():
    rng = random.Random(13)
    space = AddressSpace()
    pages: set[int] = set()
    runs = []
    addr = BASE
    while addr < BASE + 3 * C:
        n = rng.randint(1, 40)
        if rng.random() < 0.5:
            runs.append((addr, addr + n * P, rng.random() < 0.5))
            pages.update(range(addr, addr + n * P, P))
        addr += n * P
    space.replace_chunks(BASE >> CHUNK_SHIFT, (BASE + 3 * C) >> CHUNK_SHIFT, runs)
    probes = list(range(BASE - 4 * P, BASE + 3 * C + 4 * P, P))
    for a in probes:
        assert space.is_resident(a) == (a in pages), hex(a)
        assert space.is_resident(a + 123) == (a in pages), hex(a)
    assert space.resident_flags(probes) == [a in pages for a in probes]
    assert any(space.resident_flags(probes)) and not all(space.resident_flags(probes))


def test_is_resident_follows_a_rescan_that_drops_pages():
    space = AddressSpace()
    space.replace_chunks(BASE >> CHUNK_SHIFT, (BASE >> CHUNK_SHIFT) + 1,
                         [(BASE, BASE + 8 * P, True)])
    assert space.is_resident(BASE + 7 * P) and not space.is_resident(BASE + 8 * P)
    # MADV_DONTNEED of pages 2..5, then the chunk is rescanned
    space.replace_chunks(BASE >> CHUNK_SHIFT, (BASE >> CHUNK_SHIFT) + 1,
                         [(BASE, BASE + 2 * P, True), (BASE + 6 * P, BASE + 8 * P, True)])
    assert space.resident_flags([BASE + i * P for i in range(9)]) == [
        True, True, False, False, False, False, True, True, False]


def test_replace_chunks_says_whether_the_runs_changed():
    """A rescan that finds the same runs changes nothing (the tracker then
    measures no VMA there); any other run, a chunk emptied or a new chunk does."""
    space = AddressSpace()
    runs = [(BASE, BASE + 3 * P, True), (BASE + C + P, BASE + C + 2 * P, False)]
    space.replace_chunks(0, 1 << 40, runs)
    first, last = chunk_span(BASE, BASE + 2 * C)
    assert space.replace_chunks(first, last, list(runs)) is False
    for other in ([runs[0]],                                        # a chunk emptied
                  [*runs, (BASE + 3 * C, BASE + 3 * C + P, True)],  # a new chunk
                  [(BASE, BASE + 2 * P, True), runs[1]],            # a run shorter
                  [(BASE, BASE + 3 * P, False), runs[1]]):          # anon -> file
        space.replace_chunks(first, last + 2, runs)
        assert space.replace_chunks(first, last + 2, other) is True
    assert space.replace_chunks(first, last + 2, other) is False


def test_attribute_leaves_unchanged_spans_but_counts_them_rescanned():
    space = AddressSpace()
    a, b = vma(BASE, BASE + 8 * P), vma(BASE + 2 * C, BASE + 2 * C + 8 * P)
    space.set_vmas([a, b])
    space.replace_chunks(0, 1 << 40, [(BASE, BASE + 2 * P, True),
                                      (BASE + 2 * C, BASE + 2 * C + P, True)])
    space.attribute_all()
    space.track_rescanned = True
    space.take_changed()
    span_a, span_b = chunk_span(a.start, a.end), chunk_span(b.start, b.end)
    space.replace_chunks(*span_a, [(BASE, BASE + 4 * P, True)])
    space.attribute([span_a], same=[span_b])
    assert space.take_changed() == {a.start}
    assert space.take_rescanned() == {a.start, b.start}
    assert space.resident_of(a).anon == 4 * P and space.resident_of(b).anon == P


def test_rescans_with_the_same_pages_count_only_for_watched_starts():
    """rescan_watch (live PSS: its unsettled mappings) limits which VMAs of
    unchanged spans count as rescanned; VMAs of changed spans always count."""
    space = AddressSpace()
    a, b = vma(BASE, BASE + 8 * P), vma(BASE + 2 * C, BASE + 2 * C + 8 * P)
    space.set_vmas([a, b])
    space.replace_chunks(0, 1 << 40, [(BASE, BASE + 2 * P, True)])
    space.attribute_all()
    space.track_rescanned = True
    span_a, span_b = chunk_span(a.start, a.end), chunk_span(b.start, b.end)
    for watch, expected in ((set(), {a.start}), ({b.start}, {a.start, b.start}),
                            (None, {a.start, b.start})):
        space.rescan_watch = watch
        space.take_rescanned()
        space.attribute([span_a], same=[span_b])
        assert space.take_rescanned() == expected
