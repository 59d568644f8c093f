"""memtrace.stacks.symbols: function symbols of real ELF files (compared with
nm), the fallbacks of stripped files, and batched C++ demangling."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from memtrace.stacks import modules as modules_mod
from memtrace.stacks.modules import parse_module
from memtrace.stacks.symbols import Demangler, SymbolTable

from .helpers import nm_functions

LIBC = Path("/usr/lib/x86_64-linux-gnu/libc.so.6")


def _load(path: Path):
    with open(path, "rb") as f:
        module = parse_module(f)
    assert module is not None
    return module


def test_symtab_names_each_function_over_its_whole_body(prog):
    table = _load(prog).symbols
    funcs = nm_functions(prog)
    for name in ("inner", "outer", "main"):
        addr, size = funcs[name]
        assert size > 0
        for pc in (addr, addr + size // 2, addr + size - 1):
            assert table.lookup(pc) == (name, addr), (name, hex(pc))
        after = table.lookup(addr + size)
        assert after is None or after[0] != name


def test_dynsym_of_libc_matches_nm(monkeypatch):
    if not LIBC.exists():
        pytest.skip("no Debian libc")
    monkeypatch.setattr(modules_mod, "DEBUG_ROOT", "/nonexistent")   # .dynsym only
    table = _load(LIBC).symbols
    funcs = nm_functions(LIBC, dynamic=True)
    by_addr: dict[int, set[str]] = {}
    for name, (addr, _size) in funcs.items():
        by_addr.setdefault(addr, set()).add(name)
    sample = random.Random(7).sample(sorted(funcs.items()), 200)
    for name, (addr, size) in sample:
        found = table.lookup(addr + max(size - 1, 0))
        assert found is not None, name
        assert found[1] == addr and found[0] in by_addr[addr], (name, found)
    assert table.lookup(0x10) is None


def test_libc_debug_symbols_come_from_the_build_id_file():
    if not LIBC.exists():
        pytest.skip("no Debian libc")
    module = _load(LIBC)
    debug = Path(modules_mod.DEBUG_ROOT, module.build_id[:2], module.build_id[2:] + ".debug")
    if not debug.exists():
        pytest.skip("libc6-dbg not installed")
    names = set(module.symbols.names)
    assert b"__libc_start_call_main" in names        # a local symbol: not in .dynsym


def test_a_stripped_program_falls_back_to_dynsym(prog, tmp_path):
    if shutil.which("strip") is None:
        pytest.skip("no strip")
    stripped = tmp_path / "stripped"
    subprocess.run(["strip", "-o", str(stripped), str(prog)], check=True)
    module = _load(stripped)
    addr, _ = nm_functions(prog)["inner"]
    assert module.symbols.lookup(addr) is None or module.symbols.lookup(addr)[0] != "inner"
    assert module.eh_frame is not None and module.cfi(addr) is not None   # CFI is kept


def test_aliases_prefer_global_then_fewer_underscores():
    import struct
    strtab = b"\0__libc_read\0read\0__read\0local_one\0f@@GLIBC_2.34\0"

    def sym(name_off: int, bind: int, value: int, size: int) -> bytes:
        return struct.pack("<IBBHQQ", name_off, (bind << 4) | 2, 0, 1, value, size)

    data = (sym(1, 0, 0x100, 16) + sym(13, 2, 0x100, 16) + sym(18, 1, 0x100, 16)
            + sym(25, 0, 0x200, 0) + sym(25, 0, 0x300, 8) + sym(35, 1, 0x400, 4))
    table = SymbolTable.from_elf(data, strtab)
    assert table.lookup(0x10F) == ("__read", 0x100)   # the global one
    assert table.lookup(0x110) is None
    assert table.lookup(0x2FF) == ("local_one", 0x200)    # size 0: up to the next symbol
    assert table.lookup(0x308) is None
    assert table.lookup(0x401) == ("f", 0x400)           # version suffix dropped


def test_demangling_runs_one_process_per_batch():
    d = Demangler()
    if d.command is None:
        pytest.skip("no c++filt")
    names = ["_ZN8memtrace5stackEv", "_ZNSt6vectorIiSaIiEE9push_backERKi", "plain_c", "_Z3fooi"]
    d.prepare(names)
    assert d.runs == 1
    assert d("_ZN8memtrace5stackEv") == "memtrace::stack()"
    assert d("_Z3fooi") == "foo(int)"
    assert d("_ZNSt6vectorIiSaIiEE9push_backERKi").startswith("std::vector<int")
    assert d("plain_c") == "plain_c"
    d.prepare(names)
    assert d.runs == 1                                   # all known: no process
    assert d("_ZN1a1bEv") == "a::b()" and d.runs == 2    # a new name alone: one more


def test_without_cplusfilt_names_stay_mangled():
    d = Demangler(command="no-such-c++filt-here")
    assert d("_ZN8memtrace5stackEv") == "_ZN8memtrace5stackEv" and d.runs == 0


def test_load_bias_uses_the_segment_the_vma_maps():
    from memtrace.stacks.modules import Module
    from memtrace.trace.procfs import Vma
    from memtrace.util.elf import ProgramHeader

    # an old layout: text and data share the file page at 0x1000
    loads = [ProgramHeader(1, 5, 0, 0, 0x1234, 0x1234),
             ProgramHeader(1, 6, 0x1E10, 0x201E10, 0x200, 0x400)]
    m = Module(loads, None, SymbolTable.empty())
    text = Vma(0x400000, 0x402000, "r-xp", 0, "fe:00", 5, b"/x")
    data = Vma(0x601000, 0x602000, "rw-p", 0x1000, "fe:00", 5, b"/x")
    assert m.bias(text) == 0x400000
    assert m.bias(data) == 0x601000 - 0x1000 - (0x201E10 - 0x1E10)
    assert m.bias(Vma(0x700000, 0x701000, "r-xp", 0x9000, "fe:00", 5, b"/x")) is None
