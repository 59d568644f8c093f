"""--malloc: one process's sampled allocations netted against their frees into
outstanding bytes by call stack (docs/malloc.md).

Each sampled allocation is unwound when it arrives (the --stacks unwinder:
memtrace/stacks/unwind.py) and stands for its weight in bytes (size divided
by its chance of being sampled, from the sampler), so sums are unbiased. A
free of a sampled pointer takes its weight off its stack. Records of one
drain are applied in the order of their kernel timestamps; a free that
matches nothing is applied again with the next drain's records, in case its
allocation's record was still in its ring (two rings are read one after the
other: the same address can be allocated and freed many times in between). Frees of pointers this
process did not sample here (allocated before a fork, in the parent) are
ignored."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from memtrace.malloc.leaks import LEAK_INTERVALS, Leak
from memtrace.stacks.profile import Frame, Stack, StackIds, StackProfile, StackSample
from memtrace.stacks.python import PyResolver, merge
from memtrace.stacks.summary import FRAMES_MAX, frame_text
from memtrace.stacks.unwind import Unwinder
from memtrace.trace.events import PY_TRUNCATED
from memtrace.trace.mallocevents import MallocRecord
from memtrace.trace.procfs import Vma

SHIM_PREFIX = "libmemtrace-malloc"       # the built sampler's file name (shim.py)
MAPPING = "[malloc]"                     # the mapping and kind a StackSample needs
MALLOC_TOP = 10                          # stacks per list in a snapshot
# the stack of samples memtrace kept without their stack copy (SampleBacklog)
STACK_DROPPED = Stack((Frame(0, "[stack dropped]", "[stack dropped]"),))


def trim_sampler(stack: Stack) -> Stack:
    """The stack without the sampler's own frames, but for its outermost one:
    the interposed function the program called (malloc, calloc, realloc...)."""
    frames = stack.frames
    n = 0
    while n < len(frames) and os.path.basename(frames[n].module).startswith(SHIM_PREFIX):
        n += 1
    return Stack(frames[n - 1:]) if n > 1 else stack


class MallocTracker:
    """The --malloc state of one process image."""

    def __init__(self, pid: int, unwinder: Unwinder) -> None:
        self.pid = pid
        self.unwinder = unwinder
        # CPython frames (stacks/python.py), as StackTracker keeps them
        self.python: PyResolver | None = None
        self.python_epoch: int | None = None
        self._reset()

    def _reset(self) -> None:
        self._stacks = StackIds()
        self._live: dict[int, tuple[int, int]] = {}        # ptr -> (stack id, weight)
        self._outstanding: dict[int, list[int]] = {}       # stack id -> [bytes, blocks]
        self._allocated: dict[int, list[int]] = {}         # stack id -> [bytes, samples]
        self._carried: list[MallocRecord] = []             # frees that matched nothing yet
        self.samples = 0
        self.frees = 0
        self.untracked = 0       # samples whose free the sampler could not report
        self.stacks_dropped = 0  # samples kept without their stack (mallocevents.SampleBacklog)
        self.period_max = 0      # the largest mean gap of a sample (the rate cap raises it)

    def add(self, records: Iterable[MallocRecord], vmas: Sequence[Vma]) -> None:
        """Apply one drain's records (unwinding allocations with this VMA list).
        Frees that match nothing are applied again with the next drain's
        records, in timestamp order with them, then dropped."""
        records = sorted([*self._carried, *records], key=lambda r: r.ts)
        allocs = [r for r in records if not r.freed and not r.stack_dropped]
        stacks = iter(self.unwinder.unwind_many(
            self.pid, vmas, [(r.ip, r.sp, r.bp, r.stack) for r in allocs])) if allocs else None
        carried = {id(r) for r in self._carried}      # applied twice now: dropped if unmatched
        self._carried = []
        for r in records:
            if r.stack_dropped:
                self.stacks_dropped += 1
                self._alloc_sampled(r, self._stacks.intern(STACK_DROPPED))
            elif not r.freed:
                assert stacks is not None
                stack = trim_sampler(next(stacks))
                if r.py_frames and self.python is not None:
                    stack = merge(stack, self.python.groups(
                        r.py_frames, truncated=bool(r.py_flags & PY_TRUNCATED)))
                self._alloc_sampled(r, self._stacks.intern(stack))
            elif not self._free(r.ptr) and id(r) not in carried:
                self._carried.append(r)

    def _alloc_sampled(self, r: MallocRecord, sid: int) -> None:
        self.period_max = max(self.period_max, r.period)
        if r.untracked:
            self.alloc_untracked(sid, r.weight)
        else:
            self.alloc(sid, r.ptr, r.weight)

    def alloc(self, sid: int, ptr: int, weight: int) -> None:
        if ptr in self._live:       # its free was lost: the address is in use again
            self._free(ptr)
        self._live[ptr] = (sid, weight)
        _add(self._outstanding, sid, weight, 1)
        _add(self._allocated, sid, weight, 1)
        self.samples += 1

    def alloc_untracked(self, sid: int, weight: int) -> None:
        """A sample the sampler had no room to remember: allocated, but its
        free will not be seen, so it is not counted outstanding."""
        _add(self._allocated, sid, weight, 1)
        self.samples += 1
        self.untracked += 1

    def _free(self, ptr: int) -> bool:
        got = self._live.pop(ptr, None)
        if got is None:
            return False
        sid, weight = got
        cell = self._outstanding[sid]
        cell[0] -= weight
        cell[1] -= 1
        if cell[1] == 0:
            del self._outstanding[sid]
        self.frees += 1
        return True

    def stack(self, sid: int) -> Stack:
        return self._stacks[sid]

    def outstanding(self) -> dict[int, int]:
        """Outstanding bytes by stack id."""
        return {sid: cell[0] for sid, cell in self._outstanding.items()}

    def forget_exec(self) -> None:
        """A new program image: nothing sampled before applies to it."""
        self._reset()
        self.close_python()

    def close_python(self) -> None:
        if self.python is not None:
            self.python.close()
        self.python = None
        self.python_epoch = None

    def profile(self, comm: str, ts: float, period: int, lost: int = 0) -> StackProfile:
        """held_bytes: outstanding now; brought_bytes: allocated since attach."""
        out: dict[int, StackSample] = {}
        for sid, (nbytes, n) in self._allocated.items():
            out[sid] = StackSample(self._stacks[sid], MAPPING, "malloc",
                                   brought_bytes=nbytes, samples=n)
        for sid, (nbytes, _blocks) in self._outstanding.items():
            out[sid].held_bytes = nbytes
        ranked = sorted(out.values(), key=lambda s: (-s.held_bytes, -s.brought_bytes))
        return StackProfile(self.pid, comm, ts, ranked, sample_period_bytes=period,
                            samples_lost=lost, sample_period_max_bytes=self.period_max)


def _add(table: dict[int, list[int]], sid: int, nbytes: int, n: int) -> None:
    cell = table.get(sid)
    if cell is None:
        table[sid] = [nbytes, n]
    else:
        cell[0] += nbytes
        cell[1] += n


def _frames(stack: Stack) -> list[str]:
    frames = [frame_text(f.function, f.module) for f in stack.frames]
    return frames[:FRAMES_MAX - 1] + ["[...]"] if len(frames) > FRAMES_MAX else frames


def malloc_summary(tracker: MallocTracker, profile: StackProfile, leaks: list[Leak],
                   top: int = MALLOC_TOP) -> dict[str, Any]:
    """The `malloc` object of a snapshot (docs/output.md): top stacks by bytes
    outstanding and by bytes allocated since attach, and the leak report."""
    def entry(s: StackSample, measure: str) -> dict[str, Any]:
        return {"bytes": s.held_bytes if measure == "held" else s.brought_bytes,
                "samples": s.samples, "truncated": s.stack.truncated,
                "frames": _frames(s.stack)}

    out: dict[str, Any] = {
        "period_bytes": profile.sample_period_bytes,
        "period_max_bytes": max(profile.sample_period_max_bytes, profile.sample_period_bytes),
        "samples": tracker.samples,
        "frees": tracker.frees,
        "untracked": tracker.untracked,
        "stacks_dropped": tracker.stacks_dropped,
        "lost": profile.samples_lost,
        "outstanding_bytes": profile.held_total(),
        "allocated_bytes": profile.brought_total(),
    }
    for name, measure in (("outstanding", "held"), ("allocated", "brought")):
        ranked = sorted((s for s in profile.samples if getattr(s, f"{measure}_bytes") > 0),
                        key=lambda s: (-getattr(s, f"{measure}_bytes"),
                                       [f.function for f in s.stack.frames]))
        out[name] = [entry(s, measure) for s in ranked[:top]]
    out["leak_intervals"] = LEAK_INTERVALS
    out["leaks"] = [
        {"bytes": lk.bytes, "growth_bytes": lk.growth, "seconds": round(lk.seconds, 3),
         "bytes_per_second": round(lk.bytes_per_second),
         "truncated": tracker.stack(lk.key).truncated,
         "frames": _frames(tracker.stack(lk.key))} for lk in leaks[:top]]
    return out
