"""memtrace.stacks.netting.StackTracker on a hand-built AddressSpace: held now
nets releases, brought in never does, per-mapping scaling is exact, and the
profile's held total is the process's resident total."""

from __future__ import annotations

import random

import pytest

from memtrace.stacks.netting import UNSAMPLED, StackTracker, scale
from memtrace.stacks.profile import Frame, Stack
from memtrace.trace.events import ReleaseRecord, StackRecord
from memtrace.trace.model import AddressSpace, chunk_span
from memtrace.trace.procfs import PAGE_SIZE, Vma

from ..fakes import runs_of

P = PAGE_SIZE
PID = 77
HEAP = Vma(0x555555600000, 0x555555700000, "rw-p", 0, "00:00", 0, b"[heap]")
A = Vma(0x7F0000000000, 0x7F0000400000, "rw-p", 0, "00:00", 0, b"")          # 1024 pages
B = Vma(0x7F0000400000 + 16 * P, 0x7F0000500000, "rw-p", 0, "00:00", 0, b"[anon:b]")
LIB = Vma(0x7F0001000000, 0x7F0001010000, "r-xp", 0, "fe:00", 9,
          b"/usr/lib/x86_64-linux-gnu/libfoo.so.1")
VMAS = [HEAP, A, B, LIB]


def stack_of(*names: str) -> Stack:
    return Stack(tuple(Frame(0x1000 + i, n, "/usr/bin/t") for i, n in enumerate(names)))


PATH_A = stack_of("memset", "fill_big", "main")
PATH_B = stack_of("memset", "fill_small", "main")
PATH_C = stack_of("calloc", "other", "main")
STACKS = {1: PATH_A, 2: PATH_B, 3: PATH_C}


class FakeUnwinder:
    """Gives the stack named by a record's ip (1, 2, 3), as the real one would."""

    def __init__(self, proc_root: str) -> None:
        self.proc_root = proc_root
        self.calls = 0

    def unwind_many(self, pid, vmas, regs):
        self.calls += 1
        return [STACKS[ip] for ip, _sp, _bp, _stack in regs]


class World:
    def __init__(self, tmp_path) -> None:
        (tmp_path / str(PID)).mkdir()
        self.unwinder = FakeUnwinder(str(tmp_path))
        self.tracker = StackTracker(PID, self.unwinder)   # type: ignore[arg-type]
        self.space = AddressSpace()
        self.pages: dict[int, bool] = {}
        self.vmas = list(VMAS)
        self.sync()

    def touch(self, vma: Vma, first: int, count: int) -> None:
        for i in range(first, first + count):
            self.pages[vma.start + i * P] = True

    def drop(self, lo: int, hi: int) -> None:
        for a in [a for a in self.pages if lo <= a < hi]:
            del self.pages[a]

    def unmap(self, vma: Vma) -> None:
        self.vmas = [v for v in self.vmas if v != vma]
        self.drop(vma.start, vma.end)

    def sync(self) -> None:
        """The model rescans everything (as a tracker would after marks)."""
        lo, hi = min(v.start for v in VMAS), max(v.end for v in VMAS)
        first, last = chunk_span(lo, hi)
        self.space.set_vmas(list(self.vmas))
        self.space.replace_chunks(first, last, runs_of(self.pages, lo, hi))
        self.space.attribute_all()

    def sample(self, ip: int, vma: Vma, pages: range, weight: int) -> list[StackRecord]:
        return [StackRecord(PID, vma.start + i * P + 100, ip, 0, 0, weight, b"")
                for i in pages]

    def profile(self):
        return self.tracker.profile(self.space, self.space.vmas, b"/usr/bin/t", "t", 1.0)


def by_stack(profile, field: str) -> dict[Stack, int]:
    out: dict[Stack, int] = {}
    for s in profile.samples:
        out[s.stack] = out.get(s.stack, 0) + getattr(s, field)
    return out


@pytest.fixture
def w(tmp_path):
    return World(tmp_path)


def test_release_of_one_path_nets_out_of_held_but_not_brought(w):
    # path A makes 768 pages of A resident, path B 192 pages of B; one sample per
    # 8 pages, weighing 8 pages
    w.touch(A, 0, 768)
    w.touch(B, 0, 192)
    w.sync()
    w.tracker.add(w.sample(1, A, range(0, 768, 8), 8 * P) +
                  w.sample(2, B, range(0, 192, 8), 8 * P), w.vmas)
    before = w.profile()
    assert by_stack(before, "held_bytes") == {PATH_A: 768 * P, PATH_B: 192 * P}
    assert before.held_total() == w.space.totals().total
    w.unmap(A)                     # munmap of the first path's memory
    w.sync()
    after = w.profile()
    held = by_stack(after, "held_bytes")
    assert held.get(PATH_A, 0) == 0 and held[PATH_B] == 192 * P
    brought = by_stack(after, "brought_bytes")
    assert brought == {PATH_A: 768 * P, PATH_B: 192 * P}
    assert after.held_total() == w.space.totals().total == 192 * P
    assert after.samples[0].stack == PATH_B            # sorted by held bytes
    assert sum(s.samples for s in after.samples) == 96 + 24


