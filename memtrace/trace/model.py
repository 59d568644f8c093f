"""The address-space model of one process: resident runs per 2 MiB chunk, the
VMA list, and the attribution of runs to VMAs.

Runs come from PAGEMAP_SCAN and are stored clipped to their chunk. A VMA's
resident bytes are the sum of the runs inside it; only VMAs that overlap a
rescanned chunk, or that are new, are recomputed, so the cost of a tick follows
what changed, not the size of the process."""

from __future__ import annotations

import itertools
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

from memtrace.trace.events import CHUNK_SHIFT, CHUNK_SIZE
from memtrace.trace.pagemap import Run
from memtrace.trace.procfs import Vma
from memtrace.util.ints import shared

_LAYOUT_TOKENS = itertools.count(1)


@dataclass(slots=True)
class Chunk:
    runs: list[Run]
    anon: int       # bytes of anonymous pages
    other: int      # bytes of file or shmem pages


@dataclass(slots=True)
class Resident:
    anon: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return self.anon + self.other


_AFTER_ANY_END = 1 << 64     # sorts (addr, _AFTER_ANY_END, ...) after every run starting at addr


def chunk_span(start: int, end: int) -> tuple[int, int]:
    """Chunks [first, last) that cover [start, end)."""
    return start >> CHUNK_SHIFT, ((end - 1) >> CHUNK_SHIFT) + 1


