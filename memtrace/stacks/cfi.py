"""DWARF call frame information (x86-64) of one ELF file: which rule gives the
caller's frame at an address, from `.eh_frame` (indexed by `.eh_frame_hdr`)
or `.debug_frame`.

pyelftools parses entries, but slowly: about 1.5 ms per FDE, 10 s for all of
libc's, most of it building the same `construct` structs again for each entry;
with those shared (`_shared_structs`) an FDE takes about 0.13 ms. Still,
nothing is parsed up front: the FDEs' start addresses come from `.eh_frame_hdr`'s sorted table
(or, for `.debug_frame`, from the entries' fixed headers) read with `struct`, a
lookup bisects them, and only the FDE found is parsed and its rows decoded,
once, into compact `Row`s that later lookups bisect. `.eh_frame` without
`.eh_frame_hdr` (rare: linkers write it) is parsed whole on first use.

Rules are kept only for what a copy of the user stack can restore: the CFA,
the frame pointer (rbp, DWARF register 6) and the return address (16)."""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from elftools.dwarf import callframe
from elftools.dwarf.callframe import FDE, CallFrameInfo, RegisterRule
from elftools.dwarf.structs import DWARFStructs

RBP, RSP, RIP = 6, 7, 16                  # DWARF register numbers on x86-64
MASK = (1 << 64) - 1

# A register rule: ("u",) undefined, ("s",) same value, ("o", n) saved at CFA+n,
# ("vo", n) is CFA+n, ("r", reg) in another register, ("e", expr) saved at the
# address the expression gives, ("ve", expr) is that value.
Rule = tuple[Any, ...]
_RULE_KINDS = {RegisterRule.UNDEFINED: "u", RegisterRule.SAME_VALUE: "s",
               RegisterRule.OFFSET: "o", RegisterRule.VAL_OFFSET: "vo",
               RegisterRule.REGISTER: "r", RegisterRule.EXPRESSION: "e",
               RegisterRule.VAL_EXPRESSION: "ve"}


@dataclass(frozen=True)
class Row:
    """The unwinding rules from one address on, up to the next row."""

    cfa_reg: int | None       # CFA = register + offset ...
    cfa_offset: int
    cfa_expr: bytes | None    # ... or the value of this DWARF expression
    rbp: Rule | None          # None: not described (callee-saved: unchanged)
    ra: Rule | None           # None: not described (no way to find the caller)


@dataclass(frozen=True)
class FdeRows:
    start: int
    end: int
    pcs: list[int]
    rows: list[Row]
    signal: bool              # a signal trampoline ("S"): the caller's ip is exact

    def row_at(self, pc: int) -> Row:
        return self.rows[max(bisect_right(self.pcs, pc) - 1, 0)]


def _rule(rule: Any) -> Rule | None:
    if rule is None:
        return None
    kind = _RULE_KINDS.get(rule.type)
    if kind is None:
        return ("?",)            # architectural: nothing a generic unwinder can do
    if kind in ("e", "ve"):
        return (kind, bytes(rule.arg))
    if kind in ("o", "vo", "r"):
        return (kind, int(rule.arg))
    return (kind,)


def decode_fde(fde: Any) -> FdeRows | None:
    """The rows of one pyelftools FDE; None if its table is empty."""
    cie = fde.cie
    ra_col = cie.header.get("return_address_register", RIP)
    rows, pcs = [], []
    for line in fde.get_decoded().table:
        cfa = line["cfa"]
        expr = bytes(cfa.expr) if cfa.expr is not None else None
        rows.append(Row(cfa.reg, cfa.offset or 0, expr, _rule(line.get(RBP)),
                        _rule(line.get(ra_col))))
        pcs.append(line["pc"])
    if not rows:
        return None
    start = fde.header["initial_location"]
    aug = cie.header.get("augmentation") or b""
    return FdeRows(start, start + fde.header["address_range"], pcs, rows, b"S" in aug)


_STRUCTS = DWARFStructs(little_endian=True, dwarf_format=32, address_size=8)
_structs: dict[tuple[Any, ...], Any] = {}


def _one_structs_per_format(little_endian: bool, dwarf_format: int, address_size: int,
                            dwarf_version: int = 2) -> Any:
    key = (little_endian, dwarf_format, address_size, dwarf_version)
    found = _structs.get(key)
    if found is None:
        found = _structs[key] = DWARFStructs(little_endian=little_endian,
                                             dwarf_format=dwarf_format,
                                             address_size=address_size,
                                             dwarf_version=dwarf_version)
    return found


@contextmanager
def _shared_structs() -> Iterator[None]:
    """pyelftools builds a DWARFStructs (dozens of construct objects, most of
    its 1.5 ms per FDE) for every entry it parses, always one of a few equal
    ones: while we parse, its callframe module gets one per format instead.
    They are parsers without state, so sharing them changes no result."""
    saved = callframe.DWARFStructs
    callframe.DWARFStructs = _one_structs_per_format
    try:
        yield
    finally:
        callframe.DWARFStructs = saved
