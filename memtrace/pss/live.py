"""Live PSS, USS and swap per mapping for watch/run/agent (docs/pss.md, "Live").

Per tracked process, one `Usage` per VMA (memtrace.pss.reader), recomputed only when
it may have changed:

- its pages were rescanned this tick (the tracker re-attributed the VMA: faults,
  madvise, munmap... in it; `AddressSpace.rescanned`), or it is new;
- a watched process mapped or unmapped (or exited with) a mapping of the same
  file (device and inode): the shares of that file's pages changed;
- every `interval` seconds, or 20 times the duration of the last full refresh
  if that is longer, all of the process's mappings: map counts change
  without any event in this process when another process (watched or not)
  maps, unmaps, forks or breaks copy-on-write sharing. Left out of these
  full refreshes (when BPF counts the process's forks, `forks_known`): private
  anonymous mappings whose every page was exclusive, with nothing swapped,
  at their last computation. Such a page can only become shared by a fork of
  this process (counted in BPF) or by KSM merging (not while ksmd is off);
  any change to the mapping's own pages is an event that recomputes it. A
  fork makes the next tick's refresh a full one (spaced by its cost).

Between full refreshes, the figures of pages this process did not touch can be
stale by what other processes did to their map counts in that time. The
kpagecount reads of one tick are shared by all processes (one KPageCounts,
cleared per tick). The result is kept per process (`usage_of`), and the start of
every VMA whose figures changed is added to `space.changed`, so the snapshot
builder rebuilds exactly those entries."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from memtrace.pss.accounting import PSS_SHIFT, SKIP_NAMES, Usage
from memtrace.pss.reader import KPageCounts, PssReader
from memtrace.trace.model import AddressSpace, chunk_span
from memtrace.trace.pagemap import ScanUnsupported
from memtrace.trace.procfs import Vma, statm_is_exact
from memtrace.trace.tracker import ProcessTracker
from memtrace.util.ranges import merge_ranges

DEFAULT_PSS_INTERVAL = 5.0
FileKey = tuple[str, int]     # (device, inode)


def file_key(vma: Vma) -> FileKey | None:
    return (vma.dev, vma.inode) if vma.inode else None


@dataclass
class _Process:
    space: AddressSpace
    reader: PssReader
    layout: int = -1
    idents: dict[int, Vma] = field(default_factory=dict)       # VMA start -> VMA computed
    files: dict[int, FileKey] = field(default_factory=dict)   # VMA start -> file
    pending: set[int] = field(default_factory=set)            # to compute next time
    last_full: float = float("-inf")                           # monotonic
    full_cost: float = 0.0                                     # seconds, last full refresh
    usage: dict[int, Usage] = field(default_factory=dict)     # VMA start -> its figures
    refreshed_at: float | None = None                          # wall time of last full
    # starts of mappings computed and not _settled: what a full refresh must
    # recompute while no new sharing can have happened (kept in step with usage)
    unsettled: set[int] = field(default_factory=set)
    forks: int | None = None         # the process's fork count at the last full refresh
    ksm_off: bool = False            # KSM was not running at the last full refresh


# Full refreshes of one process are spaced by at least this many times the
# duration of its last one: at most 1/20 of a core for a process whose every
# refresh is expensive (4 GiB in 60k mappings: about 1 s each).
FULL_REFRESH_COST_FACTOR = 20


class LivePss:
    """Keeps the PSS/USS/swap of every tracked process's mappings current. Raises
    OSError (PermissionError when not root) if /proc/kpagecount cannot be
    opened; `failure` is set when a later read finds PSS unavailable."""

    def __init__(self, interval: float = DEFAULT_PSS_INTERVAL, proc_root: str = "/proc",
                 reader_options: dict[str, object] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 forks_known: bool = False,
                 ksm_run_path: str = "/sys/kernel/mm/ksm/run") -> None:
        self.interval = interval
        self.forks_known = forks_known      # tracker.stats.forks counts every fork
        self.ksm_run_path = ksm_run_path
        self.proc_root = proc_root
        self.counts = KPageCounts(proc_root)
        self.reader_options = reader_options or {}
        self.clock = clock
        self.failure: str | None = None
        self._procs: dict[int, _Process] = {}
        self._files_now: set[FileKey] = set()
        self._files_prev: set[FileKey] = set()
        self.vmas_computed = 0      # counters for tests and benchmarks
        self.full_refreshes = 0
        self.scans = 0              # computations that needed their own PAGEMAP_SCAN
        self.vmas_settled = 0       # left out of full refreshes: exclusive anonymous
        self.vmas_from_model = 0    # settled, changed, figures from the model's pages

    # -- per tick -----------------------------------------------------------
    def begin_tick(self) -> None:
        """Map counts read last tick may be stale: forget them."""
        self.counts.clear()

    def end_tick(self) -> None:
        """Files whose mappings changed this tick are recomputed in every
        process this tick (those updated later) and the next (all of them)."""
        self._files_prev, self._files_now = self._files_now, set()

    def usage_of(self, pid: int) -> dict[int, Usage] | None:
        """PSS/USS/swap per VMA start of `pid`; None before its first update
        (or when its pagemap could not be opened)."""
        st = self._procs.get(pid)
        return st.usage if st else None

    def refreshed_at(self, pid: int) -> float | None:
        st = self._procs.get(pid)
        return st.refreshed_at if st else None

    def update(self, tracker: ProcessTracker) -> None:
        """Recompute what may have changed in `tracker`'s mappings (after its
        tracker.update of this tick, before its snapshot)."""
        if self.failure is not None:
            return
        space = tracker.space
        st = self._procs.get(tracker.pid)
        if st is None or st.space is not space:
            if st is not None:          # exec: a new address space
                st.reader.close()
                self._files_now.update(st.files.values())
            try:
                reader = PssReader(tracker.pid, self.proc_root, self.counts,
                                   **self.reader_options)  # type: ignore[arg-type]
            except OSError:
                return                   # gone: the tracker notices
            st = self._procs[tracker.pid] = _Process(space, reader)
            space.track_rescanned = True
            space.take_rescanned()
        usage = st.usage
        todo = st.pending
        st.pending = set()
        todo |= space.take_rescanned()
        if space.layout_version != st.layout:
            self._diff_layout(st, usage, todo)
        files = self._files_now | self._files_prev
        if files:
            todo.update(s for s, f in st.files.items() if f in files)
        now = self.clock()
        since = now - st.last_full
        spacing = FULL_REFRESH_COST_FACTOR * st.full_cost
        forks = tracker.stats.forks if self.forks_known else None
        full = self.interval > 0 and since >= max(self.interval, spacing) or (
            forks is not None and st.forks is not None and forks != st.forks
            and since >= spacing)
        # For the next tick: a settled mapping rescanned with the same pages
        # keeps its figures while no new sharing can happen (its pages stay
        # exclusive): only the unsettled ones need such rescans.
        space.rescan_watch = st.unsettled if _no_new_sharing(st, forks) else None
        nothing_swapped: bool | None = None       # /proc/PID/status read once, if needed
        if full:
            st.ksm_off = not self._ksm_running()
            if _no_new_sharing(st, forks):
                # the settled ones are left out (no pass over every mapping)
                vmas = _by_start(space, todo | st.unsettled)
                self.vmas_settled += len(space.vmas) - len(vmas)
            else:
                vmas = list(space.vmas)
        else:
            if todo and _no_new_sharing(st, forks):
                # settled mappings known by their start alone (a VMA whose
                # identity changed is unsettled until computed: _diff_layout)
                settled = [s for s in todo if s in usage and s not in st.unsettled]
                if settled:
                    nothing_swapped = self._nothing_swapped(tracker.pid)
                    if nothing_swapped:
                        self._settled_from_model(space, settled, usage)
                        todo.difference_update(settled)
            vmas = _by_start(space, todo)
            if vmas and _no_new_sharing(st, forks) and any(
                    _settled(v, usage.get(v.start)) for v in vmas):
                if nothing_swapped is None:
                    nothing_swapped = self._nothing_swapped(tracker.pid)
                if nothing_swapped:
                    vmas = self._from_model(space, vmas, usage)
        if not vmas:
            return
        t0 = time.perf_counter()
        try:
            new = self._compute(st.reader, vmas, whole=full, space=space,
                                nothing_swapped=nothing_swapped)
        except PermissionError as e:
            self.failure = str(e)
            return
        except OSError:
            # gone (ProcessLookupError) or a read failed: keep the old
            # figures and try again next tick
            st.pending = {v.start for v in vmas}
            return
        self.vmas_computed += len(vmas)
        if full:
            self.full_refreshes += 1
            st.full_cost = time.perf_counter() - t0
            st.last_full = now
            st.refreshed_at = time.time()
            st.forks = forks
        unsettled = st.unsettled
        for vma, u in zip(vmas, new):
            if _settled(vma, u):
                unsettled.discard(vma.start)
            else:
                unsettled.add(vma.start)
            if usage.get(vma.start) != u:
                usage[vma.start] = u
                space.changed.add(vma.start)

    def _from_model(self, space: AddressSpace, vmas: list[Vma],
                    usage: dict[int, Usage]) -> list[Vma]:
        """Settled mappings whose pages changed (faults, madvise...) while the
        process did not fork and nothing is swapped out: every resident page is
        still exclusive (a page this process faults in is its own), so their
        figures are their resident bytes in the model, just rescanned; no
        pagemap read. Returns the mappings left to compute."""
        rest = []
        for v in vmas:
            if not _settled(v, usage.get(v.start)):
                rest.append(v)
                continue
            rss = space.resident_of(v).total
            old = usage[v.start]          # settled: pss and uss are its rss, no swap
            if old.rss == rss and old.uss == rss and old.pss_fixed == rss << PSS_SHIFT:
                self.vmas_from_model += 1
                continue
            u = Usage(rss=rss, pss_fixed=rss << PSS_SHIFT, uss=rss)
            if old != u:
                usage[v.start] = u
                space.changed.add(v.start)
            self.vmas_from_model += 1
        return rest

    def _settled_from_model(self, space: AddressSpace, starts: list[int],
                            usage: dict[int, Usage]) -> None:
        """_from_model for mappings known settled, by start: no VMA lookup (a
        tick rescans ~1,300 of them at 60k mappings, most with the same pages)."""
        resident = space.resident
        for start in starts:
            r = resident.get(start)
            rss = r.anon + r.other if r is not None else 0
            old = usage[start]
            self.vmas_from_model += 1
            if old.rss == rss and old.uss == rss and old.pss_fixed == rss << PSS_SHIFT:
                continue
            usage[start] = Usage(rss=rss, pss_fixed=rss << PSS_SHIFT, uss=rss)
            space.changed.add(start)

    def _ksm_running(self) -> bool:
        try:
            with open(self.ksm_run_path, "rb") as f:
                return f.read().strip() not in (b"0", b"")
        except FileNotFoundError:
            return False          # no KSM in this kernel
        except OSError:
            return True

    def _diff_layout(self, st: _Process, usage: dict[int, Usage], todo: set[int]) -> None:
        # First sight of a process: its mappings existed before, so no share
        # changed; later, new and removed file mappings change their files' shares.
        changes = self._files_now if st.layout != -1 else set()
        current = {v.start: v for v in st.space.vmas}
        for start, was in list(st.idents.items()):
            v = current.get(start)
            if v is None or not v.same_identity(was):
                f = st.files.pop(start, None)
                if f is not None:
                    changes.add(f)
                if v is None:
                    usage.pop(start, None)
                    st.unsettled.discard(start)
        for v in current.values():
            before = st.idents.get(v.start)
            if before is None or not v.same_identity(before):
                todo.add(v.start)
                st.unsettled.add(v.start)     # until computed as what it is now
                f = file_key(v)
                if f is not None:
                    st.files[v.start] = f
                    changes.add(f)
        st.idents = current
        st.layout = st.space.layout_version

    def _compute(self, reader: PssReader, vmas: list[Vma], whole: bool = False,
                 space: AddressSpace | None = None,
                 nothing_swapped: bool | None = None) -> list[Usage]:
        """Usage of `vmas`. Where pages are read: the model's resident runs
        (exact, just rescanned by the tracker) when the process has nothing
        swapped out (status VmSwap 0, on a kernel whose counters are exact);
        else PAGEMAP_SCAN for present and swapped pages, one scan from the
        first to the last VMA when `whole` (all of them), else one per run of
        adjacent VMAs. Either way a present page counts only inside the
        model's runs: PSS and USS never count a page the RSS does not."""
        readable = [v for v in vmas if v.path not in SKIP_NAMES]
        if nothing_swapped is None and space is not None:
            nothing_swapped = self._nothing_swapped(reader.pid)
        model = _model_runs(space, readable) if space is not None else None
        if model is not None and nothing_swapped:
            return reader.usage(vmas, model)
        self.scans += 1
        if whole and readable:
            spans = [(readable[0].start, readable[-1].end)]
        else:
            spans = merge_ranges(((v.start, v.end) for v in readable), 0, presorted=True)
        runs: list[tuple[int, int]] = []
        if reader.use_scan:
            try:
                for start, end in spans:
                    runs += reader.scan(start, end)
            except ScanUnsupported:
                reader.use_scan = False
                runs = merge_ranges(((v.start, v.end) for v in readable), 0, presorted=True)
        else:
            runs = merge_ranges(((v.start, v.end) for v in readable), 0, presorted=True)
        return reader.usage(vmas, runs, resident=model)

    def _nothing_swapped(self, pid: int) -> bool:
        if not statm_is_exact():
            return False
        try:
            with open(f"{self.proc_root}/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmSwap:"):
                        return int(line.split()[1]) == 0
        except (OSError, ValueError, IndexError):
            pass
        return False

    def forget(self, pid: int) -> None:
        """`pid` is no longer tracked: the shares of its files change."""
        st = self._procs.pop(pid, None)
        if st is not None:
            st.reader.close()
            self._files_now.update(st.files.values())

    def close(self) -> None:
        for pid in list(self._procs):
            self.forget(pid)
        self.counts.close()


