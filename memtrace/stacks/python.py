"""CPython 3.11 frames in sampled stacks (--stacks, docs/stacks.md "Python").

At a sample of a registered process BPF records the faulting thread's
interpreter frames, innermost first: each frame's code object address (| 1
for an entry frame, the first one a call of `_PyEval_EvalFrameDefault`
runs) and a word holding the offset of its `prev_instr` in the code object
(low 32 bits) and the code object's fingerprint read at the sample (high 32
bits: `co_firstlineno`, the `co_qualname` string's address, length and first
8 characters, `code_fingerprint`). Here, later, a code object is named from the
process's memory (/proc/PID/mem): `co_qualname`, `co_filename` and the line
of `prev_instr` in `co_linetable` (else `co_firstlineno`), if its
fingerprint is still the sampled one: a code object freed since, and another
allocated at its address, reads as `[unknown]` (counted in `stale`), not
under the newer one's name. Names are cached per process by address and
fingerprint.

Merging: native `_PyEval_EvalFrameDefault` frames and groups of interpreter
frames (each ending at an entry frame) pair up innermost first; each group
goes just inside (leaf-side of) its native frame."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence

from memtrace.stacks.profile import PY_MODULE, TRUNCATED, Frame, Stack
from memtrace.trace.pyoffsets import PyOffsets

EVAL_FRAME = "_PyEval_EvalFrameDefault"
PY_TRUNCATED = Frame(0, "[truncated]", PY_MODULE)
"""The last Python frame read of a deeper Python stack (BPF reads 32)."""
MAX_TEXT = 1024                          # characters of a name or file name read
_MAX_CODES = 100_000                     # cached code objects per process
_LOCATION_NONE, _NO_COLUMNS, _LONG = 15, 13, 14
OFFSET_UNKNOWN = 0xFFFFFFFF              # bpf/pyframes.h MT_PY_OFFSET_UNKNOWN
_U32 = 0xFFFFFFFF


Reader = Callable[[int, int], "bytes | None"]     # (address, size) -> process memory


def decode_unicode(header: bytes, read: Reader, address: int, off: PyOffsets) -> str | None:
    """A compact str object (3.11's PyASCIIObject / PyCompactUnicodeObject)
    from its header bytes; `read(addr, n)` reads process memory. None for
    anything else (a legacy, non-compact string)."""
    if len(header) < off.unicode_state + 4:
        return None
    length, = struct.unpack_from("<q", header, off.unicode_length)
    state, = struct.unpack_from("<I", header, off.unicode_state)
    kind, compact, ascii_ = (state >> 2) & 7, (state >> 5) & 1, (state >> 6) & 1
    if not compact or length < 0 or kind not in (1, 2, 4):
        return None
    n = min(length, MAX_TEXT)
    start = address + (off.unicode_ascii_size if ascii_ else off.unicode_compact_size)
    data = read(start, n * kind)
    if data is None or len(data) < n * kind:
        return None
    codec = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind]
    return data.decode(codec, errors="replace")


def code_fingerprint(firstlineno: int, qualname: int, str_header: bytes,
                     off: PyOffsets) -> int:
    """What BPF reads of a code object at a sample to tell it from a later one
    at the same address (bpf/pyframes.h py_instr_word: the same formula): its
    `co_firstlineno`, the address of its `co_qualname` string, and from that
    string's header bytes its length and, if ASCII, its first 8 bytes."""
    length = text = 0
    if len(str_header) >= off.unicode_ascii_size + 8:
        length, = struct.unpack_from("<Q", str_header, off.unicode_length)
        state, = struct.unpack_from("<I", str_header, off.unicode_state)
        if (state >> 6) & 1:
            text, = struct.unpack_from("<Q", str_header, off.unicode_ascii_size)
            if length < 8:
                text &= (1 << (length * 8)) - 1
    return ((qualname >> 4) & _U32) ^ (((firstlineno & _U32) * 0x9E3779B1) & _U32) \
        ^ (((length & _U32) * 0x85EBCA6B) & _U32) ^ (text & _U32) ^ (text >> 32)


def split_instr(word: int) -> tuple[int, int]:
    """A frame's py_instr word: (prev_instr's byte offset in its code object,
    or OFFSET_UNKNOWN; the code object's fingerprint, 0 when BPF could not read it)."""
    return word & _U32, (word >> 32) & _U32


def _ptr(raw: bytes, at: int) -> int:
    return int(struct.unpack_from("<Q", raw, at)[0])


def _varint(table: bytes, i: int) -> tuple[int, int]:
    b = table[i]
    i += 1
    val, shift = b & 63, 0
    while b & 64:
        b = table[i]
        i += 1
        shift += 6
        val |= (b & 63) << shift
    return val, i


def line_of(table: bytes, firstlineno: int, addr: int) -> int | None:
    """The line of the code unit at byte offset `addr`, from a 3.11
    `co_linetable` (Objects/locations.md); None where it has no line."""
    line, i, start = firstlineno, 0, 0
    while i < len(table):
        head = table[i]
        code, units = (head >> 3) & 15, (head & 7) + 1
        i += 1
        delta = 0
        if code in (_NO_COLUMNS, _LONG):
            uval, i = _varint(table, i)
            delta = -(uval >> 1) if uval & 1 else uval >> 1
            if code == _LONG:
                for _ in range(3):
                    _, i = _varint(table, i)
        elif 10 <= code <= 12:
            delta = code - 10
            i += 2
        elif code < 10:
            i += 1
        line += delta
        end = start + units * 2
        if start <= addr < end:
            return None if code == _LOCATION_NONE else line
        start = end
    return None


class PyCode:
    """What naming a frame of one code object needs."""

    __slots__ = ("qualname", "filename", "firstlineno", "linetable", "units_at", "fingerprint")

    def __init__(self, qualname: str, filename: str, firstlineno: int, linetable: bytes,
                 units_at: int, fingerprint: int) -> None:
        self.qualname = qualname
        self.filename = filename
        self.firstlineno = firstlineno
        self.linetable = linetable
        self.units_at = units_at          # offset of co_code_adaptive in the object
        self.fingerprint = fingerprint

    def line(self, offset: int) -> int:
        """The line of the instruction at byte `offset` in the code object."""
        addr = offset - self.units_at if offset != OFFSET_UNKNOWN else -1
        try:
            found = line_of(self.linetable, self.firstlineno, addr) if addr >= 0 else None
        except IndexError:      # a table cut short (read while being replaced)
            found = None
        return found if found is not None else self.firstlineno


class PyResolver:
    """Names the interpreter frames of one process from its memory."""

    def __init__(self, pid: int, offsets: PyOffsets, proc_root: str = "/proc") -> None:
        self.pid = pid
        self.off = offsets
        self.path = os.path.join(proc_root, str(pid), "mem")
        self._fd: int | None = None
        self._codes: dict[int, PyCode | None] = {}
        self._frames: dict[tuple[int, int], Frame] = {}
        self.unreadable = 0          # code objects that could not be read
        self.stale = 0               # code objects freed since their sample (another there)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self, addr: int, n: int) -> bytes | None:
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            return os.pread(self._fd, n, addr)
        except (OSError, OverflowError, ValueError):
            return None

    def _string(self, addr: int) -> str | None:
        return self._string_and_header(addr)[0]

    def _string_and_header(self, addr: int) -> tuple[str | None, bytes]:
        if not addr:
            return None, b""
        # an ASCII string's header and first 8 bytes where the whole compact
        # header cannot be read (the end of a mapping): what BPF reads of it
        header = self.read(addr, self.off.unicode_compact_size) \
            or self.read(addr, self.off.unicode_ascii_size + 8) or b""
        return (decode_unicode(header, self.read, addr, self.off) if header else None), header

    def _bytes(self, addr: int) -> bytes:
        head = self.read(addr, self.off.bytes_data) if addr else None
        if not head or len(head) < self.off.bytes_data:
            return b""
        size, = struct.unpack_from("<q", head, self.off.bytes_size)
        if size <= 0 or size > 1 << 20:
            return b""
        return self.read(addr + self.off.bytes_data, size) or b""

    def code(self, addr: int, fingerprint: int = 0) -> PyCode | None:
        """The code object at addr, if it is the one with that fingerprint (0:
        any). Read again only when a sample's fingerprint is not the cached
        object's (another object there since); the cache keeps what is there now."""
        known = self._codes.get(addr)
        if addr in self._codes and (known is None or not fingerprint
                                    or known.fingerprint == fingerprint):
            return known
        found = self._read_code(addr)
        if addr not in self._codes and len(self._codes) >= _MAX_CODES:
            self._codes.clear()
            self._frames.clear()
        self._codes[addr] = found
        if found is not None and fingerprint and found.fingerprint != fingerprint:
            self.stale += 1
            return None
        return found

    def _read_code(self, addr: int) -> PyCode | None:
        o = self.off
        end = max(o.code_filename, o.code_name, o.code_qualname, o.code_linetable) + 8
        raw = self.read(addr, end)
        found = None
        if raw is not None and len(raw) == end:
            firstlineno, = struct.unpack_from("<i", raw, o.code_firstlineno)
            qualname = _ptr(raw, o.code_qualname)
            name, head = self._string_and_header(qualname)
            name = name or self._string(_ptr(raw, o.code_name))
            filename = self._string(_ptr(raw, o.code_filename))
            if name is not None and filename is not None:
                found = PyCode(name, filename, firstlineno,
                               self._bytes(_ptr(raw, o.code_linetable)), o.code_adaptive,
                               code_fingerprint(firstlineno, qualname, head, o))
        if found is None:
            self.unreadable += 1
        return found

    def frame(self, code_addr: int, instr: int) -> Frame:
        """A frame from its code object's address and its py_instr word."""
        key = (code_addr, instr)
        frame = self._frames.get(key)
        if frame is None:
            offset, fingerprint = split_instr(instr)
            code = self.code(code_addr, fingerprint)
            if code is None:
                frame = Frame(code_addr, "[unknown]", PY_MODULE)
            else:
                where = f"{os.path.basename(code.filename)}:{code.line(offset)}"
                frame = Frame(code_addr, f"{code.qualname} ({where})", PY_MODULE)
            self._frames[key] = frame
        return frame

    def groups(self, py_frames: Sequence[tuple[int, int]],
               truncated: bool = False) -> list[list[Frame]]:
        """The frames of one sample split per native eval call, innermost
        first: each group ends at an entry frame (the last may not, when BPF
        read no further). `truncated` (BPF stopped at its frame limit) ends
        the last group with PY_TRUNCATED."""
        out: list[list[Frame]] = [[]]
        for tagged, instr in py_frames:
            out[-1].append(self.frame(tagged & ~1, instr))
            if tagged & 1:
                out.append([])
        if not out[-1]:
            out.pop()
        if truncated and out:
            out[-1].append(PY_TRUNCATED)
        return out


def merge(native: Stack, groups: Sequence[Sequence[Frame]]) -> Stack:
    """The native stack with each group of Python frames just inside its
    `_PyEval_EvalFrameDefault` frame, innermost first. Groups beyond the
    native frames found (a native stack cut short) are left out."""
    if not groups:
        return native
    out: list[Frame] = []
    k = 0
    for f in native.frames:
        if f.function == EVAL_FRAME and k < len(groups) and f != TRUNCATED:
            out.extend(groups[k])
            k += 1
        out.append(f)
    return Stack(tuple(out))
