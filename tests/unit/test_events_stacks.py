"""--stacks records: the sampled-fault record and counters of bpf/memtrace.h,
their ctypes mirrors and decoding (memtrace.trace.events), on packed bytes."""

from __future__ import annotations

import ctypes
import re
import struct
from pathlib import Path

import pytest

from memtrace.trace.events import (
    PY_FRAMES,
    PY_NO_THREAD,
    PY_READ,
    PY_TRUNCATED,
    STACK_FORCED,
    STACK_FROM_KERNEL,
    STACK_RELEASE,
    RawStackHeader,
    RawStackRelease,
    RawStats,
    ReleaseRecord,
    StackRecord,
    decode_stack_sample,
    decode_stack_sample_in,
    decode_stats,
)
from memtrace.trace.sampling import GAP_TABLE_SIZE
from tests.unit.test_events import CTYPE, HEADER, SOURCE, c_struct, py_struct

UAPI_PTRACE = Path("/usr/include/x86_64-linux-gnu/asm/ptrace.h")


def header_define(name: str) -> int:
    m = re.search(r"#define " + name + r" (\w+)", HEADER)
    assert m, name
    return int(m.group(1), 0)


HEAD = 48 + 8 + 16 * 32         # registers and lengths, py_count/py_flags, py frames


def pack_sample(*, tgid=4242, epoch=1, addr=0x7F0000001000, ip=0x7F00DEAD0000,
                sp=0x7FFC00000F00, bp=0, length=0, flags=0, stack=b"",
                py=(), py_flags=0, py_count=None) -> bytes:
    copy = header_define("MT_STACK_COPY")
    body = stack.ljust(copy, b"\xee")[:copy]   # BPF leaves bytes past len unwritten
    codes = [c for c, _ in py] + [0xDD] * (PY_FRAMES - len(py))     # unwritten: garbage
    instrs = [i for _, i in py] + [0xDD] * (PY_FRAMES - len(py))
    n = len(py) if py_count is None else py_count
    return (struct.pack("<IIQQQQII", tgid, epoch, addr, ip, sp, bp, length, flags)
            + struct.pack("<II", n, py_flags) + struct.pack(f"<{PY_FRAMES}Q", *codes)
            + struct.pack(f"<{PY_FRAMES}Q", *instrs) + body)


def test_stack_header_mirrors_the_c_struct():
    fields = c_struct("mt_stack_sample")
    assert [(n, CTYPE[t], k) for n, t, k in fields] == py_struct(RawStackHeader)
    body = re.search(r"struct mt_stack_sample \{(.*?)\};", HEADER, re.S).group(1)
    # the stack bytes follow the header, last, and the header keeps them aligned
    assert body.rstrip().splitlines()[-1].split()[:2] == ["u8", "stack[MT_STACK_COPY];"]
    assert ctypes.sizeof(RawStackHeader) == HEAD


def test_decoder_reads_each_field_where_the_c_struct_has_it():
    """decode_stack_sample_in's struct formats against RawStackHeader and
    RawStackRelease (which mirror bpf/memtrace.h): every field distinct."""
    raw = RawStackHeader(tgid=11, epoch=12, addr=0x1300, ip=0x1400, sp=0x1500, bp=0x1600,
                         len=5, flags=STACK_FORCED, py_count=2, py_flags=PY_READ)
    raw.py_code[0], raw.py_code[1], raw.py_instr[0], raw.py_instr[1] = 21, 22, 31, 32
    rec = decode_stack_sample_in(in_ring(bytes(raw) + b"abcdefgh"), 24,
                                 ctypes.sizeof(raw) + 8, 9)
    assert rec == StackRecord(tgid=11, addr=0x1300, ip=0x1400, sp=0x1500, bp=0x1600, weight=9,
                              stack=b"abcde", epoch=12, from_kernel=False,
                              py_frames=((21, 31), (22, 32)), py_flags=PY_READ, forced=True)
    rel = RawStackRelease(tgid=41, epoch=42, start=0x4300, end=0x4400, to=0x4500,
                          to_end=0x4600, len=0, flags=STACK_RELEASE)
    assert decode_stack_sample_in(in_ring(bytes(rel)), 24, ctypes.sizeof(rel), 9) == \
        ReleaseRecord(41, 0x4300, 0x4400, 0x4500, 0x4600, epoch=42)


