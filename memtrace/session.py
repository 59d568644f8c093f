"""The watch loop shared by `watch` and `run`: probes in, trackers updated,
snapshots out to a reporter, every interval."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from memtrace.errors import ExitCode, MemtraceError
from memtrace.events import SyscallEvent
from memtrace.pagemap import scan_mechanism
from memtrace.probes import Probes, read_stats_of
from memtrace.procfs import ProcFS
from memtrace.tracker import ProcessGone, ProcessTracker
from memtrace.views.snapshot import snapshot


class Reporter(Protocol):
    def snapshot(self, snap: dict[str, Any]) -> None: ...
    def events(self, events: list[SyscallEvent]) -> None: ...
    def tick_done(self) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


def log(text: str) -> None:
    print(f"memtrace: {text}", file=sys.stderr, flush=True)


class Session:
    def __init__(self, reporter: Reporter, interval: float, reconcile_interval: float,
                 procfs: ProcFS | None = None) -> None:
        self.reporter = reporter
        self.interval = interval
        self.reconcile_interval = reconcile_interval
        self.procfs = procfs or ProcFS()
        self.probes: Probes | None = None
        self.trackers: dict[int, ProcessTracker] = {}
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.first_snapshot_seconds: float | None = None
        self._names_gen = 0

    def load(self) -> Probes:
        self.probes = Probes()
        log(f"probes loaded in {time.monotonic() - self.started:.1f}s; "
            f"resident pages: {scan_mechanism()}; remote changes: {self.probes.rss_stat_mechanism}")
        return self.probes

    def install_signal_handlers(self, on_signal: Callable[[int], None] | None = None) -> None:
        def handler(signum: int, _frame: Any) -> None:
            self.stop.set()
            if on_signal:
                on_signal(signum)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def add_target(self, pid: int) -> None:
        """Start tracing pid in the kernel (before any scan, so nothing is missed)."""
        assert self.probes is not None
        heap_end = 0
        with contextlib.suppress(OSError):
            heap_end = next((v.end for v in self.procfs.maps(pid) if v.path == b"[heap]"), 0)
        self.probes.add_target(pid, brk=heap_end)

    def attach(self, pid: int) -> None:
        """Read pid's address space from scratch and emit its first snapshot."""
        assert self.probes is not None
        tracker = ProcessTracker(pid, self.procfs, self.reconcile_interval)
        tracker.stats = read_stats_of(self.probes, pid)
        try:
            tracker.start()
        except ProcessGone:
            self.probes.remove_target(pid)
            raise MemtraceError(f"process {pid} exited while attaching",
                                ExitCode.NO_SUCH_PROCESS) from None
        self.trackers[pid] = tracker
        self.reporter.snapshot(snapshot(tracker, time.time()))
        if self.first_snapshot_seconds is None:
            self.first_snapshot_seconds = time.monotonic() - self.started
            log(f"first snapshot {self.first_snapshot_seconds:.2f}s after start")

    def detach(self, pid: int, why: str) -> None:
        tracker = self.trackers.pop(pid, None)
        if tracker:
            tracker.close()
        if self.probes:
            self.probes.remove_target(pid)
        self.reporter.message(f"pid {pid} {why}")

    def tick(self) -> None:
        assert self.probes is not None
        drained = self.probes.drain()
        self.reporter.events(drained.events)
        now = time.time()
        names_changed = drained.names_gen != self._names_gen
        self._names_gen = drained.names_gen
        for pid, tracker in list(self.trackers.items()):
            try:
                tracker.update(drained.chunks.get(pid, []), drained.ranges.get(pid, []),
                               drained.stats.get(pid), names_changed)
            except ProcessGone:
                self.detach(pid, "exited")
                continue
            if not self.procfs.alive(pid):
                self.detach(pid, "exited")
                continue
            self.reporter.snapshot(snapshot(tracker, now))
        self.reporter.tick_done()

    def loop(self, keep_going: Callable[[], bool]) -> None:
        deadline = time.monotonic()
        while not self.stop.is_set() and keep_going():
            deadline += self.interval
            self.stop.wait(max(0.0, deadline - time.monotonic()))
            if self.stop.is_set():
                break
            self.tick()

    def close(self) -> None:
        for pid in list(self.trackers):
            tracker = self.trackers.pop(pid)
            tracker.close()
        if self.probes:
            self.probes.close()
            self.probes = None
        self.reporter.close()
