"""memtrace.trace.tracker.ProcessTracker on a fake /proc tree and a fake PAGEMAP_SCAN."""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import time

import pytest

from memtrace.trace.events import CHUNK_SHIFT, ChunkMark, Stats
from memtrace.trace.model import chunk_span
from memtrace.trace.tracker import MAX_DEFERRED_MISMATCHES, ProcessGone, ProcessTracker
from memtrace.util.ranges import merge_ranges as merge_spans

from .fakes import ANON, ARENA, CHUNK, PAGE, SHM, STACK_END, HookedProcFS, standard_process


def stats(**kw: int) -> Stats:
    return dataclasses.replace(Stats.empty(), **kw)


def bump(tr: ProcessTracker, **kw: int) -> Stats:
    """The tracker's current stats with some counters increased."""
    return dataclasses.replace(tr.stats, **{k: getattr(tr.stats, k) + v for k, v in kw.items()})


def marks_for(*ranges: tuple[int, int], faults: int = 1) -> list[ChunkMark]:
    """Chunk marks covering address ranges, as BPF would drain them."""
    chunks: dict[int, int] = {}
    for s, e in ranges:
        for c in range(s >> CHUNK_SHIFT, ((e - 1) >> CHUNK_SHIFT) + 1):
            chunks[c] = max(s, c << CHUNK_SHIFT)
    return [ChunkMark(c, faults, addr) for c, addr in sorted(chunks.items())]


def assert_exact(tr: ProcessTracker, p) -> None:
    assert [v.identity for v in tr.space.vmas] == [v.identity for v in p.vmas]
    for v in p.vmas:
        r = tr.space.resident_of(v)
        assert (r.anon, r.other) == p.expected(v), v
    t = tr.space.totals()
    assert (t.anon, t.other) == p.expected_total()


def attach(world, p, **kw) -> ProcessTracker:
    tr = ProcessTracker(p.pid, kw.pop("procfs", None) or world.procfs(), **kw)
    tr.start()
    return tr


def scanned_since(world, n: int) -> list[tuple[int, int]]:
    return world.scanner.calls[n:]


# -- attach -----------------------------------------------------------------------
def test_attach_is_exact(world):
    p, m = standard_process(world)
    tr = attach(world, p)
    assert_exact(tr, p)
    assert tr.comm == "server"
    assert tr.exe == b"/usr/bin/server"
    assert tr.start_time == 4242
    assert tr.heap_end == m["heap"].end
    assert dict(tr.counters.full_rescans) == {"attach": 1}
    assert tr.counters.maps_reads == 1
    assert tr.statm is not None and tr.statm.resident_bytes == sum(p.expected_total())
    assert tr.drift_bytes() == 0
    # runs that cross a VMA border are clipped to each VMA
    assert tr.space.resident_of(m["anon"]).anon == 2 * CHUNK + 8 * PAGE + 2 * PAGE
    assert tr.space.resident_of(m["arena"]).anon == 3 * PAGE


def test_attach_scans_each_chunk_of_every_vma_once(world):
    p, _ = standard_process(world)
    attach(world, p)
    spans = merge_spans(chunk_span(v.start, v.end) for v in p.vmas)
    expected = [(f << CHUNK_SHIFT, la << CHUNK_SHIFT) for f, la in spans]
    assert world.scanner.calls == expected


def test_attach_to_missing_process(world):
    tr = ProcessTracker(31337, world.procfs())
    with pytest.raises(ProcessGone):
        tr.start()


