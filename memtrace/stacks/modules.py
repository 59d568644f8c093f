"""The ELF files a process executes, read once as the process sees them and
kept by file identity: what unwinding (CFI) and symbolizing (symbol table)
need from each, and the load bias of a mapping of it.

A file is opened through `/proc/PID/map_files/START-END` (the very file
mapped: works for deleted files and in other mount namespaces), else through
`/proc/PID/root/` + its path. Only the sections used are read (then the file
is closed): `.eh_frame_hdr`, `.eh_frame`, `.debug_frame`, the symbol table
(`.symtab`, else the one of the debug file named by its build-id under
/usr/lib/debug/.build-id, else `.dynsym`) and the build-id note. The vDSO has
no file: it is read from memtrace's own memory (the kernel maps one image into
every 64-bit process)."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from memtrace.stacks.cfi import CfiTable
from memtrace.stacks.symbols import SymbolTable
from memtrace.trace.procfs import Vma
from memtrace.util.elf import PT_LOAD, ProgramHeader, program_headers

PF_X = 1
DEBUG_ROOT = "/usr/lib/debug/.build-id"
_DELETED = b" (deleted)"
ModuleKey = tuple[Any, ...]


@dataclass
class Module:
    """What one ELF file holds for unwinding and symbolizing."""

    loads: list[ProgramHeader]
    build_id: str | None
    symbols: SymbolTable
    eh_frame: CfiTable | None = None
    debug_frame: CfiTable | None = None
    _bias: dict[tuple[int, int], int | None] = field(default_factory=dict)

    def bias(self, vma: Vma) -> int | None:
        """Process address minus file address for the PT_LOAD this VMA maps,
        None if it maps none (the file is not what was loaded there)."""
        key = (vma.start, vma.offset)
        if key not in self._bias:
            self._bias[key] = load_bias(self.loads, vma)
        return self._bias[key]

    def cfi(self, pc: int) -> tuple[Any, bool] | None:
        """(row, signal frame) for a file address: .eh_frame first, then .debug_frame."""
        for table in (self.eh_frame, self.debug_frame):
            if table is not None:
                found = table.lookup(pc)
                if found is not None:
                    return found
        return None


def load_bias(loads: list[ProgramHeader], vma: Vma) -> int | None:
    """From the PT_LOAD whose file range holds the VMA's offset; of two that
    share that page (an old layout without separate code pages), the one
    whose execute permission matches the VMA's."""
    found = None
    for h in loads:
        lo = h.offset & ~0xFFF
        if lo <= vma.offset < max(h.offset + h.filesz, lo + 1):
            bias = vma.start - vma.offset - (h.vaddr - h.offset)
            if bool(h.flags & PF_X) == ("x" in vma.perms):
                return bias
            if found is None:
                found = bias
    return found


def parse_module(f: Any) -> Module | None:
    """A Module from an open ELF file (x86-64, 64-bit); None for anything else."""
    head = f.read(16384)
    headers = program_headers(head)
    if headers is None:
        return None
    f.seek(0)
    try:
        elf = ELFFile(f)
        if elf.get_machine_arch() != "x64":
            return None
        return _read_sections(elf, [h for h in headers if h.type == PT_LOAD])
    except (ELFError, ValueError, OSError, KeyError, AssertionError):
        return None


def _section(elf: ELFFile, name: str) -> tuple[bytes, int] | None:
    sec = elf.get_section_by_name(name)
    if sec is None or sec["sh_type"] == "SHT_NOBITS":
        return None
    return sec.data(), sec["sh_addr"]


def _read_sections(elf: ELFFile, loads: list[ProgramHeader]) -> Module:
    build_id = _build_id(elf)
    symbols = _symbols(elf, ".symtab")
    if symbols is None and build_id is not None:
        symbols = _debug_symbols(build_id)
    if symbols is None:
        symbols = _symbols(elf, ".dynsym") or SymbolTable.empty()
    eh = _section(elf, ".eh_frame")
    debug = _section(elf, ".debug_frame")
    return Module(
        loads=loads, build_id=build_id, symbols=symbols,
        eh_frame=CfiTable(eh[0], eh[1], True, _section(elf, ".eh_frame_hdr")) if eh else None,
        debug_frame=CfiTable(debug[0], 0, False) if debug else None,
    )


