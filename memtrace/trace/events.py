"""Records that cross from BPF to user space, mirrored from bpf/memtrace.h with
ctypes, and their decoding into plain Python values. Pure: no bcc import, so it
is tested on recorded bytes."""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from memtrace.util.units import fmt_bytes

if TYPE_CHECKING:
    from memtrace.trace.mallocevents import MallocRecord

CHUNK_SHIFT = 21
CHUNK_SIZE = 1 << CHUNK_SHIFT
USER_ADDR_MAX = 0x00007FFFFFFFF000
# BPF keys dirty chunks by the low 32 bits of the process's exec_gen
EPOCH_MASK = 0xFFFFFFFF

SYSCALL_CLASSES = ("brk", "mmap", "munmap", "mremap", "madvise", "mprotect", "mlock",
                   "munlock", "shmat", "shmdt", "other", "exec")
NSYS = len(SYSCALL_CLASSES)
NSYS_SLOTS = 16   # array length in struct mt_stats (MT_NSYS_SLOTS)

# The calls traced, by their x86-64 number. BPF records the number the syscall
# tracepoint gives (__syscall_nr: the running system's numbering), so this
# table names records on x86-64 only; elsewhere a record is named by its class
# where the class is one syscall, else by its number (syscall_name).
X86_64_SYSCALL_NAMES = {12: "brk", 9: "mmap", 11: "munmap", 25: "mremap", 28: "madvise",
                 10: "mprotect", 329: "pkey_mprotect", 149: "mlock", 325: "mlock2",
                 150: "munlock", 151: "mlockall", 152: "munlockall", 30: "shmat", 67: "shmdt",
                 216: "remap_file_pages", 59: "execve", 322: "execveat", 157: "prctl"}
SYSCALL_NAMES = X86_64_SYSCALL_NAMES if os.uname().machine == "x86_64" else {}
# classes of one syscall each: their records need no number to be named
_ONE_SYSCALL = frozenset({"brk", "mmap", "munmap", "mremap", "madvise", "munlock", "shmat",
                          "shmdt"})

MADVISE_NAMES = {0: "NORMAL", 1: "RANDOM", 2: "SEQUENTIAL", 3: "WILLNEED", 4: "DONTNEED",
                 8: "FREE", 9: "REMOVE", 10: "DONTFORK", 11: "DOFORK", 12: "MERGEABLE",
                 13: "UNMERGEABLE", 14: "HUGEPAGE", 15: "NOHUGEPAGE", 16: "DONTDUMP",
                 17: "DODUMP", 18: "WIPEONFORK", 19: "KEEPONFORK", 20: "COLD", 21: "PAGEOUT",
                 22: "POPULATE_READ", 23: "POPULATE_WRITE", 24: "DONTNEED_LOCKED",
                 25: "COLLAPSE"}


class RawStats(ctypes.Structure):
    _fields_ = [
        ("calls", ctypes.c_uint64 * NSYS_SLOTS),
        ("bytes", ctypes.c_uint64 * NSYS_SLOTS),
        ("layout_gen", ctypes.c_uint64),
        ("exec_gen", ctypes.c_uint64),
        ("remote_rss", ctypes.c_uint64),
        ("full_rescan_requests", ctypes.c_uint64),
        ("ranges_lost", ctypes.c_uint64),
        ("events_lost", ctypes.c_uint64),
        ("events_sampled_out", ctypes.c_uint64),
        ("brk", ctypes.c_uint64),
        ("forks", ctypes.c_uint64),
        ("stacks_sampled", ctypes.c_uint64),
        ("stacks_lost", ctypes.c_uint64),
        ("stacks_unread", ctypes.c_uint64),
        ("file_cuts", ctypes.c_uint64),
        ("rel_start", ctypes.c_uint64),
        ("rel_end", ctypes.c_uint64),
        ("rel_seen", ctypes.c_uint64),
    ]


