"""Sampled faults netted into "held now" and "brought in" per call stack and
mapping (docs/stacks.md).

Each sample is unwound when it arrives (its mapping may be gone later) and
kept as the latest sample of its page: page -> (stack, weight). "Brought in"
is never netted: per 2 MiB chunk of the address space, the weights of the
samples in it are scaled to the chunk's exact fault count (BPF counts every
fault per chunk) times the page size (a huge page's fault, always sampled:
the huge page; stacks/huge.py), so a path's brought-in bytes are exact
up to how the samples split the chunks it shares with other paths. "Held now"
counts a sampled page only while the address-space model says it is resident
and its page was not given back since: BPF sends the ranges that munmap,
MAP_FIXED, MADV_DONTNEED/FREE/REMOVE, a shrinking brk or mremap give back (or
move) in the samples' ring, in order with the samples, and each takes back
the samples taken there before it. Without them, an address given back and
faulted again by other code before the next profile kept the first code's
sample, and that code held pages it had released (44 % of an 8 MiB buffer
mapped at the same address by another function, at a 16 KiB period).
Per VMA, the weights of the held samples are scaled
so that they add up to the VMA's exact resident bytes less what may still be
pages from before attach (no stack made those); those, and the bytes of a VMA
with no live sample, go to the one-frame stack `[unsampled]`.
The profile's held total is then the process's resident total exactly."""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from typing import TypeVar

from memtrace.stacks.profile import Frame, Stack, StackIds, StackProfile, StackSample
from memtrace.stacks.python import PyResolver, merge
from memtrace.stacks.unwind import Unwinder
from memtrace.trace.attribution import classify, mapping_identity, segments_for
from memtrace.trace.events import (
    CHUNK_SHIFT,
    PY_TRUNCATED,
    ChunkMark,
    ReleaseRecord,
    SampleRecord,
    StackRecord,
)
from memtrace.trace.model import AddressSpace
from memtrace.trace.procfs import PAGE_SIZE, Vma

UNSAMPLED = Stack((Frame(0, "[unsampled]", "[unsampled]"),))
"""The stack of a VMA's resident bytes when none of its sampled pages is."""
UNMAPPED = ("[unknown]", "special")     # a sample whose address no VMA holds
_PAGE_MASK = ~(PAGE_SIZE - 1)
MappingKey = tuple[str, str]            # (mapping identity, kind)
K = TypeVar("K")


def scale(weights: dict[K, int], total: int) -> dict[K, int]:
    """Weights scaled to add up to `total` exactly (largest remainders get
    the bytes rounding left over)."""
    s = sum(weights.values())
    if s <= 0:
        return {}
    out, rest = {}, []
    for key, w in weights.items():
        q, r = divmod(w * total, s)
        out[key] = q
        rest.append((r, key))
    left = total - sum(out.values())
    rest.sort(key=lambda x: x[0], reverse=True)
    for _, key in rest[:left]:
        out[key] += 1
    return out


