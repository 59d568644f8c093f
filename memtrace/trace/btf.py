"""Struct member offsets from the running kernel's BTF (/sys/kernel/btf/vmlinux).

BCC compiles against whatever headers are installed, which may not match the
running kernel; offsets read here are the running kernel's own."""

from __future__ import annotations

import struct

BTF_PATH = "/sys/kernel/btf/vmlinux"
_MAGIC = 0xEB9F
_KIND_STRUCT = 4
# Bytes that follow the 12-byte common header, per kind: (fixed, per vlen entry).
_TRAILER: dict[int, tuple[int, int]] = {
    1: (4, 0), 2: (0, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 7: (0, 0),
    8: (0, 0), 9: (0, 0), 10: (0, 0), 11: (0, 0), 12: (0, 0), 13: (0, 8), 14: (4, 0),
    15: (0, 12), 16: (0, 0), 17: (4, 0), 18: (0, 0), 19: (0, 12),
}


class BtfError(Exception):
    pass


def member_offset(struct_name: str, member: str, data: bytes | None = None) -> int:
    """Byte offset of `member` in `struct struct_name`."""
    if data is None:
        try:
            with open(BTF_PATH, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BtfError(f"cannot read {BTF_PATH}: {e.strerror}") from None
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != _MAGIC:
        raise BtfError("not a little-endian BTF blob")
    type_off, type_len, str_off, _str_len = struct.unpack_from("<IIII", data, 8)
    types = hdr_len + type_off
    strings = hdr_len + str_off

    def name_at(off: int) -> bytes:
        end = data.index(b"\0", strings + off)
        return data[strings + off:end]

    want_struct, want_member = struct_name.encode(), member.encode()
    pos, end = types, types + type_len
    while pos < end:
        name_off, info, _size = struct.unpack_from("<III", data, pos)
        kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        pos += 12
        if kind not in _TRAILER:
            raise BtfError(f"unknown BTF kind {kind}")
        fixed, per = _TRAILER[kind]
        if kind == _KIND_STRUCT and name_at(name_off) == want_struct:
            for i in range(vlen):
                m_name, _m_type, m_off = struct.unpack_from("<III", data, pos + 12 * i)
                if name_at(m_name) == want_member:
                    bits = m_off & 0xFFFFFF if kind_flag else m_off
                    return bits // 8
            raise BtfError(f"struct {struct_name} has no member {member}")
        pos += fixed + per * vlen
    raise BtfError(f"struct {struct_name} not found in BTF")
