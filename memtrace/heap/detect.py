"""Which malloc a process uses, from its mappings and their dynamic symbols:
memtrace heap reads only glibc's (musl, jemalloc, tcmalloc, ... and static
executables are reported as unsupported, with the reason)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from memtrace.heap.memory import AddressSpace
from memtrace.trace.procfs import escape_name
from memtrace.util.elf import PT_INTERP, defined_dynamic_symbols, is_elf64le, program_headers

KNOWN_ALLOCATORS = (
    (b"jemalloc", "jemalloc"), (b"tcmalloc", "tcmalloc"), (b"mimalloc", "mimalloc"),
    (b"hoard", "hoard"), (b"libasan", "asan"), (b"libtsan", "tsan"), (b"libmsan", "msan"),
    (b"snmalloc", "snmalloc"), (b"rpmalloc", "rpmalloc"),
)


@dataclass
class AllocatorInfo:
    allocator: str  # "glibc", "musl", "jemalloc", ..., "unknown"
    supported: bool
    reason: str = ""
    libc_path: bytes = b""


def _is_libc(path: bytes) -> bool:
    base = path.rsplit(b"/", 1)[-1]
    return base == b"libc.so.6" or bool(re.fullmatch(rb"libc-2\.\d+\.so", base))


def elf_info(data: bytes) -> tuple[bool, set[bytes]] | None:
    """(has PT_INTERP, names of defined dynamic symbols) of an ELF64 LE file
    (util/elf); None if not such a file. No names if its section table is cut off."""
    if not is_elf64le(data):
        return None
    interp = any(h.type == PT_INTERP for h in program_headers(data) or ())
    return interp, defined_dynamic_symbols(data)


def detect_allocator(space: AddressSpace, exe: bytes) -> AllocatorInfo:
    """Which malloc the process uses, from its mappings and their dynamic symbols."""
    vmas = space.maps()
    paths = list(dict.fromkeys(v.path for v in vmas if v.path.startswith(b"/")))
    for p in paths:
        base = p.rsplit(b"/", 1)[-1]
        if b"ld-musl" in base or b"libc.musl" in base or (
                base.startswith(b"libc.so") and b"musl" in p):
            return AllocatorInfo("musl", False, "the process uses musl libc's malloc "
                                 f"({escape_name(p)}); memtrace heap reads only "
                                 "glibc malloc")
    libc = next((p for p in paths if _is_libc(p)), b"")
    for p in paths:
        base = p.rsplit(b"/", 1)[-1]
        # memtrace's --malloc sampler defines malloc but hands every call to the
        # allocator after it (glibc's, or the library found further on)
        if _is_libc(p) or base.startswith((b"ld-linux", b"libc_malloc_debug",
                                           b"libmemtrace-malloc-")):
            continue
        data = space.file_bytes(p, 64 << 20)
        info = elf_info(data) if data else None
        if info is None or b"malloc" not in info[1]:
            continue
        name = next((n for key, n in KNOWN_ALLOCATORS if key in base.lower()), "unknown")
        if name == "unknown" and p == exe:
            name = next((n for key, n in KNOWN_ALLOCATORS if data and key in data), "unknown")
        return AllocatorInfo(name, False, f"malloc is provided by {escape_name(p)}"
                             f"{' (' + name + ')' if name != 'unknown' else ''}, not by glibc; "
                             "memtrace heap reads only glibc malloc")
    if not libc:
        data = space.file_bytes(exe, 64 << 20) if exe else None
        info = elf_info(data) if data else None
        if info is not None and not info[0]:
            return AllocatorInfo("unknown", False, "statically linked executable: no libc.so.6 "
                                 "is mapped, so glibc's malloc state cannot be located")
        return AllocatorInfo("unknown", False, "no glibc (libc.so.6) is mapped in the process")
    return AllocatorInfo("glibc", True, libc_path=libc)
