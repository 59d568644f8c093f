"""One reader of ELF headers, for 64-bit little-endian files (x86-64, arm64),
from the bytes at the start of a file: its program headers (what attribution
needs for a library's segments, libs for its load span, heap for PT_INTERP)
and the names of the dynamic symbols it defines (heap: which library provides
malloc). Reads bytes only; callers open the files."""

from __future__ import annotations

import struct
from dataclasses import dataclass

PT_LOAD = 1
PT_INTERP = 3
PT_GNU_RELRO = 0x6474E552
PF_W = 2
SHT_DYNSYM = 11
_EHDR_SIZE = 64
_PHDR = struct.Struct("<IIQQQQQQ")      # Elf64_Phdr: 56 bytes
_SYM = struct.Struct("<IBBHQQ")         # Elf64_Sym: 24 bytes


@dataclass(frozen=True)
class ProgramHeader:
    type: int
    flags: int
    offset: int
    vaddr: int
    filesz: int
    memsz: int


def is_elf64le(data: bytes) -> bool:
    """A 64-bit little-endian ELF file's first bytes (its header at least)."""
    return len(data) >= _EHDR_SIZE and data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1


def program_headers(data: bytes) -> list[ProgramHeader] | None:
    """Every program header, in file order; None if data is not a 64-bit
    little-endian ELF file's start or does not hold the whole table."""
    if not is_elf64le(data):
        return None
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    if phentsize < _PHDR.size or phoff + phentsize * phnum > len(data):
        return None
    out = []
    for i in range(phnum):
        p_type, p_flags, off, vaddr, _pa, filesz, memsz, _al = _PHDR.unpack_from(
            data, phoff + i * phentsize)
        out.append(ProgramHeader(p_type, p_flags, off, vaddr, filesz, memsz))
    return out


def load_span(data: bytes) -> tuple[int, int] | None:
    """(lowest PT_LOAD p_vaddr, highest p_vaddr + p_memsz), in the file's own
    addresses; None if not such a file or it has no PT_LOAD."""
    loads = [h for h in program_headers(data) or () if h.type == PT_LOAD]
    if not loads:
        return None
    return min(h.vaddr for h in loads), max(h.vaddr + h.memsz for h in loads)


def defined_dynamic_symbols(data: bytes) -> set[bytes]:
    """Names of the symbols of SHT_DYNSYM that the file defines (st_shndx not
    SHN_UNDEF); empty if data does not hold the whole section header table
    (data is then cut short: the sections come at the end of the file)."""
    sections = _sections(data)
    return {name for sec in sections if sec.type == SHT_DYNSYM
            for name, _, shndx in _symbols(data, sections, sec) if shndx != 0}


SHT_RELA = 4
R_X86_64_64 = 1
R_X86_64_GLOB_DAT = 6
R_X86_64_JUMP_SLOT = 7
_RELA = struct.Struct("<QQq")           # Elf64_Rela: 24 bytes


@dataclass(frozen=True)
class _Section:
    type: int
    offset: int
    size: int
    link: int


def _sections(data: bytes) -> list[_Section]:
    """The section header table; empty if data does not hold all of it."""
    if not is_elf64le(data):
        return []
    shoff, = struct.unpack_from("<Q", data, 40)
    shentsize, shnum = struct.unpack_from("<HH", data, 58)
    if shoff == 0 or shentsize < 64 or shoff + shentsize * shnum > len(data):
        return []
    out = []
    for i in range(shnum):
        off = shoff + i * shentsize
        sh_type, = struct.unpack_from("<I", data, off + 4)
        sh_offset, sh_size = struct.unpack_from("<QQ", data, off + 24)
        sh_link, = struct.unpack_from("<I", data, off + 40)
        out.append(_Section(sh_type, sh_offset, sh_size, sh_link))
    return out


def _symbols(data: bytes, sections: list[_Section],
             symtab: _Section) -> list[tuple[bytes, int, int]]:
    """(name, st_value, st_shndx) of every symbol of a symbol table section."""
    if symtab.link >= len(sections):
        return []
    strs = sections[symtab.link]
    strtab = data[strs.offset:strs.offset + strs.size]
    out = []
    end = min(symtab.offset + symtab.size, len(data))
    for off in range(symtab.offset, end - _SYM.size + 1, _SYM.size):
        st_name, _, _, st_shndx, st_value, _ = _SYM.unpack_from(data, off)
        stop = strtab.find(b"\0", st_name)
        out.append((strtab[st_name:stop if stop >= 0 else len(strtab)], st_value, st_shndx))
    return out


def dynamic_symbol_values(data: bytes, names: set[bytes]) -> dict[bytes, int]:
    """st_value (the file's own address) of each of `names` the file defines in
    SHT_DYNSYM; a name defined twice (symbol versions) keeps its first value."""
    sections = _sections(data)
    out: dict[bytes, int] = {}
    for sec in sections:
        if sec.type != SHT_DYNSYM:
            continue
        for name, value, shndx in _symbols(data, sections, sec):
            if shndx != 0 and name in names and name not in out:
                out[name] = value
    return out


def symbol_slots(data: bytes, names: set[bytes]) -> list[tuple[int, bytes]]:
    """(r_offset, symbol name) of the relocations through which the file calls
    or takes the address of one of `names`: GLOB_DAT and JUMP_SLOT entries of
    the GOT, and absolute 64-bit words with no addend (x86-64). These are the
    slots the dynamic linker fills with the symbol's address, where an
    LD_PRELOADed definition would have been bound."""
    sections = _sections(data)
    out: list[tuple[int, bytes]] = []
    for sec in sections:
        if sec.type != SHT_RELA or sec.link >= len(sections):
            continue
        syms = _symbols(data, sections, sections[sec.link])
        end = min(sec.offset + sec.size, len(data))
        for off in range(sec.offset, end - _RELA.size + 1, _RELA.size):
            r_offset, r_info, r_addend = _RELA.unpack_from(data, off)
            kind, index = r_info & 0xFFFFFFFF, r_info >> 32
            if kind not in (R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT, R_X86_64_64):
                continue
            if r_addend != 0 or not 0 < index < len(syms):
                continue
            name = syms[index][0]
            if name in names:
                out.append((r_offset, name))
    return out
