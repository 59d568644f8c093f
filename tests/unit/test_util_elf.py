"""memtrace.util.elf: the one ELF header reader, pinned to what the three
parsers it replaced returned (attribution.parse_elf_layout, libs.elf_load_span,
heap.elf_info; copied below as they were) on ELF files built here, cut short
at every length, and on the system's own binaries and libraries (read only)."""

from __future__ import annotations

import glob
import os
import struct

import pytest

from memtrace.heap.detect import elf_info
from memtrace.trace.attribution import ElfLayout, parse_elf_layout
from memtrace.util.elf import (
    PT_INTERP,
    PT_LOAD,
    defined_dynamic_symbols,
    is_elf64le,
    load_span,
    program_headers,
)

PT_GNU_RELRO = 0x6474E552
PF_W = 2


# -- the replaced parsers, as they were ------------------------------------------
def old_parse_elf_layout(head: bytes, page_size: int = 4096) -> ElfLayout | None:
    """Program headers of a 64-bit little-endian ELF file (its first bytes,
    enough to hold them); None for anything else."""
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    if phentsize < 56 or phoff + phentsize * phnum > len(head):
        return None
    loads: list[tuple[int, int, int, int]] = []   # flags, vaddr, filesz, memsz
    relro = None
    down = ~(page_size - 1)
    for i in range(phnum):
        p_type, p_flags, _off, vaddr, _pa, filesz, memsz, _al = struct.unpack_from(
            "<IIQQQQQQ", head, phoff + i * phentsize)
        if p_type == PT_LOAD:
            loads.append((p_flags, vaddr, filesz, memsz))
        elif p_type == PT_GNU_RELRO and memsz:
            # glibc's _dl_protect_relro: both ends rounded down to a page
            relro = (vaddr & down, (vaddr + memsz) & down)
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



def old_elf_load_span(data: bytes) -> tuple[int, int] | None:
    """(lowest PT_LOAD p_vaddr, highest p_vaddr + p_memsz) of a 64-bit
    little-endian ELF file's program headers, or None if it is not one."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    lo, hi = None, None
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 56 > len(data):
            return None
        p_type, _, _, p_vaddr, _, _, p_memsz, _ = struct.unpack_from("<IIQQQQQQ", data, off)
        if p_type == 1:     # PT_LOAD
            lo = p_vaddr if lo is None else min(lo, p_vaddr)
            hi = p_vaddr + p_memsz if hi is None else max(hi, p_vaddr + p_memsz)
    return None if lo is None or hi is None else (lo, hi)



def old_elf_info(data: bytes) -> tuple[bool, set[bytes]] | None:
    """(has PT_INTERP, names of defined dynamic symbols) of an ELF64 LE file's
    header-and-section prefix; None if not such a file or the tables are cut off."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    phoff, shoff = struct.unpack_from("<QQ", data, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
    interp = False
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 <= len(data) and struct.unpack_from("<I", data, off)[0] == 3:
            interp = True
    names: set[bytes] = set()
    sections = []
    for i in range(shnum):
        off = shoff + i * shentsize
        if off + 64 > len(data):
            return interp, names
        sh_type, = struct.unpack_from("<I", data, off + 4)
        sh_offset, sh_size = struct.unpack_from("<QQ", data, off + 24)
        sh_link, = struct.unpack_from("<I", data, off + 40)
        sections.append((sh_type, sh_offset, sh_size, sh_link))
    for sh_type, sh_offset, sh_size, sh_link in sections:
        if sh_type != 11 or sh_link >= len(sections):  # SHT_DYNSYM
            continue
        _, str_off, str_size, _ = sections[sh_link]
        strtab = data[str_off:str_off + str_size]
        for off in range(sh_offset, min(sh_offset + sh_size, len(data)) - 23, 24):
            st_name, _, _, st_shndx = struct.unpack_from("<IBBH", data, off)
            if st_shndx != 0 and st_name < len(strtab):
                end = strtab.find(b"\0", st_name)
                names.add(strtab[st_name:end if end >= 0 else len(strtab)])
    return interp, names