# -- targeted updates -------------------------------------------------------------
def test_marked_changes_are_exact_without_full_rescan(world):
    p, m = standard_process(world)
    tr = attach(world, p)
    n = len(world.scanner.calls)
    p.touch(ANON + 4 * CHUNK + 7 * PAGE, ANON + 4 * CHUNK + 20 * PAGE)  # new faults
    p.drop(ANON + CHUNK, ANON + CHUNK + 10 * PAGE)  # DONTNEED
    p.touch(0x555555560000, 0x555555562000)  # heap grows in place
    p.sync()
    tr.update(
        marks_for(
            (ANON + 4 * CHUNK + 7 * PAGE, ANON + 4 * CHUNK + 20 * PAGE),
            (ANON + CHUNK, ANON + CHUNK + 10 * PAGE),
            (0x555555560000, 0x555555562000),
        ),
        [],
        bump(tr),
    )
    assert_exact(tr, p)
    assert dict(tr.counters.full_rescans) == {"attach": 1}
    assert tr.counters.maps_reads == 1  # layout_gen did not move
    assert tr.counters.deferred_mismatches == 0
    # only the marked chunks were scanned
    c0 = 0x555555560000 >> CHUNK_SHIFT
    assert scanned_since(world, n) == [
        (c0 << CHUNK_SHIFT, (c0 + 1) << CHUNK_SHIFT),
        (ANON + CHUNK, ANON + 2 * CHUNK),
        (ANON + 4 * CHUNK, ANON + 5 * CHUNK),
    ]
    assert tr.drift_bytes() == 0


def test_ranges_are_rescanned(world):
    p, m = standard_process(world)
    tr = attach(world, p)
    p.drop(ANON, ARENA)  # madvise(DONTNEED) of all 5 chunks: too big to mark inline
    p.sync()
    tr.update([], [(ANON, ARENA), (ARENA, ARENA)], bump(tr))
    assert_exact(tr, p)
    assert tr.space.resident_of(m["anon"]).total == 0
    assert tr.space.resident_of(m["arena"]).anon == 3 * PAGE
    assert dict(tr.counters.full_rescans) == {"attach": 1}


def test_stats_none_keeps_previous_stats(world):
    p, _ = standard_process(world)
    tr = attach(world, p)
    s = stats(layout_gen=3, remote_rss=2)
    tr.stats = s
    tr.update([], [], None)
    assert tr.stats is s
    assert dict(tr.counters.full_rescans) == {"attach": 1}
    assert tr.counters.ticks == 1


def test_quiet_tick_scans_nothing(world):
    p, _ = standard_process(world)
    tr = attach(world, p)
    n = len(world.scanner.calls)
    tr.update([], [], bump(tr))
    assert scanned_since(world, n) == []
    assert tr.counters.maps_reads == 1
    assert_exact(tr, p)
    assert tr.counters.last_tick_seconds >= 0


# -- statm check --------------------------------------------------------------------
def test_unmarked_change_with_stable_statm_triggers_full_rescan(world):
    p, m = standard_process(world)
    tr = attach(world, p)
    p.touch(ANON + 4 * CHUNK + 100 * PAGE, ANON + 4 * CHUNK + 150 * PAGE)  # no mark: a lost fault
    p.drop(0x55555555B000, 0x55555555C000)
    p.sync()
    tr.update([], [], bump(tr))
    assert tr.counters.full_rescans["statm_mismatch"] == 1
    assert tr.counters.deferred_mismatches == 0
    assert_exact(tr, p)
    assert tr.drift_bytes() == 0
    # and the next quiet tick does not rescan again
    tr.update([], [], bump(tr))
    assert tr.counters.full_rescans["statm_mismatch"] == 1


def test_change_during_tick_is_deferred_then_exact_with_marks(world):
    p, _ = standard_process(world)
    fs = HookedProcFS(world.root)
    tr = attach(world, p, procfs=fs)
    first = fs.statm_reads + 1

    def change_mid_tick(n: int) -> None:
        if n == first + 1:  # between statm_before and the check
            p.touch(ANON + 4 * CHUNK + 200 * PAGE, ANON + 4 * CHUNK + 204 * PAGE)
            p.sync()

    fs.before_statm = change_mid_tick
    tr.update([], [], bump(tr))
    assert tr.counters.deferred_mismatches == 1
    assert "statm_mismatch" not in tr.counters.full_rescans
    # the marks of that change arrive with the next drain
    fs.before_statm = None
    change = (ANON + 4 * CHUNK + 200 * PAGE, ANON + 4 * CHUNK + 204 * PAGE)
    tr.update(marks_for(change), [], bump(tr))
    assert_exact(tr, p)
    assert "statm_mismatch" not in tr.counters.full_rescans
    assert tr.counters.deferred_mismatches == 1


