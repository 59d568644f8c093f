"""memtrace.trace.attribution: segments of loaded objects (text, rodata, relro, data,
bss, gap) on fixture maps, with and without the ELF layout."""

from __future__ import annotations

import struct
from pathlib import Path

from memtrace.trace.attribution import (
    ElfLayout,
    ElfLayouts,
    Segment,
    name_segments,
    parse_elf_layout,
    segments_for,
)
from memtrace.trace.procfs import Vma, parse_maps

FIXTURES = Path(__file__).parent / "fixtures"
EXE = b"/usr/bin/my prog"
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
PLUG = "/opt/app/plugin.so (deleted)"


def load(name: str = "maps_segments") -> list[Vma]:
    return parse_maps((FIXTURES / name).read_bytes())


def names(vmas: list[Vma], segs: dict[int, Segment]) -> list[str | None]:
    return [segs[v.start].name if v.start in segs else None for v in vmas]


def test_fixture_segments_without_elf():
    vmas = load()
    segs = name_segments(vmas, EXE)
    assert names(vmas, segs) == [
        # executable: headers/rodata, text, rodata, relro, data, bss; then [heap]
        "rodata", "text", "rodata", "relro", "data", "bss", None,
        # an anonymous mapping (no library before it), libc with relro and bss
        None, "rodata", "text", "rodata", "relro", "data", "bss",
        # libffi: no bss (a file follows its data)
        "rodata", "text", "rodata", "relro", "data", None,
        # plugin.so (deleted), loaded twice, with ---p gaps
        "rodata", "gap", "text", "gap", "relro", "data", "bss",
        "rodata", "gap", "text", "gap", "relro", "data", "bss",
        # libdummy before ld.so's mprotect: RELRO not split off the data yet
        "rodata", "text", "rodata", "data", "bss",
        # a page of libc mapped on its own (not a load), the stack
        None, None,
    ]


def test_bss_counts_toward_its_owner():
    vmas = load()
    segs = name_segments(vmas, EXE)
    by_start = {v.start: v for v in vmas}
    bss = [(by_start[s], g) for s, g in segs.items() if g.name == "bss"]
    assert len(bss) == 5
    for vma, _g in bss:
        assert vma.path == b"" and vma.perms == "rw-p"
    owners = sorted((g.kind, g.mapping) for _, g in bss)
    assert owners == [("executable", EXE.decode()), ("library", PLUG), ("library", PLUG),
                      ("library", "/tmp/libdummy.so"), ("library", LIBC)]
    # every segment of one object has the object's identity
    assert {g.mapping for s, g in segs.items() if by_start[s].path == LIBC.encode()} == {LIBC}


def test_library_mapped_twice_is_two_instances():
    vmas = load()
    segs = name_segments(vmas, EXE)
    firsts = [v for v in vmas if v.path == PLUG.encode() and v.offset == 0]
    assert len(firsts) == 2
    assert all(segs[v.start] == Segment("rodata", "library", PLUG) for v in firsts)


def test_relro_split_by_mprotect():
    """Before ld.so's mprotect the RELRO part is inside the rw- data VMA; after
    it, the r-- piece directly below the data (address and file offset) is relro."""
    lib = b"/tmp/libdummy.so"
    before = [Vma(0x10000, 0x11000, "r--p", 0, "fe:00", 8, lib),
              Vma(0x11000, 0x12000, "r-xp", 0x1000, "fe:00", 8, lib),
              Vma(0x12000, 0x33000, "r--p", 0x2000, "fe:00", 8, lib),
              Vma(0x33000, 0x65000, "rw-p", 0x22000, "fe:00", 8, lib),
              Vma(0x65000, 0xC5000, "rw-p", 0, "00:00", 0, b"")]
    after = before[:3] + [Vma(0x33000, 0x34000, "r--p", 0x22000, "fe:00", 8, lib),
                          Vma(0x34000, 0x65000, "rw-p", 0x23000, "fe:00", 8, lib),
                          before[4]]
    assert names(before, name_segments(before, b"")) == [
        "rodata", "text", "rodata", "data", "bss"]
    assert names(after, name_segments(after, b"")) == [
        "rodata", "text", "rodata", "relro", "data", "bss"]


