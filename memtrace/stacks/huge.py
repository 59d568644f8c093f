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

from memtrace.trace.events import CHUNK_SHIFT, SampleRecord, StackRecord

Forget = Callable[[int, Iterable[tuple[int, int]]], None]   # (pid, [(epoch, chunk)])


class ForcedChunks:
    """The chunks of each process whose first fault BPF force-sampled."""

    def __init__(self, forget: Forget, page_size: int, huge_size: int) -> None:
        self._forget = forget
        self.page_size = page_size
        self.huge_size = huge_size
        self._chunks: dict[int, set[tuple[int, int]]] = {}    # pid -> {(epoch, chunk)}
        # pid -> forced samples whose page was not mapped yet when first weighed
        self._waiting: dict[int, list[SampleRecord]] = {}

    def weigh(self, pid: int, epoch: int, records: list[SampleRecord],
              huge_at: Callable[[int], bool | None]) -> list[SampleRecord]:
        """The records with each forced sample weighed by what its fault made
        resident (`huge_at(addr)`: True a huge page, False one page, None no
        page yet); the chunks they name are remembered. The tracepoint fires
        as the fault begins, and clearing a huge page takes a while: a sample
        whose page is not mapped yet waits for the next call, once, and the
        records after it with it (a release must come after the samples it
        takes back); still no page then (released already), it weighs one page."""
        waiting = [r for r in self._waiting.pop(pid, []) if r.epoch == epoch]
        if not waiting and not any(isinstance(r, StackRecord) and r.forced for r in records):
            return records
        chunks = self._chunks.setdefault(pid, set())
        out: list[SampleRecord] = []
        later: list[SampleRecord] = []
        for k, r in enumerate([*waiting, *records]):
            if later:
                later.append(r)
                continue
            if isinstance(r, StackRecord) and r.forced:
                huge = huge_at(r.addr)
                if huge is None and k >= len(waiting):      # not waited for yet
                    later.append(r)
                    continue
                r = dataclasses.replace(r, weight=self.huge_size if huge else self.page_size)
                chunks.add((epoch, r.addr >> CHUNK_SHIFT))
            out.append(r)
        if later:
            self._waiting[pid] = later
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
        self._waiting.pop(pid, None)
        chunks = self._chunks.pop(pid, None)
        if chunks:
            self._forget(pid, chunks)