def test_mismatch_streak_is_bounded(world):
    p, _ = standard_process(world)
    fs = HookedProcFS(world.root)
    tr = attach(world, p, procfs=fs)
    page = [ANON + 4 * CHUNK + 300 * PAGE]

    def changing(n: int) -> None:
        # every statm read inside a tick sees a new page that is never marked
        p.touch(page[0], page[0] + PAGE)
        page[0] += PAGE
        p.sync()

    fs.before_statm = changing
    for i in range(MAX_DEFERRED_MISMATCHES):
        tr.update([], [], bump(tr))
        assert tr.counters.deferred_mismatches == i + 1
        assert "statm_mismatch" not in tr.counters.full_rescans
    tr.update([], [], bump(tr))
    assert tr.counters.full_rescans["statm_mismatch"] == 1
    assert tr.counters.deferred_mismatches == MAX_DEFERRED_MISMATCHES


def test_statm_pages_invisible_to_page_tables_are_remembered(world):
    """A constant statm excess (counted but not mapped) must not rescan every tick."""
    p, _ = standard_process(world)
    p.hidden = (3, 1)
    p.sync()
    tr = attach(world, p)
    assert_exact(tr, p)
    assert tr.drift_bytes() == -4 * PAGE
    for _ in range(3):
        tr.update([], [], bump(tr))
    assert dict(tr.counters.full_rescans) == {"attach": 1}
    # a real, unmarked change is still caught
    p.drop(ANON + CHUNK, ANON + 2 * CHUNK)
    p.sync()
    tr.update([], [], bump(tr))
    assert tr.counters.full_rescans["statm_mismatch"] == 1
    assert_exact(tr, p)


# -- full rescans requested by BPF ----------------------------------------------------
@pytest.mark.parametrize(
    "field,reason",
    [
        ("remote_rss", "remote_change"),
        ("ranges_lost", "ranges_lost"),
        ("full_rescan_requests", "unbounded_call"),
    ],
)
def test_counter_change_forces_full_rescan(world, field, reason):
    p, _ = standard_process(world)
    tr = attach(world, p)
    p.drop(ANON, ANON + 3 * CHUNK)  # e.g. reclaim or exit of another thread: no marks
    p.touch(ANON + 4 * CHUNK, ANON + 5 * CHUNK)
    p.sync()
    tr.update([], [], bump(tr, **{field: 1}))
    assert dict(tr.counters.full_rescans) == {"attach": 1, reason: 1}
    assert_exact(tr, p)


def test_reason_priority(world):
    p, _ = standard_process(world)
    tr = attach(world, p)
    tr.update([], [], bump(tr, remote_rss=1, ranges_lost=1, full_rescan_requests=1))
    assert dict(tr.counters.full_rescans) == {"attach": 1, "remote_change": 1}
    tr.update([], [], bump(tr, ranges_lost=1, full_rescan_requests=1))
    assert tr.counters.full_rescans["ranges_lost"] == 1
    tr.update([], [], bump(tr))
    assert sum(tr.counters.full_rescans.values()) == 3


def test_periodic_reconcile(world):
    p, _ = standard_process(world)
    tr = attach(world, p, reconcile_interval=1e-9)
    tr.update([], [], bump(tr))
    assert tr.counters.full_rescans["periodic"] == 1
    never = attach(world, p, reconcile_interval=0.0)
    never.update([], [], bump(never))
    assert "periodic" not in never.counters.full_rescans


def test_exec_restarts_from_scratch(world):
    p, m = standard_process(world)
    tr = attach(world, p)
    tr.update(marks_for((ANON, ANON + PAGE), faults=5), [], bump(tr))
    assert tr.faults_by_vma[m["anon"].start] == 5
    old_scanner = world.scanner
    # execve: a new image, nothing of the old address space survives
    p.vmas, p.pages = [], {}
    p.comm = b"new (image)"
    p.set_exe(b"/usr/bin/other")
    p.map(0x400000, 0x401000, b"/usr/bin/other", "r-xp", inode=77, dev="fe:00")
    new_anon = p.map(0x7F1000000000, 0x7F1000400000)
    p.touch(0x400000, 0x401000, anon=False)
    p.touch(new_anon.start + CHUNK - PAGE, new_anon.start + CHUNK + PAGE)
    p.sync()
    tr.update([], [], bump(tr, exec_gen=1, layout_gen=9))
    assert tr.counters.full_rescans["attach"] == 2
    assert tr.comm == "new (image)"
    assert tr.exe == b"/usr/bin/other"
    assert old_scanner.closed and world.scanner is not old_scanner
    assert not tr.faults_by_vma
    assert_exact(tr, p)
    assert tr.stats.exec_gen == 1
    # later ticks compare against the post-exec counters
    tr.update([], [], bump(tr))
    assert tr.counters.full_rescans["attach"] == 2


