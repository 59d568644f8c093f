"""Which processes run CPython 3.11, and where their `_PyRuntime` is
(--stacks, docs/stacks.md "Python").

A process runs CPython if its executable or a mapped `libpython*.so*` (a file
whose name contains "python") exports `_PyRuntime` in its dynamic symbol
table. Its version is the `Py_Version` constant next to it (PY_VERSION_HEX,
exported since 3.11); a build with `_Py_RefTotal` is a debug build (its
objects have another layout). Only 3.11 release builds on x86-64 get frames
(memtrace.trace.pyoffsets); for the others `PyCheck.reason` says why not.
Files are read once and kept by identity (device, inode)."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from memtrace.stacks.modules import load_bias
from memtrace.trace.procfs import Vma
from memtrace.trace.pyoffsets import SUPPORTED, PyOffsets
from memtrace.util.elf import PT_LOAD, SHT_DYNSYM, ProgramHeader, program_headers

_DELETED = b" (deleted)"


@dataclass(frozen=True)
class PyFile:
    """What one ELF file says about the CPython in it."""

    runtime: int                    # _PyRuntime's file address (st_value)
    version: int                    # Py_Version (PY_VERSION_HEX), 0 if absent
    debug: bool                     # _Py_RefTotal exported: a Py_REF_DEBUG build
    loads: tuple[ProgramHeader, ...]

    @property
    def major_minor(self) -> tuple[int, int]:
        return (self.version >> 24) & 0xFF, (self.version >> 16) & 0xFF

    def version_text(self) -> str:
        if not self.version:
            return "a CPython without Py_Version (before 3.11)"
        major, minor = self.major_minor
        return f"CPython {major}.{minor}.{(self.version >> 8) & 0xFF}"


@dataclass(frozen=True)
class PyCheck:
    """The outcome for one process image: frames possible (runtime, offsets)
    or the reason why not; None reason and no runtime: not a CPython."""

    runtime: int = 0                # _PyRuntime's address in the process
    offsets: PyOffsets | None = None
    version: str = ""
    path: str = ""
    reason: str | None = None


_SHDR = struct.Struct("<IIQQQQIIQQ")     # Elf64_Shdr: 64 bytes
_SYM = struct.Struct("<IBBHQQ")          # Elf64_Sym: 24 bytes
_WANTED = (b"_PyRuntime", b"Py_Version", b"_Py_RefTotal")


def read_pyfile(f: BinaryIO) -> PyFile | None:
    """PyFile of an open ELF file, None if it exports no _PyRuntime. Reads
    the dynamic symbol table with struct (a few ms for python3.11's 2,000
    symbols; a general ELF reader took 40 ms, longer than CPython takes to
    start running a script)."""
    try:
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as data:
            return _pyfile(data)
    except (OSError, ValueError, struct.error):
        return None


def _pyfile(data: mmap.mmap) -> PyFile | None:
    headers = program_headers(data[:16384])
    if headers is None:
        return None
    shoff, = struct.unpack_from("<Q", data, 40)
    shentsize, shnum = struct.unpack_from("<HH", data, 58)
    sections = [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    found: dict[bytes, tuple[int, int]] = {}
    for sh in sections:
        if sh[1] != SHT_DYNSYM or sh[6] >= len(sections):
            continue
        strtab = sections[sh[6]]
        str_off, str_size = strtab[4], strtab[5]
        for st_name, _, _, shndx, value, _ in _SYM.iter_unpack(data[sh[4]:sh[4] + sh[5]]):
            if shndx == 0 or st_name >= str_size:
                continue
            at = str_off + st_name
            if data[at:at + 1] not in (b"_", b"P"):
                continue
            name = data[at:data.find(b"\0", at)]
            if name in _WANTED:
                found[name] = (shndx, value)
    if b"_PyRuntime" not in found:
        return None
    version = 0
    if b"Py_Version" in found:
        shndx, value = found[b"Py_Version"]
        if shndx < len(sections):
            sec = sections[shndx]
            at = sec[4] + value - sec[3]
            version = int.from_bytes(data[at:at + 4], "little") if sec[1] != 8 else 0
    return PyFile(found[b"_PyRuntime"][1], version, b"_Py_RefTotal" in found,
                  tuple(h for h in headers if h.type == PT_LOAD))


def _is_candidate(vma: Vma) -> bool:
    # checked every tick for processes not found to run CPython: the substring
    # test (in C) first, the base name only for the few paths that pass it
    return b"python" in vma.path and bool(vma.inode) \
        and b"python" in os.path.basename(vma.path)


class PyDetector:
    """Finds CPython in processes, reading each candidate file once."""

    def __init__(self, proc_root: str = "/proc", machine: str | None = None) -> None:
        self.proc_root = proc_root
        self.machine = machine or os.uname().machine
        self._files: dict[tuple[str, int], PyFile | None] = {}

    def check(self, pid: int, vmas: Sequence[Vma]) -> PyCheck:
        """Where pid's CPython runtime is, from its VMA list."""
        seen: set[tuple[str, int]] = set()
        for vma in vmas:
            key = (vma.dev, vma.inode)
            if key in seen or not _is_candidate(vma):
                continue
            seen.add(key)
            info = self._file(pid, vma, key)
            if info is None:
                continue
            return self._verdict(info, vmas, vma)
        return PyCheck()

    def _verdict(self, info: PyFile, vmas: Sequence[Vma], vma: Vma) -> PyCheck:
        path = vma.display_path
        text = info.version_text()
        if self.machine != "x86_64":
            return PyCheck(version=text, path=path,
                           reason=f"Python frames are read on x86-64 only, not {self.machine}")
        offsets = SUPPORTED.get(info.major_minor) if info.version else None
        if offsets is None:
            return PyCheck(version=text, path=path,
                           reason=f"{text}: Python frames are read for CPython 3.11 only")
        if info.debug:
            return PyCheck(version=text, path=path,
                           reason=f"{text} is a debug build (another object layout)")
        bias = None
        for v in vmas:
            if (v.dev, v.inode) == (vma.dev, vma.inode):
                bias = load_bias(list(info.loads), v)
                if bias is not None:
                    break
        if bias is None:
            return PyCheck(version=text, path=path, reason=f"{path}: load address not found")
        return PyCheck(runtime=bias + info.runtime, offsets=offsets, version=text, path=path)

    def _file(self, pid: int, vma: Vma, key: tuple[str, int]) -> PyFile | None:
        if key in self._files:
            return self._files[key]
        base = os.fsencode(os.path.join(self.proc_root, str(pid)))
        paths = [base + b"/map_files/%x-%x" % (vma.start, vma.end)]
        if not vma.path.endswith(_DELETED) and vma.path.startswith(b"/"):
            paths.append(base + b"/root" + vma.path)
        for path in paths:
            try:
                with open(path, "rb") as f:
                    info = read_pyfile(f)
            except OSError:
                continue
            self._files[key] = info
            return info
        return None
