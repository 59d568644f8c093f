"""memtrace.trace.events: the ctypes mirrors of bpf/memtrace.h and their decoding."""

from __future__ import annotations

import ctypes
import re
import struct
from pathlib import Path

import pytest

from memtrace.trace.events import (
    CHUNK_SHIFT,
    CHUNK_SIZE,
    NSYS,
    NSYS_SLOTS,
    PY_FRAMES,
    SYSCALL_CLASSES,
    USER_ADDR_MAX,
    X86_64_SYSCALL_NAMES,
    RawEvent,
    RawRange,
    RawStats,
    Stats,
    decode_event,
    decode_range,
    decode_stats,
    syscall_name,
)
from memtrace.util.units import fmt_bytes

BPF = Path(__file__).resolve().parents[2] / "bpf"
HEADER = (BPF / "memtrace.h").read_text()
SOURCE = (BPF / "memtrace.bpf.c").read_text()
CTYPE = {"u64": ctypes.c_uint64, "u32": ctypes.c_uint32, "s64": ctypes.c_int64}
ARRAY_LENGTHS = {"MT_NSYS": NSYS, "MT_NSYS_SLOTS": NSYS_SLOTS, "MT_PY_FRAMES": PY_FRAMES}


def c_struct(name: str) -> list[tuple[str, str, int | None]]:
    """(field, C type, array length) of `struct name` in memtrace.h."""
    body = re.search(r"struct " + name + r" \{(.*?)\};", HEADER, re.S)
    assert body, name
    out = []
    for m in re.finditer(r"^\s*(u64|u32|s64)\s+(\w+)(?:\[(\w+)\])?;", body.group(1), re.M):
        n = m.group(3)
        out.append(
            (m.group(2), m.group(1), None if n is None else ARRAY_LENGTHS.get(n) or int(n))
        )
    return out


def py_struct(cls: type[ctypes.Structure]) -> list[tuple[str, object, int | None]]:
    out = []
    for name, t in cls._fields_:
        if hasattr(t, "_length_"):
            out.append((name, t._type_, t._length_))
        else:
            out.append((name, t, None))
    return out


# -- the contract with bpf/memtrace.h ---------------------------------------------------
@pytest.mark.parametrize(
    "c_name,cls", [("mt_event", RawEvent), ("mt_range", RawRange), ("mt_stats", RawStats)]
)
def test_ctypes_mirror_header(c_name, cls):
    fields = c_struct(c_name)
    assert fields, c_name
    assert [(n, CTYPE[t], k) for n, t, k in fields] == py_struct(cls)


def test_struct_sizes():
    assert ctypes.sizeof(RawEvent) == 72
    assert ctypes.sizeof(RawRange) == 24
    assert ctypes.sizeof(RawStats) == 2 * 8 * NSYS_SLOTS + 16 * 8


def test_slots_hold_every_class_and_mask_cleanly():
    slots = int(re.search(r"#define MT_NSYS_SLOTS (\d+)", HEADER).group(1))
    assert slots == NSYS_SLOTS >= NSYS
    assert slots & (slots - 1) == 0  # a power of two: masking keeps the index in bounds


def test_syscall_classes_follow_enum():
    enum = re.search(r"enum mt_syscall \{(.*?)\};", HEADER, re.S).group(1)
    names = re.findall(r"^\s*MT_SYS_(\w+)", enum, re.M)
    assert [n.lower() for n in names] == list(SYSCALL_CLASSES)
    assert NSYS == len(SYSCALL_CLASSES) == 12


def test_constants_match_header():
    assert int(re.search(r"MT_CHUNK_SHIFT (\d+)", HEADER).group(1)) == CHUNK_SHIFT
    assert CHUNK_SIZE == 2 * 1024 * 1024
    assert (
        int(re.search(r"MT_USER_ADDR_MAX (0x[0-9a-fA-F]+)", HEADER).group(1), 16) == USER_ADDR_MAX
    )


def test_bpf_writes_no_syscall_number_or_page_size_by_hand():
    """The enter probes record the tracepoint's __syscall_nr, and the page size
    comes from user space (-DMT_PAGE_SIZE, os.sysconf); user space names every
    traced call."""
    entries = re.findall(r"^ENTER(?:_FLAGS)?\((\w+), MT_SYS_\w+,", SOURCE, re.M)
    assert len(entries) >= 15
    for name in entries:
        assert name in X86_64_SYSCALL_NAMES.values()
    assert "#define ENTER(name, sys, a0, a1, a2, a3, a4)" in SOURCE
    assert "args->__syscall_nr" in SOURCE
    assert not re.search(r"\bnr\s*==\s*\d+|stash\(\w+, \d+", SOURCE)
    assert not re.search(r"\b409[56]", SOURCE.replace("BPF_HASH(inflight, u32, struct mt_inflight,"
                                                     " 4096)", ""))
    assert "prctl" in X86_64_SYSCALL_NAMES.values()


