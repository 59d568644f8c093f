"""memtrace.stacks.cfi on real ELF files: the row found for an address is the
row readelf decodes there, FDEs are decoded lazily and once, and the DWARF
expressions of PLT stubs and realigned frames evaluate."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from memtrace.stacks.cfi import RBP, RIP, RSP, Row, evaluate
from memtrace.stacks.modules import parse_module

from .helpers import HERE, ReadelfFde, readelf_fdes

LIBC = Path("/usr/lib/x86_64-linux-gnu/libc.so.6")
_REG = {"rsp": RSP, "rbp": RBP}


def _load(path: Path):
    with open(path, "rb") as f:
        module = parse_module(f)
    assert module is not None
    return module


def _cfa_text(row: Row) -> str:
    if row.cfa_expr is not None:
        return "exp"
    name = {RSP: "rsp", RBP: "rbp"}.get(row.cfa_reg, f"r{row.cfa_reg}")
    return f"{name}{row.cfa_offset:+d}"


def _rule_text(rule) -> str:
    if rule is None or rule[0] == "u":
        return "u"
    if rule[0] == "o":
        return f"c{rule[1]:+d}"
    if rule[0] == "r":
        return f"r{rule[1]}"
    return {"e": "exp", "ve": "vexp", "s": "s"}.get(rule[0], str(rule))


def assert_rows_match(module, fdes: list[ReadelfFde]) -> int:
    checked = 0
    for fde in fdes:
        for i, want in enumerate(fde.rows):
            end = fde.rows[i + 1].loc if i + 1 < len(fde.rows) else fde.end
            for pc in {want.loc, end - 1}:
                found = module.cfi(pc)
                assert found is not None, hex(pc)
                row, _signal = found
                where = f"pc {pc:#x} in FDE {fde.start:#x}..{fde.end:#x}"
                if want.cfa[:3] in _REG or want.cfa == "exp":
                    assert _cfa_text(row) == want.cfa, where
                else:            # a CFA over another register: kept, not usable here
                    assert row.cfa_reg not in (RSP, RBP) and row.cfa_expr is None, where
                assert _rule_text(row.ra) == want.cols.get("ra", "u"), where
                assert _rule_text(row.rbp) == want.cols.get("rbp", "u"), where
                checked += 1
    return checked


def test_rows_match_readelf_on_a_program_without_frame_pointers(prog):
    module = _load(prog)
    fdes = readelf_fdes(prog)
    assert len(module.eh_frame) == len(fdes)       # the .eh_frame_hdr index: every FDE
    assert assert_rows_match(module, [f for f in fdes if f.rows]) >= 10


def test_rows_match_readelf_on_a_sample_of_libc():
    if not LIBC.exists():
        pytest.skip("no Debian libc")
    module = _load(LIBC)
    fdes = [f for f in readelf_fdes(LIBC) if f.rows]
    assert len(module.eh_frame) >= len(fdes) > 1000
    sample = random.Random(13).sample(fdes, 150)
    # the FDEs with a signal frame or a CFA over an odd register are in libc too
    sample += [f for f in fdes if any(r.cfa[:3] not in ("rsp", "rbp") for r in f.rows)][:20]
    assert assert_rows_match(module, sample) > 300


def test_an_fde_is_decoded_once_and_only_when_looked_up(prog):
    module = _load(prog)
    table = module.eh_frame
    assert table._decoded == {}                     # nothing parsed at load
    fde = next(f for f in readelf_fdes(prog) if len(f.rows) > 2)
    for row in fde.rows:
        assert table.lookup(row.loc) is not None
    assert len(table._decoded) == 1
    first = table._decoded.copy()
    table.lookup(fde.rows[-1].loc)
    assert table._decoded == first and next(iter(table._decoded.values())) is \
        next(iter(first.values()))


def test_addresses_outside_every_fde_have_no_row(prog):
    module = _load(prog)
    fdes = sorted(readelf_fdes(prog), key=lambda f: f.start)
    assert module.cfi(fdes[0].start - 1) is None
    assert module.cfi(fdes[-1].end) is None
    gaps = [(a.end, b.start) for a, b in zip(fdes, fdes[1:]) if a.end < b.start]
    assert gaps, "prog.c's functions are padded apart"
    for lo, _hi in gaps:
        assert module.cfi(lo) is None


def test_debug_frame_is_used_when_there_is_no_eh_frame_entry(tmp_path):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "prog_dbg"
    subprocess.run(["cc", "-O2", "-fomit-frame-pointer", "-g", "-fno-asynchronous-unwind-tables",
                    "-o", str(exe), str(HERE / "prog.c")], check=True)
    module = _load(exe)
    assert module.debug_frame is not None and len(module.debug_frame) >= 3
    assert module.debug_frame._decoded == {}        # indexed from headers, nothing parsed
    dbg = readelf_fdes(exe, "frames-interp")
    inner = next(f for f in dbg if f.rows and module.symbols.lookup(f.start) and
                 module.symbols.lookup(f.start)[0] == "inner")
    assert module.eh_frame is None or module.eh_frame.lookup(inner.start) is None
    assert assert_rows_match(module, [inner]) >= 2


# -- DWARF expressions ----------------------------------------------------------------
def _no_memory(addr: int) -> int | None:
    return None


def test_the_plt_expression_gives_rsp_plus_8_then_16_after_the_push(prog):
    module = _load(prog)
    fde = next(f for f in readelf_fdes(prog) if any(r.cfa == "exp" for r in f.rows))
    pc = next(r.loc for r in fde.rows if r.cfa == "exp")
    row, _ = module.cfi(pc)
    assert row.cfa_expr is not None
    sp = 0x7FFC0000F000
    threshold = None
    for low in range(16):
        cfa = evaluate(row.cfa_expr, {RSP: sp, RBP: None, RIP: (pc & ~15) + low}, _no_memory)
        assert cfa in (sp + 8, sp + 16)
        if cfa == sp + 16 and threshold is None:
            threshold = low
    # GNU ld's lazy PLT entry: jmp *GOT (6 bytes), push $n (5 bytes), jmp .plt:
    # rsp + 8 until the push has run, rsp + 16 after it.
    assert threshold in (10, 11)


def test_expression_deref_reads_the_stack_copy_and_fails_outside_it():
    sp = 0x1000
    memory = {0x2000 - 8: 0x3000}
    read = memory.get
    realigned = bytes([0x76, 0x78, 0x06])          # DW_OP_breg6 -8; DW_OP_deref
    assert evaluate(realigned, {RBP: 0x2000, RSP: sp}, read) == 0x3000
    assert evaluate(realigned, {RBP: 0x2100, RSP: sp}, read) is None
    assert evaluate(realigned, {RBP: None, RSP: sp}, read) is None     # rbp unknown
    assert evaluate(bytes([0x7A, 0x00]), {RSP: sp}, read) is None       # breg10: not known
    assert evaluate(bytes([0xE0]), {RSP: sp}, read) is None             # unknown op
    # DW_CFA_expression rules push the CFA first: CFA + 0x10
    assert evaluate(bytes([0x23, 0x10]), {}, read, initial=0x500) == 0x510
    assert evaluate(bytes([0x08, 0xFF, 0x09, 0xFF, 0x22]), {}, read) == 0xFE   # 255 + -1


def test_eh_frame_without_its_index_is_parsed_whole_with_the_same_rows(prog):
    from elftools.elf.elffile import ELFFile

    from memtrace.stacks.cfi import CfiTable

    with open(prog, "rb") as f:
        sec = ELFFile(f).get_section_by_name(".eh_frame")
        data, addr = sec.data(), sec["sh_addr"]
    indexed, whole = _load(prog).eh_frame, CfiTable(data, addr, True, hdr=None)
    assert len(whole) == len(indexed)
    for fde in readelf_fdes(prog):
        for pc in (fde.start, fde.end - 1, fde.end):
            assert whole.lookup(pc) == indexed.lookup(pc), hex(pc)
