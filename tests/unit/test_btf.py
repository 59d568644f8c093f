"""memtrace.trace.btf.member_offset on synthetic BTF blobs (and the real one if readable)."""

from __future__ import annotations

import os
import struct

import pytest

from memtrace.trace import btf


class Blob:
    """Builds a little-endian BTF blob: header, type section, string section."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.types = bytearray()
        self.ntypes = 0

    def s(self, name: str) -> int:
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(
        self,
        kind: int,
        name: str,
        vlen: int = 0,
        size: int = 0,
        trailer: bytes = b"",
        kind_flag: int = 0,
    ) -> int:
        info = (kind_flag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.s(name) if name else 0, info, size) + trailer
        self.ntypes += 1
        return self.ntypes

    def struct(
        self, name: str, members: list[tuple[str, int]], kind_flag: int = 0, kind: int = 4
    ) -> int:
        trailer = b"".join(struct.pack("<III", self.s(m), 1, off) for m, off in members)
        return self.add(kind, name, len(members), 8, trailer, kind_flag)

    def bytes(self, magic: int = 0xEB9F) -> bytes:
        hdr = struct.pack(
            "<HBBIIIII", magic, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings)
        )
        return hdr + bytes(self.types) + bytes(self.strings)


def sample() -> Blob:
    b = Blob()
    b.add(1, "int", size=4, trailer=struct.pack("<I", 32))  # INT
    b.add(2, "")  # PTR
    b.add(3, "", trailer=struct.pack("<III", 1, 1, 16))  # ARRAY
    b.struct("mm_struct", [("mm", 0), ("pgd", 64)])  # a decoy "mm"
    b.struct("task_struct", [("mm", 0)], kind=5)  # a UNION, not a struct
    b.add(6, "flags", vlen=2, size=4, trailer=struct.pack("<iIiI", 1, 0, 2, 1))  # ENUM
    b.add(7, "fwd")  # FWD
    b.add(8, "u32", size=1)  # TYPEDEF
    for kind in (9, 10, 11, 12, 16, 18):  # no trailer
        b.add(kind, "")
    b.add(13, "", vlen=3, trailer=b"\0" * 24)  # FUNC_PROTO
    b.add(14, "v", trailer=b"\0" * 4)  # VAR
    b.add(15, ".data", vlen=2, trailer=b"\0" * 24)  # DATASEC
    b.add(17, "tag", trailer=b"\0" * 4)  # DECL_TAG
    b.add(19, "e64", vlen=1, trailer=b"\0" * 12)  # ENUM64
    b.struct("task_struct", [("thread_info", 0), ("__state", 192), ("mm", 1856 * 8)])
    b.struct("bits", [("a", (3 << 24) | 0), ("b", (5 << 24) | 96)], kind_flag=1)
    return b


def test_member_offset():
    data = sample().bytes()
    assert btf.member_offset("task_struct", "mm", data) == 1856
    assert btf.member_offset("task_struct", "__state", data) == 24
    assert btf.member_offset("mm_struct", "pgd", data) == 8


def test_member_offset_bitfield_struct():
    assert btf.member_offset("bits", "b", sample().bytes()) == 12


def test_missing_member_and_struct():
    data = sample().bytes()
    with pytest.raises(btf.BtfError, match="no member"):
        btf.member_offset("task_struct", "nope", data)
    with pytest.raises(btf.BtfError, match="not found"):
        btf.member_offset("nope_struct", "mm", data)


def test_bad_magic():
    with pytest.raises(btf.BtfError):
        btf.member_offset("task_struct", "mm", sample().bytes(magic=0x9FEB))


def test_unknown_kind():
    b = Blob()
    b.add(31, "weird")
    b.struct("task_struct", [("mm", 0)])
    with pytest.raises(btf.BtfError, match="unknown BTF kind 31"):
        btf.member_offset("task_struct", "mm", b.bytes())


@pytest.mark.skipif(not os.access(btf.BTF_PATH, os.R_OK), reason="no readable kernel BTF")
def test_real_kernel_btf():
    off = btf.member_offset("task_struct", "mm")
    assert 0 < off < 16384
    assert off % 8 == 0