def test_madvise_dontneed_inside_a_shared_mapping_moves_held_bytes(w):
    w.touch(A, 0, 512)
    w.sync()
    w.tracker.add(w.sample(1, A, range(0, 256, 4), 4 * P) +
                  w.sample(2, A, range(256, 512, 4), 4 * P), w.vmas)
    assert by_stack(w.profile(), "held_bytes") == {PATH_A: 256 * P, PATH_B: 256 * P}
    w.drop(A.start, A.start + 256 * P)        # MADV_DONTNEED of path A's half
    w.sync()
    held = by_stack(w.profile(), "held_bytes")
    assert held.get(PATH_A, 0) == 0 and held[PATH_B] == 256 * P


def test_held_weights_are_scaled_to_the_mapping_exact_bytes(w):
    w.touch(A, 0, 100)
    w.sync()
    w.tracker.add(w.sample(1, A, range(0, 10), 3 * P) + w.sample(3, A, range(10, 15), 3 * P),
                  w.vmas)
    held = by_stack(w.profile(), "held_bytes")
    assert held[PATH_A] + held[PATH_C] == 100 * P
    assert abs(held[PATH_A] - 100 * P * 2 / 3) <= 1 and abs(held[PATH_C] - 100 * P / 3) <= 1


def test_resident_bytes_with_no_live_sample_go_to_unsampled_per_mapping(w):
    w.touch(HEAP, 0, 7)
    w.touch(A, 0, 40)
    w.touch(LIB, 0, 3)
    w.sync()
    w.tracker.add(w.sample(1, A, range(0, 40, 10), 10 * P), w.vmas)
    p = w.profile()
    unsampled = {(s.mapping, s.kind): s.held_bytes for s in p.samples if s.stack == UNSAMPLED}
    assert unsampled == {("[heap]", "heap"): 7 * P,
                         ("/usr/lib/x86_64-linux-gnu/libfoo.so.1", "library"): 3 * P}
    assert p.held_total() == w.space.totals().total == 50 * P
    assert UNSAMPLED.frames[0].function == "[unsampled]" and len(UNSAMPLED.frames) == 1


def test_mapping_identity_and_kind_are_the_snapshot_ones(w):
    w.touch(HEAP, 0, 4)
    w.touch(B, 0, 4)
    w.sync()
    w.tracker.add(w.sample(1, HEAP, range(4), P) + w.sample(2, B, range(4), P)
                  + [StackRecord(PID, 0x10000, 3, 0, 0, P, b"")], w.vmas)   # no VMA there
    keys = {(s.stack, s.mapping, s.kind) for s in w.profile().samples}
    assert (PATH_A, "[heap]", "heap") in keys
    assert (PATH_B, "[anon:b]", "anon") in keys
    assert (PATH_C, "[unknown]", "special") in keys


def test_the_latest_sample_of_a_page_holds_it(w):
    w.touch(A, 0, 1)
    w.sync()
    w.tracker.add(w.sample(1, A, range(1), P), w.vmas)
    w.tracker.add(w.sample(2, A, range(1), P), w.vmas)     # freed and re-faulted
    p = w.profile()
    assert by_stack(p, "held_bytes") == {PATH_A: 0, PATH_B: P}
    assert by_stack(p, "brought_bytes") == {PATH_A: P, PATH_B: P}


def test_a_page_not_yet_scanned_is_kept_for_one_profile_then_forgotten(w):
    w.tracker.add(w.sample(1, A, range(1), P), w.vmas)     # the model has not seen it
    first = w.profile()
    assert by_stack(first, "held_bytes").get(PATH_A, 0) == 0
    w.touch(A, 0, 1)
    w.sync()
    assert by_stack(w.profile(), "held_bytes")[PATH_A] == P   # kept: now resident
    w.drop(A.start, A.end)
    w.sync()
    w.profile()                              # not resident after a profile: dropped
    assert w.tracker._pages == {}
    w.touch(A, 0, 1)
    w.sync()
    held = by_stack(w.profile(), "held_bytes")
    assert held.get(PATH_A, 0) == 0 and held[UNSAMPLED] == P


