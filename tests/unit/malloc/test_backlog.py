"""mallocevents.SampleBacklog: what the --malloc reader keeps between two ticks.
Sampled allocations are kept with their stacks up to its bytes, then without
(their bytes still count), then dropped and counted; frees are always kept
(a lost free would leave its block outstanding)."""

from __future__ import annotations

from memtrace.malloc.outstanding import STACK_DROPPED, MallocTracker, malloc_summary
from memtrace.stacks.unwind import Unwinder
from memtrace.trace.mallocevents import RECORD_OVERHEAD, MallocRecord, SampleBacklog


def _sample(tgid: int, n: int, stack: int = 1000) -> MallocRecord:
    return MallocRecord(tgid=tgid, ts=n, ptr=0x1000 + n, weight=64, stack=b"\0" * stack)


def _free(tgid: int, n: int) -> MallocRecord:
    return MallocRecord(tgid=tgid, ts=n, ptr=0x1000 + n, freed=True)


def test_stacks_then_stackless_then_dropped_frees_always_kept():
    per = 1000 + RECORD_OVERHEAD
    backlog = SampleBacklog(max_bytes=3 * per, max_samples=2)
    kept = [backlog.add(_sample(7, n)) for n in range(6)]
    assert kept == [True, True, True, True, True, False]
    assert backlog.stacks_full() and backlog.dropped == 1
    assert all(backlog.add(_free(7, n)) for n in range(100))     # frees: always
    assert backlog.add(_sample(8, 9)) is False and backlog.dropped == 2
    records = backlog.take()
    samples = [r for r in records[7] if not r.freed]
    assert [(r.ts, len(r.stack), r.stack_dropped) for r in samples] == [
        (0, 1000, False), (1, 1000, False), (2, 1000, False), (3, 0, True), (4, 0, True)]
    assert sum(r.freed for r in records[7]) == 100 and 8 not in records


def test_take_empties_it_and_keeps_the_count():
    backlog = SampleBacklog(max_bytes=1, max_samples=0)
    assert backlog.add(_sample(1, 0))          # the first always fits
    assert not backlog.add(_sample(1, 1))
    assert len(backlog.take()[1]) == 1
    assert not backlog.stacks_full() and backlog.take() == {}
    assert backlog.add(_sample(2, 2)) and backlog.dropped == 1   # a total since the start


def test_a_sample_kept_without_its_stack_counts_its_bytes_and_its_free(tmp_path):
    tracker = MallocTracker(1, Unwinder(str(tmp_path)))
    kept = MallocRecord(tgid=1, ts=1, ptr=0x5000, weight=4096, stack=b"", stack_dropped=True)
    tracker.add([kept, MallocRecord(tgid=1, ts=2, ptr=0x6000, weight=100, stack=b"",
                                    stack_dropped=True)], [])
    assert tracker.stacks_dropped == 2 and tracker.samples == 2
    assert tracker.stack(next(iter(tracker.outstanding()))) == STACK_DROPPED
    tracker.add([MallocRecord(tgid=1, ts=3, ptr=0x5000, freed=True)], [])
    assert sum(tracker.outstanding().values()) == 100
    profile = tracker.profile("x", 0.0, 512 << 10)
    summary = malloc_summary(tracker, profile, [])
    assert summary["stacks_dropped"] == 2
    assert summary["outstanding"][0]["frames"] == ["[stack dropped]"]
