"""find_mmapped_chunks at many mappings: pages found resident and heads read in
batches (not one scan and one read per mapping), a chunk merged into a bigger
mapping looked for there first, and the same chunks found as one by one."""

from __future__ import annotations

from memtrace.heap.analysis import find_mmapped_chunks
from memtrace.heap.layout import IS_MMAPPED

from .synth import PAGE, FakeSpace

SMALL = 18 * PAGE           # manymaps' regions
CHUNK = 118 * PAGE          # an mmapped malloc chunk (472 KiB)


class CountingSpace(FakeSpace):
    """FakeSpace that counts its scans and reads, with a batched read_heads."""

    def __init__(self) -> None:
        super().__init__()
        self.scans = 0
        self.reads = 0
        self.heads_read = 0

    def resident_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        self.scans += 1
        return super().resident_runs(start, end)

    def read(self, addr: int, size: int) -> bytes:
        self.reads += 1
        return super().read(addr, size)

    def read_heads(self, addrs: list[int], size: int) -> bytes:
        self.heads_read += len(addrs)
        return b"".join(FakeSpace.read(self, a, size) for a in addrs)


def chunk_header(space: FakeSpace, addr: int, size: int) -> None:
    space.q(addr, 0)
    space.q(addr + 8, size | IS_MMAPPED)


def many_maps(n: int, merged_at: int | None) -> tuple[CountingSpace, int]:
    """n small anonymous mappings, a page apart (never merged); one mmapped
    chunk at the start of mapping 3 and, at `merged_at`, a mapping whose chunk
    sits after another mapping it merged with (not at its start)."""
    space = CountingSpace()
    addr = 0x7F1000000000
    inside = 0
    for i in range(n):
        if i == merged_at:
            space.map(addr, SMALL + CHUNK)
            inside = addr + SMALL
            chunk_header(space, inside, CHUNK)
            addr += SMALL + CHUNK + PAGE
            continue
        space.map(addr, SMALL)
        if i == 3:
            chunk_header(space, addr, SMALL)
        addr += SMALL + PAGE
    return space, inside


def test_chunks_at_mapping_starts_cost_a_few_scans_and_one_batch():
    space, _ = many_maps(5000, merged_at=None)
    found = find_mmapped_chunks(space, space.vmas, [], expected=1)
    assert [(s, r) for _, s, r in found] == [(SMALL, SMALL)]
    assert space.scans <= 10            # one per cluster + the follow of the hit
    assert space.heads_read == 5000     # every mapping's first page, batched


def test_a_chunk_inside_a_merged_mapping_is_looked_for_there_first():
    space, inside = many_maps(5000, merged_at=4000)
    found = find_mmapped_chunks(space, space.vmas, [], expected=2, likely_size=32 * PAGE)
    assert [p for p, _, _ in found][1] == inside
    # pass 2 read the big mapping's pages, not the 4,000 small mappings' before it
    assert space.heads_read < 5000 + 2 * (SMALL + CHUNK) // PAGE + 1
    # without the hint the same chunks are found, reading every page before it
    space2, _ = many_maps(5000, merged_at=4000)
    assert find_mmapped_chunks(space2, space2.vmas, [], expected=2) == found
    assert space2.heads_read > 4000 * SMALL // PAGE


def test_where_chunks_were_last_time_is_looked_at_first():
    space, inside = many_maps(5000, merged_at=4000)
    first = find_mmapped_chunks(space, space.vmas, [], expected=2, likely_size=32 * PAGE)
    again = CountingSpace()
    again.regions, again.vmas = space.regions, space.vmas
    hints = [p for p, _, _ in first]
    assert find_mmapped_chunks(again, again.vmas, [], expected=2, hints=hints) == first
    assert again.heads_read == 2            # the two hints, not 5,000 mapping starts
    assert again.scans <= 8             # one per hint and the follows of both


def test_a_stale_hint_is_read_again_and_the_search_goes_on():
    space, inside = many_maps(5000, merged_at=4000)
    first = find_mmapped_chunks(space, space.vmas, [], expected=2, likely_size=32 * PAGE)
    stale = space.vmas[10].start            # no chunk there (any more)
    found = find_mmapped_chunks(space, space.vmas, [], expected=2, likely_size=32 * PAGE,
                                hints=[stale, inside, 1 << 60])
    assert found == first
    assert stale not in [p for p, _, _ in found]


def test_no_mmapped_chunk_expected_reads_nothing():
    space, _ = many_maps(5000, merged_at=None)
    assert find_mmapped_chunks(space, space.vmas, [], expected=0) == []
    assert space.heads_read == space.scans == space.reads == 0