def test_faults_around_an_exec_count_on_their_own_image(world):
    """Marks carry the exec epoch of the image that made them: in the tick of
    the exec, the old image's faults count on its layout and the new image's
    on the new one (none lost); an old-image fault drained a tick late still
    counts on the old layout; an image never seen counts as [unmapped]."""
    p, m = standard_process(world)
    tr = attach(world, p)
    old_anon = m["anon"]
    p.vmas, p.pages = [], {}
    p.set_exe(b"/usr/bin/other")
    p.map(0x400000, 0x401000, b"/usr/bin/other", "r-xp", inode=77, dev="fe:00")
    new_anon = p.map(0x7F1000000000, 0x7F1000400000)
    p.touch(new_anon.start, new_anon.start + 8 * PAGE)
    p.sync()
    marks = [
        ChunkMark(old_anon.start >> CHUNK_SHIFT, 3, old_anon.start, epoch=0),
        ChunkMark(new_anon.start >> CHUNK_SHIFT, 8, new_anon.start + 7 * PAGE, epoch=2),
        ChunkMark(0x500000 >> CHUNK_SHIFT, 4, 0x500000, epoch=1),   # image 1: never seen
    ]
    tr.update(marks, [], bump(tr, exec_gen=2))
    assert tr.epoch == 2
    assert tr.faults_total == 15
    assert dict(tr.faults_by_vma) == {new_anon.start: 8}
    assert tr.faults_by_mapping == {"[anon]": 11, "[unmapped]": 4}
    assert_exact(tr, p)
    # a late fault of image 0, then one of image 0 again (no longer known)
    tr.update([ChunkMark(old_anon.start >> CHUNK_SHIFT, 2, old_anon.start, epoch=0),
               ChunkMark(new_anon.start >> CHUNK_SHIFT, 1, new_anon.start, epoch=2)],
              [], bump(tr))
    assert tr.faults_total == 18
    assert dict(tr.faults_by_vma) == {new_anon.start: 9}
    assert tr.faults_by_mapping == {"[anon]": 14, "[unmapped]": 4}
    tr.update([ChunkMark(old_anon.start >> CHUNK_SHIFT, 1, old_anon.start, epoch=0)],
              [], bump(tr))
    assert tr.faults_total == 19
    assert tr.faults_by_mapping["[unmapped]"] == 5
    assert dict(tr.faults_by_vma) == {new_anon.start: 9}


# -- layout changes ------------------------------------------------------------------
def test_layout_change_rereads_maps_and_scans_new_vmas(world):
    p, m = standard_process(world)
    tr = attach(world, p)
    n = len(world.scanner.calls)
    # mmap: a new 6 MiB anonymous VMA, populated (MAP_POPULATE: no fault marks)
    new = p.map(0x7F2000100000, 0x7F2000700000)
    p.touch(new.start, new.start + 40 * PAGE)
    p.touch(new.end - 3 * PAGE, new.end)
    # munmap of the arena, with its range
    p.unmap(m["arena"].start, m["arena"].end)
    # mprotect splits libc in two
    libc = m["libc"]
    p.vmas.remove(libc)
    p.map(libc.start, libc.start + 0x4000, libc.path, "r--p", inode=22, dev="fe:00")
    p.map(libc.start + 0x4000, libc.end, libc.path, "r-xp", offset=0x4000, inode=22, dev="fe:00")
    p.sync()
    tr.update([], [(m["arena"].start, m["arena"].end)], bump(tr, layout_gen=3))
    assert tr.counters.maps_reads == 2
    assert dict(tr.counters.full_rescans) == {"attach": 1}
    assert_exact(tr, p)
    assert tr.space.resident_of(new).anon == 43 * PAGE
    assert m["arena"].start not in tr.space.resident
    scanned = scanned_since(world, n)
    assert (new.start & ~(CHUNK - 1), (new.end + CHUNK - 1) & ~(CHUNK - 1)) in scanned
    # chunks of VMAs that did not change are not rescanned
    assert not any(s <= 0x555555554000 < e for s, e in scanned)