def test_many_samples_of_few_stacks_are_interned(w):
    w.touch(A, 0, 1024)
    w.sync()
    rng = random.Random(3)
    records = [StackRecord(PID, A.start + rng.randrange(1024) * P, rng.choice((1, 2, 3)),
                           0, 0, P, b"") for _ in range(20000)]
    w.tracker.add(records, w.vmas)
    assert len(w.tracker._stacks) == 3 and w.unwinder.calls == 1
    p = w.profile()
    assert sum(s.samples for s in p.samples) == 20000
    assert p.brought_total() == 20000 * P and p.sample_period_bytes == P
    assert p.held_total() == 1024 * P


def test_forget_exec_drops_everything(w):
    w.touch(A, 0, 8)
    w.sync()
    w.tracker.add(w.sample(1, A, range(8), P), w.vmas)
    w.tracker.note_lost(3)
    assert w.profile().samples_lost == 3
    w.tracker.forget_exec()
    p = w.profile()
    assert [s.stack for s in p.samples] == [UNSAMPLED] and p.samples_lost == 0
    assert p.brought_total() == 0


def test_scale_is_exact_and_proportional():
    rng = random.Random(11)
    for _ in range(500):
        weights = {i: rng.randint(0, 10**6) for i in range(rng.randint(1, 30))}
        total = rng.randint(0, 10**9)
        out = scale(weights, total)
        s = sum(weights.values())
        if s == 0:
            assert out == {}
            continue
        assert sum(out.values()) == total
        for k, w_ in weights.items():
            assert abs(out[k] - w_ * total / s) < 1 + 1e-9


# -- with the real tracker on the fake /proc world (tests/unit/fakes.py) ----------------
def test_profile_follows_the_tracker_model_through_dontneed_and_munmap(world, tmp_path):
    from ..fakes import ANON, ARENA, CHUNK, standard_process
    from ..test_tracker import attach, bump, marks_for

    p, m = standard_process(world)
    tr = attach(world, p)
    unwinder = FakeUnwinder(str(world.root))
    st = StackTracker(p.pid, unwinder)     # type: ignore[arg-type]

    def rec(ip: int, addr: int) -> StackRecord:
        return StackRecord(p.pid, addr, ip, 0, 0, 4 * P, b"")

    # path A sampled in [anon] (its pages ANON+CHUNK-3P .. ANON+3CHUNK+5P), path B
    # in the arena, path C on the heap
    a_pages = [ANON + CHUNK + i * P for i in range(0, 64, 4)]
    st.add([rec(1, a) for a in a_pages] + [rec(2, ARENA + P), rec(3, 0x55555555B000)],
           tr.space.vmas)
    prof = st.profile(tr.space, tr.space.vmas, tr.exe, "server", 1.0)
    assert prof.held_total() == tr.space.totals().total
    held = {(s.stack, s.mapping): s.held_bytes for s in prof.samples}
    assert held[(PATH_A, "[anon]")] == tr.space.resident_of(m["anon"]).total
    assert held[(PATH_B, "[anon:arena]")] == tr.space.resident_of(m["arena"]).total
    assert held[(PATH_C, "[heap]")] == tr.space.resident_of(m["heap"]).total
    # MADV_DONTNEED of every page path A sampled, then munmap of the arena
    p.drop(ANON + CHUNK, ANON + CHUNK + 64 * P)
    p.unmap(m["arena"].start, m["arena"].end)
    p.sync()
    tr.update(marks_for((ANON + CHUNK, ANON + CHUNK + 64 * P)),
              [(m["arena"].start, m["arena"].end)], bump(tr, layout_gen=5))
    after = st.profile(tr.space, tr.space.vmas, tr.exe, "server", 2.0)
    held = {(s.stack, s.mapping): s.held_bytes for s in after.samples}
    assert held.get((PATH_A, "[anon]"), 0) == 0 and held.get((PATH_B, "[anon:arena]"), 0) == 0
    assert held[(UNSAMPLED, "[anon]")] == tr.space.resident_of(m["anon"]).total > 0
    assert after.held_total() == tr.space.totals().total == sum(p.expected_total())
    brought = {(s.stack, s.mapping): s.brought_bytes for s in after.samples}
    assert brought[(PATH_A, "[anon]")] == len(a_pages) * 4 * P
    assert brought[(PATH_B, "[anon:arena]")] == 4 * P