def test_stack_constants_match_header():
    copy = header_define("MT_STACK_COPY")
    assert copy >= 4096 and copy & (copy - 1) == 0     # BPF masks lengths with copy - 1
    assert header_define("MT_STACK_GAPS") == GAP_TABLE_SIZE
    assert GAP_TABLE_SIZE & (GAP_TABLE_SIZE - 1) == 0   # BPF masks a random index
    assert header_define("MT_STACK_FROM_KERNEL") == STACK_FROM_KERNEL
    assert header_define("MT_STACK_FORCED") == STACK_FORCED
    assert header_define("MT_STACK_RELEASE") == STACK_RELEASE
    assert header_define("MT_PY_FRAMES") == PY_FRAMES
    assert header_define("MT_PY_TRUNCATED") == PY_TRUNCATED
    assert header_define("MT_PY_NO_THREAD") == PY_NO_THREAD
    assert header_define("MT_PY_READ") == PY_READ


def test_decode_python_frames_only_up_to_their_count():
    py = [(0x7F0000A00011, 0x7F0000A000F0), (0x7F0000B00020, 0x7F0000B00100)]
    for decode in (lambda d: decode_stack_sample(d, 1), decode_in_place):
        rec = decode(pack_sample(py=py, py_flags=PY_READ))
        assert rec.py_frames == tuple(py) and rec.py_flags == PY_READ
        rec = decode(pack_sample(py=py, py_count=1, py_flags=PY_READ | PY_TRUNCATED))
        assert rec.py_frames == (py[0],) and rec.py_flags & PY_TRUNCATED
        # a count past the array (never written by BPF) reads the array only
        assert len(decode(pack_sample(py=py, py_count=1000)).py_frames) == PY_FRAMES
        assert decode(pack_sample()).py_frames == ()


def in_ring(data: bytes, offset: int = 24) -> memoryview:
    """`data` at `offset` in a larger buffer, as a ring holds a record, seen
    as probes.py sees a record: a memoryview of a ctypes char array."""
    raw = b"\xAA" * offset + data + b"\xBB" * 64
    return memoryview(ctypes.create_string_buffer(raw, len(raw)))


def decode_in_place(data: bytes):
    return decode_stack_sample_in(in_ring(data), 24, len(data), 1)


def test_stats_carry_the_stack_counters():
    names = [n for n, _, _ in c_struct("mt_stats")]
    i = names.index("stacks_sampled")
    assert names[i:i + 3] == ["stacks_sampled", "stacks_lost", "stacks_unread"]
    raw = RawStats()
    raw.stacks_sampled, raw.stacks_lost, raw.stacks_unread, raw.forks = 300, 12, 3, 1
    s = decode_stats(RawStats.from_buffer_copy(bytes(raw)))
    assert (s.stacks_sampled, s.stacks_lost, s.stacks_unread, s.forks) == (300, 12, 3, 1)


def test_decode_keeps_only_the_bytes_copied():
    stack = bytes(range(256)) * 2
    rec = decode_stack_sample(pack_sample(length=300, stack=stack, bp=0x7FFC00001000),
                              weight=264192)
    assert (rec.tgid, rec.epoch, rec.addr) == (4242, 1, 0x7F0000001000)
    assert (rec.ip, rec.sp, rec.bp) == (0x7F00DEAD0000, 0x7FFC00000F00, 0x7FFC00001000)
    assert rec.stack == stack[:300]
    assert rec.weight == 264192
    assert not rec.from_kernel


def test_decode_full_copy_and_kernel_flag():
    copy = header_define("MT_STACK_COPY")
    stack = bytes(i % 251 for i in range(copy))
    rec = decode_stack_sample(pack_sample(length=copy, stack=stack, flags=STACK_FROM_KERNEL), 7)
    assert rec.stack == stack and len(rec.stack) == copy
    assert rec.from_kernel and not rec.forced


def test_decode_forced_flag_both_ways():
    data = pack_sample(length=16, stack=bytes(16), flags=STACK_FORCED | STACK_FROM_KERNEL)
    assert decode_stack_sample(data, 7).forced
    assert decode_in_place(data).forced and decode_in_place(data).from_kernel