def grow_stack(p, m, new_start: int):
    """The kernel grows [stack] down to new_start on a fault (no syscall)."""
    p.vmas.remove(m["stack"])
    return p.map(new_start, STACK_END, b"[stack]")


@pytest.mark.parametrize("new_start, last_addr", [
    (STACK_END - 0x41000, STACK_END - 0x1000),        # in its chunk; last fault above the old end
    (STACK_END - 0x300000, STACK_END - 0x300000),     # into the chunk below, where no VMA was
])
def test_stack_growth_rereads_maps_without_a_syscall(world, new_start, last_addr):
    p, m = standard_process(world)
    tr = attach(world, p)
    before = tr.space.resident_of(m["stack"]).anon
    stack = grow_stack(p, m, new_start)
    p.touch(new_start, new_start + 0x10000)
    p.sync()
    tr.update([ChunkMark(new_start >> CHUNK_SHIFT, 16, last_addr)], [], bump(tr))
    assert tr.counters.maps_reads == 2
    assert dict(tr.counters.full_rescans) == {"attach": 1}
    assert_exact(tr, p)
    assert tr.space.resident_of(stack).anon == before + 0x10000


def test_fault_below_the_stack_inside_another_vma_reads_no_maps(world):
    p, m = standard_process(world)
    tr = attach(world, p)
    below = p.map(STACK_END - 0x400000, STACK_END - 0x3FF000)
    p.sync()
    tr.update([], [], bump(tr, layout_gen=1))
    p.touch(below.start, below.end)
    p.sync()
    tr.update([ChunkMark(below.start >> CHUNK_SHIFT, 1, below.start)], [], bump(tr))
    assert tr.counters.maps_reads == 2
    assert_exact(tr, p)


def test_file_cut_rescans_file_mappings_only(world):
    """ftruncate or a hole punch of a memfd the process maps: no fault, no
    address-space call; BPF counts the call and the file mappings are rescanned."""
    p, m = standard_process(world)
    tr = attach(world, p)
    n = len(world.scanner.calls)
    p.drop(SHM, SHM + 0x8000)
    p.sync()
    tr.update([], [], bump(tr, file_cuts=1))
    assert dict(tr.counters.full_rescans) == {"attach": 1}
    assert_exact(tr, p)
    scanned = scanned_since(world, n)
    assert any(s <= SHM < e for s, e in scanned)
    assert not any(s <= ANON < e for s, e in scanned)


def test_no_layout_change_means_no_maps_read(world):
    p, _ = standard_process(world)
    tr = attach(world, p)
    for _ in range(3):
        tr.update(marks_for((ANON, ANON + PAGE)), [], bump(tr))
    assert tr.counters.maps_reads == 1


# -- faults --------------------------------------------------------------------------
def test_fault_counting(world):
    p, m = standard_process(world)
    tr = attach(world, p)
    marks = [
        ChunkMark(ANON >> CHUNK_SHIFT, 7, ANON + 5 * PAGE),
        ChunkMark((ANON >> CHUNK_SHIFT) + 5, 2, ARENA + PAGE),  # in the arena VMA
        ChunkMark(0x555555560000 >> CHUNK_SHIFT, 3, 0x555555560000),  # heap
        ChunkMark(0x10000 >> CHUNK_SHIFT, 4, 0x10000),  # outside every VMA
        ChunkMark((ANON >> CHUNK_SHIFT) + 1, 0, ANON + CHUNK),  # no faults
    ]
    tr.update(marks, [], bump(tr))
    assert tr.faults_total == 16
    assert dict(tr.faults_by_vma) == {m["anon"].start: 7, m["arena"].start: 2, m["heap"].start: 3}
    tr.update(marks[:1], [], bump(tr))
    assert tr.faults_total == 23
    assert tr.faults_by_vma[m["anon"].start] == 14


