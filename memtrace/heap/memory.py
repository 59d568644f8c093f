"""How the analysis reads a process: the AddressSpace it needs (a live process,
a stopped-process snapshot, or a synthetic image in unit tests) and ResidentMap,
the resident runs of a range with O(log n) byte counts."""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Protocol

from memtrace.heap.layout import QWORD
from memtrace.trace.procfs import Vma
from memtrace.util.ranges import merge_ranges


class AddressSpace(Protocol):
    """What the analysis needs from a process (a fake in unit tests)."""

    page_size: int

    def maps(self) -> list[Vma]: ...

    def read(self, addr: int, size: int) -> bytes: ...

    def resident_runs(self, start: int, end: int) -> list[tuple[int, int]]: ...

    def file_bytes(self, path: bytes, limit: int) -> bytes | None: ...


class ResidentMap:
    """Sorted, merged resident runs with O(log n) byte counts over any range."""

    def __init__(self, runs: Iterable[tuple[int, int]]) -> None:
        merged = merge_ranges(runs)
        self.starts = [s for s, _ in merged]
        self.ends = [e for _, e in merged]
        self.cum = [0]
        for s, e in merged:
            self.cum.append(self.cum[-1] + e - s)

    def bytes_in(self, lo: int, hi: int) -> int:
        if hi <= lo or not self.starts:
            return 0
        i = bisect.bisect_right(self.starts, lo) - 1
        if i >= 0 and self.ends[i] >= hi:  # one run covers it all
            return hi - lo
        return self._upto(hi) - self._upto(lo)

    def _upto(self, x: int) -> int:
        i = bisect.bisect_right(self.starts, x) - 1
        if i < 0:
            return 0
        return self.cum[i] + min(x, self.ends[i]) - self.starts[i]

    def runs_in(self, lo: int, hi: int) -> list[tuple[int, int]]:
        out = []
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        while i < len(self.starts) and self.starts[i] < hi:
            s, e = max(lo, self.starts[i]), min(hi, self.ends[i])
            if s < e:
                out.append((s, e))
            i += 1
        return out


def u64(space: AddressSpace, addr: int) -> int:
    return int(QWORD.unpack(space.read(addr, 8))[0])