def test_decode_unreadable_stack():
    rec = decode_stack_sample(pack_sample(length=0, sp=0, ip=0), 1)
    assert rec.stack == b"" and rec.sp == 0


def test_decode_never_reads_past_the_record():
    """A length beyond the record (never written by BPF) cannot pull in
    bytes that are not there."""
    data = pack_sample(length=0xFFFFFFFF, stack=b"\x01" * 64)
    assert decode_stack_sample(data, 1).stack == data[HEAD:]


def test_decode_short_buffer_raises():
    with pytest.raises(ValueError):
        decode_stack_sample(b"\0" * 40, 1)


def test_register_offsets_are_the_uapi_layout():
    """BPF reads rip, rsp and rbp at fixed offsets of the x86-64 uapi pt_regs."""
    if not UAPI_PTRACE.exists():
        pytest.skip("no x86-64 asm/ptrace.h")
    text = UAPI_PTRACE.read_text().split("#else /* __i386__ */", 1)[1]
    body = re.search(r"struct pt_regs \{(.*?)\};", text, re.S).group(1)
    names = re.findall(r"unsigned long (\w+);", body)
    assert len(names) == 21
    for reg, define in (("rbp", "MT_REGS_BP"), ("rip", "MT_REGS_IP"), ("rsp", "MT_REGS_SP")):
        m = re.search(r"#define " + define + r" (\d+)", SOURCE)
        assert m, define
        assert int(m.group(1)) == 8 * names.index(reg), reg


@pytest.mark.parametrize("length", [0, 300, 0xFFFFFFFF])
def test_decode_in_place_equals_decode_of_a_copy(length):
    """The ring callback decodes the record where it lies: the same record as
    from a copy, and never more than the record's bytes."""
    data = pack_sample(length=length, stack=bytes(range(256)) * 40, flags=STACK_FROM_KERNEL)
    at = decode_stack_sample_in(in_ring(data), 24, len(data), 5)
    assert at == decode_stack_sample(data, 5)
    assert isinstance(at, StackRecord) and len(at.stack) == min(length, len(data) - HEAD)
    with pytest.raises(ValueError):
        decode_stack_sample_in(in_ring(data), 24, 40, 5)
    with pytest.raises(ValueError):     # the common fields, but not a sample's header
        decode_stack_sample_in(in_ring(data), 24, ctypes.sizeof(RawStackHeader) - 8, 5)


# -- release records (struct mt_stack_release), in the samples' ring ------------------


def test_release_record_mirrors_the_c_struct_and_shares_the_sample_prefix():
    fields = c_struct("mt_stack_release")
    assert [(n, CTYPE[t], k) for n, t, k in fields] == py_struct(RawStackRelease)
    assert ctypes.sizeof(RawStackRelease) == 48
    # len and flags where a sample has them: one read of flags tells them apart
    assert RawStackRelease.flags.offset == RawStackHeader.flags.offset
    assert RawStackRelease.len.offset == RawStackHeader.len.offset


def pack_release(start: int, end: int, to: int = 0, to_end: int = 0) -> bytes:
    return struct.pack("<IIQQQQII", 4242, 3, start, end, to, to_end, 0, STACK_RELEASE)


@pytest.mark.parametrize("to", [0, 0x7F0000800000])
def test_decode_release_both_ways(to):
    data = pack_release(0x7F0000000000, 0x7F0000100000, to, to + 0x80000 if to else 0)
    want = ReleaseRecord(4242, 0x7F0000000000, 0x7F0000100000, to,
                         to + 0x80000 if to else 0, epoch=3)
    assert decode_stack_sample(data, 99) == want
    assert decode_stack_sample_in(in_ring(data), 24, len(data), 99) == want


def test_a_sample_is_not_taken_for_a_release():
    rec = decode_stack_sample(pack_sample(flags=STACK_FORCED | STACK_FROM_KERNEL), 5)
    assert not isinstance(rec, ReleaseRecord)


def test_a_drain_counts_its_samples_not_its_releases():
    from memtrace.trace.events import Drained

    sample = decode_stack_sample(pack_sample(), 5)
    release = decode_stack_sample(pack_release(0x1000, 0x2000), 5)
    d = Drained(chunks={}, ranges={}, events=[], stats={},
                stacks={1: [sample, release, sample], 2: [release]})
    assert d.sample_count() == 2