def _symbols(elf: ELFFile, name: str) -> SymbolTable | None:
    sec = elf.get_section_by_name(name)
    if sec is None or sec["sh_type"] == "SHT_NOBITS":
        return None
    strtab = elf.get_section(sec["sh_link"])
    table = SymbolTable.from_elf(sec.data(), strtab.data())
    return table if len(table) else None


def _debug_symbols(build_id: str) -> SymbolTable | None:
    """The .symtab of the separate debug file with this build-id (Debian's
    -dbg and -dbgsym packages), if installed."""
    path = os.path.join(DEBUG_ROOT, build_id[:2], build_id[2:] + ".debug")
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            if _build_id(elf) != build_id:
                return None
            return _symbols(elf, ".symtab")
    except (OSError, ELFError, ValueError):
        return None


def _build_id(elf: ELFFile) -> str | None:
    sec = elf.get_section_by_name(".note.gnu.build-id")
    if sec is None:
        return None
    data = sec.data()
    if len(data) < 16:
        return None
    namesz = int.from_bytes(data[0:4], "little")
    descsz = int.from_bytes(data[4:8], "little")
    start = 12 + ((namesz + 3) & ~3)
    if data[12:12 + namesz] != b"GNU\0" or start + descsz > len(data):
        return None
    return data[start:start + descsz].hex()


class ModuleCache:
    """Modules by file identity (device, inode; the vDSO by name), at most
    `max_modules`, least recently used dropped first. A file that is not an
    x86-64 ELF file is remembered as None; one that could not be opened is not
    (the next frame may come through another pid that can)."""

    def __init__(self, proc_root: str = "/proc", max_modules: int = 256) -> None:
        self.proc_root = proc_root
        self.max_modules = max_modules
        self._cache: OrderedDict[ModuleKey, Module | None] = OrderedDict()
        self.loads = 0                 # files read (for tests and measurements)

    @staticmethod
    def key(vma: Vma) -> ModuleKey | None:
        if vma.inode:
            return (vma.dev, vma.inode)
        if vma.path == b"[vdso]":
            return ("[vdso]",)
        return None

    def get(self, pid: int, vma: Vma) -> Module | None:
        key = self.key(vma)
        if key is None:
            return None
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            module = _vdso() if key == ("[vdso]",) else self._open(pid, vma)
        except OSError:
            return None
        self.loads += 1
        self._cache[key] = module
        if len(self._cache) > self.max_modules:
            self._cache.popitem(last=False)
        return module

    def _open(self, pid: int, vma: Vma) -> Module | None:
        base = os.fsencode(os.path.join(self.proc_root, str(pid)))
        paths = [base + b"/map_files/%x-%x" % (vma.start, vma.end)]
        if not vma.path.endswith(_DELETED) and vma.path.startswith(b"/"):
            paths.append(base + b"/root" + vma.path)
        error: OSError | None = None
        for path in paths:
            try:
                with open(path, "rb") as f:
                    return parse_module(f)
            except OSError as e:
                error = e
        # the process has exited (its samples of the last moments are unwound
        # after): the path as memtrace sees it, if it is the very same file
        if vma.path.startswith(b"/") and _same_file(vma.path, vma):
            with contextlib.suppress(OSError), open(vma.path, "rb") as f:
                return parse_module(f)
        raise error or FileNotFoundError(vma.display_path)


def _same_file(path: bytes, vma: Vma) -> bool:
    """path names the file vma maps: same inode, same device (maps gives it
    as major:minor in hex)."""
    try:
        st = os.stat(path)
        major, minor = (int(x, 16) for x in vma.dev.split(":"))
    except (OSError, ValueError):
        return False
    return st.st_ino == vma.inode and (os.major(st.st_dev), os.minor(st.st_dev)) == (major, minor)


def _vdso() -> Module | None:
    """The vDSO image mapped into this process (the same in every 64-bit one)."""
    with open("/proc/self/maps", "rb") as f:
        for line in f:
            if line.rstrip().endswith(b"[vdso]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split(b"-"))
                image = ctypes.string_at(lo, hi - lo)
                return parse_module(BytesIO(image))
    return None
