"""The watch loop shared by `watch` and `run`: probes in, trackers updated,
snapshots out to a reporter, every interval."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from memtrace.errors import ExitCode, MemtraceError
from memtrace.heap.sampler import HeapSampler
from memtrace.libevents import LibraryEvents
from memtrace.pss.accounting import Usage
from memtrace.pss.live import LivePss, drop_all
from memtrace.published import NO_CONTAINER, StateBox, TickState, add_counters, empty_counters
from memtrace.reporter import Reporter
from memtrace.snapshot import SnapshotBuilder
from memtrace.stacks.huge import ForcedChunks
from memtrace.trace.events import EPOCH_MASK, ChunkMark, Drained, SampleRecord
from memtrace.trace.mallocevents import MallocRecord
from memtrace.trace.ownmem import shed_compiler_memory
from memtrace.trace.pagemap import huge_page_size, scan_mechanism
from memtrace.trace.probes import Probes, read_stats_of
from memtrace.trace.procfs import PAGE_SIZE, ProcFS, Vma, want_rss_stat_probe
from memtrace.trace.tracker import ProcessGone, ProcessTracker
from memtrace.util.gcpause import Freezer, gc_paused
from memtrace.util.log import debug, log
from memtrace.util.pidfd import close_fd, pidfd_exited, pidfd_open

if TYPE_CHECKING:
    from memtrace.malloc.outstanding import MallocTracker
    from memtrace.malloc.state import MallocState
    from memtrace.stacks.netting import StackTracker
    from memtrace.stacks.profile import StackProfile
    from memtrace.stacks.pydetect import PyCheck, PyDetector
    from memtrace.stacks.unwind import Unwinder


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
        self.exporter_box = StateBox()
        self._snapshots: dict[int, dict[str, Any]] = {}
        self._builders: dict[int, SnapshotBuilder] = {}
        self._rescans_of_gone: Counter[str] = Counter()
        self._lost_of_gone = (0, 0)
        self._attach_seconds: dict[int, float] = {}
        self._last_tick_seconds = 0.0
        self.targets_dropped = 0
        self.notices_lost: dict[str, int] = {}   # agent: exec/fork notices the rings dropped
        # Identity of each watched process: a pidfd (refers to that process, not
        # to whatever later gets its pid) and its start time (exec keeps both).
        self._pidfds: dict[int, int] = {}
        self._start_times: dict[int, int] = {}
        self.group_of: dict[int, str] = {}
        self.grouping = False      # metrics by group label instead of pid (agent mode)
        # agent mode: pid -> (container_id, pod_uid), labels of every series
        self.container_labels = False
        self.container_of: dict[int, tuple[str, str]] = {}
        self._retired: dict[tuple[str, ...], dict[str, Any]] = {}
        self.heap: HeapSampler | None = None  # --heap-interval: see enable_heap
        self._heap_status: dict[int, str] = {}
        self._libevents: dict[int, LibraryEvents] = {}
        self.pss: LivePss | None = None   # --pss-interval: see enable_pss
        self.stack_period = 0             # --stacks: mean bytes between samples (0: off)
        self._unwinder: Unwinder | None = None
        self._stacks: dict[int, StackTracker] = {}
        self._stack_epochs: dict[int, int] = {}
        self._forced: ForcedChunks | None = None        # --stacks: huge pages (stacks/huge.py)
        self._pydetector: PyDetector | None = None     # --stacks, --malloc: CPython targets
        self._python_said: dict[int, set[str]] = {}     # why not, said once per process
        self._profiles: dict[int, StackProfile] = {}   # last one of every process seen
        # pid -> (what its last profile was computed from, its summary)
        self._profile_inputs: dict[int, tuple[tuple[object, ...], dict[str, Any]]] = {}
        # agent: processes come and go for days; their profiles go with them
        self.keep_exited_profiles = True
        self.malloc: MallocState | None = None     # --malloc: see enable_malloc
        self.freezer = Freezer()
        self._malloc_shim: str | None = None

    def load(self, watch_execs: bool = False) -> Probes:
        if sys.stderr.isatty():
            log("compiling and loading the BPF probes ...")
        self.probes = Probes(watch_execs=watch_execs, rss_stat_probe=want_rss_stat_probe(),
                             stream_events=self.reporter.wants_events,
                             stacks=self.stack_period > 0, stack_period=self.stack_period,
                             malloc_shim=self._malloc_shim)
        faults = self.probes.stack_mechanism
        stacks = faults and f"; stacks sampled at {faults}"
        log(f"probes loaded in {time.monotonic() - self.started:.1f}s; resident pages: "
            f"{scan_mechanism()}; remote changes: {self.probes.rss_stat_mechanism}{stacks}")
        shed_compiler_memory()    # the compiler is not needed again (memtrace/trace/ownmem.py)
        return self.probes

    def install_signal_handlers(self, on_signal: Callable[[int], None] | None = None) -> None:
        """SIGINT, SIGTERM and SIGHUP stop the loop: everything is detached and the
        command exits 0 (watch, agent; docs/exit-codes.md). A SIGHUP ignored when
        memtrace started (nohup) stays ignored."""
        def handler(signum: int, _frame: Any) -> None:
            self.stop.set()
            if on_signal:
                on_signal(signum)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
            signal.signal(signal.SIGHUP, handler)

    def add_target(self, pid: int) -> None:
        """Start tracing pid in the kernel (before any scan, so nothing is missed)."""
        assert self.probes is not None
        heap_end = 0
        with contextlib.suppress(OSError):
            heap_end = self.procfs.heap_end(pid)
        self.probes.add_target(pid, brk=heap_end)

    def attach(self, pid: int) -> None:
        """Read pid's address space from scratch and emit its first snapshot."""
        with gc_paused():       # millions of objects made, none garbage (util/gcpause.py)
            self._attach(pid)
        self.freezer.freeze()   # and kept: no full collection walks them again

    def _attach(self, pid: int) -> None:
        assert self.probes is not None
        tracker = ProcessTracker(pid, self.procfs, self.reconcile_interval)
        tracker.stats = read_stats_of(self.probes, pid)
        pidfd = pidfd_open(pid)
        try:
            tracker.start()
            if pidfd is not None and pidfd_exited(pidfd):
                # exited (or its pid was reused) while we read it
                raise ProcessGone(pid)
        except ProcessGone:
            close_fd(pidfd)
            tracker.close()
            self.probes.remove_target(pid)
            raise MemtraceError(f"process {pid} exited while attaching",
                                ExitCode.NO_SUCH_PROCESS) from None
        except PermissionError as e:
            close_fd(pidfd)
            tracker.close()
            self.probes.remove_target(pid)
            raise MemtraceError(
                f"cannot read {e.filename or f'/proc/{pid}'}: permission denied (another "
                "user's process needs CAP_DAC_READ_SEARCH, or CAP_SYS_PTRACE on older "
                "kernels)", ExitCode.NOT_ROOT) from None
        self._same_process(tracker)     # the kernel's fault counters
        self._read_peak(tracker)
        self.trackers[pid] = tracker
        if pidfd is not None:
            self._pidfds[pid] = pidfd
        self._start_times[pid] = tracker.start_time
        self._builders[pid] = SnapshotBuilder(
            json_text=self.reporter.wants_json_text)
        if self.pss is not None:
            self.pss.begin_tick()
            self._update_pss(tracker)
        snap = self._builders[pid].build(tracker, time.time(), self._pss_usage(pid))
        self._add_heap(snap, tracker)
        self._add_pss(snap, tracker)
        self._add_stacks(snap, tracker, [], [])
        self._libevents[pid] = LibraryEvents()
        self._library_events(pid, snap, tracker.space.vmas)
        self._add_malloc(snap, tracker, [], {})
        self._builders[pid].stamp(snap)
        self._snapshots[pid] = snap
        self._attach_seconds[pid] = time.time() - tracker.attached_at
        self.reporter.snapshot(snap)
        self.publish()
        if self.first_snapshot_seconds is None:
            self.first_snapshot_seconds = time.monotonic() - self.started
            log(f"first snapshot {self.first_snapshot_seconds:.2f}s after start")

    def detach_quietly(self, pid: int) -> None:
        """Undo add_target for a process that could not be attached."""
        if pid not in self.trackers and self.probes:
            self.probes.remove_target(pid)

    def detach(self, pid: int, why: str) -> None:
        tracker = self.trackers.pop(pid, None)
        last = self._snapshots.pop(pid, None)
        self._builders.pop(pid, None)
        if last is not None and self.grouping:
            key = self._row_key(pid, last)
            if not any(key[2:]) or any(
                    self._row_key(p, s) == key for p, s in self._snapshots.items()):
                add_counters(self._retired.setdefault(key, empty_counters()), last)
            else:
                # the last watched process of a container: its series end with it
                # (containers come and go; their counters are not kept forever)
                self._retired.pop(key, None)
        self.group_of.pop(pid, None)
        self.container_of.pop(pid, None)
        self._attach_seconds.pop(pid, None)
        close_fd(self._pidfds.pop(pid, None))
        self._start_times.pop(pid, None)
        self._forget_heap(pid)
        st = self._stacks.pop(pid, None)
        if st is not None and st.python is not None:
            st.python.close()
        if self._forced is not None:
            self._forced.drop(pid)
        self._stack_epochs.pop(pid, None)
        self._python_said.pop(pid, None)
        self._profile_inputs.pop(pid, None)
        if self.malloc is not None:
            self.malloc.forget(pid)
        if not self.keep_exited_profiles:
            self._profiles.pop(pid, None)
        self._libevents.pop(pid, None)
        if self.pss is not None:
            self.pss.forget(pid)
        if tracker:
            tracker.close()
            self._rescans_of_gone.update(tracker.counters.full_rescans)
            events, ranges = self._lost_of_gone
            self._lost_of_gone = (events + tracker.stats.events_lost,
                                  ranges + tracker.stats.ranges_lost)
        if self.probes:
            self.probes.remove_target(pid)
        self.reporter.detached(pid, why)

    def _row_key(self, pid: int, snap: dict[str, Any]) -> tuple[str, ...]:
        """The exporter's row_key of a process (group, comm[, container_id, pod_uid])."""
        key: tuple[str, ...] = (self.group_of.get(pid, snap["comm"]), snap["comm"])
        if self.container_labels:
            key += self.container_of.get(pid, NO_CONTAINER)
        return key

    def tick(self) -> Drained:
        assert self.probes is not None
        t0 = time.perf_counter()
        drained = self.probes.drain()
        self.reporter.events(drained.events)
        now = time.time()
        names_changed = drained.names_gen != self._names_gen
        self._names_gen = drained.names_gen
        if self.pss is not None:
            self.pss.begin_tick()
        for pid, tracker in list(self.trackers.items()):
            # Identity before the update (its /proc reads would read a process
            # that reused the pid) and after it (the pid may be reused meanwhile):
            # nothing read from another process reaches a snapshot of this one.
            # Before, the pidfd alone says it (no /proc read); the full check,
            # which also reads the fault counters, runs once, after.
            if not self._still_there(tracker):
                self._last_malloc(tracker, drained)
                self.detach(pid, "exited")
                continue
            try:
                tracker.update(drained.chunks.get(pid, []), drained.ranges.get(pid, []),
                               drained.stats.get(pid), names_changed)
            except ProcessGone as gone:
                self.detach(pid, gone.why)
                continue
            if not self._same_process(tracker):
                self.detach(pid, "exited")
                continue
            self._read_peak(tracker)
            self._update_pss(tracker)
            snap = self._builders[pid].build(tracker, now, self._pss_usage(pid))
            self._add_heap(snap, tracker)
            self._add_pss(snap, tracker)
            self._add_stacks(snap, tracker, drained.stacks.get(pid, []),
                              drained.chunks.get(pid, []))
            self._library_events(pid, snap, tracker.space.vmas)
            self._add_malloc(snap, tracker, drained.malloc.get(pid, []), drained.malloc_counts)
            self._builders[pid].stamp(snap)
            self._snapshots[pid] = snap
            self.reporter.snapshot(snap)
        if self.pss is not None:
            self.pss.end_tick()
        self.freezer.tick()
        self._last_tick_seconds = time.perf_counter() - t0
        self.publish()
        self.reporter.tick_done()
        return drained

    def _library_events(self, pid: int, snap: dict[str, Any], layout: object = None) -> None:
        """Libraries loaded and unloaded since the last snapshot (docs/output.md)."""
        lib = self._libevents.setdefault(pid, LibraryEvents())
        snap["library_events"] = lib.update(snap, layout)
        snap["library_totals"] = lib.totals_dict()

    def _still_there(self, tracker: ProcessTracker) -> bool:
        """The process attached is still alive: its pidfd when there is one (a
        poll, no /proc read), else the full _same_process check."""
        pidfd = self._pidfds.get(tracker.pid)
        if pidfd is not None:
            return not pidfd_exited(pidfd)
        return self._same_process(tracker)

    def _same_process(self, tracker: ProcessTracker) -> bool:
        """Still alive, and not a new process that reused the PID. The pidfd
        opened at attach becomes readable when that process exits, whoever has
        the pid now; without one (pidfd_open before 5.3), the start time read at
        attach must still be the pid's. An exec keeps both: tracker.start() after
        an exec re-reads start_time, so the attach-time value is the one compared."""
        pidfd = self._pidfds.get(tracker.pid)
        if pidfd is not None and pidfd_exited(pidfd):
            return False
        try:
            st = self.procfs.stat(tracker.pid)
        except (OSError, ValueError, IndexError):
            return False
        expected = self._start_times.get(tracker.pid, tracker.start_time)
        if not (st.state not in ("Z", "X") and st.start_time == expected
                and tracker.start_time == expected):
            return False
        tracker.minor_faults, tracker.major_faults = st.minflt, st.majflt
        return True

    def _read_peak(self, tracker: ProcessTracker) -> None:
        """The kernel's high-water mark of the resident size (VmHWM), once a tick."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            tracker.peak_rss_bytes = self.procfs.peak_rss_bytes(tracker.pid)

    def publish(self) -> None:
        """Hand the exporter a consistent copy of the latest tick."""
        rescans = Counter(self._rescans_of_gone)
        events_lost, ranges_lost = self._lost_of_gone
        for tracker in self.trackers.values():
            rescans.update(tracker.counters.full_rescans)
            events_lost += tracker.stats.events_lost
            ranges_lost += tracker.stats.ranges_lost
        self.exporter_box.set(TickState(
            snapshots=dict(self._snapshots), full_rescans=dict(rescans),
            events_lost=events_lost, ranges_lost=ranges_lost,
            tick_seconds=self._last_tick_seconds, attach_seconds=dict(self._attach_seconds),
            targets_dropped=self.targets_dropped, notices_lost=dict(self.notices_lost),
            groups=dict(self.group_of) if self.grouping else None,
            containers=dict(self.container_of) if self.container_labels else None,
            retired={k: {f: dict(v) for f, v in c.items()} for k, c in self._retired.items()},
            heap_walks=self.heap.counts() if self.heap else None))

    def latest_snapshots(self) -> dict[int, dict[str, Any]]:
        """The latest snapshot of every watched process (pid -> snapshot)."""
        return dict(self._snapshots)

    def loop(self, keep_going: Callable[[], bool],
             on_tick: Callable[[Drained], None] | None = None,
             quick_start: bool = False) -> None:
        """Tick every interval until stopped or keep_going() is false. With
        quick_start (run), the first ticks come 1/8, 1/4 and 1/2 of an interval
        after the start, so a short job is caught in its first second."""
        start = deadline = time.monotonic()
        quick = [start + self.interval * f for f in (0.125, 0.25, 0.5, 1.0)] if quick_start else []
        while not self.stop.is_set() and keep_going():
            deadline = quick.pop(0) if quick else deadline + self.interval
            self.stop.wait(max(0.0, deadline - time.monotonic()))
            if self.stop.is_set():
                break
            drained = self.tick()
            if on_tick:
                on_tick(drained)

    # ---- PSS, USS and swap (memtrace/pss/live.py)

    def enable_pss(self, interval: float) -> None:
        """Keep per-mapping PSS/USS/swap live, refreshing every mapping's shares
        every `interval` seconds (0: off). Says once on stderr when they are off
        or unavailable (the fields are then null)."""
        if interval <= 0:
            log("PSS off (--pss-interval 0): pss_bytes, uss_bytes and swap_bytes are null")
            return
        try:
            # forks are counted in BPF (stats.forks): settled mappings are
            # left out of full refreshes
            self.pss = LivePss(interval, str(self.procfs.root), forks_known=True)
        except OSError as e:
            log(f"PSS unavailable (cannot read /proc/kpagecount: {e.strerror or e}; needs "
                "root): pss_bytes, uss_bytes and swap_bytes are null")

    def _update_pss(self, tracker: ProcessTracker) -> None:
        if self.pss is None:
            return
        self.pss.update(tracker)
        if self.pss.failure is not None:
            log(f"PSS unavailable ({self.pss.failure}): pss_bytes, uss_bytes and "
                "swap_bytes are null from now on")
            self.pss.close()
            self.pss = None
            drop_all(self.trackers.values())

    def _pss_usage(self, pid: int) -> dict[int, Usage] | None:
        return self.pss.usage_of(pid) if self.pss is not None else None

    def _add_pss(self, snap: dict[str, Any], tracker: ProcessTracker) -> None:
        if self.pss is not None:
            snap["pss_refreshed_ts"] = self.pss.refreshed_at(tracker.pid)

    # ---- heap figures (memtrace heap, walked in the background: memtrace/heap/sampler.py)

    def enable_heap(self, interval: float) -> None:
        """Walk the malloc heap of every watched process every `interval` seconds
        (0: never) in a background walker; snapshots get the latest under `heap`."""
        if interval > 0 and self.heap is None:
            self.heap = HeapSampler(interval)

    def _add_heap(self, snap: dict[str, Any], tracker: ProcessTracker) -> None:
        if self.heap is None:
            return
        self.heap.track(tracker.pid, tracker.start_time, tracker.space.layout_token)
        heap = snap["heap"] = self.heap.latest(tracker.pid, tracker.start_time)
        status = heap["status"]
        if status in ("unsupported", "failed") and self._heap_status.get(tracker.pid) != status:
            self.reporter.message(f"pid {tracker.pid}: no heap figures: {heap.get('reason')}")
        self._heap_status[tracker.pid] = status

    def _forget_heap(self, pid: int) -> None:
        self._heap_status.pop(pid, None)
        if self.heap is not None:
            self.heap.forget(pid)

    # ---- stacks (--stacks: memtrace/stacks/, docs/stacks.md)

    def enable_stacks(self, period: int) -> None:
        """Sample the user stacks of page faults every `period` bytes on average
        (before load(): the BPF program is built with the sampler)."""
        from memtrace.stacks.unwind import Unwinder

        self.stack_period = period
        self._unwinder = Unwinder(str(self.procfs.root))
        self._forced = ForcedChunks(self._forget_huge_chunks, PAGE_SIZE, huge_page_size())

    def _forget_huge_chunks(self, pid: int, keys: Iterable[tuple[int, int]]) -> None:
        if self.probes is not None:
            self.probes.forget_huge_chunks(pid, keys)

    def _add_stacks(self, snap: dict[str, Any], tracker: ProcessTracker,
                    records: list[SampleRecord], marks: list[ChunkMark]) -> None:
        """Feed this tick's sampled faults of `tracker`'s process to its
        StackTracker and put the top stacks in the snapshot."""
        if self._unwinder is None:
            return
        from memtrace.stacks.netting import StackTracker
        from memtrace.stacks.summary import stacks_summary

        pid = tracker.pid
        st = self._stacks.get(pid)
        if st is None:
            st = self._stacks[pid] = StackTracker(pid, self._unwinder, from_start=tracker.epoch > 0)
        elif self._stack_epochs.get(pid) != tracker.epoch:
            st.forget_exec()          # a new image: its stacks start again
        self._stack_epochs[pid] = tracker.epoch
        if st.python_epoch != tracker.epoch:
            self._check_python(st, tracker.epoch, tracker.space.vmas)
        records = [r for r in records if r.epoch == tracker.epoch]
        marks = [m for m in marks if m.epoch == tracker.epoch and m.faults]
        if self._forced is not None:
            self._forced.release(pid, tracker.epoch, tracker.space.chunks)
            records = self._forced.weigh(pid, tracker.epoch, records, tracker.huge_at)
        # Nothing sampled, faulted or rescanned since the last profile (an idle
        # process): the last profile still holds; only its time moves.
        inputs = (id(tracker.space), tracker.space.version, tracker.epoch, tracker.exe,
                  tracker.comm, tracker.stats.stacks_lost)
        last = self._profile_inputs.get(pid)
        if not records and not marks and last is not None and last[0] == inputs \
                and pid in self._profiles:
            self._profiles[pid].ts = snap["ts"]
            snap["stacks"] = last[1]
            self._report_profile(pid)
            return
        vmas = tracker.space.vmas
        st.add(records, vmas)
        st.add_faults(marks)
        profile = st.profile(tracker.space, vmas, tracker.exe, tracker.comm, snap["ts"])
        profile.sample_period_bytes = self.stack_period
        profile.samples_lost = tracker.stats.stacks_lost     # ring full (BPF counts them)
        self._profiles[pid] = profile
        snap["stacks"] = stacks_summary(profile)
        self._profile_inputs[pid] = (inputs, snap["stacks"])
        self._report_profile(pid)

    def _report_profile(self, pid: int) -> None:
        """The whole profile to a reporter that keeps it (a recording)."""
        if self.reporter.wants_stack_profiles:
            self.reporter.stack_profile(self._profiles[pid])

    def _check_python(self, st: StackTracker | MallocTracker, epoch: int,
                      vmas: Sequence[Vma]) -> None:
        """Read the CPython frames of a process running CPython 3.11 at its
        samples (--stacks) or sampled allocations (--malloc) (docs/stacks.md,
        "Python"); say once why not for another CPython. A process with no
        CPython mapped is checked again next tick (libpython may be loaded later)."""
        from memtrace.stacks.python import PyResolver

        found = self._find_python(st.pid, epoch, vmas)
        if found is None:
            st.python_epoch = epoch
            return
        if found.offsets is not None:
            st.python = PyResolver(st.pid, found.offsets, str(self.procfs.root))
            debug(f"pid {st.pid}: {found.version} ({found.path}): Python frames, "
                  f"_PyRuntime at {found.runtime:#x}")
        elif found.reason is not None:
            if found.reason not in self._python_said.setdefault(st.pid, set()):
                self._python_said[st.pid].add(found.reason)
                log(f"pid {st.pid}: no Python frames: {found.reason}")
        else:
            return
        st.python_epoch = epoch

    def _find_python(self, pid: int, epoch: int, vmas: Sequence[Vma]) -> PyCheck | None:
        """Check pid's image for CPython and register a 3.11 one with BPF;
        None when the probes read no Python frames at all."""
        from memtrace.stacks.pydetect import PyDetector

        if self.probes is None or not self.probes.python_frames:
            return None
        if self._pydetector is None:
            self._pydetector = PyDetector(str(self.procfs.root))
        found = self._pydetector.check(pid, vmas)
        if found.offsets is not None:
            self.probes.set_python(pid, epoch, found.runtime)
        return found

    def python_at_exec(self, pid: int, timeout: float = 0.05) -> None:
        """`run`: register the command's CPython as soon as its exec is done
        (BPF counted it), before its first line of Python runs; the tick's
        check would come after a short script has finished."""
        if self.probes is None or not self.probes.python_frames:
            return
        deadline = time.monotonic() + timeout
        while (gen := read_stats_of(self.probes, pid).exec_gen) == 0:
            if time.monotonic() > deadline:
                return
            time.sleep(0.0005)
        with contextlib.suppress(OSError):
            self._find_python(pid, gen & EPOCH_MASK, self.procfs.maps(pid))

    def stack_profiles(self) -> dict[int, StackProfile]:
        """The last stack profile of every process watched with --stacks,
        exited ones included unless keep_exited_profiles is off (for
        --stacks-output)."""
        return dict(self._profiles)

    # ---- --malloc (run: the preloaded sampler; memtrace/malloc/, docs/malloc.md)

    def enable_malloc(self, period: int, shim: str) -> None:
        """Take the sampled allocations of the sampler `shim` (preloaded into
        the command by `run`), before load()."""
        from memtrace.malloc.state import MallocState
        from memtrace.stacks.unwind import Unwinder

        self._malloc_shim = shim
        self.malloc = MallocState(period, self._unwinder or Unwinder(str(self.procfs.root)),
                                  check_python=self._check_python)

    def _add_malloc(self, snap: dict[str, Any], tracker: ProcessTracker,
                    records: list[MallocRecord], counts: dict[str, int]) -> None:
        if self.malloc is not None:
            snap["malloc"] = self.malloc.update(
                tracker.pid, tracker.epoch, records, tracker.space.vmas, tracker.comm,
                snap["ts"], counts.get("lost", 0) + counts.get("frees_lost", 0))
            self.malloc.libraries_loaded(tracker.pid, snap["library_events"])   # watch

    def _last_malloc(self, tracker: ProcessTracker, drained: Drained) -> None:
        """--malloc: what a process sampled after its last tick, until it exited,
        still counts in its figures (run's report, --malloc-output), though it
        gets no snapshot."""
        records = drained.malloc.get(tracker.pid)
        if self.malloc is not None and records:
            counts = drained.malloc_counts
            self.malloc.update(tracker.pid, tracker.epoch, records, tracker.space.vmas,
                               tracker.comm, time.time(),
                               counts.get("lost", 0) + counts.get("frees_lost", 0), exited=True)

    def close(self) -> None:
        if self.heap is not None:
            self.heap.close()
        if self.pss is not None:
            self.pss.close()
            self.pss = None
        if self.malloc is not None:
            self.malloc.close()         # watch --malloc: glibc's functions back
        for pid in list(self.trackers):
            tracker = self.trackers.pop(pid)
            tracker.close()
        for fd in self._pidfds.values():
            close_fd(fd)
        self._pidfds.clear()
        if self.probes:
            self.probes.close()
            self.probes = None
        self.reporter.close()
