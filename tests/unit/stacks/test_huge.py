"""memtrace.stacks.huge.ForcedChunks: forced samples weighed by what their
fault made resident; chunks forgotten in BPF once empty."""

from __future__ import annotations

from memtrace.stacks.huge import ForcedChunks
from memtrace.trace.events import CHUNK_SHIFT, StackRecord

P, HUGE = 4096, 2 << 20
PID = 9
BASE = 0x7F0000000000


def rec(addr: int, forced: bool, weight: int = 123) -> StackRecord:
    return StackRecord(PID, addr, 1, 0, 0, weight, b"", forced=forced)


class Forgotten:
    def __init__(self) -> None:
        self.calls: list[tuple[int, set[tuple[int, int]]]] = []

    def __call__(self, pid, keys) -> None:
        self.calls.append((pid, set(keys)))


def test_forced_samples_weigh_a_huge_page_or_one_page():
    forced = ForcedChunks(Forgotten(), P, HUGE)
    huge_pages = {BASE + 7 * P}
    records = [rec(BASE + 7 * P, True), rec(BASE + HUGE, True), rec(BASE + 3 * P, False)]
    out = forced.weigh(PID, 0, records, lambda a: a in huge_pages)
    assert [r.weight for r in out] == [HUGE, P, 123]     # sampled ones keep theirs


def test_records_without_forced_ones_are_returned_as_they_are():
    forced = ForcedChunks(Forgotten(), P, HUGE)
    records = [rec(BASE, False)]
    assert forced.weigh(PID, 0, records, lambda a: True) is records


def test_empty_chunks_and_old_images_are_forgotten_in_bpf():
    forget = Forgotten()
    forced = ForcedChunks(forget, P, HUGE)
    c0, c1 = BASE >> CHUNK_SHIFT, (BASE >> CHUNK_SHIFT) + 1
    forced.weigh(PID, 0, [rec(BASE, True), rec(BASE + HUGE, True)], lambda a: True)
    forced.release(PID, 0, {c0, c1})
    assert forget.calls == []                            # both still resident
    forced.release(PID, 0, {c1})
    assert forget.calls == [(PID, {(0, c0)})]
    forced.release(PID, 1, {c1})                         # an exec: a new image
    assert forget.calls[-1] == (PID, {(0, c1)})
    forced.weigh(PID, 1, [rec(BASE, True)], lambda a: False)
    forced.drop(PID)
    assert forget.calls[-1] == (PID, {(1, c0)})
    forced.drop(PID)                                     # nothing left: no call
    assert len(forget.calls) == 3
