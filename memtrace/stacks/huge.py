"""A huge page is always sampled (--stacks, docs/stacks.md "Huge pages").

The fault tracepoint fires before the kernel chooses the page size, so BPF
cannot weigh a fault by what it maps. In a process whose faults may map a
transparent huge page it samples the first fault of each 2 MiB chunk outside
the countdown (flag MT_STACK_FORCED) and remembers the chunk in huge_chunks.
Here such a sample gets its weight: the huge page that holds its page now, or
one page. A sample taken with probability 1 stands for exactly what it made
resident, so the countdown's estimate of the other faults stays unbiased. A
chunk found empty again is forgotten in BPF: its next first fault may map a
new huge page."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Container, Iterable

from memtrace.trace.events import CHUNK_SHIFT, StackRecord

Forget = Callable[[int, Iterable[tuple[int, int]]], None]   # (pid, [(epoch, chunk)])


class ForcedChunks:
    """The chunks of each process whose first fault BPF force-sampled."""

    def __init__(self, forget: Forget, page_size: int, huge_size: int) -> None:
        self._forget = forget
        self.page_size = page_size
        self.huge_size = huge_size
        self._chunks: dict[int, set[tuple[int, int]]] = {}    # pid -> {(epoch, chunk)}

    def weigh(self, pid: int, epoch: int, records: list[StackRecord],
              huge_at: Callable[[int], bool]) -> list[StackRecord]:
        """The records with each forced sample weighed by what its fault made
        resident; the chunks they name are remembered."""
        if not any(r.forced for r in records):
            return records
        chunks = self._chunks.setdefault(pid, set())
        out = []
        for r in records:
            if r.forced:
                weight = self.huge_size if huge_at(r.addr) else self.page_size
                r = dataclasses.replace(r, weight=weight)
                chunks.add((epoch, r.addr >> CHUNK_SHIFT))
            out.append(r)
        return out

    def release(self, pid: int, epoch: int, resident_chunks: Container[int]) -> None:
        """Forget the chunks that hold no resident page now (or belong to an
        image that is gone): BPF samples their next first fault again."""
        chunks = self._chunks.get(pid)
        if not chunks:
            return
        gone = [(e, c) for e, c in chunks if e != epoch or c not in resident_chunks]
        if gone:
            chunks.difference_update(gone)
            self._forget(pid, gone)

    def drop(self, pid: int) -> None:
        chunks = self._chunks.pop(pid, None)
        if chunks:
            self._forget(pid, chunks)
