"""What each mapping is (its kind and stable identity) and how its resident
bytes split into anon / file / shmem."""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memtrace.trace.model import Resident
from memtrace.trace.procfs import PAGE_SIZE, Vma
from memtrace.util.elf import PF_W, PT_GNU_RELRO, PT_LOAD, program_headers

KINDS = ("library", "executable", "heap", "stack", "anon", "file", "shmem", "special")
_LIBRARY = re.compile(rb"(\.so(\.[0-9][^/]*)?|/ld-linux[^/]*)( \(deleted\))?$")
_SHMEM_PREFIXES = (b"/memfd:", b"/dev/shm/", b"/SYSV", b"/dev/zero", b"[anon_shmem:")
_DELETED = b" (deleted)"


def _strip_deleted(path: bytes) -> bytes:
    return path[: -len(_DELETED)] if path.endswith(_DELETED) else path


def classify(vma: Vma, exe: bytes) -> str:
    path = vma.path
    if not path or path.startswith(b"[anon:"):
        return "anon"
    if path == b"[heap]":
        return "heap"
    if path.startswith(b"[stack"):
        return "stack"
    if path.startswith(_SHMEM_PREFIXES) or (vma.perms[3:4] == "s" and vma.inode == 0):
        return "shmem"
    if path.startswith(b"["):
        return "special"
    if exe and _strip_deleted(path) == _strip_deleted(exe):
        return "executable"
    if _LIBRARY.search(path):
        return "library"
    return "file"


def mapping_identity(vma: Vma, kind: str) -> str:
    """The name all segments of one object share: a library's path, [heap], [anon]..."""
    if kind == "anon":
        return vma.display_path if vma.path.startswith(b"[anon:") else "[anon]"
    if kind in ("heap", "stack", "special"):
        return "[stack]" if kind == "stack" else vma.display_path
    return vma.display_path


@dataclass(frozen=True, slots=True)
class Split:
    anon: int
    file: int
    shmem: int

    @property
    def total(self) -> int:
        return self.anon + self.file + self.shmem


def split(resident: Resident, kind: str) -> Split:
    """Non-anonymous pages of a shmem mapping are shmem; of any other, file."""
    if kind == "shmem":
        return Split(anon=resident.anon, file=0, shmem=resident.other)
    return Split(anon=resident.anon, file=resident.other, shmem=0)


# -- segments of a loaded object ---------------------------------------------
#
# A library or executable loaded by ld.so (or the kernel) is several VMAs of one
# file: the ELF headers and read-only data (r--), the code (r-x), more read-only
# data (r--), the relocation-read-only part of the data segment (RELRO, r--
# after ld.so's mprotect), the data (rw-, file-backed) and, when .bss is larger
# than what the data segment's last file page holds, an anonymous rw- VMA right
# after the data: the bss. The kernel shows that one without a path.

SEGMENTS = ("text", "rodata", "relro", "data", "bss", "gap")
_OBJECT_KINDS = ("library", "executable")


@dataclass(frozen=True)
class ElfLayout:
    """What the program headers say, in the object's own (unbiased) addresses."""

    first_vaddr: int                   # p_vaddr of the first PT_LOAD (page-aligned down)
    relro: tuple[int, int] | None      # [start, end) ld.so makes read-only (page-aligned down)
    bss: tuple[int, int] | None        # [start, end) of zero-fill pages past the file data


def parse_elf_layout(head: bytes, page_size: int = PAGE_SIZE) -> ElfLayout | None:
    """The layout from the program headers of a 64-bit little-endian ELF file
    (its first bytes, enough to hold them); None for anything else."""
    headers = program_headers(head)
    if headers is None:
        return None
    loads: list[tuple[int, int, int, int]] = []   # flags, vaddr, filesz, memsz
    relro = None
    down = ~(page_size - 1)
    for h in headers:
        if h.type == PT_LOAD:
            loads.append((h.flags, h.vaddr, h.filesz, h.memsz))
        elif h.type == PT_GNU_RELRO and h.memsz:
            # glibc's _dl_protect_relro: both ends rounded down to a page
            relro = (h.vaddr & down, (h.vaddr + h.memsz) & down)
    if not loads:
        return None
    bss = None
    writable = [x for x in loads if x[0] & PF_W]
    if writable:
        _, vaddr, filesz, memsz = writable[-1]
        lo, hi = (vaddr + filesz + page_size - 1) & down, (vaddr + memsz + page_size - 1) & down
        if hi > lo:
            bss = (lo, hi)
    if relro is not None and relro[1] <= relro[0]:
        relro = None
    return ElfLayout(first_vaddr=loads[0][1] & down, relro=relro, bss=bss)