class StackTracker:
    """The --stacks state of one process."""

    def __init__(self, pid: int, unwinder: Unwinder, top: int = 20,
                 from_start: bool = False) -> None:
        self.pid = pid
        self.unwinder = unwinder
        self.top = top                  # stacks a view shows; the profile keeps all
        self._stacks = StackIds()
        self._pages: dict[int, tuple[int, int, int]] = {}   # page -> (stack, weight, gen)
        self._brought: dict[tuple[int, MappingKey], list[int]] = {}  # -> [bytes, samples]
        # chunk -> (stack, mapping) -> sampled weight, and chunk -> exact faults
        self._chunk_weights: dict[int, dict[tuple[int, MappingKey], int]] = {}
        self._chunk_faults: dict[int, int] = {}
        # chunk -> bytes its huge-page faults made resident beyond one page each
        self._chunk_huge: dict[int, int] = {}
        self._gen = 0                   # profiles taken: pages sampled since are kept
        # VMA start -> (VMA, its bytes resident since before attach, at most): set
        # by a first profile taken before any sample (attach), then never more
        # than the VMA holds. An image exec'd while traced (its epoch > 0: `run`) has none:
        # its first profile may come after it faulted (the scan saw pages whose
        # samples the next drain brings), and those pages are not from before.
        self._before: dict[int, tuple[Vma, int]] | None = {} if from_start else None
        self._exe: bytes | None = None
        self.samples = 0
        self.weight = 0
        self.samples_lost = 0
        # CPython frames (stacks/python.py): the resolver of this image, and
        # the image (epoch) whose check is settled
        self.python: PyResolver | None = None
        self.python_epoch: int | None = None

    # -- samples in -----------------------------------------------------------------
    def add(self, records: Iterable[SampleRecord], vmas: Sequence[Vma]) -> None:
        """Unwind and keep samples of this process, taken with this VMA list;
        apply its releases where they come among them."""
        records = list(records)
        if not records:
            return
        samples = [r for r in records if isinstance(r, StackRecord)]
        unwound = iter(self.unwinder.unwind_many(
            self.pid, vmas, [(r.ip, r.sp, r.bp, r.stack) for r in samples]) if samples else ())
        mapping_of = _MappingFinder(self, vmas, self._exe_now())
        # unwind_many gives one Stack object to all samples of one walk, and
        # `unwound` keeps them alive: their ids name them during this batch
        sid_of: dict[int, int] = {}
        for r in records:
            if isinstance(r, ReleaseRecord):
                self._release(r)
                continue
            stack = next(unwound)
            if r.py_frames and self.python is not None:
                sid = self._stacks.intern(merge(stack, self.python.groups(
                    r.py_frames, truncated=bool(r.py_flags & PY_TRUNCATED))))
            else:
                known = sid_of.get(id(stack))
                if known is None:
                    known = sid_of[id(stack)] = self._stacks.intern(stack)
                sid = known
            self._pages[r.addr & _PAGE_MASK] = (sid, r.weight, self._gen)
            key = (sid, mapping_of(r.addr))
            chunk = r.addr >> CHUNK_SHIFT
            in_chunk = self._chunk_weights.setdefault(chunk, {})
            in_chunk[key] = in_chunk.get(key, 0) + r.weight
            if r.forced and r.weight > PAGE_SIZE:   # one fault, a huge page
                self._chunk_huge[chunk] = self._chunk_huge.get(chunk, 0) + r.weight - PAGE_SIZE
            cell = self._brought.get(key)
            if cell is None:
                self._brought[key] = [r.weight, 1]
            else:
                cell[0] += r.weight
                cell[1] += 1
            self.samples += 1
            self.weight += r.weight

    def _release(self, r: ReleaseRecord) -> None:
        """The samples of pages in [r.start, r.end) no longer hold them: their
        pages were given back before any later fault there (which, sampled,
        comes after this record). Moved by mremap, they hold them at the new
        address, where whatever was mapped before is gone (MREMAP_FIXED).
        Only "held now" changes: "brought in" is never netted."""
        moved = [(r.to + p - r.start, v) for p, v in self._take(r.start, r.end)]
        if r.to:
            self._take(r.to, r.to_end)
            self._pages.update((p, v) for p, v in moved if p < r.to_end)

    def _take(self, start: int, end: int) -> list[tuple[int, tuple[int, int, int]]]:
        """Remove and return the sampled pages in [start, end)."""
        pages = self._pages
        if not pages or end <= start:
            return []
        if (end - start) // PAGE_SIZE <= len(pages):
            hit = [p for p in range(start & _PAGE_MASK, end, PAGE_SIZE) if p in pages]
        else:
            hit = [p for p in pages if start <= p < end]
        return [(p, pages.pop(p)) for p in hit]

    def add_faults(self, marks: Iterable[ChunkMark]) -> None:
        """The exact fault counts of this image's chunks, drained with the
        samples (ChunkMark.last_addr names the chunk)."""
        for m in marks:
            if m.faults:
                chunk = m.last_addr >> CHUNK_SHIFT
                self._chunk_faults[chunk] = self._chunk_faults.get(chunk, 0) + m.faults

    def note_lost(self, n: int) -> None:
        """Samples the capture could not deliver (ring full, stack unreadable)."""
        self.samples_lost += n

    def forget_exec(self) -> None:
        """A new program image: nothing sampled before applies to it."""
        self._stacks.clear()
        self._pages.clear()
        self._brought.clear()
        self._chunk_weights.clear()
        self._chunk_faults.clear()
        self._chunk_huge.clear()
        self._before = {}               # the new image's pages all came after attach
        self._exe = None
        self.samples = self.weight = self.samples_lost = 0
        if self.python is not None:
            self.python.close()
        self.python = None
        self.python_epoch = None

    def _exe_now(self) -> bytes:
        if self._exe is None:
            try:
                self._exe = os.fsencode(os.readlink(
                    os.path.join(self.unwinder.proc_root, str(self.pid), "exe")))
            except OSError:
                return b""
        return self._exe

    # -- the profile ------------------------------------------------------------------
    def profile(self, space: AddressSpace, vmas: Sequence[Vma], exe: bytes, comm: str,
                ts: float) -> StackProfile:
        """Held now and brought in per (stack, mapping). Call it after the
        model has been updated from the same drain as the last add()."""
        self._exe = exe
        mapping_of = _MappingFinder(self, vmas, exe)
        held = self._held_by_vma(space, vmas)
        out: dict[tuple[int, MappingKey], StackSample] = {}
        unsampled: dict[MappingKey, int] = {}
        # the first profile, before any sample or fault was fed in: attach
        attach = self._before is None and not self.samples and not self._chunk_faults
        before = self._before or {}
        still: dict[int, tuple[Vma, int]] = {}
        for vma in vmas:
            resident = space.resident_of(vma).total
            if not resident:
                continue
            weights = held.get(vma.start)
            sampled = sum(weights.values()) if weights else 0
            pre = resident if attach else _before_attach(before.get(vma.start), vma,
                                                         resident - sampled)
            if pre:
                still[vma.start] = (vma, pre)
            key = mapping_of.of_vma(vma)
            if not weights or pre == resident:
                unsampled[key] = unsampled.get(key, 0) + resident
                continue
            if pre:         # no stack made those: a sample after attach is not scaled onto them
                unsampled[key] = unsampled.get(key, 0) + pre
            for sid, nbytes in scale(weights, resident - pre).items():
                self._sample(out, sid, key).held_bytes += nbytes
        self._before = still
        for (sid, key), nbytes in self._brought_bytes().items():
            self._sample(out, sid, key).brought_bytes += nbytes
        for (sid, key), (_, n) in self._brought.items():
            self._sample(out, sid, key).samples += n
        samples = list(out.values())
        samples += [StackSample(UNSAMPLED, m, kind, held_bytes=b)
                    for (m, kind), b in unsampled.items()]
        samples.sort(key=lambda s: (-s.held_bytes, -s.brought_bytes))
        self._gen += 1
        return StackProfile(self.pid, comm, ts, samples,
                            sample_period_bytes=self.weight // self.samples if self.samples else 0,
                            samples_lost=self.samples_lost)

    def _sample(self, out: dict[tuple[int, MappingKey], StackSample], sid: int,
                key: MappingKey) -> StackSample:
        sample = out.get((sid, key))
        if sample is None:
            sample = out[(sid, key)] = StackSample(self._stacks[sid], key[0], key[1])
        return sample

    def _brought_bytes(self) -> dict[tuple[int, MappingKey], int]:
        """Brought-in bytes per (stack, mapping): per chunk, the samples'
        weights scaled to the chunk's exact faults x page size, plus what its
        huge-page faults made resident beyond one page (the weights as they
        are where no fault of the chunk was counted)."""
        out: dict[tuple[int, MappingKey], int] = {}
        for chunk, weights in self._chunk_weights.items():
            faults = self._chunk_faults.get(chunk, 0)
            made = faults * PAGE_SIZE + self._chunk_huge.get(chunk, 0)
            split = scale(weights, made) if faults else weights
            for key, nbytes in split.items():
                out[key] = out.get(key, 0) + nbytes
        return out

    def _held_by_vma(self, space: AddressSpace,
                     vmas: Sequence[Vma]) -> dict[int, dict[int, int]]:
        """Weights of the sampled pages resident now, by VMA start and stack.
        Pages found not resident are forgotten, except those sampled since the
        last profile (the model may not have scanned them yet)."""
        pages = list(self._pages.items())
        flags = space.resident_flags([p for p, _ in pages])
        ends = [v.end for v in vmas]
        held: dict[int, dict[int, int]] = {}
        for (page, (sid, weight, gen)), resident in zip(pages, flags):
            if not resident:
                if gen < self._gen:
                    del self._pages[page]
                continue
            i = bisect_right(ends, page)
            if i == len(vmas) or vmas[i].start > page:
                continue
            by_stack = held.setdefault(vmas[i].start, {})
            by_stack[sid] = by_stack.get(sid, 0) + weight
        return held


