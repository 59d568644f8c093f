"""--malloc: ctypes mirrors of bpf/malloc.h and their decoding; pure, tested on
recorded bytes (docs/malloc.md)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

MALLOC_COUNTS = ("lost", "frees_lost", "unread")   # enum mt_malloc_count, in order


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
    ip: int = 0          # user registers at memtrace_malloc_sampled
    sp: int = 0
    bp: int = 0
    stack: bytes = b""   # user memory [sp, sp + len(stack)); may be short


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
    ]


class RawMallocFree(ctypes.Structure):
    """struct mt_malloc_free."""

    _fields_ = [
        ("tgid", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("ts", ctypes.c_uint64),
        ("ptr", ctypes.c_uint64),
    ]


def decode_malloc_sample(data: bytes) -> MallocRecord:
    """A sampled allocation as BPF wrote it; only the `len` stack bytes BPF
    copied are kept."""
    size = ctypes.sizeof(RawMallocHeader)
    raw = RawMallocHeader.from_buffer_copy(data[:size])
    return MallocRecord(tgid=raw.tgid, ts=raw.ts, ptr=raw.ptr, size=raw.size,
                        weight=raw.weight, ip=raw.ip, sp=raw.sp, bp=raw.bp,
                        stack=bytes(data[size:size + raw.len]))


def decode_malloc_free(data: bytes) -> MallocRecord:
    raw = RawMallocFree.from_buffer_copy(data[:ctypes.sizeof(RawMallocFree)])
    return MallocRecord(tgid=raw.tgid, ts=raw.ts, ptr=raw.ptr, freed=True)
