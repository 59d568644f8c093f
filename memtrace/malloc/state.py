"""--malloc for every watched process: a MallocTracker and a LeakDetector per
process image, fed once a tick by the session, and what `run` reports at the
end (docs/malloc.md)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from memtrace.errors import MemtraceError
from memtrace.malloc.inject import Interposer
from memtrace.malloc.leaks import LeakDetector
from memtrace.malloc.outstanding import MallocTracker, malloc_summary
from memtrace.stacks.profile import StackProfile
from memtrace.stacks.unwind import Unwinder
from memtrace.trace.mallocevents import MallocRecord
from memtrace.trace.procfs import Vma
from memtrace.util.log import log


class MallocState:
    def __init__(self, period: int, unwinder: Unwinder,
                 check_python: Callable[[MallocTracker, int, Sequence[Vma]], None] | None = None
                 ) -> None:
        self.period = period
        self.unwinder = unwinder
        # sets a tracker's CPython resolver for its image (the session's check)
        self.check_python = check_python
        self._trackers: dict[int, MallocTracker] = {}
        self._detectors: dict[int, LeakDetector] = {}
        self._epochs: dict[int, int] = {}
        self.profiles: dict[int, StackProfile] = {}       # the last one of every process seen
        self.summaries: dict[int, dict[str, Any]] = {}    # likewise, the snapshot's object
        # watch --malloc: the processes the sampler was put into (inject.py)
        self.interposer: Interposer | None = None
        self._said_lost = False

    def update(self, pid: int, epoch: int, records: list[MallocRecord], vmas: Sequence[Vma],
               comm: str, ts: float, lost: int, exited: bool = False) -> dict[str, Any]:
        """Apply a tick's records of one process; its `malloc` snapshot object.
        `exited`: the last records, taken after the process exited; they count
        in its figures, but the leak rule keeps the readings of its life (what
        a program frees as it exits, destructors, an interpreter's teardown,
        does not unmake a leak seen while it ran)."""
        tracker = self._trackers.get(pid)
        detector = self._detectors.get(pid)
        if tracker is None or detector is None:
            tracker = self._trackers[pid] = MallocTracker(pid, self.unwinder)
            detector = self._detectors[pid] = LeakDetector()
        elif self._epochs.get(pid) != epoch:
            # a new image: its allocations start again; this drain's records may
            # be the old image's (they carry no epoch) and are dropped
            tracker.forget_exec()
            detector.clear()
            records = []
        self._epochs[pid] = epoch
        if lost and not self._said_lost:
            self._said_lost = True
            log(f"--malloc: {lost} sampled allocations or frees lost so far (more than "
                "memtrace reads between two ticks; counted in malloc.lost): a larger "
                f"--malloc-period (now {self.period}) or a lower --malloc-max-rate takes "
                "fewer samples")
        if self.check_python is not None and tracker.python_epoch != epoch:
            self.check_python(tracker, epoch, vmas)
        tracker.add(records, vmas)
        profile = tracker.profile(comm, ts, self.period, lost)
        if not exited:
            detector.observe(ts, tracker.outstanding())
        self.profiles[pid] = profile
        summary = self.summaries[pid] = malloc_summary(tracker, profile, detector.leaks())
        return summary

    def interpose(self, pid: int) -> None:
        """watch --malloc: put the sampler into pid. If that fails, pid has no
        figures to report (its attach snapshot's empty ones are dropped)."""
        assert self.interposer is not None
        try:
            self.interposer.add(pid)
        except MemtraceError:
            self.summaries.pop(pid, None)
            self.profiles.pop(pid, None)
            raise

    def libraries_loaded(self, pid: int, events: list[dict[str, Any]]) -> None:
        """A tick's library events of pid: a library it loaded (dlopen) calls
        glibc's functions until its GOT slots point at the sampler too."""
        if self.interposer is not None and any(e["event"] == "library_load" for e in events):
            self.interposer.extend(pid)

    def close(self) -> None:
        if self.interposer is not None:
            self.interposer.withdraw_all()

    def forget(self, pid: int) -> None:
        """A process detached: its figures stay in profiles and summaries."""
        if self.interposer is not None:
            self.interposer.withdraw(pid)
        tracker = self._trackers.pop(pid, None)
        if tracker is not None:
            tracker.close_python()
        self._detectors.pop(pid, None)
        self._epochs.pop(pid, None)


def leak_report(summaries: dict[int, dict[str, Any]]) -> list[str]:
    """The lines `run` prints at its end: per process, the stacks the leak
    rule names (docs/malloc.md), or that there are none."""
    lines = []
    for pid, s in sorted(summaries.items()):
        leaks = s.get("leaks") or []
        head = (f"--malloc pid {pid}: {s['outstanding_bytes']} bytes outstanding in sampled "
                f"allocations ({s['samples']} samples, {s['frees']} freed)")
        if s.get("lost"):
            head += (f"; {s['lost']} samples or frees lost (the rings were full: a lost "
                     "free leaves its block outstanding)")
        if s.get("period_max_bytes", 0) > s.get("period_bytes", 0):
            head += (f"; the rate cap (--malloc-max-rate) raised the period up to "
                     f"{s['period_max_bytes']} bytes")
        if s.get("untracked"):
            head += (f"; {s['untracked']} samples not tracked (the sampler's table of live "
                     "samples was full: their frees are not seen, their bytes count as "
                     "allocated only)")
        if not leaks:
            lines.append(f"{head}; no stack grew across the last {s['leak_intervals']} "
                         "intervals")
            continue
        lines.append(f"{head}; growing across the last {s['leak_intervals']} intervals:")
        for lk in leaks:
            frames = lk["frames"]
            lines.append(f"  {lk['bytes']} bytes outstanding, +{lk['growth_bytes']} in "
                         f"{lk['seconds']}s ({lk['bytes_per_second']} B/s): "
                         + " <- ".join(frames[:8]) + (" ..." if len(frames) > 8 else ""))
    return lines