class RawRange(ctypes.Structure):
    _fields_ = [("tgid", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("start", ctypes.c_uint64), ("end", ctypes.c_uint64)]


class RawEvent(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("tgid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("sys", ctypes.c_uint32),
        ("nr", ctypes.c_uint32),
        ("ret", ctypes.c_int64),
        ("args", ctypes.c_uint64 * 5),
    ]


@dataclass(frozen=True)
class Stats:
    """Per-process counters kept in BPF, as of one read."""

    calls: dict[str, int]
    bytes: dict[str, int]
    layout_gen: int = 0
    exec_gen: int = 0
    remote_rss: int = 0
    full_rescan_requests: int = 0
    ranges_lost: int = 0
    events_lost: int = 0
    events_sampled_out: int = 0
    brk: int = 0
    forks: int = 0      # fork/clone calls without CLONE_VM: copy-on-write children
    stacks_sampled: int = 0     # --stacks: faults sampled, delivered or not
    stacks_lost: int = 0        # --stacks: samples that did not fit the ring buffer
    stacks_unread: int = 0      # --stacks: samples delivered without stack bytes
    file_cuts: int = 0          # truncates and fallocates: mapped file pages may be gone

    @classmethod
    def empty(cls) -> Stats:
        return cls(calls=dict.fromkeys(SYSCALL_CLASSES, 0), bytes=dict.fromkeys(SYSCALL_CLASSES, 0))


def decode_stats(raw: RawStats) -> Stats:
    return Stats(
        calls={name: int(raw.calls[i]) for i, name in enumerate(SYSCALL_CLASSES)},
        bytes={name: int(raw.bytes[i]) for i, name in enumerate(SYSCALL_CLASSES)},
        layout_gen=raw.layout_gen, exec_gen=raw.exec_gen, remote_rss=raw.remote_rss,
        full_rescan_requests=raw.full_rescan_requests, ranges_lost=raw.ranges_lost,
        events_lost=raw.events_lost, events_sampled_out=raw.events_sampled_out, brk=raw.brk,
        forks=raw.forks, stacks_sampled=raw.stacks_sampled, stacks_lost=raw.stacks_lost,
        stacks_unread=raw.stacks_unread, file_cuts=raw.file_cuts,
    )


@dataclass(frozen=True)
class Range:
    tgid: int
    start: int
    end: int


def decode_range(data: bytes) -> Range:
    raw = RawRange.from_buffer_copy(data[:ctypes.sizeof(RawRange)])
    return Range(tgid=raw.tgid, start=raw.start, end=raw.end)


@dataclass(frozen=True)
class SyscallEvent:
    ts_ns: int
    tgid: int
    tid: int
    syscall: str          # class name, e.g. "mmap"
    name: str             # actual syscall, e.g. "mlock2"
    ret: int
    args: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return self.ret >= 0

    def describe(self) -> str:
        a = self.args
        n = self.name
        if n == "mmap":
            res = f"-> {self.ret:#x}" if self.ok else f"= {self.ret}"
            return f"mmap(len={fmt_bytes(a[1])}, fd={_fd(a[4])}) {res}"
        if n in ("munmap", "mprotect", "pkey_mprotect", "mlock", "mlock2", "munlock"):
            return f"{n}({a[0]:#x}, {fmt_bytes(a[1])}) = {self.ret}"
        if n == "madvise":
            advice = MADVISE_NAMES.get(a[2], str(a[2]))
            return f"madvise({a[0]:#x}, {fmt_bytes(a[1])}, {advice}) = {self.ret}"
        if n == "mremap":
            res = f"-> {self.ret:#x}" if self.ok else f"= {self.ret}"
            return f"mremap({a[0]:#x}, {fmt_bytes(a[1])} -> {fmt_bytes(a[2])}) {res}"
        if n == "brk":
            return f"brk({a[0]:#x}) = {self.ret:#x}"
        return f"{n}(...) = {self.ret}"


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _fd(v: int) -> int:
    """mmap's fd is an int: the tracepoint's 64-bit slot may hold it
    zero-extended (4294967295 for -1) or sign-extended."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def syscall_name(cls: str, nr: int, names: dict[int, str] | None = None) -> str:
    """The name of a record's syscall from its class and number (see
    SYSCALL_NAMES; names: another machine's table, for tests)."""
    name = (SYSCALL_NAMES if names is None else names).get(nr)
    if name is not None:
        return name
    return cls if cls in _ONE_SYSCALL else str(nr)


def decode_event(data: bytes) -> SyscallEvent:
    raw = RawEvent.from_buffer_copy(data[:ctypes.sizeof(RawEvent)])
    cls = SYSCALL_CLASSES[raw.sys] if raw.sys < NSYS else "other"
    return SyscallEvent(ts_ns=raw.ts_ns, tgid=raw.tgid, tid=raw.tid, syscall=cls,
                        name=syscall_name(cls, raw.nr), ret=raw.ret,
                        args=tuple(int(x) for x in raw.args))


@dataclass
class ChunkMark:
    """A dirty 2 MiB chunk drained from BPF, with the faults counted in it."""

    chunk: int
    faults: int
    last_addr: int
    epoch: int = 0      # the process's execs when marked (exec_gen & EPOCH_MASK)


@dataclass(frozen=True)
class StackRecord:
    """One sampled page fault with what unwinding its user stack needs
    (--stacks; docs/stacks.md): the faulting address, the user registers at
    the fault and a copy of the user stack from `sp` upwards."""

    tgid: int
    addr: int            # the faulting address
    ip: int              # user instruction pointer at the fault
    sp: int              # user stack pointer
    bp: int              # user frame pointer register (rbp), whatever it holds
    weight: int          # bytes this sample stands for (its expected bytes)
    stack: bytes         # user memory [sp, sp + len(stack)); may be short
    epoch: int = 0       # the process's execs when sampled (as ChunkMark.epoch)
    # a kernel-mode fault (read() into a fresh buffer...): ip, sp and bp are
    # the user's registers at syscall entry, not at the faulting instruction
    from_kernel: bool = False
    # CPython frames of the faulting thread, innermost first: (code object
    # address | 1 for an entry frame, prev_instr's offset | the code object's
    # fingerprint << 32: stacks/python.py split_instr); only for registered processes
    py_frames: tuple[tuple[int, int], ...] = ()
    py_flags: int = 0    # PY_* below
    # the first fault of a chunk in a process whose faults may map a huge page,
    # sampled outside the countdown: user space sets its weight to what it made
    # resident (a huge page or one page)
    forced: bool = False


@dataclass(frozen=True)
class ReleaseRecord:
    """Pages a call of the process gave back (munmap, MAP_FIXED over a mapping,
    madvise DONTNEED/FREE/REMOVE, a shrinking brk or mremap) or moved
    (mremap), delivered in order with the samples (--stacks; struct
    mt_stack_release): the samples taken in [start, end) before it no longer
    hold those pages, or now hold them at [to, to_end)."""

    tgid: int
    start: int
    end: int
    to: int = 0          # moved to [to, to_end); 0: given back
    to_end: int = 0
    epoch: int = 0       # as StackRecord.epoch


SampleRecord = StackRecord | ReleaseRecord
"""What the samples' ring delivers, in the order BPF wrote it."""

STACK_FROM_KERNEL = 1   # mt_stack_sample.flags (MT_STACK_FROM_KERNEL)
STACK_FORCED = 2        # mt_stack_sample.flags (MT_STACK_FORCED)
STACK_RELEASE = 4       # mt_stack_release.flags (MT_STACK_RELEASE)
PY_FRAMES = 32          # MT_PY_FRAMES
PY_TRUNCATED = 1        # py_flags: more frames than PY_FRAMES
PY_NO_THREAD = 2        # py_flags: no thread state of the faulting thread found
PY_READ = 4             # py_flags: the frames were read (maybe none)


class RawStackHeader(ctypes.Structure):
    """struct mt_stack_sample up to its stack bytes, which follow it."""

    _fields_ = [
        ("tgid", ctypes.c_uint32),
        ("epoch", ctypes.c_uint32),
        ("addr", ctypes.c_uint64),
        ("ip", ctypes.c_uint64),
        ("sp", ctypes.c_uint64),
        ("bp", ctypes.c_uint64),
        ("len", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("py_count", ctypes.c_uint32),
        ("py_flags", ctypes.c_uint32),
        ("py_code", ctypes.c_uint64 * PY_FRAMES),
        ("py_instr", ctypes.c_uint64 * PY_FRAMES),
    ]


class RawStackRelease(ctypes.Structure):
    """struct mt_stack_release: its fields up to `flags` lie where
    mt_stack_sample's do."""

    _fields_ = [
        ("tgid", ctypes.c_uint32),
        ("epoch", ctypes.c_uint32),
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("to", ctypes.c_uint64),
        ("to_end", ctypes.c_uint64),
        ("len", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


# Both stack records begin with these fields (tgid, epoch, then mt_stack_sample's
# addr, ip, sp, bp where mt_stack_release has start, end, to, to_end; len,
# flags); a sample goes on with py_count, py_flags and the two CPython arrays.
_STACK_COMMON = struct.Struct("=IIQQQQII")
_PY_HEAD = struct.Struct("=II")
_PY_ARRAYS = struct.Struct(f"={PY_FRAMES}Q{PY_FRAMES}Q")
_STACK_HEAD_SIZE = _STACK_COMMON.size + _PY_HEAD.size + _PY_ARRAYS.size
Buffer = bytes | bytearray | memoryview


def decode_stack_sample_in(buf: Buffer, offset: int, size: int, weight: int) -> SampleRecord:
    """decode_stack_sample of the `size` bytes at `offset` in `buf` (a view of
    a ring buffer's record, valid during its callback): unpacks only the
    header's fields and copies only the `len` bytes of stack BPF wrote."""
    if size < _STACK_COMMON.size:
        raise ValueError(f"stack record of {size} bytes")
    tgid, epoch, addr, ip, sp, bp, length, flags = _STACK_COMMON.unpack_from(buf, offset)
    if flags & STACK_RELEASE:
        return ReleaseRecord(tgid=tgid, start=addr, end=ip, to=sp, to_end=bp, epoch=epoch)
    if size < _STACK_HEAD_SIZE:
        raise ValueError(f"stack record of {size} bytes")
    py_count, py_flags = _PY_HEAD.unpack_from(buf, offset + _STACK_COMMON.size)
    py_frames: tuple[tuple[int, int], ...] = ()
    if py_count:
        arrays = _PY_ARRAYS.unpack_from(buf, offset + _STACK_COMMON.size + _PY_HEAD.size)
        n = min(py_count, PY_FRAMES)
        py_frames = tuple(zip(arrays[:n], arrays[PY_FRAMES:PY_FRAMES + n]))
    start = offset + _STACK_HEAD_SIZE
    n = max(0, min(length, size - _STACK_HEAD_SIZE))
    return StackRecord(tgid=tgid, addr=addr, ip=ip, sp=sp, bp=bp, weight=weight,
                       stack=bytes(buf[start:start + n]), epoch=epoch,
                       from_kernel=bool(flags & STACK_FROM_KERNEL), py_frames=py_frames,
                       py_flags=py_flags, forced=bool(flags & STACK_FORCED))


def decode_stack_sample(data: bytes, weight: int) -> SampleRecord:
    """A sampled fault as BPF wrote it (or a release); `weight` is the bytes
    each sample stands for (memtrace.trace.sampling.sample_weight). Only the
    `len` bytes BPF copied are kept (never more than the record holds)."""
    return decode_stack_sample_in(data, 0, len(data), weight)


@dataclass
class Drained:
    """Everything one drain of the BPF side produced, grouped by process."""

    chunks: dict[int, list[ChunkMark]]
    ranges: dict[int, list[tuple[int, int]]]
    events: list[SyscallEvent]
    stats: dict[int, Stats]
    names_gen: int = 0      # count of unlinks/renames on the whole system
    execs: list[int] = field(default_factory=list)   # agent mode: pids that exec'd
    # agent mode: new processes (not threads) forked by watched processes
    forks: list[int] = field(default_factory=list)
    # agent mode: exec and fork notices that did not fit their ring (totals)
    notices_lost: dict[str, int] = field(default_factory=dict)
    # --stacks: sampled faults with their user stacks, and releases, by process
    stacks: dict[int, list[SampleRecord]] = field(default_factory=dict)
    # --malloc: sampled allocations and frees of sampled pointers, by process
    # (memtrace.trace.mallocevents.MallocRecord), and the BPF side's loss counters
    malloc: dict[int, list[MallocRecord]] = field(default_factory=dict)
    malloc_counts: dict[str, int] = field(default_factory=dict)

    def sample_count(self) -> int:
        """Sampled faults in `stacks` (release records not counted)."""
        return sum(isinstance(r, StackRecord) for recs in self.stacks.values() for r in recs)