class AddressSpace:
    def __init__(self) -> None:
        self.chunks: dict[int, Chunk] = {}
        self.vmas: list[Vma] = []
        self._ends: list[int] = []
        self.resident: dict[int, Resident] = {}   # by VMA start
        self._total = Resident()                   # sum of self.resident, kept in step
        # For incremental views: bumped whenever the VMA list is replaced, and
        # the starts of VMAs whose figures changed since take_changed().
        self.layout_version = 0
        # unique across every AddressSpace of this memtrace: names one VMA list
        # (the heap walker reuses its parse of /proc/PID/maps while it is the same)
        self.layout_token = 0
        self.changed: set[int] = set()
        # Bumped by every change of what the model holds (scans, VMAs,
        # figures): a reader whose last look saw this version needs no new one.
        self.version = 0
        # Starts of VMAs re-attributed since take_rescanned() (their pages were
        # rescanned, whether or not their resident bytes changed: a copy-on-write
        # break keeps the count but makes a shared page private). Kept only once
        # a reader asks for it (live PSS), so that it never grows unread.
        self.track_rescanned = False
        # With it, the starts whose rescans matter even when their pages are the
        # same (live PSS: mappings with shared pages, where a copy-on-write break
        # keeps the count); None: every start. Kept by the reader (a live set).
        self.rescan_watch: set[int] | None = None
        self.rescanned: set[int] = set()

    # -- resident pages -------------------------------------------------
    def replace_chunks(self, first: int, last: int, runs: Iterable[Run]) -> bool:
        """Chunks [first, last) now hold exactly `runs` (from one scan of them).
        Returns whether they hold other runs than before (a rescan that finds
        the same pages changes no VMA's figures)."""
        self.version += 1
        before = self._chunks_in(first, last)
        for c in before:
            del self.chunks[c]
        self._fill(runs)
        after = self._chunks_in(first, last)
        return len(after) != len(before) or any(
            (old := before.get(c)) is None or old.runs != chunk.runs
            for c, chunk in after.items())

    def _chunks_in(self, first: int, last: int) -> dict[int, Chunk]:
        chunks = self.chunks
        if last - first <= len(chunks):
            return {c: chunks[c] for c in range(first, last) if c in chunks}
        return {c: chunk for c, chunk in chunks.items() if first <= c < last}

    def _fill(self, runs: Iterable[Run]) -> None:
        for start, end, anon in runs:
            while start < end:
                c = start >> CHUNK_SHIFT
                piece_end = min(end, (c + 1) << CHUNK_SHIFT)
                chunk = self.chunks.get(c)
                if chunk is None:
                    chunk = self.chunks[c] = Chunk([], 0, 0)
                chunk.runs.append((start, piece_end, anon))
                if anon:
                    chunk.anon += piece_end - start
                else:
                    chunk.other += piece_end - start
                start = piece_end

    def clear(self) -> None:
        self.version += 1
        self.chunks.clear()

    def is_resident(self, addr: int) -> bool:
        """Whether the page holding addr is resident (per the last scan of its
        chunk). A chunk's runs come from one scan, in address order: bisect."""
        chunk = self.chunks.get(addr >> CHUNK_SHIFT)
        if chunk is None:
            return False
        runs = chunk.runs
        i = bisect_right(runs, (addr, _AFTER_ANY_END, True)) - 1
        return i >= 0 and addr < runs[i][1]

    def resident_flags(self, addrs: Iterable[int]) -> list[bool]:
        """is_resident of many addresses (the pages of --stacks samples)."""
        is_resident = self.is_resident
        return [is_resident(a) for a in addrs]

    # -- VMAs -------------------------------------------------------------
    def set_vmas(self, vmas: list[Vma]) -> list[Vma]:
        """Install a new VMA list; return the VMAs that were not there before."""
        old = {v.identity for v in self.vmas}
        self.vmas = vmas
        self.layout_version += 1
        self.layout_token = next(_LAYOUT_TOKENS)
        self.version += 1
        self._ends = [v.end for v in self.vmas]
        starts = {v.start for v in self.vmas}
        for s in [s for s in self.resident if s not in starts]:
            self._set(s, None)
        return [v for v in self.vmas if v.identity not in old]

    def vmas_overlapping(self, start: int, end: int) -> list[Vma]:
        i = bisect_right(self._ends, start)
        out = []
        while i < len(self.vmas) and self.vmas[i].start < end:
            out.append(self.vmas[i])
            i += 1
        return out

    def vma_from(self, addr: int) -> Vma | None:
        """The VMA holding addr, else the first one above it (None: neither)."""
        i = bisect_right(self._ends, addr)
        return self.vmas[i] if i < len(self.vmas) else None

    def vma_at(self, addr: int) -> Vma | None:
        i = bisect_right(self._ends, addr)
        if i < len(self.vmas) and self.vmas[i].start <= addr:
            return self.vmas[i]
        return None

    # -- attribution ----------------------------------------------------------
    def _measure(self, vma: Vma) -> Resident:
        first, last = chunk_span(vma.start, vma.end)
        if last - first <= len(self.chunks):
            indices: Iterable[int] = range(first, last)
        else:
            indices = [c for c in self.chunks if first <= c < last]
        res = Resident()
        for c in indices:
            chunk = self.chunks.get(c)
            if chunk is None:
                continue
            c_start = c << CHUNK_SHIFT
            if vma.start <= c_start and c_start + CHUNK_SIZE <= vma.end:
                res.anon += chunk.anon
                res.other += chunk.other
                continue
            for start, end, anon in chunk.runs:
                lo, hi = max(start, vma.start), min(end, vma.end)
                if lo < hi:
                    if anon:
                        res.anon += hi - lo
                    else:
                        res.other += hi - lo
        # kept per VMA; equal figures share one int (util/ints.py)
        res.anon, res.other = shared(res.anon, res.anon), shared(res.other, res.other)
        return res

    def attribute(self, spans: Iterable[tuple[int, int]], new_vmas: Iterable[Vma] = (),
                  same: Iterable[tuple[int, int]] = ()) -> None:
        """Recompute the VMAs overlapping chunk spans [first, last), and new VMAs.
        `same`: spans rescanned that hold the same runs as before: their VMAs'
        figures stand (only counted as rescanned)."""
        todo = {v.start: v for v in new_vmas}
        for first, last in spans:
            for v in self.vmas_overlapping(first << CHUNK_SHIFT, last << CHUNK_SHIFT):
                todo[v.start] = v
        for v in todo.values():
            self._set(v.start, self._measure(v))
        if self.track_rescanned:
            self.rescanned.update(todo)
            watch = self.rescan_watch
            if watch is None or watch:
                for first, last in same:
                    self.rescanned.update(
                        v.start for v in self.vmas_overlapping(
                            first << CHUNK_SHIFT, last << CHUNK_SHIFT)
                        if watch is None or v.start in watch)

    def attribute_all(self) -> None:
        self.version += 1
        self.resident = {v.start: self._measure(v) for v in self.vmas}
        self.changed.update(self.resident)
        if self.track_rescanned:
            self.rescanned.update(self.resident)
        self._total = Resident()
        for r in self.resident.values():
            self._total.anon += r.anon
            self._total.other += r.other

    def take_changed(self) -> set[int]:
        changed, self.changed = self.changed, set()
        return changed

    def take_rescanned(self) -> set[int]:
        rescanned, self.rescanned = self.rescanned, set()
        return rescanned

    def _set(self, start: int, res: Resident | None) -> None:
        if res is not None and self.resident.get(start) == res:
            return      # a rescan that found the same pages changes nothing
        self.version += 1
        self.changed.add(start)
        old = self.resident.pop(start, None)
        if old is not None:
            self._total.anon -= old.anon
            self._total.other -= old.other
        if res is not None:
            self.resident[start] = res
            self._total.anon += res.anon
            self._total.other += res.other

    def resident_of(self, vma: Vma) -> Resident:
        return self.resident.get(vma.start) or Resident()

    def totals(self) -> Resident:
        return Resident(self._total.anon, self._total.other)