_DATAREL_SDATA4 = 0x3B          # DW_EH_PE_datarel | DW_EH_PE_sdata4: the table's encoding


class CfiTable:
    """The FDEs of one section; `lookup(pc)` gives the row covering pc (an
    address in the file's own address space) and whether it is a signal frame."""

    def __init__(self, data: bytes, address: int, eh_frame: bool,
                 hdr: tuple[bytes, int] | None = None) -> None:
        self._cfi = CallFrameInfo(stream=BytesIO(data), size=len(data), address=address,
                                  base_structs=_STRUCTS, for_eh_frame=eh_frame)
        self._address = address
        self._starts: list[int] = []
        self._offsets: list[int] = []           # FDE offset in the section, or -1
        self._decoded: dict[int, FdeRows | None] = {}
        self._parsed = False
        if eh_frame:
            index = _hdr_index(hdr, address) if hdr is not None else None
        else:
            index = _debug_frame_index(data)
        if index is not None:
            self._starts, self._offsets = index
            self._parsed = True

    def __len__(self) -> int:
        self._parse_all()
        return len(self._starts)

    def _parse_all(self) -> None:
        """Every entry, sorted by start, once: for .eh_frame without an index."""
        if self._parsed:
            return
        self._parsed = True
        try:
            with _shared_structs():
                entries = self._cfi.get_entries()
        except Exception:             # malformed CFI: the file has none usable
            entries = []
        fdes = sorted((e for e in entries if isinstance(e, FDE)),
                      key=lambda e: e.header["initial_location"])
        self._starts = [e.header["initial_location"] for e in fdes]
        self._offsets = [-1] * len(fdes)
        for i, e in enumerate(fdes):
            self._decoded[i] = _decode_or_none(e)

    def lookup(self, pc: int) -> tuple[Row, bool] | None:
        if not self._parsed:
            self._parse_all()
        i = bisect_right(self._starts, pc) - 1
        if i < 0:
            return None
        fde = self._decoded[i] if i in self._decoded else self._decode(i)
        if fde is None or not fde.start <= pc < fde.end:
            return None
        return fde.row_at(pc), fde.signal

    def _decode(self, i: int) -> FdeRows | None:
        fde: FdeRows | None = None
        try:
            # pyelftools parses one entry only through this (internal) method;
            # any parse error means no usable CFI for this function.
            with _shared_structs():
                entry = self._cfi._parse_entry_at(self._offsets[i])
            if isinstance(entry, FDE):
                fde = decode_fde(entry)
        except Exception:
            fde = None
        self._decoded[i] = fde
        return fde


def _decode_or_none(entry: Any) -> FdeRows | None:
    try:
        return decode_fde(entry)
    except Exception:
        return None


def _hdr_index(hdr: tuple[bytes, int], eh_address: int) -> tuple[list[int], list[int]] | None:
    """(FDE starts, FDE offsets in .eh_frame) from .eh_frame_hdr's search table,
    or None when it has none in the encoding every linker writes."""
    data, hdr_address = hdr
    if len(data) < 4 or data[0] != 1 or data[3] != _DATAREL_SDATA4:
        return None
    ptr_size = _encoded_size(data[1])
    if ptr_size < 0 or data[2] & 0x0F not in (0x03, 0x0B):
        return None         # no eh_frame_ptr, or a count not in 4 bytes
    pos = 4 + ptr_size
    if pos + 4 > len(data):
        return None
    count, = struct.unpack_from("<I", data, pos)
    pos += 4
    if pos + 8 * count > len(data):
        return None
    starts, offsets = [], []
    for loc, fde in struct.iter_unpack("<ii", data[pos:pos + 8 * count]):
        starts.append(hdr_address + loc)
        offsets.append(hdr_address + fde - eh_address)
    return starts, offsets


def _debug_frame_index(data: bytes) -> tuple[list[int], list[int]] | None:
    """(FDE starts, FDE offsets) of .debug_frame from the entries' headers
    alone (its addresses are absolute, 8 bytes: no encoding to decode)."""
    entries: list[tuple[int, int]] = []
    pos = 0
    while pos + 4 <= len(data):
        length, = struct.unpack_from("<I", data, pos)
        if length == 0xFFFFFFFF:                    # 64-bit DWARF
            if pos + 20 > len(data):
                return None
            length, cie_id = struct.unpack_from("<QQ", data, pos + 4)
            body, is_cie = pos + 12, cie_id == 0xFFFFFFFFFFFFFFFF
            fields = pos + 20
        else:
            if pos + 8 > len(data):
                return None
            cie_id, = struct.unpack_from("<I", data, pos + 4)
            body, is_cie = pos + 4, cie_id == 0xFFFFFFFF
            fields = pos + 8
        end = body + length
        if length == 0 or end > len(data):
            return None
        if not is_cie:
            if fields + 16 > end:
                return None
            start, _range = struct.unpack_from("<QQ", data, fields)
            entries.append((start, pos))
        pos = end
    entries.sort()
    return [s for s, _ in entries], [o for _, o in entries]


