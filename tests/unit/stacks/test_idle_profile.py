"""Session._add_stacks: an idle process (no sample, no fault, its model
unchanged) keeps its last profile; anything new computes a fresh one."""

from __future__ import annotations

from types import SimpleNamespace

from memtrace.reporter import Reporter
from memtrace.session import Session
from memtrace.stacks.netting import StackTracker
from memtrace.trace.events import ChunkMark
from memtrace.trace.model import AddressSpace


def _tracker() -> SimpleNamespace:
    return SimpleNamespace(pid=7, epoch=0, exe=b"/bin/app", comm="app", space=AddressSpace(),
                           stats=SimpleNamespace(stacks_lost=0), huge_at=lambda addr: False)


def test_an_idle_process_keeps_its_profile_and_a_change_recomputes_it(world, monkeypatch):
    session = Session(Reporter(), 1.0, 0.0, world.procfs())
    session.enable_stacks(512 * 1024)
    computed = []
    real = StackTracker.profile

    def counting(self, *args, **kw):
        computed.append(args[-1])        # the snapshot's ts
        return real(self, *args, **kw)

    monkeypatch.setattr(StackTracker, "profile", counting)
    tracker = _tracker()

    def tick(ts: float, marks: list[ChunkMark] | None = None) -> dict:
        snap = {"ts": ts}
        session._add_stacks(snap, tracker, [], marks or [])   # type: ignore[arg-type]
        return snap

    first = tick(1.0)
    idle = tick(2.0)
    assert computed == [1.0]
    assert idle["stacks"] == first["stacks"]
    assert session.stack_profiles()[7].ts == 2.0
    tick(3.0, [ChunkMark(chunk=5, faults=3, last_addr=5 << 21, epoch=0)])   # faults
    tracker.space.replace_chunks(0, 1, [])                                  # a rescan
    tick(4.0)
    tick(5.0)                                                               # idle again
    tracker.stats.stacks_lost = 2                                           # ring overflow
    tick(6.0)
    assert computed == [1.0, 3.0, 4.0, 6.0]
