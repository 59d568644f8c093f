"""memtrace.pss.live on fake /proc trees: trackers over FakeProcess page tables,
with pagemap and kpagecount files written from a model of page frames (file
pages shared by device, inode and offset; anonymous pages private unless a
test shares them), so that expected PSS/USS is computed by brute force."""

from __future__ import annotations

import dataclasses
import struct
from collections import Counter
from pathlib import Path

import pytest

from memtrace.pss.accounting import PM_EXCLUSIVE, PSS_SHIFT, Usage
from memtrace.pss.live import LivePss
from memtrace.reporter import Reporter
from memtrace.session import Session
from memtrace.snapshot import SnapshotBuilder
from memtrace.trace.events import CHUNK_SHIFT, ChunkMark
from memtrace.trace.tracker import ProcessTracker

from .fakes import ANON, ARENA, LIBC, PAGE, SHM, STACK_END, FakeProcess, World, standard_process

PRESENT = 1 << 63
OPTIONS = {"use_scan": False, "zero_pfns": frozenset(), "precise_mapcount": True}


class Frames:
    """Page frames of every fake process, and the pagemap/kpagecount files."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.fresh: dict[tuple[int, int], int] = {}
        self.shared: dict[tuple[int, int], int] = {}   # (pid, addr) -> pfn (a "fork")
        self.zero_pfn_for: set[tuple[int, int]] = set()

    def pfn(self, p: FakeProcess, addr: int) -> int:
        if (p.pid, addr) in self.shared:
            return self.shared[(p.pid, addr)]
        if (p.pid, addr) in self.zero_pfn_for:
            return 0
        v = next(v for v in p.vmas if v.start <= addr < v.end)
        if v.inode:
            return 0x100000 + v.inode * 0x1000 + (v.offset + addr - v.start) // PAGE
        return self.fresh.setdefault((p.pid, addr), 0x800000 + len(self.fresh))

    def counts(self) -> Counter[int]:
        return Counter(self.pfn(p, a) for p in self.world.procs.values() for a in p.pages)

    def sync(self) -> None:
        counts = self.counts()
        with open(self.world.root / "kpagecount", "wb") as f:
            for pfn, n in counts.items():
                f.seek(pfn * 8)
                f.write(struct.pack("<Q", n))
        for p in self.world.procs.values():
            p.sync()
            with open(p.dir / "pagemap", "wb") as f:
                for addr, anon in p.pages.items():
                    pfn = self.pfn(p, addr)
                    entry = PRESENT | pfn
                    if anon and counts[pfn] == 1:
                        entry |= PM_EXCLUSIVE
                    f.seek(addr // PAGE * 8)
                    f.write(struct.pack("<Q", entry))
                f.truncate(max(v.end for v in p.vmas) // PAGE * 8 if p.vmas else 0)

    def expected(self, p: FakeProcess) -> dict[int, Usage]:
        counts = self.counts()
        out = {}
        for v in p.vmas:
            u = Usage()
            for a in p.pages:
                if v.start <= a < v.end:
                    n = counts[self.pfn(p, a)]
                    u.rss += PAGE
                    u.pss_fixed += (PAGE << PSS_SHIFT) // n if n >= 2 else PAGE << PSS_SHIFT
                    u.uss += PAGE if n < 2 else 0
            out[v.start] = u
        return out


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(world):
    a, _ = standard_process(world, 4000)
    b, _ = standard_process(world, 4001)
    frames = Frames(world)
    frames.sync()
    clock = Clock()
    live = LivePss(60.0, str(world.root), OPTIONS, clock=clock)
    trackers = {}
    for p in (a, b):
        tr = ProcessTracker(p.pid, world.procfs())
        tr.start()
        trackers[p.pid] = tr
    return a, b, frames, clock, live, trackers


def tick(live: LivePss, trackers: dict[int, ProcessTracker], marks=None, layout=()):
    live.begin_tick()
    for pid, tr in trackers.items():
        stats = tr.stats
        if pid in layout:
            stats = dataclasses.replace(stats, layout_gen=stats.layout_gen + 1)
        tr.update((marks or {}).get(pid, []), [], stats)
        live.update(tr)
    live.end_tick()


def usage_of(live: LivePss, pid: int) -> dict[int, Usage]:
    usage = live.usage_of(pid)
    assert usage is not None
    return {s: Usage(u.rss, u.pss_fixed, u.uss, u.swap) for s, u in usage.items()}


def test_first_update_computes_every_mapping_like_smaps(setup):
    a, b, frames, clock, live, trackers = setup
    tick(live, trackers)
    for p in (a, b):
        got = usage_of(live, p.pid)
        assert got == frames.expected(p)
    # libc text is mapped by both: half each, nothing private
    libc = live.usage_of(a.pid)[LIBC]    # type: ignore[index]
    assert libc.rss == 8 * PAGE and libc.pss == 4 * PAGE and libc.uss == 0


def test_snapshot_fields_and_totals_round_like_smaps_rollup(setup):
    a, b, frames, clock, live, trackers = setup
    # four frames each mapped by a once and by b twice (share 1/3, truncated
    # in fixed point): in a's heap, stack and arena (two), so that the sum of
    # per-mapping bytes differs from the rounded fixed-point total
    a_pages = [0x55555555B000, STACK_END - PAGE, ARENA, ARENA + PAGE]
    for i, addr in enumerate(a_pages):
        frames.shared[(a.pid, addr)] = 0x900000 + i
        for j in (0, 1):
            frames.shared[(b.pid, ANON + (1 << CHUNK_SHIFT) + (2 * i + j) * PAGE)] = 0x900000 + i
    frames.sync()
    tick(live, trackers)
    builder = SnapshotBuilder()
    snap = builder.stamp(builder.build(trackers[a.pid], 1.0, live.usage_of(a.pid)))
    want = frames.expected(a)
    for m in snap["mappings"]:
        u = want[m["start"]]
        assert (m["pss_bytes"], m["uss_bytes"], m["swap_bytes"]) == (u.pss, u.uss, 0)
    fixed = sum(u.pss_fixed for u in want.values())
    assert snap["pss_bytes"] == fixed >> PSS_SHIFT
    assert snap["pss_bytes"] != sum(u.pss for u in want.values())   # rounding matters here
    assert snap["uss_bytes"] == sum(u.uss for u in want.values())
    assert snap["swap_bytes"] == 0


def test_only_rescanned_mappings_are_recomputed_and_marked_changed(setup):
    a, b, frames, clock, live, trackers = setup
    tick(live, trackers)
    before = live.vmas_computed
    tr = trackers[b.pid]
    tr.space.take_changed()
    b.touch(ANON + 4 * (1 << CHUNK_SHIFT), ANON + 4 * (1 << CHUNK_SHIFT) + 3 * PAGE)
    frames.sync()
    mark = ChunkMark((ANON >> CHUNK_SHIFT) + 4, 3, ANON + 4 * (1 << CHUNK_SHIFT))
    tick(live, trackers, marks={b.pid: [mark]})
    assert live.vmas_computed - before == 1            # b's anonymous VMA, nothing else
    assert usage_of(live, tr.pid) == frames.expected(b)
    assert ANON in tr.space.changed


def test_copy_on_write_break_is_seen_though_rss_is_unchanged(setup):
    """A rescan that finds the same number of pages marks nothing for the
    resident figures, but the page became private: PSS must follow."""
    a, b, frames, clock, live, trackers = setup
    frames.shared[(a.pid, ANON + (1 << CHUNK_SHIFT))] = 0x900000
    frames.shared[(b.pid, ANON + (1 << CHUNK_SHIFT))] = 0x900000
    frames.sync()
    tick(live, trackers)
    assert live.usage_of(b.pid)[ANON].uss == frames.expected(b)[ANON].uss  # type: ignore[index]
    del frames.shared[(b.pid, ANON + (1 << CHUNK_SHIFT))]     # b wrote: its own copy
    frames.sync()
    mark = ChunkMark((ANON >> CHUNK_SHIFT) + 1, 1, ANON + (1 << CHUNK_SHIFT))
    tick(live, trackers, marks={b.pid: [mark]})
    assert usage_of(live, b.pid) == frames.expected(b)
    # a did nothing: its share of that page is stale until the full refresh
    assert usage_of(live, a.pid) != frames.expected(a)
    clock.now += 60
    tick(live, trackers)
    assert usage_of(live, a.pid) == frames.expected(a)


def test_a_file_mapped_by_another_watched_process_is_recomputed_at_once(setup):
    a, b, frames, clock, live, trackers = setup
    tick(live, trackers)
    odd = SHM + 0x40000
    assert live.usage_of(a.pid)[odd].uss == 0             # type: ignore[index]
    # b unmaps its mapping of the same file (inode 44): a's page is now private
    b.unmap(odd, odd + PAGE)
    frames.sync()
    before = live.vmas_computed
    tick(live, trackers, layout={b.pid})     # a was updated before b saw the change
    tick(live, trackers)                     # so a recomputes in the next tick
    assert usage_of(live, a.pid) == frames.expected(a)
    assert live.usage_of(a.pid)[odd].uss == PAGE           # type: ignore[index]
    assert usage_of(live, b.pid) == frames.expected(b)
    assert live.vmas_computed - before == 1    # a's odd mapping; nothing else


def test_a_process_that_goes_away_changes_its_files_shares(setup):
    a, b, frames, clock, live, trackers = setup
    tick(live, trackers)
    before = live.vmas_computed
    del trackers[b.pid]
    live.forget(b.pid)
    b.pages.clear()
    b.vmas.clear()
    frames.sync()
    tick(live, trackers)
    assert usage_of(live, a.pid) == frames.expected(a)
    # file mappings of a (exe x2, libc, shm, odd) only; not its anonymous memory
    assert live.vmas_computed - before == 5


def test_hidden_pfns_make_pss_unavailable(setup):
    a, b, frames, clock, live, trackers = setup
    for addr in a.pages:
        frames.zero_pfn_for.add((a.pid, addr))
    frames.sync()
    tick(live, trackers)
    assert live.failure is not None and "CAP_SYS_ADMIN" in live.failure


class _Quiet(Reporter):
    """Reports nothing."""


def test_session_says_once_when_pss_is_off_or_unavailable(tmp_path: Path, capsys):
    from memtrace.trace.procfs import ProcFS
    s = Session(_Quiet(), 1.0, 0.0, ProcFS(tmp_path))
    s.enable_pss(0)
    assert s.pss is None
    assert capsys.readouterr().err.count("PSS off (--pss-interval 0)") == 1
    s.enable_pss(5)            # no kpagecount under this root
    assert s.pss is None
    err = capsys.readouterr().err
    assert "PSS unavailable" in err and "null" in err


def test_table_shows_pss_and_uss_and_a_dash_when_null(setup):
    import io

    from rich.console import Console

    from memtrace.util.units import fmt_bytes as human
    from memtrace.views.table import TableReporter
    a, b, frames, clock, live, trackers = setup
    tick(live, trackers)
    builder = SnapshotBuilder()
    snap = builder.stamp(builder.build(trackers[a.pid], 1.0, live.usage_of(a.pid)))
    console = Console(file=io.StringIO(), width=220, height=60)
    table = TableReporter(console=console, max_rows=3)
    table.snapshot(snap)
    off = dict(snap, pid=9, pss_bytes=None, uss_bytes=None, swap_bytes=None,
               mappings=[dict(m, pss_bytes=None, uss_bytes=None) for m in snap["mappings"]])
    table.snapshot(off)
    table.close()
    text = console.file.getvalue()     # type: ignore[attr-defined]
    lines = text.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("perms"))
    assert header.split()[4:7] == ["rss", "pss", "uss"]
    assert f"pss {human(snap['pss_bytes'])}  uss {human(snap['uss_bytes'])}" in text
    assert "pss -  uss -" in text


def test_without_swap_the_models_runs_are_read_and_agree(setup, monkeypatch):
    import memtrace.pss.live as livepss_mod
    a, b, frames, clock, live, trackers = setup
    monkeypatch.setattr(livepss_mod, "statm_is_exact", lambda: True)
    for p in (a, b):
        with open(p.dir / "status", "ab") as f:
            f.write(b"VmSwap:\t       0 kB\n")
    tick(live, trackers)
    assert live.scans == 0
    for p in (a, b):
        assert usage_of(live, p.pid) == frames.expected(p)
    # something swapped out: PAGEMAP_SCAN (here: whole VMAs) again
    a.sync()
    with open(a.dir / "status", "ab") as f:
        f.write(b"VmSwap:\t       4 kB\n")
    clock.now += 60
    live.update(trackers[a.pid])
    assert live.scans == 1


def test_full_refreshes_are_spaced_by_their_cost(setup):
    """interval 60 s; a process whose last full refresh took 10 s waits 200 s."""
    a, b, frames, clock, live, trackers = setup
    tick(live, trackers)
    assert live.full_refreshes == 2
    for st in live._procs.values():
        st.full_cost = 10.0
    clock.now += 61
    tick(live, trackers)
    assert live.full_refreshes == 2          # 61 s < 20 x 10 s
    clock.now += 140
    tick(live, trackers)
    assert live.full_refreshes == 4


def _forking_setup(world, tmp_path: Path, ksm: bytes = b"0\n"):
    a, _ = standard_process(world, 4000)
    frames = Frames(world)
    frames.sync()
    clock = Clock()
    (tmp_path / "ksm_run").write_bytes(ksm)
    live = LivePss(60.0, str(world.root), OPTIONS, clock=clock, forks_known=True,
                   ksm_run_path=str(tmp_path / "ksm_run"))
    tr = ProcessTracker(a.pid, world.procfs())
    tr.start()
    return a, frames, clock, live, {a.pid: tr}


def _private_anon(live: LivePss, tr: ProcessTracker) -> list[int]:
    usage = live.usage_of(tr.pid)
    assert usage is not None
    return [v.start for v in tr.space.vmas if not v.inode and v.perms.endswith("p")
            and usage[v.start].rss and usage[v.start].uss == usage[v.start].rss]


def test_full_refresh_leaves_out_exclusive_anonymous_mappings_while_nothing_forks(world, tmp_path):
    a, frames, clock, live, trackers = _forking_setup(world, tmp_path)
    tr = trackers[a.pid]
    tick(live, trackers)
    settled = _private_anon(live, tr)
    assert settled and live.vmas_settled == 0       # the first refresh computes everything
    computed = live.vmas_computed
    clock.now += 61
    tick(live, trackers)
    assert live.full_refreshes == 2
    assert live.vmas_settled == len(settled)
    assert live.vmas_computed - computed == len(tr.space.vmas) - len(settled)
    assert usage_of(live, tr.pid) == frames.expected(a)


def test_a_fork_recomputes_every_mapping_at_the_next_tick(world, tmp_path):
    """A fork shares the parent's anonymous pages with no fault or call in the
    parent: BPF counts it (stats.forks), and the next tick refreshes all."""
    a, frames, clock, live, trackers = _forking_setup(world, tmp_path)
    tr = trackers[a.pid]
    tick(live, trackers)
    clock.now += 61
    tick(live, trackers)
    # the "child" maps a's heap page (its copy-on-write share)
    child, _ = standard_process(world, 4100)
    heap_page = next(addr for addr in a.pages if ANON <= addr < ANON + (4 << CHUNK_SHIFT))
    frames.shared[(a.pid, heap_page)] = 0x900000
    frames.shared[(child.pid, heap_page)] = 0x900000
    child.pages[heap_page] = True
    frames.sync()
    clock.now += 1
    tick(live, trackers)
    assert usage_of(live, tr.pid) != frames.expected(a)  # no fork counted: stale until a refresh
    tr.stats = dataclasses.replace(tr.stats, forks=tr.stats.forks + 1)
    clock.now += 1
    tick(live, trackers)
    assert live.full_refreshes == 3
    assert usage_of(live, tr.pid) == frames.expected(a)


def test_nothing_is_left_out_while_ksm_runs_or_forks_are_not_counted(world, tmp_path):
    a, frames, clock, live, trackers = _forking_setup(world, tmp_path, ksm=b"1\n")
    tick(live, trackers)
    clock.now += 61
    tick(live, trackers)
    assert live.full_refreshes == 2 and live.vmas_settled == 0
    live.ksm_run_path = str(tmp_path / "none")        # no KSM in the kernel
    live.forks_known = False
    clock.now += 61
    tick(live, trackers)
    assert live.full_refreshes == 3 and live.vmas_settled == 0


def test_a_mapping_with_shared_pages_is_still_refreshed_in_full(world, tmp_path):
    """a's page shared with another process (their fork) becomes private
    when that process writes its copy: no event in a, only a full refresh
    shows it, so mappings with shared pages are never left out."""
    a, frames, clock, live, trackers = _forking_setup(world, tmp_path)
    other, _ = standard_process(world, 4100)
    page = ANON + (1 << CHUNK_SHIFT)
    frames.shared[(a.pid, page)] = frames.shared[(other.pid, page)] = 0x900000
    frames.sync()
    tick(live, trackers)
    assert live.usage_of(a.pid)[ANON].uss < live.usage_of(a.pid)[ANON].rss  # type: ignore[index]
    del frames.shared[(other.pid, page)]
    frames.sync()
    clock.now += 61
    tick(live, trackers)
    assert live.vmas_settled > 0
    assert usage_of(live, a.pid) == frames.expected(a)


def test_new_pages_of_a_settled_mapping_come_from_the_model(world, tmp_path):
    """A settled (exclusive anonymous) mapping faults in more pages and the
    process did not fork: its figures are its resident bytes, all private,
    without reading the pagemap; the result is what smaps would say."""
    a, frames, clock, live, trackers = _forking_setup(world, tmp_path)
    live._nothing_swapped = lambda pid: True          # type: ignore[method-assign]
    tr = trackers[a.pid]
    tick(live, trackers)
    assert live.usage_of(tr.pid)[ANON].uss == live.usage_of(tr.pid)[ANON].rss > 0      # type: ignore[index]
    fresh = next(x for x in range(ANON, ANON + (5 << CHUNK_SHIFT), PAGE)
                 if not any(y in a.pages for y in range(x, x + 3 * PAGE, PAGE)))
    a.touch(fresh, fresh + 3 * PAGE)
    frames.sync()
    before = live.usage_of(tr.pid)[ANON]                                        # type: ignore[index]
    mark = ChunkMark(fresh >> CHUNK_SHIFT, 3, fresh)
    tick(live, trackers, marks={a.pid: [mark]})
    assert live.vmas_from_model == 1
    assert live.usage_of(tr.pid)[ANON].rss == before.rss + 3 * PAGE            # type: ignore[index]
    assert usage_of(live, tr.pid) == frames.expected(a)
    assert ANON in tr.space.changed


def test_model_figures_are_not_used_while_ksm_runs(world, tmp_path):
    a, frames, clock, live, trackers = _forking_setup(world, tmp_path, ksm=b"1\n")
    live._nothing_swapped = lambda pid: True          # type: ignore[method-assign]
    tick(live, trackers)
    a.touch(ANON + (2 << CHUNK_SHIFT), ANON + (2 << CHUNK_SHIFT) + PAGE)
    frames.sync()
    mark = ChunkMark((ANON >> CHUNK_SHIFT) + 2, 1, ANON + (2 << CHUNK_SHIFT))
    tick(live, trackers, marks={a.pid: [mark]})
    assert live.vmas_from_model == 0
    assert usage_of(live, a.pid) == frames.expected(a)


# -- zero-page PTEs (issue 16, item 2) ---------------------------------------------
ZERO_PFN = 0x7777
HEAP = 0x55555555B000


@pytest.mark.parametrize("swapped", [False, True], ids=["model_runs", "pagemap_read"])
def test_zero_page_ptes_never_count_and_pss_stays_within_rss(world, monkeypatch, swapped):
    """The heap has zero-page PTEs (present in pagemap, PFN not known to the
    reader, as on the PAGEMAP_SCAN path) between resident pages: not in the
    model, so not in RSS. Whether the model's runs are read (nothing swapped)
    or whole mappings (something swapped), on the first tick and on later
    full refreshes, every mapping has the figures smaps gives and PSS, USS
    <= RSS. Before the fix they counted in PSS and USS (53248 vs RSS 20480 in
    the issue's libc bss)."""
    import memtrace.pss.live as livepss_mod
    monkeypatch.setattr(livepss_mod, "statm_is_exact", lambda: True)
    p, _ = standard_process(world, 4000)
    p.touch(HEAP + 7 * PAGE, HEAP + 8 * PAGE)
    p.touch(HEAP + 10 * PAGE, HEAP + 11 * PAGE)
    frames = Frames(world)
    frames.sync()
    zero_at = [HEAP + i * PAGE for i in (5, 6, 8, 9, 11, 12)]
    with open(p.dir / "pagemap", "r+b") as f:
        for addr in zero_at:
            f.seek(addr // PAGE * 8)
            f.write(struct.pack("<Q", PRESENT | ZERO_PFN))
    with open(p.dir / "status", "ab") as f:
        f.write(b"VmSwap:\t       4 kB\n" if swapped else b"VmSwap:\t       0 kB\n")
    clock = Clock()
    live = LivePss(60.0, str(world.root), OPTIONS, clock=clock)
    tr = ProcessTracker(p.pid, world.procfs())
    tr.start()
    trackers = {p.pid: tr}
    want = frames.expected(p)
    assert want[HEAP].rss == 7 * PAGE
    for _ in range(3):
        tick(live, trackers)
        got = usage_of(live, tr.pid)
        assert got == want
        for v in tr.space.vmas:
            rss = tr.space.resident_of(v).total
            assert got[v.start].pss <= rss and got[v.start].uss <= rss, v
        clock.now += 61          # the next tick is a full refresh
    assert live.scans == (3 if swapped else 0)