def _model_runs(space: AddressSpace, vmas: list[Vma]) -> list[tuple[int, int]]:
    """The resident runs the model holds in the chunks covering `vmas`, sorted
    (runs are clipped at 2 MiB chunk borders, which never cut a PMD mapping;
    PssReader.usage joins adjacent ones)."""
    runs: list[tuple[int, int]] = []
    chunks = space.chunks
    for first, last in merge_ranges(chunk_span(v.start, v.end) for v in vmas):
        if last - first <= len(chunks):
            indices: Iterable[int] = range(first, last)
        else:
            indices = sorted(c for c in chunks if first <= c < last)
        for c in indices:
            chunk = chunks.get(c)
            if chunk is not None:
                runs.extend((start, end) for start, end, _ in chunk.runs)
    return runs


def _no_new_sharing(st: _Process, forks: int | None) -> bool:
    """No page of the process can have become shared without an event in it
    since its last full refresh: BPF counts its forks and none happened, and
    KSM was off."""
    return forks is not None and forks == st.forks and st.ksm_off


def _settled(vma: Vma, usage: Usage | None) -> bool:
    """A private anonymous mapping whose pages were all exclusive, none
    swapped, when last computed from the pagemap."""
    return (usage is not None and not vma.inode and vma.perms[3:4] == "p"
            and usage.uss == usage.rss and not usage.swap)


def _by_start(space: AddressSpace, starts: set[int]) -> list[Vma]:
    """The VMAs of `space` that start at one of `starts`, in address order."""
    out = []
    for start in sorted(starts):
        v = space.vma_at(start)
        if v is not None and v.start == start:
            out.append(v)
    return out


def drop_all(trackers: Iterable[ProcessTracker]) -> None:
    """PSS turned unavailable: every mapping's entry is rebuilt, its PSS
    figures null."""
    for t in trackers:
        t.space.changed.update(v.start for v in t.space.vmas)
