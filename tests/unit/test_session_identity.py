"""A watched process's identity (memtrace/session.py): pid + the start time
read at attach. A new process that got the pid and exec'd makes the tracker
re-read its start time; that must not make it the same process."""

from __future__ import annotations

from memtrace.reporter import Reporter
from memtrace.session import Session
from memtrace.trace.tracker import ProcessTracker

from .fakes import World


class _Quiet(Reporter):
    """Reports nothing."""


def _session_with(world: World, pid: int) -> tuple[Session, ProcessTracker]:
    session = Session(_Quiet(), 1.0, 0.0, world.procfs())
    tracker = ProcessTracker(pid, world.procfs())
    tracker.start()
    session.trackers[pid] = tracker
    session._start_times[pid] = tracker.start_time
    return session, tracker


def test_same_process_while_start_time_holds(world):
    world.process(700)
    session, tracker = _session_with(world, 700)
    assert session._same_process(tracker)


def test_a_new_process_on_the_pid_that_execd_is_not_the_watched_one(world):
    a = world.process(700)
    session, tracker = _session_with(world, 700)
    a.start_time += 1000          # A died; B got pid 700 ...
    a.comm = b"cat"
    a.sync()
    tracker.start()               # ... and exec'd: the tracker starts over on B
    assert tracker.start_time == a.start_time
    assert not session._same_process(tracker)


def test_gone_or_zombie_is_not_the_same_process(world):
    a = world.process(700)
    session, tracker = _session_with(world, 700)
    a.state = "Z"
    a.sync()
    assert not session._same_process(tracker)
    a.vanish()
    assert not session._same_process(tracker)
