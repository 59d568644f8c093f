"""--malloc: ctypes mirrors of bpf/malloc.h and their decoding; pure, tested on
recorded bytes (docs/malloc.md)."""

from __future__ import annotations

import ctypes
import dataclasses
from dataclasses import dataclass

from memtrace.trace.events import PY_FRAMES

MALLOC_COUNTS = ("lost", "frees_lost", "unread")   # enum mt_malloc_count, in order
# A weight with this bit set: the sampler had no room to remember the pointer
# (memtrace/malloc/shim.c, MT_UNTRACKED), so its free will not be reported.
UNTRACKED = 1 << 63


@dataclass(frozen=True)
class MallocRecord:
    """A sampled allocation (with what unwinding its stack needs) or, with
    `freed`, the free of a sampled pointer (no registers, no stack)."""

    tgid: int
    ts: int              # bpf_ktime_get_ns: allocations and frees are ordered by it
    ptr: int
    freed: bool = False
    size: int = 0        # bytes requested
    weight: int = 0      # bytes the sample stands for
    period: int = 0      # the mean gap it ended (raised above --malloc-period by the rate cap)
    untracked: bool = False  # its free will not be reported (the sampler's table was full)
    ip: int = 0          # user registers at memtrace_malloc_sampled
    sp: int = 0
    bp: int = 0
    stack: bytes = b""   # user memory [sp, sp + len(stack)); may be short
    # CPython frames of the allocating thread, innermost first, as StackRecord's
    py_frames: tuple[tuple[int, int], ...] = ()
    py_flags: int = 0
    stack_dropped: bool = False  # kept without its stack: memtrace's backlog was full


class RawMallocHeader(ctypes.Structure):
    """struct mt_malloc_sample up to its stack bytes, which follow it."""

    _fields_ = [
        ("tgid", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
        ("ts", ctypes.c_uint64),
        ("ptr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("weight", ctypes.c_uint64),
        ("period", ctypes.c_uint64),
        ("ip", ctypes.c_uint64),
        ("sp", ctypes.c_uint64),
        ("bp", ctypes.c_uint64),
        ("py_count", ctypes.c_uint32),
        ("py_flags", ctypes.c_uint32),
        ("py_code", ctypes.c_uint64 * PY_FRAMES),
        ("py_instr", ctypes.c_uint64 * PY_FRAMES),
    ]


class RawMallocFree(ctypes.Structure):
    """struct mt_malloc_free."""

    _fields_ = [
        ("tgid", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("ts", ctypes.c_uint64),
        ("ptr", ctypes.c_uint64),
    ]


_HEADER = ctypes.sizeof(RawMallocHeader)


def decode_malloc_sample(data: bytes | int, size: int | None = None,
                         with_stack: bool = True) -> MallocRecord:
    """A sampled allocation as BPF wrote it: bytes, or the address of a ring
    record and its size (then only the header and the `len` stack bytes BPF
    copied are read, not the whole fixed-size record; none without
    `with_stack`)."""
    if isinstance(data, int):
        raw = RawMallocHeader.from_buffer_copy(ctypes.string_at(data, _HEADER))
        n = min(raw.len, (size or _HEADER) - _HEADER) if with_stack else 0
        stack = ctypes.string_at(data + _HEADER, n) if n > 0 else b""
    else:
        raw = RawMallocHeader.from_buffer_copy(data[:_HEADER])
        stack = bytes(data[_HEADER:_HEADER + raw.len])
    n_py = min(raw.py_count, PY_FRAMES)
    return MallocRecord(tgid=raw.tgid, ts=raw.ts, ptr=raw.ptr, size=raw.size,
                        weight=raw.weight & ~UNTRACKED, untracked=bool(raw.weight & UNTRACKED),
                        period=raw.period,
                        ip=raw.ip, sp=raw.sp, bp=raw.bp, stack=stack,
                        py_frames=tuple(zip(raw.py_code[:n_py], raw.py_instr[:n_py])),
                        py_flags=raw.py_flags)


def decode_malloc_free(data: bytes | int, size: int | None = None) -> MallocRecord:
    n = ctypes.sizeof(RawMallocFree)
    raw = RawMallocFree.from_buffer_copy(
        ctypes.string_at(data, n) if isinstance(data, int) else data[:n])
    return MallocRecord(tgid=raw.tgid, ts=raw.ts, ptr=raw.ptr, freed=True)


RECORD_OVERHEAD = 400   # bytes a decoded record costs besides its stack copy (object, tuple)


class SampleBacklog:
    """What the reader thread decoded since the last take(), by process, with
    bounded memory when a program samples faster than memtrace unwinds. Frees
    are always kept (a lost free would leave its block outstanding). Sampled
    allocations are kept whole up to `max_bytes` (their stack copies and
    records); beyond, up to `max_samples` more are kept without their stack
    (`stack_dropped`: their bytes count, under one `[stack dropped]` stack);
    beyond that they are dropped and counted, lost like those a full ring
    drops."""

    def __init__(self, max_bytes: int, max_samples: int) -> None:
        self.max_bytes = max_bytes
        self.max_samples = max_samples
        self.dropped = 0            # samples dropped, since the start
        self._records: dict[int, list[MallocRecord]] = {}
        self._bytes = 0
        self._stackless = 0

    def stacks_full(self) -> bool:
        """Samples from now on are kept without their stack, if at all."""
        return self._bytes >= self.max_bytes

    def add(self, rec: MallocRecord) -> bool:
        """Keep rec (without its stack once stacks_full()); False if it was a
        sample dropped for want of room."""
        if not rec.freed:
            if self._bytes < self.max_bytes:
                self._bytes += len(rec.stack) + RECORD_OVERHEAD
            elif self._stackless < self.max_samples:
                self._stackless += 1
                rec = dataclasses.replace(rec, stack=b"", stack_dropped=True)
            else:
                self.dropped += 1
                return False
        self._records.setdefault(rec.tgid, []).append(rec)
        return True

    def take(self) -> dict[int, list[MallocRecord]]:
        records, self._records = self._records, {}
        self._bytes = self._stackless = 0
        return records