def test_a_huge_page_fault_brings_and_holds_its_huge_page(w):
    """Path C's one fault mapped a huge page over A's first chunk (a forced
    sample weighing 2 MiB, stacks/huge.py); path A faulted 256 pages of the
    next chunk, sampled every 8 pages. Brought: the huge page is 512 pages,
    not the one fault's page."""
    from memtrace.trace.events import CHUNK_SHIFT, ChunkMark

    w.touch(A, 0, 768)
    w.sync()
    huge = StackRecord(PID, A.start + 5 * P, 3, 0, 0, 512 * P, b"", forced=True)
    w.tracker.add([huge] + w.sample(1, A, range(512, 768, 8), 8 * P), w.vmas)
    w.tracker.add_faults([ChunkMark(A.start >> CHUNK_SHIFT, 1, A.start + 5 * P),
                          ChunkMark((A.start >> CHUNK_SHIFT) + 1, 256, A.start + 600 * P)])
    p = w.profile()
    assert by_stack(p, "brought_bytes") == {PATH_C: 512 * P, PATH_A: 256 * P}
    assert by_stack(p, "held_bytes") == {PATH_C: 512 * P, PATH_A: 256 * P}
    assert p.held_total() == w.space.totals().total


def test_a_forced_sample_of_one_page_brings_one_page(w):
    """A forced sample whose fault mapped one page weighs one page, exactly."""
    from memtrace.trace.events import CHUNK_SHIFT, ChunkMark

    w.touch(A, 0, 1)
    w.sync()
    one = StackRecord(PID, A.start, 3, 0, 0, P, b"", forced=True)
    w.tracker.add([one], w.vmas)
    w.tracker.add_faults([ChunkMark(A.start >> CHUNK_SHIFT, 1, A.start)])
    assert by_stack(w.profile(), "brought_bytes") == {PATH_C: P}


def test_pages_resident_before_attach_stay_unsampled(w):
    # watch attaches to a process whose mapping A holds 300 pages already: the
    # first profile, before any sample, is attach
    w.touch(A, 0, 300)
    w.sync()
    assert by_stack(w.profile(), "held_bytes") == {UNSAMPLED: 300 * P}
    # after attach path B faults 20 pages into the same mapping, 2 of them sampled:
    # they hold those 20 pages, not the 300 no stack of theirs made resident
    w.touch(A, 300, 20)
    w.sync()
    w.tracker.add(w.sample(2, A, range(300, 320, 10), 10 * P), w.vmas)
    held = by_stack(w.profile(), "held_bytes")
    assert held == {UNSAMPLED: 300 * P, PATH_B: 20 * P}
    # 200 of the old pages go: what may be left of before attach is 100 pages at most
    w.drop(A.start, A.start + 200 * P)
    w.sync()
    held = by_stack(w.profile(), "held_bytes")
    assert held == {UNSAMPLED: 100 * P, PATH_B: 20 * P}
    # and it never grows back: 50 pages faulted by B again are B's
    w.touch(A, 0, 50)
    w.sync()
    w.tracker.add(w.sample(2, A, range(0, 50, 10), 10 * P), w.vmas)
    held = by_stack(w.profile(), "held_bytes")
    assert held == {UNSAMPLED: 100 * P, PATH_B: 70 * P}
    assert sum(held.values()) == w.space.totals().total


def test_a_new_image_after_exec_has_nothing_from_before_attach(w):
    w.touch(A, 0, 300)
    w.sync()
    w.profile()                                 # attach
    w.tracker.forget_exec()
    w.tracker.add(w.sample(1, A, range(0, 300, 10), 10 * P), w.vmas)
    assert by_stack(w.profile(), "held_bytes") == {PATH_A: 300 * P}


def test_an_image_traced_from_its_exec_has_nothing_from_before_even_if_scanned_first(w):
    """`run`: the first profile may come after the program faulted pages whose
    samples only the next drain brings (the scan ran after the drain); those
    pages are not from before attach. The samples' estimate (270 pages for
    300, one in 10 sampled at 9 pages each) is scaled to all of them: with
    attach semantics 30 pages stayed [unsampled] (a CI run of heldstacks: 94 %
    of fill_big's 64 MiB held by it)."""
    traced = StackTracker(PID, w.unwinder, from_start=True)  # type: ignore[arg-type]
    attached = w.tracker
    w.touch(A, 0, 300)
    w.sync()
    for tracker in (traced, attached):
        w.tracker = tracker
        assert by_stack(w.profile(), "held_bytes") == {UNSAMPLED: 300 * P}   # nothing fed yet
        w.tracker.add(w.sample(1, A, range(0, 300, 10), 9 * P), w.vmas)
    w.tracker = traced
    assert by_stack(w.profile(), "held_bytes") == {PATH_A: 300 * P}
    w.tracker = attached
    assert by_stack(w.profile(), "held_bytes") == {PATH_A: 270 * P, UNSAMPLED: 30 * P}