def test_x86_64_names_are_the_systems_numbers():
    """The table agrees with the x86-64 numbering of the system's headers."""
    header = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
    if not header.exists():
        pytest.skip("no x86-64 asm/unistd_64.h")
    nrs = {m[0]: int(m[1]) for m in re.findall(r"#define __NR_(\w+) (\d+)", header.read_text())}
    assert {nrs[name]: name for name in X86_64_SYSCALL_NAMES.values()} == X86_64_SYSCALL_NAMES


def test_syscall_name_elsewhere():
    """On another machine (no table) a record is named by its class where that
    is one syscall, else by its number."""
    assert syscall_name("mmap", 222, {}) == "mmap"
    assert syscall_name("mlock", 284, {}) == "284"
    assert syscall_name("other", 167, {}) == "167"
    assert syscall_name("mlock", 325, X86_64_SYSCALL_NAMES) == "mlock2"


# -- decoding -----------------------------------------------------------------------
def test_decode_range_from_packed_bytes():
    data = struct.pack("<IIQQ", 4321, 0, 0x7F0000000000, 0x7F0000A00000)
    r = decode_range(data)
    assert (r.tgid, r.start, r.end) == (4321, 0x7F0000000000, 0x7F0000A00000)


def test_decode_range_ignores_trailing_bytes():
    data = bytes(RawRange(7, 0, 0x1000, 0x2000)) + b"\xaa" * 8
    r = decode_range(data)
    assert (r.tgid, r.start, r.end) == (7, 0x1000, 0x2000)


def test_decode_range_short_buffer_raises():
    with pytest.raises(ValueError):
        decode_range(b"\0" * 16)


def pack_event(*, ts=123456789, tgid=100, tid=101, sys=1, nr=9, ret=0, args=(0,) * 5):
    return struct.pack("<QIIIIq5Q", ts, tgid, tid, sys, nr, ret, *args)


def test_decode_event_fields():
    e = decode_event(
        pack_event(
            ts=5,
            tgid=10,
            tid=11,
            sys=1,
            nr=9,
            ret=0x7F0000001000,
            args=(0, 8192, 3, 0x22, 2**64 - 1),
        )
    )
    assert (e.ts_ns, e.tgid, e.tid, e.syscall, e.name) == (5, 10, 11, "mmap", "mmap")
    assert e.ret == 0x7F0000001000
    assert e.args == (0, 8192, 3, 0x22, 2**64 - 1)
    assert e.ok


def test_decode_event_from_ctypes_object_matches_struct_pack():
    raw = RawEvent(ts_ns=1, tgid=2, tid=3, sys=4, nr=28, ret=-22)
    raw.args[:] = [0x1000, 4096, 4, 0, 0]
    assert bytes(raw) == pack_event(
        ts=1, tgid=2, tid=3, sys=4, nr=28, ret=-22, args=(0x1000, 4096, 4, 0, 0)
    )
    e = decode_event(bytes(raw))
    assert e.syscall == "madvise" and e.ret == -22 and not e.ok


def test_decode_event_unknown_class_and_number():
    e = decode_event(pack_event(sys=NSYS + 5, nr=9999))
    assert e.syscall == "other"
    assert e.name == "9999"
    assert e.describe() == "9999(...) = 0"


def test_decode_event_negative_ret():
    e = decode_event(pack_event(sys=1, nr=9, ret=-12, args=(0, 1 << 40, 3, 0x22, 2**64 - 1)))
    assert e.ret == -12
    assert not e.ok
    assert e.describe() == "mmap(len=1.0 TiB, fd=-1) = -12"


