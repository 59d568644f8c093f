"""One watched process: turns drained BPF marks into targeted PAGEMAP_SCANs,
keeps its AddressSpace exact, checks it against statm, and rescans everything
only when a check or an event says the targeted path cannot be trusted."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from memtrace.trace.attribution import Segment, classify, mapping_identity, segments_for
from memtrace.trace.events import CHUNK_SHIFT, EPOCH_MASK, USER_ADDR_MAX, ChunkMark, Stats
from memtrace.trace.model import AddressSpace, chunk_span
from memtrace.trace.pagemap import Scanner, open_scanner
from memtrace.trace.procfs import ProcFS, Statm, Vma, statm_is_exact
from memtrace.util.log import DEBUG, debug
from memtrace.util.ranges import merge_ranges

T = TypeVar("T")

# Mismatches with statm while the process is changing are expected (it runs
# while we scan); after this many in a row we rescan anyway.
MAX_DEFERRED_MISMATCHES = 5
# An unlink or rename anywhere on the system may change mapping names (the
# " (deleted)" suffix), never resident pages. The names of the process's file
# mappings are checked with one readlink each in /proc/PID/map_files, and maps
# is re-read only when one differs; without map_files, maps is re-read. Both
# are spaced so that they cost at most 1/NAMES_REFRESH_COST_FACTOR of a core:
# immediate for a small process, every ~20 s for a maps read of 60k mappings.
NAMES_REFRESH_COST_FACTOR = 20
# The main stack's VMA is among the last few of maps (above it: vvar, vdso,
# vsyscall); only those are looked at for it every tick.
STACK_NEAR_TOP = 16
# Faults this far below the stack's end (1 GiB) are looked at for its growth
# in one tick; mmap'd memory starts at least 128 MiB below the stack anyway.
STACK_REACH_CHUNKS = 512


@dataclass
class TrackerCounters:
    ticks: int = 0
    chunks_scanned: int = 0
    ranges_scanned: int = 0
    maps_reads: int = 0
    full_rescans: Counter[str] = field(default_factory=Counter)
    deferred_mismatches: int = 0
    last_tick_seconds: float = 0.0


class ProcessGone(Exception):
    """The process can no longer be watched; `why` completes "pid N ..."."""

    def __init__(self, pid: int, why: str = "exited") -> None:
        super().__init__(pid, why)
        self.why = why


class ProcessTracker:
    def __init__(self, pid: int, procfs: ProcFS, reconcile_interval: float = 0.0) -> None:
        self.pid = pid
        self.procfs = procfs
        self.reconcile_interval = reconcile_interval
        self.space = AddressSpace()
        self.counters = TrackerCounters()
        self.stats = Stats.empty()
        self.faults_by_vma: Counter[int] = Counter()
        self.faults_by_mapping: Counter[str] = Counter()   # never decreases: for counters
        self.faults_total = 0
        # The image self.space describes: its exec count (stats.exec_gen &
        # EPOCH_MASK), as BPF keys the marks of its faults.
        self.epoch = 0
        # The image before the latest exec, for one tick: its faults made just
        # before the exec can reach the tick after it.
        self._before_exec: tuple[int, AddressSpace, bytes] | None = None
        # PSS/USS/swap per VMA start, kept by memtrace.pss.live; None when off
        self.comm = ""
        self.exe = b""
        self.start_time = 0
        # the kernel's own figures, read each tick (memtrace.session): VmHWM and
        # the minor/major fault counters since the process started
        self.peak_rss_bytes: int | None = None
        self.minor_faults: int | None = None
        self.major_faults: int | None = None
        self.statm: Statm | None = None
        self.attached_at = time.time()
        self._scanner: Scanner | None = None
        self._last_full = 0.0
        self._mismatch_streak = 0
        # Chunks marked by faults in the previous tick: a fault is marked when it
        # starts, so its page may have appeared after our scan; scan them again.
        self._recheck: list[tuple[int, int]] = []
        # statm minus model (anon, other) that a full rescan could not remove:
        # page-table state the RSS counters do not count, or the reverse.
        self._unexplained: tuple[int, int] = (0, 0)
        self._names_stale = False
        self._maps_read_seconds = 0.0
        self._last_maps_read = 0.0
        self._map_files_usable = True       # False once readlink there is refused
        self._names_check_seconds = 0.0
        self._last_names_check = 0.0
        self.names_checks = 0               # readlink rounds (tests, benchmarks)

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        """Read the address space from scratch (attach, exec)."""
        try:
            st = self.procfs.stat(self.pid)
            self.comm, self.start_time = st.comm, st.start_time
            self.exe = self.procfs.exe(self.pid)
            if self._scanner:
                self._scanner.close()
            self._scanner = open_scanner(self.pid, str(self.procfs.root), self._vmas_in)
        except PermissionError:
            raise
        except OSError as e:
            raise ProcessGone(self.pid) from e
        self.space = AddressSpace()
        self.epoch = self.stats.exec_gen & EPOCH_MASK
        self.faults_by_vma.clear()
        self._full_rescan("attach")

    def close(self) -> None:
        if self._scanner:
            self._scanner.close()
            self._scanner = None

    def huge_at(self, addr: int) -> bool | None:
        """Whether a huge page holds the page at addr now; None if no page is
        mapped there (yet: a fault in progress, or no longer)."""
        if self._scanner is None:
            return False
        try:
            return self._scanner.huge(addr)
        except OSError:
            return False

    def _vmas_in(self, start: int, end: int) -> list[tuple[int, int, bytes]]:
        return [(v.start, v.end, v.path) for v in self.space.vmas_overlapping(start, end)]

    @property
    def heap_end(self) -> int:
        return next((v.end for v in self.space.vmas if v.path == b"[heap]"), 0)

    # -- reading the process ---------------------------------------------------
    def _read_maps(self) -> list[Vma]:
        self.counters.maps_reads += 1
        t0 = time.perf_counter()
        vmas = self._read_or_gone(self.procfs.maps, "maps")
        self._maps_read_seconds = time.perf_counter() - t0
        self._last_maps_read = time.monotonic()
        self._names_stale = False
        return vmas

    def _names_refresh_due(self) -> bool:
        """Whether to re-read maps because a file somewhere was unlinked or renamed."""
        if not self._names_stale:
            return False
        if self._map_files_usable:
            since = time.monotonic() - self._last_names_check
            if since < NAMES_REFRESH_COST_FACTOR * self._names_check_seconds:
                return False
            t0 = time.perf_counter()
            differ = self._file_names_differ()
            self._names_check_seconds = time.perf_counter() - t0
            self._last_names_check = time.monotonic()
            if differ is not None:
                self._names_stale = differ
                return differ
        since = time.monotonic() - self._last_maps_read
        return since >= NAMES_REFRESH_COST_FACTOR * self._maps_read_seconds

    def _file_names_differ(self) -> bool | None:
        """Whether a file mapping's name in map_files differs from the model's
        (a VMA that is gone counts as differing); None when map_files cannot
        be read (not permitted: then never tried again)."""
        self.names_checks += 1
        for v in self.space.vmas:
            if not v.inode:
                continue
            try:
                if self.procfs.map_file_name(self.pid, v.start, v.end) != v.path:
                    return True
            except PermissionError:
                self._map_files_usable = False
                return None
            except OSError:
                return True
        return False

    def _read_statm(self) -> Statm:
        return self._read_or_gone(self.procfs.statm, "statm")

    def _read_or_gone(self, read: Callable[[int], T], name: str) -> T:
        """read(pid); ProcessGone if it fails and the process has exited. A
        failure while it is alive is tried once more, then ends the watch of it
        with the error said (never passed off as an exit)."""
        for attempt in (1, 2):
            try:
                return read(self.pid)
            except OSError as e:
                if not self.procfs.alive(self.pid):
                    raise ProcessGone(self.pid) from e
                if attempt == 2:
                    raise ProcessGone(self.pid, f"is alive but /proc/{self.pid}/{name} "
                                      f"cannot be read ({e}): no longer watched") from e
        raise AssertionError("unreachable")

    def _scan_spans(self, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Rescan chunk spans; return those whose runs are the same as before."""
        assert self._scanner is not None
        same = []
        for first, last in spans:
            start, end = first << CHUNK_SHIFT, min(last << CHUNK_SHIFT, USER_ADDR_MAX)
            if start >= end:
                continue
            try:
                runs = self._scanner.scan(start, end)
            except ProcessLookupError as e:
                raise ProcessGone(self.pid) from e
            except OSError as e:
                if not self.procfs.alive(self.pid):
                    raise ProcessGone(self.pid) from e
                raise
            if not self.space.replace_chunks(first, last, runs):
                same.append((first, last))
            self.counters.ranges_scanned += 1
            self.counters.chunks_scanned += last - first
        return same

    def _full_rescan(self, reason: str) -> None:
        self.counters.full_rescans[reason] += 1
        statm_before = self._read_statm()
        self.space.set_vmas(self._read_maps())
        self.space.clear()
        spans = merge_ranges(chunk_span(v.start, v.end) for v in self.space.vmas)
        self._scan_spans(spans)
        self.space.attribute_all()
        self.statm = self._read_statm()
        # A difference that survives a scan of a quiet process is real and
        # stays; one seen while the process ran is lag, fixed by later ticks.
        self._unexplained = self._diff(self.statm) if self.statm == statm_before else (0, 0)
        self._last_full = time.monotonic()

    # -- one tick ---------------------------------------------------------------
    def update(self, marks: list[ChunkMark], ranges: list[tuple[int, int]],
               stats: Stats | None, names_changed: bool = False) -> None:
        """One tick. `names_changed`: a file was deleted or renamed somewhere, so
        mapping names in maps may have changed."""
        t0 = time.perf_counter()
        self.counters.ticks += 1
        old, self.stats = self.stats, stats or self.stats
        new = self.stats
        if new.exec_gen != old.exec_gen:
            self._exec(marks)
            self._finish(t0)
            return
        marks = self._own_marks(marks)
        reason = self._rescan_reason(old, new)
        statm_before = self._read_statm()
        self._names_stale = self._names_stale or names_changed
        if reason:
            self._full_rescan(reason)
        else:
            self._targeted(marks, ranges, layout_changed=new.layout_gen != old.layout_gen
                           or self._names_refresh_due() or self._stack_grew(marks),
                           files_cut=new.file_cuts != old.file_cuts)
        self._count_faults(marks)
        self._check(statm_before)
        self._finish(t0)

    def _exec(self, marks: list[ChunkMark]) -> None:
        """The process exec'd: count the faults of the old image on its layout,
        start over on the new one, and count the faults the new image made
        since (right after an exec they are in the same drain)."""
        old_epoch, old_space, old_exe = self.epoch, self.space, self.exe
        self._count_faults([m for m in marks if m.epoch == old_epoch])
        self.start()
        self._before_exec = (old_epoch, old_space, old_exe)
        own = [m for m in marks if m.epoch == self.epoch]
        self._count_faults(own)
        self._recheck = [(m.chunk, m.chunk + 1) for m in own if m.faults]
        # images that came and went within one interval: never seen
        self._count_faults([m for m in marks if m.epoch not in (old_epoch, self.epoch)],
                           space=AddressSpace())

    def _own_marks(self, marks: list[ChunkMark]) -> list[ChunkMark]:
        """The marks of the current image. Faults the image before the latest
        exec made after the drain of the exec's tick are counted against that
        image's layout."""
        before, self._before_exec = self._before_exec, None
        if all(m.epoch == self.epoch for m in marks):
            return marks
        own = [m for m in marks if m.epoch == self.epoch]
        late = [m for m in marks if m.epoch != self.epoch]
        if before is not None:
            epoch, space, exe = before
            self._count_faults([m for m in late if m.epoch == epoch], space=space, exe=exe)
            late = [m for m in late if m.epoch != epoch]
        self._count_faults(late, space=AddressSpace())
        return own

    def _finish(self, t0: float) -> None:
        self.counters.last_tick_seconds = time.perf_counter() - t0

    def _rescan_reason(self, old: Stats, new: Stats) -> str | None:
        if new.remote_rss != old.remote_rss:
            return "remote_change"
        if new.ranges_lost != old.ranges_lost:
            return "ranges_lost"
        if new.full_rescan_requests != old.full_rescan_requests:
            return "unbounded_call"
        if self.reconcile_interval > 0 and (
                time.monotonic() - self._last_full >= self.reconcile_interval):
            return "periodic"
        return None

    def _stack_grew(self, marks: list[ChunkMark]) -> bool:
        """The main stack grows down on a fault, with no address-space call: a
        fault in the chunk where it ends, or below it where no VMA is, means
        the VMA list must be read again."""
        stack = next((v for v in reversed(self.space.vmas[-STACK_NEAR_TOP:])
                      if v.path == b"[stack]"), None)
        if stack is None:
            return False
        low = stack.start >> CHUNK_SHIFT
        reach = low - STACK_REACH_CHUNKS
        for m in marks:
            if not m.faults or m.chunk > low or m.chunk < reach:
                continue
            if m.chunk == low:
                return True
            above = self.space.vma_from(m.last_addr)     # no VMA between it and the stack?
            if above is not None and above.start == stack.start > m.last_addr:
                return True
        return False

    def _targeted(self, marks: list[ChunkMark], ranges: list[tuple[int, int]],
                  layout_changed: bool, files_cut: bool = False) -> None:
        marked = [(m.chunk, m.chunk + 1) for m in marks if m.faults]
        spans = marked + self._recheck
        self._recheck = marked
        spans += [(m.chunk, m.chunk + 1) for m in marks if not m.faults]
        spans += [chunk_span(s, e) for s, e in ranges if e > s]
        if files_cut:
            # a truncate or hole punch: any file this process maps may have lost pages
            spans += [chunk_span(v.start, v.end) for v in self.space.vmas if v.inode]
        new_vmas: list[Vma] = []
        if layout_changed:
            new_vmas = self.space.set_vmas(self._read_maps())
            spans += [chunk_span(v.start, v.end) for v in new_vmas]
        merged = merge_ranges(spans)
        same = self._scan_spans(merged)
        if same:
            kept = set(same)
            self.space.attribute([s for s in merged if s not in kept], new_vmas, same)
        else:
            self.space.attribute(merged, new_vmas)

    def _count_faults(self, marks: list[ChunkMark], space: AddressSpace | None = None,
                      exe: bytes | None = None) -> None:
        """Count faults on the current image's layout, or (`space`, `exe`) on
        an image that is gone: in faults and faults_by_mapping only (an empty
        space: an image never seen, its faults count as [unmapped])."""
        current = space is None
        space = self.space if space is None else space
        exe = self.exe if exe is None else exe
        segments: dict[int, Segment] | None = None
        for m in marks:
            if not m.faults:
                continue
            self.faults_total += m.faults
            vma = space.vma_at(m.last_addr)
            if vma is not None:
                if current:
                    self.faults_by_vma[vma.start] += m.faults
                    space.changed.add(vma.start)
                if segments is None:     # a library's bss counts with its library
                    segments = segments_for(space, space.vmas, exe, self.pid,
                                            self.procfs.root)
                seg = segments.get(vma.start)
                identity = (seg.mapping if seg is not None
                            else mapping_identity(vma, classify(vma, exe)))
                self.faults_by_mapping[identity] += m.faults
            else:
                self.faults_by_mapping["[unmapped]"] += m.faults

    def _check(self, statm_before: Statm) -> None:
        """Compare the model with statm; rescan when a mismatch is real."""
        statm = self._read_statm()
        self.statm = statm
        if self._matches(statm):
            self._mismatch_streak = 0
            return
        if not statm_is_exact():
            # Approximate counters (older kernels): a difference says nothing;
            # rely on the marks, remote-change events and periodic rescans.
            return
        if statm != statm_before and self._mismatch_streak < MAX_DEFERRED_MISMATCHES:
            # The process changed while we scanned: the marks of the change are
            # already queued for the next tick.
            self._mismatch_streak += 1
            self.counters.deferred_mismatches += 1
            return
        self._mismatch_streak = 0
        if DEBUG:
            debug(f"pid {self.pid} tick {self.counters.ticks}: statm - model = "
                  f"{self._diff(statm)} (anon, file+shmem), accepted {self._unexplained}")
        self._full_rescan("statm_mismatch")

    def _diff(self, statm: Statm) -> tuple[int, int]:
        total = self.space.totals()
        return statm.anon_bytes - total.anon, statm.shared_bytes - total.other

    def _matches(self, statm: Statm) -> bool:
        return self._diff(statm) == self._unexplained

    def drift_bytes(self) -> int:
        """Model total minus the kernel's statm resident at the last check."""
        if self.statm is None:
            return 0
        return self.space.totals().total - self.statm.resident_bytes