# -- releases in order with the samples (struct mt_stack_release) -------------------


def held_now(w: World) -> dict[Stack, int]:
    return {k: v for k, v in by_stack(w.profile(), "held_bytes").items() if v}


def test_address_given_back_and_faulted_again_by_other_code_is_not_held_by_the_first(w):
    """munmap and a new mapping at the same address faulted by other code, all
    before the next profile: the model sees the pages resident throughout, so
    only the release record, between the two paths' samples, tells them apart."""
    w.touch(A, 0, 512)
    w.sync()
    first = w.sample(1, A, range(0, 512, 4), 4 * P)              # path A fills
    released = [ReleaseRecord(PID, A.start, A.start + 512 * P)]  # given back
    second = w.sample(3, A, range(2, 512, 16), 16 * P)           # C faults it again
    w.tracker.add(first + released + second, w.vmas)
    held = held_now(w)
    assert held == {PATH_C: 512 * P}


def test_without_the_release_record_the_first_path_keeps_what_it_gave_back(w):
    """The same, without the record: what the model alone can say (the bug the
    record fixes: path A keeps its samples, half the weight, half the bytes)."""
    w.touch(A, 0, 512)
    w.sync()
    w.tracker.add(w.sample(1, A, range(0, 512, 4), 4 * P)
                  + w.sample(3, A, range(2, 512, 16), 16 * P), w.vmas)
    assert held_now(w) == {PATH_A: 256 * P, PATH_C: 256 * P}


def test_a_sample_after_the_release_is_kept(w):
    w.touch(A, 0, 64)
    w.sync()
    w.tracker.add([ReleaseRecord(PID, A.start, A.start + 64 * P)]
                  + w.sample(2, A, range(0, 64, 8), 8 * P), w.vmas)
    assert held_now(w) == {PATH_B: 64 * P}


def test_a_release_elsewhere_leaves_the_samples(w):
    w.touch(A, 0, 64)
    w.sync()
    w.tracker.add(w.sample(1, A, range(0, 64, 8), 8 * P), w.vmas)
    w.tracker.add([ReleaseRecord(PID, A.start + 64 * P, A.end),     # the rest of A
                   ReleaseRecord(PID, B.start, B.end)], w.vmas)
    assert held_now(w) == {PATH_A: 64 * P}


def test_a_large_release_takes_back_only_its_range(w):
    """A range of more pages than there are samples is matched the other way
    round (each sample against the range): same outcome."""
    w.touch(A, 0, 1024)
    w.sync()
    w.tracker.add(w.sample(1, A, range(0, 512, 8), 8 * P)
                  + w.sample(2, A, range(512, 1024, 8), 8 * P), w.vmas)
    w.tracker.add([ReleaseRecord(PID, A.start - (1 << 30), A.start + 512 * P)]
                  + w.sample(3, A, range(4, 512, 8), 8 * P), w.vmas)
    assert held_now(w) == {PATH_B: 512 * P, PATH_C: 512 * P}


def test_mremap_moves_the_samples_with_the_pages(w):
    """mremap to a new address: the samples follow their pages; what the new
    size cuts off is given back."""
    w.touch(A, 0, 64)
    w.sync()
    w.tracker.add(w.sample(1, A, range(0, 64, 8), 8 * P), w.vmas)
    to = B.start
    w.tracker.add([ReleaseRecord(PID, A.start, A.start + 64 * P, to, to + 32 * P)], w.vmas)
    w.drop(A.start, A.end)
    w.touch(B, 0, 32)
    w.sync()
    assert held_now(w) == {PATH_A: 32 * P}
    assert len(w.tracker._pages) == 4 and all(B.start <= p < B.start + 32 * P
                                              for p in w.tracker._pages)


def test_mremap_onto_sampled_pages_replaces_them(w):
    """MREMAP_FIXED onto a range that held sampled pages: those are gone, the
    moved samples take their place (none left where nothing moved)."""
    w.touch(A, 0, 64)
    w.touch(B, 0, 64)
    w.sync()
    w.tracker.add(w.sample(1, A, range(0, 16, 8), 8 * P)
                  + w.sample(2, B, range(0, 64, 8), 8 * P), w.vmas)
    w.tracker.add([ReleaseRecord(PID, A.start, A.start + 16 * P, B.start, B.start + 64 * P)],
                  w.vmas)
    assert sorted(w.tracker._pages) == [B.start, B.start + 8 * P]
    assert {w.tracker._stacks[sid] for sid, _, _ in w.tracker._pages.values()} == {PATH_A}