@pytest.mark.parametrize(
    "sys,nr,ret,args,text",
    [
        (
            1,
            9,
            0x7F0000001000,
            (0, 8192, 3, 0x22, 2**64 - 1),
            "mmap(len=8.0 KiB, fd=-1) -> 0x7f0000001000",
        ),
        (1, 9, 0x7F0000001000, (0, 4096, 1, 1, 7), "mmap(len=4.0 KiB, fd=7) -> 0x7f0000001000"),
        # the tracepoint's 64-bit slot holds the int fd zero-extended (issue 11)
        (1, 9, 0x7F0000001000, (0, 1 << 20, 3, 0x22, 0xFFFFFFFF),
         "mmap(len=1.0 MiB, fd=-1) -> 0x7f0000001000"),
        (2, 11, 0, (0x7F0000000000, 3 << 20, 0, 0, 0), "munmap(0x7f0000000000, 3.0 MiB) = 0"),
        (5, 10, 0, (0x1000, 100, 1, 0, 0), "mprotect(0x1000, 100 B) = 0"),
        (5, 329, 0, (0x1000, 4096, 1, 2, 0), "pkey_mprotect(0x1000, 4.0 KiB) = 0"),
        (6, 325, -1, (0x2000, 1536, 1, 0, 0), "mlock2(0x2000, 1.5 KiB) = -1"),
        (7, 150, 0, (0x2000, 0, 0, 0, 0), "munlock(0x2000, 0 B) = 0"),
        (4, 28, 0, (0x3000, 1 << 30, 4, 0, 0), "madvise(0x3000, 1.0 GiB, DONTNEED) = 0"),
        (4, 28, 0, (0x3000, 4096, 25, 0, 0), "madvise(0x3000, 4.0 KiB, COLLAPSE) = 0"),
        (4, 28, -22, (0x3000, 4096, 99, 0, 0), "madvise(0x3000, 4.0 KiB, 99) = -22"),
        (
            3,
            25,
            0x7F0000200000,
            (0x7F0000000000, 4096, 8192, 1, 0),
            "mremap(0x7f0000000000, 4.0 KiB -> 8.0 KiB) -> 0x7f0000200000",
        ),
        (
            3,
            25,
            -12,
            (0x7F0000000000, 4096, 8192, 0, 0),
            "mremap(0x7f0000000000, 4.0 KiB -> 8.0 KiB) = -12",
        ),
        (
            0,
            12,
            0x555555580000,
            (0x555555580000, 0, 0, 0, 0),
            "brk(0x555555580000) = 0x555555580000",
        ),
        (8, 30, 0x7F0000000000, (5, 0, 0, 0, 0), "shmat(...) = 139637976727552"),
        (10, 157, 0, (0x53564D41, 0, 0, 0, 0), "prctl(...) = 0"),
        (11, 59, 0, (0,) * 5, "execve(...) = 0"),
    ],
)
def test_describe(sys, nr, ret, args, text):
    assert decode_event(pack_event(sys=sys, nr=nr, ret=ret, args=args)).describe() == text


@pytest.mark.parametrize(
    "n,text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        ((1 << 20) - 1, "1.0 MiB"),      # rounds up to the next unit, not "1024.0 KiB"
        (1 << 20, "1.0 MiB"),
        (5 << 30, "5.0 GiB"),
    ],
)
def test_size_format(n, text):
    assert fmt_bytes(n) == text


def test_decode_stats():
    raw = RawStats()
    for i in range(NSYS):
        raw.calls[i] = i + 1
        raw.bytes[i] = (i + 1) * 4096
    raw.layout_gen, raw.exec_gen, raw.remote_rss = 7, 1, 3
    raw.full_rescan_requests, raw.ranges_lost, raw.events_lost = 2, 4, 5
    raw.events_sampled_out, raw.brk = 6, 0x555555580000
    # round trip through bytes, as read from the BPF map
    s = decode_stats(RawStats.from_buffer_copy(bytes(raw)))
    assert s.calls == {name: i + 1 for i, name in enumerate(SYSCALL_CLASSES)}
    assert s.bytes["mmap"] == 2 * 4096
    assert s.bytes["exec"] == NSYS * 4096
    assert (s.layout_gen, s.exec_gen, s.remote_rss) == (7, 1, 3)
    assert (s.full_rescan_requests, s.ranges_lost, s.events_lost) == (2, 4, 5)
    assert (s.events_sampled_out, s.brk) == (6, 0x555555580000)
    assert all(type(x) is int for x in (s.layout_gen, s.brk, *s.calls.values()))


def test_decode_stats_u64_max():
    raw = RawStats()
    raw.remote_rss = 2**64 - 1
    assert decode_stats(raw).remote_rss == 2**64 - 1


def test_stats_empty():
    s = Stats.empty()
    assert list(s.calls) == list(SYSCALL_CLASSES)
    assert set(s.calls.values()) == {0} and set(s.bytes.values()) == {0}
    assert (s.layout_gen, s.exec_gen, s.remote_rss, s.events_lost) == (0, 0, 0, 0)
    assert Stats.empty() == Stats.empty()
    assert Stats.empty().calls is not Stats.empty().calls