# -- the process going away ------------------------------------------------------------
def test_process_vanishes(world):
    p, _ = standard_process(world)
    tr = attach(world, p)
    p.vanish()
    with pytest.raises(ProcessGone):
        tr.update(marks_for((ANON, ANON + PAGE)), [], bump(tr))


def test_scan_esrch_means_gone(world):
    p, _ = standard_process(world)
    tr = attach(world, p)
    world.scanner.fail = ProcessLookupError(p.pid)
    with pytest.raises(ProcessGone):
        tr.update(marks_for((ANON, ANON + PAGE)), [], bump(tr))


def test_scan_error_of_live_process_propagates(world):
    p, _ = standard_process(world)
    tr = attach(world, p)
    world.scanner.fail = OSError(errno.EIO, "I/O error")
    with pytest.raises(OSError) as ei:
        tr.update(marks_for((ANON, ANON + PAGE)), [], bump(tr))
    assert not isinstance(ei.value, ProcessGone)
    assert ei.value.errno == errno.EIO


def test_scan_error_of_zombie_means_gone(world):
    p, _ = standard_process(world)
    tr = attach(world, p)
    p.state = "Z"
    p.sync()
    world.scanner.fail = OSError(errno.EIO, "I/O error")
    with pytest.raises(ProcessGone):
        tr.update(marks_for((ANON, ANON + PAGE)), [], bump(tr))


def test_close_closes_scanner(world):
    p, _ = standard_process(world)
    tr = attach(world, p)
    tr.close()
    assert world.scanner.closed
    tr.close()  # idempotent


# -- the top of the user address space ---------------------------------------------
def test_stack_in_the_last_user_chunk_is_counted(world):
    p = world.process(4100)
    p.map(0x555555554000, 0x555555555000, b"/usr/bin/fake", "r-xp", inode=5, dev="fe:00")
    stack = p.map(0x7FFFFFFDE000, 0x7FFFFFFFF000, b"[stack]")  # setarch -R layout
    p.touch(0x555555554000, 0x555555555000, anon=False)
    p.touch(0x7FFFFFFF9000, 0x7FFFFFFFF000)
    p.sync()
    tr = attach(world, p)
    assert tr.space.resident_of(stack).anon == 6 * PAGE
    assert_exact(tr, p)


def test_vsyscall_above_user_space_is_not_scanned(world):
    p, m = standard_process(world, pid=4200)
    vsys = p.map(0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000, b"[vsyscall]", "--xp")
    p.sync()
    tr = attach(world, p)  # the fake scanner raises EFAULT beyond USER_ADDR_MAX
    assert tr.space.resident_of(vsys).total == 0
    assert_exact(tr, p)


