"""--malloc: ctypes mirrors of bpf/malloc.h and their decoding; pure, tested on
recorded bytes (docs/malloc.md)."""

from __future__ import annotations

import ctypes
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
    untracked: bool = False  # its free will not be reported (the sampler's table was full)
    ip: int = 0          # user registers at memtrace_malloc_sampled
    sp: int = 0
    bp: int = 0
    stack: bytes = b""   # user memory [sp, sp + len(stack)); may be short
    # CPython frames of the allocating thread, innermost first, as StackRecord's
    py_frames: tuple[tuple[int, int], ...] = ()
    py_flags: int = 0


class RawMallocHeader(ctypes.Structure):
    """struct mt_malloc_sample up to its stack bytes, which follow it."""

    _fields_ = [
        ("tgid", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
        ("ts", ctypes.c_uint64),
        ("ptr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("weight", ctypes.c_uint64),
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


def decode_malloc_sample(data: bytes | int, size: int | None = None) -> MallocRecord:
    """A sampled allocation as BPF wrote it: bytes, or the address of a ring
    record and its size (then only the header and the `len` stack bytes BPF
    copied are read, not the whole fixed-size record)."""
    if isinstance(data, int):
        raw = RawMallocHeader.from_buffer_copy(ctypes.string_at(data, _HEADER))
        n = min(raw.len, (size or _HEADER) - _HEADER)
        stack = ctypes.string_at(data + _HEADER, n) if n > 0 else b""
    else:
        raw = RawMallocHeader.from_buffer_copy(data[:_HEADER])
        stack = bytes(data[_HEADER:_HEADER + raw.len])
    n_py = min(raw.py_count, PY_FRAMES)
    return MallocRecord(tgid=raw.tgid, ts=raw.ts, ptr=raw.ptr, size=raw.size,
                        weight=raw.weight & ~UNTRACKED, untracked=bool(raw.weight & UNTRACKED),
                        ip=raw.ip, sp=raw.sp, bp=raw.bp, stack=stack,
                        py_frames=tuple(zip(raw.py_code[:n_py], raw.py_instr[:n_py])),
                        py_flags=raw.py_flags)


def decode_malloc_free(data: bytes | int, size: int | None = None) -> MallocRecord:
    n = ctypes.sizeof(RawMallocFree)
    raw = RawMallocFree.from_buffer_copy(
        ctypes.string_at(data, n) if isinstance(data, int) else data[:n])
    return MallocRecord(tgid=raw.tgid, ts=raw.ts, ptr=raw.ptr, freed=True)