def _encoded_size(enc: int) -> int:
    return {0x02: 2, 0x03: 4, 0x04: 8, 0x0A: 2, 0x0B: 4, 0x0C: 8, 0x00: 8}.get(enc & 0x0F, -1)


# -- DWARF expressions ---------------------------------------------------------------
#
# Evaluated for the few CFA and register rules that need them: the PLT
# (rsp + 8, or + 16 after its push, chosen from rip), a function that realigns
# its stack (CFA = *(rbp - 8)), glibc's signal trampoline (every register read
# from the ucontext on the stack). Only rsp, rbp and rip are known; an
# expression that needs another register, or an operation not listed, fails.

Read = Callable[[int], "int | None"]


def _leb128(expr: bytes, pos: int, signed: bool) -> tuple[int, int]:
    """A LEB128 number at expr[pos] and the position after it."""
    value = shift = 0
    while True:
        b = expr[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            if signed and b & 0x40:
                value -= 1 << shift
            return value, pos


def _uleb(expr: bytes, pos: int) -> tuple[int, int]:
    return _leb128(expr, pos, signed=False)


def _sleb(expr: bytes, pos: int) -> tuple[int, int]:
    return _leb128(expr, pos, signed=True)


_CONSTS = {0x08: "<B", 0x09: "<b", 0x0A: "<H", 0x0B: "<h", 0x0C: "<I", 0x0D: "<i",
           0x0E: "<Q", 0x0F: "<q", 0x03: "<Q"}


def _signed(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


_BINARY: dict[int, Callable[[int, int], int]] = {
    0x1A: lambda a, b: a & b, 0x1C: lambda a, b: a - b, 0x1E: lambda a, b: a * b,
    0x21: lambda a, b: a | b, 0x22: lambda a, b: a + b, 0x24: lambda a, b: a << b,
    0x25: lambda a, b: a >> b, 0x27: lambda a, b: a ^ b,
    0x26: lambda a, b: _signed(a) >> b,
    0x29: lambda a, b: int(a == b), 0x2E: lambda a, b: int(a != b),
    0x2A: lambda a, b: int(_signed(a) >= _signed(b)),
    0x2B: lambda a, b: int(_signed(a) > _signed(b)),
    0x2C: lambda a, b: int(_signed(a) <= _signed(b)),
    0x2D: lambda a, b: int(_signed(a) < _signed(b)),
}


def evaluate(expr: bytes, regs: dict[int, int | None], read: Read,
             initial: int | None = None) -> int | None:
    """The value of a DWARF expression (None if it cannot be computed here).
    `initial` is pushed first (the CFA, for register rules)."""
    stack: list[int] = [] if initial is None else [initial]
    pos = 0
    try:
        while pos < len(expr):
            op = expr[pos]
            pos += 1
            if 0x30 <= op <= 0x4F:                       # DW_OP_lit0..31
                stack.append(op - 0x30)
            elif 0x70 <= op <= 0x8F or op == 0x92:       # DW_OP_breg0..31, bregx
                if op == 0x92:
                    reg, pos = _uleb(expr, pos)
                else:
                    reg = op - 0x70
                off, pos = _sleb(expr, pos)
                value = regs.get(reg)
                if value is None:
                    return None
                stack.append((value + off) & MASK)
            elif op in _CONSTS:
                fmt = _CONSTS[op]
                stack.append(struct.unpack_from(fmt, expr, pos)[0] & MASK)
                pos += struct.calcsize(fmt)
            elif op == 0x10:                             # DW_OP_constu
                v, pos = _uleb(expr, pos)
                stack.append(v & MASK)
            elif op == 0x11:                             # DW_OP_consts
                v, pos = _sleb(expr, pos)
                stack.append(v & MASK)
            elif op == 0x23:                             # DW_OP_plus_uconst
                v, pos = _uleb(expr, pos)
                stack.append((stack.pop() + v) & MASK)
            elif op == 0x06:                             # DW_OP_deref
                value = read(stack.pop())
                if value is None:
                    return None
                stack.append(value)
            elif op in _BINARY:
                b, a = stack.pop(), stack.pop()
                stack.append(_BINARY[op](a, b) & MASK)
            elif op == 0x12:                             # dup
                stack.append(stack[-1])
            elif op == 0x13:                             # drop
                stack.pop()
            elif op == 0x14:                             # over
                stack.append(stack[-2])
            elif op == 0x16:                             # swap
                stack[-1], stack[-2] = stack[-2], stack[-1]
            elif op == 0x1F:                             # neg
                stack.append(-stack.pop() & MASK)
            elif op == 0x20:                             # not
                stack.append(~stack.pop() & MASK)
            elif op != 0x96:                             # anything but DW_OP_nop
                return None
    except (IndexError, struct.error):
        return None
    return stack[-1] if stack else None