def _before_attach(was: tuple[Vma, int] | None, vma: Vma, unsampled: int) -> int:
    """Bytes of `vma` that may still be pages resident before attach: what the
    same mapping (start, file, offset; its end may have moved) held then (or at
    the last profile), at most its resident bytes less the weights of its live
    samples (`unsampled`, an estimate of the bytes no sample stands for): pages
    it gave back never come back as such."""
    if was is None or unsampled <= 0:
        return 0
    then, pre = was
    if then.inode != vma.inode or then.offset != vma.offset or then.path != vma.path:
        return 0
    return min(pre, unsampled)


class _MappingFinder:
    """(mapping identity, kind) of addresses and VMAs, as the snapshot names
    them (a library's bss counts as the library)."""

    def __init__(self, owner: StackTracker, vmas: Sequence[Vma], exe: bytes) -> None:
        self.vmas = vmas if isinstance(vmas, list) else list(vmas)
        self.exe = exe
        self.ends = [v.end for v in self.vmas]
        self.segments = segments_for(owner, self.vmas, exe, owner.pid,
                                     owner.unwinder.proc_root)
        self._by_index: dict[int, MappingKey] = {}

    def of_vma(self, vma: Vma) -> MappingKey:
        seg = self.segments.get(vma.start)
        if seg is not None:
            return seg.mapping, seg.kind
        kind = classify(vma, self.exe)
        return mapping_identity(vma, kind), kind

    def __call__(self, addr: int) -> MappingKey:
        i = bisect_right(self.ends, addr)
        if i < len(self.vmas) and self.vmas[i].start <= addr:
            key = self._by_index.get(i)
            if key is None:
                key = self._by_index[i] = self.of_vma(self.vmas[i])
            return key
        return UNMAPPED