class ElfLayouts:
    """ELF layouts by file, read once (through /proc/PID/map_files, which works for
    deleted files and other mount namespaces) and kept by (dev, inode, path)."""

    MAX = 4096

    def __init__(self, proc_root: str | Path = "/proc") -> None:
        self.root = Path(proc_root)
        self._cache: dict[tuple[str, int, bytes], ElfLayout | None] = {}

    def __call__(self, pid: int, vma: Vma) -> ElfLayout | None:
        key = (vma.dev, vma.inode, vma.path)
        if key in self._cache:
            return self._cache[key]
        layout = None
        try:
            with open(self.root / str(pid) / "map_files" / f"{vma.start:x}-{vma.end:x}",
                      "rb") as f:
                layout = parse_elf_layout(f.read(16384))
        except OSError:
            return None          # not cached: may work at the next layout change
        if len(self._cache) >= self.MAX:
            self._cache.clear()
        self._cache[key] = layout
        return layout


LayoutOf = Callable[[Vma], "ElfLayout | None"]


@dataclass(frozen=True)
class Segment:
    name: str                 # one of SEGMENTS
    kind: str                 # library or executable (the owner's kind, also for bss)
    mapping: str              # the owner's identity (its path, also for bss)


def _object_instances(vmas: list[Vma], exe: bytes) -> list[tuple[str, list[int]]]:
    """Indices of the VMAs of each loaded object, in address order. A VMA at file
    offset 0 starts a new instance (a library mapped twice is two instances);
    the next VMAs of the same file, at other offsets, continue it."""
    out: list[tuple[str, list[int]]] = []
    prev_path: bytes | None = None
    for i, vma in enumerate(vmas):
        kind = classify(vma, exe)
        if kind not in _OBJECT_KINDS:
            prev_path = None
            continue
        if vma.path == prev_path and vma.offset != 0 and out:
            out[-1][1].append(i)
        elif vma.offset == 0:
            out.append((kind, [i]))
        else:               # a piece of the file mapped on its own, not a load
            prev_path = None
            continue
        prev_path = vma.path
    return out


def name_segments(vmas: list[Vma], exe: bytes,
                  layout_of: LayoutOf | None = None) -> dict[int, Segment]:
    """Segment of every VMA that belongs to a loaded library or the executable,
    by VMA start; the anonymous bss VMA after an object's data gets its owner's
    kind and identity. `layout_of(first_vma)` may give the ELF layout; without
    it (file unreadable) the names come from permissions and adjacency only."""
    out: dict[int, Segment] = {}
    for kind, idx in _object_instances(vmas, exe):
        first = vmas[idx[0]]
        ident = mapping_identity(first, kind)
        layout = layout_of(first) if layout_of is not None and first.offset == 0 else None
        bias = first.start - layout.first_vaddr if layout else 0
        data_i = next((i for i in idx if vmas[i].perms[:3] == "rw-"), None)
        for i in idx:
            vma = vmas[i]
            p = vma.perms
            if "x" in p[:3]:
                name = "text"
            elif p[1] == "w":
                name = "data"
            elif p[0] == "r":
                name = "rodata"
                if layout is not None:
                    if layout.relro and (bias + layout.relro[0] <= vma.start
                                         and vma.end <= bias + layout.relro[1]):
                        name = "relro"
                elif data_i is not None and i == data_i - 1 and vma.offset != 0 and (
                        vma.end == vmas[data_i].start
                        and vma.offset + vma.size == vmas[data_i].offset):
                    name = "relro"   # the part of the data segment made read-only
            else:
                name = "gap"         # ---p: padding between segments, never resident
            out[vma.start] = Segment(name, kind, ident)
        last = idx[-1]
        if last + 1 < len(vmas) and vmas[last].perms[:3] == "rw-":
            after = vmas[last + 1]
            if (not after.path and after.perms[:3] == "rw-" and after.inode == 0
                    and after.start == vmas[last].end and _is_bss(after, layout, bias)):
                out[after.start] = Segment("bss", kind, ident)
    return out


def _is_bss(vma: Vma, layout: ElfLayout | None, bias: int) -> bool:
    """Without the ELF layout, an anonymous rw- VMA right after the data is taken
    as the bss. With it, the VMA must start where the bss starts and end within
    it: a longer VMA is the bss merged by the kernel with a later anonymous
    mapping, which stays [anon] (its pages cannot be split by VMA)."""
    if layout is None:
        return True
    if layout.bss is None:
        return False
    return vma.start == bias + layout.bss[0] and vma.end <= bias + layout.bss[1]


_layouts: dict[str, ElfLayouts] = {}
_named: weakref.WeakKeyDictionary[Any, tuple[list[Vma], bytes, dict[int, Segment]]] = (
    weakref.WeakKeyDictionary())


def segments_for(owner: Any, vmas: list[Vma], exe: bytes, pid: int,
                 proc_root: str | Path = "/proc") -> dict[int, Segment]:
    """name_segments with the ELF layouts read from the process, computed again
    only when `vmas` is another list than last time for this owner (the model
    replaces its list whenever the layout changes)."""
    last = _named.get(owner)
    if last is not None and last[0] is vmas and last[1] == exe:
        return last[2]
    layouts = _layouts.setdefault(str(proc_root), ElfLayouts(proc_root))
    segs = name_segments(vmas, exe, lambda v: layouts(pid, v))
    _named[owner] = (vmas, exe, segs)
    return segs