# -- randomized: every change marked => exact on every tick, no fallback rescans ----------
@pytest.mark.parametrize("seed", range(4))
def test_random_marked_workload_stays_exact(world, seed):
    rng = random.Random(seed)
    p, m = standard_process(world, pid=5000 + seed)
    tr = attach(world, p)
    region = (0x7F3000000000, 0x7F3000000000 + 12 * CHUNK)  # where mmaps go
    for tick in range(30):
        marks: list[tuple[int, int]] = []
        ranges: list[tuple[int, int]] = []
        layout = 0
        for _ in range(rng.randrange(1, 4)):
            op = rng.random()
            anon_vmas = [v for v in p.vmas if v.path in (b"", b"[heap]", b"[anon:arena]")]
            if op < 0.45 and anon_vmas:  # faults
                v = rng.choice(anon_vmas)
                s = v.start + rng.randrange(v.size // PAGE) * PAGE
                e = min(v.end, s + rng.choice([1, 3, 100, 600]) * PAGE)
                p.touch(s, e)
                marks.append((s, e))
            elif op < 0.6 and anon_vmas:  # madvise(DONTNEED)
                v = rng.choice(anon_vmas)
                s = v.start + rng.randrange(v.size // PAGE) * PAGE
                e = min(v.end, s + rng.choice([1, 50, 1000]) * PAGE)
                p.drop(s, e)
                (ranges if e - s > 4 * CHUNK or rng.random() < 0.5 else marks).append((s, e))
            elif op < 0.8:  # mmap (+ populate)
                size = rng.choice([1, 16, 512, 700, 1500]) * PAGE
                s = region[0] + rng.randrange((region[1] - region[0] - size) // PAGE) * PAGE
                if any(v.start < s + size and s < v.end for v in p.vmas):
                    continue
                p.map(s, s + size)
                if rng.random() < 0.5:
                    p.touch(s, s + size // 2)
                layout += 1
            else:  # munmap part of an mmap
                cands = [v for v in p.vmas if region[0] <= v.start < region[1]]
                if not cands:
                    continue
                v = rng.choice(cands)
                s = v.start + rng.randrange(v.size // PAGE) * PAGE
                e = min(v.end, s + rng.randrange(1, v.size // PAGE + 1) * PAGE)
                p.unmap(s, e)
                ranges.append((s, e))
                layout += 1
        p.sync()
        tr.update(marks_for(*marks) if marks else [], ranges, bump(tr, layout_gen=layout))
        assert_exact(tr, p)
        assert tr.drift_bytes() == 0, tick
    assert dict(tr.counters.full_rescans) == {"attach": 1}


# -- names refresh (unlink/rename somewhere on the system) -----------------------
def test_names_refresh_is_spaced_by_the_cost_of_reading_maps(world, monkeypatch):
    """Without map_files links (not permitted), maps is re-read, spaced."""
    import memtrace.trace.tracker as tracker_mod

    p, m = standard_process(world)
    tr = attach(world, p)
    tr._map_files_usable = False
    clock = [1000.0]
    monkeypatch.setattr(tracker_mod.time, "monotonic", lambda: clock[0])
    tr._last_maps_read, tr._maps_read_seconds = clock[0], 0.5   # a 0.5 s maps read
    lib = m["libc"]
    deleted = dataclasses.replace(lib, path=lib.path + b" (deleted)")
    p.vmas = [deleted if v == lib else v for v in p.vmas]
    p.sync()

    reads = tr.counters.maps_reads
    clock[0] += 1.0                       # < 20 x 0.5 s since the last read: wait
    tr.update([], [], None, names_changed=True)
    assert tr.counters.maps_reads == reads
    clock[0] += 5.0
    tr.update([], [], None, names_changed=False)   # still stale, still too early
    assert tr.counters.maps_reads == reads
    clock[0] += 5.0                       # 11 s >= 10 s: refresh, without a new event
    tr.update([], [], None, names_changed=False)
    assert tr.counters.maps_reads == reads + 1
    assert deleted.identity in {v.identity for v in tr.space.vmas}
    assert_exact(tr, p)
    tr.update([], [], None, names_changed=False)   # not stale any more
    assert tr.counters.maps_reads == reads + 1


def test_names_refresh_is_immediate_for_a_cheap_maps_read(world):
    p, _ = standard_process(world)
    tr = attach(world, p)
    tr._map_files_usable = False
    reads = tr.counters.maps_reads
    tr._maps_read_seconds = 0.0
    tr.update([], [], None, names_changed=True)
    assert tr.counters.maps_reads == reads + 1


def _with_map_files(world):
    p, m = standard_process(world)
    p.map_files = True
    p.sync()
    tr = attach(world, p)
    tr._last_maps_read, tr._maps_read_seconds = time.monotonic(), 10.0   # costly maps
    return p, m, tr


def test_unchanged_file_names_cost_no_maps_read(world):
    """An unlink elsewhere: one readlink per file mapping finds every name as
    the model has it, so maps (60k lines, say) is not read."""
    p, m, tr = _with_map_files(world)
    reads = tr.counters.maps_reads
    tr.update([], [], None, names_changed=True)
    assert tr.names_checks == 1 and tr.counters.maps_reads == reads
    tr.update([], [], None, names_changed=False)       # not stale any more
    assert tr.names_checks == 1 and tr.counters.maps_reads == reads


def test_a_deleted_mapped_file_is_renamed_at_once(world):
    """The check finds libc's new name (" (deleted)") and maps is read in that
    tick, however costly the last read was."""
    p, m, tr = _with_map_files(world)
    lib = m["libc"]
    deleted = dataclasses.replace(lib, path=lib.path + b" (deleted)")
    p.vmas = [deleted if v == lib else v for v in p.vmas]
    p.sync()
    reads = tr.counters.maps_reads
    tr.update([], [], None, names_changed=True)
    assert tr.counters.maps_reads == reads + 1
    assert deleted.identity in {v.identity for v in tr.space.vmas}
    assert_exact(tr, p)


def test_a_path_with_a_newline_has_its_real_name_and_stays_unchanged(world):
    """maps shows the newline as \\012; the model holds the real bytes (from
    map_files), so the names check finds nothing changed."""
    p, m, tr = _with_map_files(world)
    v = p.map(0x7F0002000000, 0x7F0002002000, b"/tmp/a\nb.dat", "r--s", inode=77)
    p.sync()
    assert b"/tmp/a\\012b.dat\n" in (p.dir / "maps").read_bytes()
    tr.update([], [], bump(tr, layout_gen=1))          # the mmap: maps re-read
    assert v.identity in {x.identity for x in tr.space.vmas}
    tr._last_maps_read, tr._maps_read_seconds = time.monotonic(), 10.0
    link = os.fsencode(p.dir / "map_files" / f"{v.start:x}-{v.end:x}")
    assert os.readlink(link) == b"/tmp/a\nb.dat"
    reads = tr.counters.maps_reads
    tr._names_check_seconds = 0.0
    tr.update([], [], None, names_changed=True)
    assert tr.counters.maps_reads == reads


def test_names_checks_fall_back_to_maps_when_map_files_is_refused(world, monkeypatch):
    p, m, tr = _with_map_files(world)
    tr._maps_read_seconds = 0.0

    def refuse(*_: object) -> bytes:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(tr.procfs, "map_file_name", refuse)
    reads = tr.counters.maps_reads
    tr.update([], [], None, names_changed=True)
    assert tr.counters.maps_reads == reads + 1 and not tr._map_files_usable



def test_fault_in_a_hole_with_a_vma_between_it_and_the_stack_reads_no_maps(world):
    """A fault where no VMA is (a stray access) that the stack could not have
    grown to: another VMA lies between it and the stack."""
    p, m = standard_process(world)
    tr = attach(world, p)
    hole = m["vdso"].start - 0x300000 - 0x1000000         # below the stack, in no VMA
    between = p.map(STACK_END - 0x800000, STACK_END - 0x7FF000)
    p.sync()
    tr.update([], [], bump(tr, layout_gen=1))
    assert hole < between.start and tr.space.vma_at(hole) is None
    tr.update([ChunkMark(hole >> CHUNK_SHIFT, 1, hole)], [], bump(tr))
    assert tr.counters.maps_reads == 2


def test_a_statm_read_that_fails_once_while_alive_is_tried_again(world):
    p, _ = standard_process(world)
    fs = HookedProcFS(world.root)
    tr = attach(world, p, procfs=fs)
    failed = []

    def fail_once(n: int) -> None:
        if not failed:
            failed.append(n)
            raise OSError(errno.EAGAIN, "transient")

    fs.before_statm = fail_once
    tr.update([], [], bump(tr))         # no ProcessGone: the second read worked
    assert failed and tr.statm is not None
    assert_exact(tr, p)


def test_a_process_alive_whose_statm_cannot_be_read_is_not_said_to_have_exited(world):
    p, _ = standard_process(world)
    fs = HookedProcFS(world.root)
    tr = attach(world, p, procfs=fs)

    def fail(n: int) -> None:
        raise OSError(errno.EIO, "broken")

    fs.before_statm = fail
    with pytest.raises(ProcessGone) as gone:
        tr.update([], [], bump(tr))
    assert "alive" in gone.value.why and "statm" in gone.value.why and "broken" in gone.value.why
    p.state = "Z"
    p.sync()
    with pytest.raises(ProcessGone) as gone:
        tr.update([], [], bump(tr))
    assert gone.value.why == "exited"