# -- ELF files built here ----------------------------------------------------------
def build_elf(phdrs, symbols=(), interp=False):
    """An ELF64 LE file: program headers (type, flags, offset, vaddr, filesz,
    memsz), a PT_INTERP if asked, and a .dynsym/.dynstr defining `symbols`
    (name, defined) after them, with the section header table at the end."""
    phdrs = list(phdrs) + ([(PT_INTERP, 4, 0, 0, 0, 0)] if interp else [])
    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x01"
    ph = b"".join(struct.pack("<IIQQQQQQ", t, f, o, va, va, fs, ms, 0x1000)
                  for t, f, o, va, fs, ms in phdrs)
    strtab = bytearray(b"\0")
    syms = bytearray(24)                                  # symbol 0: null
    for name, defined in symbols:
        syms += struct.pack("<IBBHQQ", len(strtab), 0x12, 0, 12 if defined else 0, 0, 0)
        strtab += name + b"\0"
    body = bytes(head) + ph
    dynsym_off = len(body)
    body += bytes(syms)
    dynstr_off = len(body)
    body += bytes(strtab)
    shoff = (len(body) + 7) & ~7
    body += bytes(shoff - len(body))
    sh = bytes(64)                                        # section 0: null
    sh += struct.pack("<IIQQQQIIQQ", 0, 11, 0, 0, dynsym_off, len(syms), 2, 1, 8, 24)
    sh += struct.pack("<IIQQQQIIQQ", 0, 3, 0, 0, dynstr_off, len(strtab), 0, 0, 1, 0)
    out = bytearray(body + sh)
    struct.pack_into("<QQ", out, 32, 64, shoff)
    struct.pack_into("<HHHH", out, 54, 56, len(phdrs), 64, 3)
    return bytes(out)


LIB = [(PT_LOAD, 4, 0, 0, 0x800, 0x800),
       (PT_LOAD, 5, 0x1000, 0x1000, 0x2000, 0x2000),
       (PT_LOAD, 6, 0x3E10, 0x4E10, 0x1200, 0x5000),
       (PT_GNU_RELRO, 4, 0x3E10, 0x4E10, 0x1F0, 0x1F0)]
BUILT = [
    build_elf(LIB, [(b"malloc", True), (b"free", True), (b"printf", False)]),
    build_elf(LIB, interp=True),
    build_elf([(PT_LOAD, 5, 0, 0x400000, 0x1234, 0x1234)], interp=True),
    build_elf([(PT_GNU_RELRO, 4, 0, 0, 0x10, 0x10)]),      # no PT_LOAD
    build_elf([(PT_LOAD, 6, 0x2000, 0x3000, 0x10, 0x10),   # not in address order
               (PT_LOAD, 5, 0, 0x1000, 0x100, 0x100)]),
    build_elf([]),
]


def system_files():
    paths = ["/bin/true", "/usr/lib/x86_64-linux-gnu/libc.so.6", "/proc/self/exe"]
    paths += sorted(glob.glob("/usr/lib/x86_64-linux-gnu/*.so*"))[:40]
    paths += sorted(glob.glob("/usr/bin/*"))[:40]
    out = []
    for p in paths:
        try:
            if os.path.isfile(p) and os.path.getsize(p) <= 64 << 20:
                with open(p, "rb") as f:
                    out.append(f.read())
        except OSError:
            continue
    return out


def test_built_files_decode():
    lib = BUILT[0]
    assert is_elf64le(lib) and not is_elf64le(b"\x7fELF\x01\x01" + bytes(58))
    assert [h.type for h in program_headers(lib)] == [PT_LOAD] * 3 + [PT_GNU_RELRO]
    assert program_headers(lib)[2].memsz == 0x5000
    assert load_span(lib) == (0, 0x4E10 + 0x5000)
    assert defined_dynamic_symbols(lib) == {b"malloc", b"free"}
    assert elf_info(lib) == (False, {b"malloc", b"free"})
    assert elf_info(BUILT[1]) == (True, set())
    assert parse_elf_layout(lib, 4096) == ElfLayout(first_vaddr=0, relro=(0x4000, 0x5000),
                                                   bss=(0x7000, 0xA000))
    assert load_span(BUILT[4]) == (0x1000, 0x3010)
    assert load_span(BUILT[3]) is None and load_span(b"not an elf") is None


@pytest.mark.parametrize("page", [4096, 16384])
def test_same_as_the_old_parsers_on_built_files_cut_anywhere(page):
    for data in BUILT:
        for n in range(len(data) + 1):
            head = data[:n]
            assert parse_elf_layout(head, page) == old_parse_elf_layout(head, page), n
            assert load_span(head) == old_elf_load_span(head), n
        assert elf_info(data) == old_elf_info(data)


def test_same_as_the_old_parsers_on_the_systems_files():
    files = system_files()
    assert len(files) >= 3
    elves = 0
    for data in files:
        elves += is_elf64le(data)
        for n in (4096, 16384, len(data)):      # what libs and attribution read
            head = data[:n]
            assert parse_elf_layout(head) == old_parse_elf_layout(head)
            assert load_span(head) == old_elf_load_span(head)
        assert elf_info(data) == old_elf_info(data)
    assert elves >= 3


def test_libc_defines_malloc():
    with open("/usr/lib/x86_64-linux-gnu/libc.so.6", "rb") as f:
        data = f.read()
    _, names = elf_info(data)
    assert b"malloc" in names and b"free" in names
    with open("/bin/true", "rb") as f:
        assert elf_info(f.read())[0] is True        # dynamically linked: has PT_INTERP