def test_elf_layout_decides_relro_and_bss():
    """With program headers: relro is what PT_GNU_RELRO covers, and an
    anonymous VMA longer than the bss (merged by the kernel with a later
    anonymous mapping) stays [anon]."""
    lib = b"/usr/lib/libx.so.1"
    base = 0x7F0000000000
    vmas = [Vma(base, base + 0x1000, "r--p", 0, "fe:00", 9, lib),
            Vma(base + 0x1000, base + 0x3000, "r-xp", 0x1000, "fe:00", 9, lib),
            Vma(base + 0x3000, base + 0x4000, "r--p", 0x3000, "fe:00", 9, lib),
            Vma(base + 0x4000, base + 0x5000, "rw-p", 0x4000, "fe:00", 9, lib),
            Vma(base + 0x5000, base + 0x9000, "rw-p", 0, "00:00", 0, b"")]
    no_relro = ElfLayout(first_vaddr=0, relro=None, bss=(0x5000, 0x7000))
    segs = name_segments(vmas, b"", lambda v: no_relro)
    # no PT_GNU_RELRO: the r-- below the data is rodata, and the anonymous
    # VMA is 0x4000 long where the bss is 0x2000: not the bss
    assert names(vmas, segs) == ["rodata", "text", "rodata", "data", None]
    fits = ElfLayout(first_vaddr=0, relro=(0x3000, 0x4000), bss=(0x5000, 0x9000))
    assert names(vmas, name_segments(vmas, b"", lambda v: fits)) == [
        "rodata", "text", "relro", "data", "bss"]
    no_bss = ElfLayout(first_vaddr=0, relro=(0x3000, 0x4000), bss=None)
    assert names(vmas, name_segments(vmas, b"", lambda v: no_bss))[-1] is None


def _elf(phdrs: list[tuple[int, int, int, int, int, int]]) -> bytes:
    """A minimal ELF64 LE header with program headers (type, flags, offset,
    vaddr, filesz, memsz)."""
    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", head, 32, 64)
    struct.pack_into("<HH", head, 54, 56, len(phdrs))
    body = b"".join(struct.pack("<IIQQQQQQ", t, f, o, va, va, fs, ms, 0x1000)
                    for t, f, o, va, fs, ms in phdrs)
    return bytes(head) + body


def test_parse_elf_layout():
    head = _elf([(1, 4, 0, 0, 0x800, 0x800),
                 (1, 5, 0x1000, 0x1000, 0x2000, 0x2000),
                 (1, 6, 0x3E10, 0x4E10, 0x1200, 0x5000),
                 (0x6474E552, 4, 0x3E10, 0x4E10, 0x1F0, 0x1F0)])
    lay = parse_elf_layout(head, 4096)
    assert lay == ElfLayout(first_vaddr=0, relro=(0x4000, 0x5000), bss=(0x7000, 0xA000))
    assert parse_elf_layout(b"not an elf file" * 8) is None
    assert parse_elf_layout(head[:70]) is None           # program headers cut off
    assert parse_elf_layout(_elf([(0x6474E552, 4, 0, 0, 0x10, 0x10)])) is None  # no PT_LOAD


def test_real_libc_layout_names_its_segments():
    """This process's own libc, read through /proc/self/map_files like memtrace does."""
    import os

    from memtrace.trace.procfs import ProcFS

    pid = os.getpid()
    vmas = ProcFS().maps(pid)
    layouts = ElfLayouts()
    segs = name_segments(vmas, ProcFS().exe(pid), lambda v: layouts(pid, v))
    libc = [v for v in vmas if v.path.endswith(b"/libc.so.6")]
    if not libc:
        return
    got = [segs[v.start].name for v in libc]
    assert got[:2] == ["rodata", "text"] and "data" in got
    if "relro" in got:
        i = got.index("relro")
        assert libc[i].end == libc[i + 1].start and got[i + 1] == "data"


def test_segments_for_is_cached_per_list(tmp_path):
    class Owner:
        pass

    vmas = load()
    o = Owner()
    a = segments_for(o, vmas, EXE, 1, tmp_path)
    assert segments_for(o, vmas, EXE, 1, tmp_path) is a
    assert segments_for(o, list(vmas), EXE, 1, tmp_path) is not a
