"""memtrace.stacks.huge.ForcedChunks: forced samples weighed by what their
fault made resident; chunks forgotten in BPF once empty."""

from __future__ import annotations

from memtrace.stacks.huge import ForcedChunks
from memtrace.trace.events import CHUNK_SHIFT, ReleaseRecord, StackRecord

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


def test_a_sample_whose_page_is_not_mapped_yet_waits_one_call():
    """The tracepoint fires as the fault begins; a huge page takes a while to
    clear: weighed while its page is not mapped yet, the sample would count one
    page for a huge one (the flake of test_huge_stacks). It waits for the next
    call (the records after it with it: order is kept, for the releases); a
    page still missing then (released already) weighs one page."""
    forced = ForcedChunks(Forgotten(), P, HUGE)
    state: dict[int, bool | None] = {BASE: None, BASE + HUGE: True}
    first = forced.weigh(PID, 0, [rec(BASE, True), rec(BASE + HUGE, True)], state.get)
    assert first == []
    state[BASE] = True                                   # the fault finished: a huge page
    second = forced.weigh(PID, 0, [], state.get)
    assert [(r.addr, r.weight) for r in second] == [(BASE, HUGE), (BASE + HUGE, HUGE)]
    assert forced.weigh(PID, 0, [], state.get) == []     # weighed once
    state[BASE + 2 * HUGE] = None
    forced.weigh(PID, 0, [rec(BASE + 2 * HUGE, True)], state.get)
    last = forced.weigh(PID, 0, [], state.get)           # still nothing: one page
    assert [(r.addr, r.weight) for r in last] == [(BASE + 2 * HUGE, P)]
    forced.weigh(PID, 0, [rec(BASE + 3 * HUGE, True)], lambda a: None)
    assert forced.weigh(PID, 1, [], lambda a: True) == []   # an exec: the old image's go


def test_a_release_after_a_waiting_sample_stays_after_it():
    """A sample that waits a call takes the records after it along: a release
    of its page that came after it must not be applied before it."""
    forced = ForcedChunks(Forgotten(), P, HUGE)
    gone = ReleaseRecord(PID, BASE, BASE + HUGE)
    first = forced.weigh(PID, 0, [rec(BASE + HUGE, False), rec(BASE, True), gone],
                         lambda a: None)
    assert [r.addr for r in first] == [BASE + HUGE]
    second = forced.weigh(PID, 0, [rec(BASE + 2 * HUGE, False)], lambda a: None)
    assert [type(r).__name__ for r in second] == ["StackRecord", "ReleaseRecord", "StackRecord"]
    assert second[0].addr == BASE and second[0].weight == P and second[1] == gone
