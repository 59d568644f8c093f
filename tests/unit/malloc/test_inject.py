"""`watch --malloc` without root (memtrace/malloc/inject.py): the ELF reading
that finds the GOT slots, the choice of a thread, the slots planned in this
very process, and the sampler's function that stores them (shim.c)."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from memtrace.malloc.borrow import DATA, _is_safe, _Regs, candidate_rank
from memtrace.malloc.inject import (
    INTERPOSED,
    RELEASERS,
    SLOTS_PER_CALL,
    _objects,
    _setter_calls,
    _slot_table,
    plan_slots,
)
from memtrace.malloc.shim import build_shim
from memtrace.trace.procfs import ProcFS, Vma
from memtrace.util.elf import dynamic_symbol_values, symbol_slots

CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None or shutil.which("readelf") is None,
                              reason="no C compiler or readelf")


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if CC is None:
        pytest.skip("no C compiler")
    cache = tmp_path_factory.mktemp("shim-cache")
    return build_shim({"PATH": os.environ.get("PATH", os.defpath),
                       "MEMTRACE_CACHE_DIR": str(cache)})


@needs_cc
def test_symbol_slots_are_the_relocations_readelf_lists(tmp_path: Path):
    src = tmp_path / "lib.c"
    src.write_text("#include <stdlib.h>\n"
                   "void *(*keep)(size_t) = malloc;\n"              # an address taken: GLOB_DAT
                   "void *f(size_t n) { return calloc(1, n); }\n"
                   "void g(void *p) { free(p); }\n")
    lib = tmp_path / "lib.so"
    subprocess.run([CC, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    listed = subprocess.run(["readelf", "-rW", str(lib)], capture_output=True, text=True,
                            check=True).stdout
    expected = set()
    for line in listed.splitlines():
        m = re.match(r"\s*([0-9a-f]+)\s+\S+\s+R_X86_64_(GLOB_DAT|JUMP_SLOT|64)\s+\S+\s+"
                     r"(malloc|free|calloc)@\S+ \+ 0$", line)
        if m:
            expected.add((int(m.group(1), 16), m.group(3).encode()))
    got = set(symbol_slots(lib.read_bytes(), set(INTERPOSED)))
    assert got == expected and {n for _, n in got} == {b"malloc", b"free", b"calloc"}


@needs_cc
def test_dynamic_symbol_values_are_readelfs(shim: Path):
    listed = subprocess.run(["readelf", "-sW", "--dyn-syms", str(shim)], capture_output=True,
                            text=True, check=True).stdout
    want = {m.group(2).encode(): int(m.group(1), 16) for m in re.finditer(
        r":\s+([0-9a-f]+)\s+\d+\s+\w+\s+GLOBAL\s+DEFAULT\s+\d+\s+(malloc|free|"
        r"memtrace_malloc_interpose)\n", listed)}
    assert len(want) == 3
    assert dynamic_symbol_values(shim.read_bytes(), set(want)) == want


@needs_cc
def test_the_sampler_stores_a_slot_only_where_it_holds_the_expected_value(shim: Path):
    lib = ctypes.CDLL(str(shim), mode=os.RTLD_LOCAL)   # local: interposes nothing here
    words = (ctypes.c_uint64 * 3)(1, 2, 3)
    base = ctypes.addressof(words)
    table = _slot_table([(base, 1, 10, -1), (base + 8, 99, 20, -1), (base + 16, 3, 30, -1)])
    buf = ctypes.create_string_buffer(table, len(table))
    fn = lib.memtrace_malloc_interpose
    fn.argtypes = (ctypes.c_long, ctypes.c_void_p, ctypes.c_long)
    fn.restype = ctypes.c_long
    assert fn(65536, buf, 3) == 2
    assert list(words) == [10, 2, 30]           # the second had changed: left alone
    assert ctypes.c_long.in_dll(lib, "memtrace_malloc_period").value == 65536
    assert fn(0, buf, 3) == 0                   # stored already: nothing expected is there
    assert ctypes.c_long.in_dll(lib, "memtrace_malloc_period").value == 65536


def test_candidate_rank_prefers_threads_that_see_nothing():
    assert candidate_rank(b"running\n", b"0") == 0
    assert candidate_rank(b"0 0x3 0x7ff 0x1 0x0 0x0 0x0 0x7ffd 0x7f12\n", b"pipe_read") == 1
    assert candidate_rank(b"232 0x4 0x7ff 0x40 0xffffffff 0x0 0x0 0x7ffd 0x7f\n",
                          b"ep_poll") == 2             # epoll_wait: EINTR after a stop
    assert candidate_rank(b"202 0x5 0x80 0x2 0x0 0x0 0x0 0x7ffd 0x7f\n", b"futex_do_wait") is None
    assert candidate_rank(b"9 0x0 0x1000 0x3 0x22 0xffffffff 0x0 0x7ffd 0x7f\n", b"0") is None
    assert candidate_rank(b"219 0x0 0x0 0x0 0x0 0x0 0x0 0x7ffd 0x7f\n", b"hrtimer_nanosleep") == 1
    assert candidate_rank(b"219 0x0 0x0 0x0 0x0 0x0 0x0 0x7ffd 0x7f\n", b"futex_do_wait") is None
    assert candidate_rank(b"-1 0x7ffd 0x7f\n", b"0") is None


def test_a_stopped_thread_is_safe_outside_libc_or_in_a_safe_system_call(tmp_path: Path):
    libc = [(0x7F0000000000, 0x7F0000100000)]
    wchan = tmp_path / "wchan"
    wchan.write_bytes(b"futex_do_wait")
    regs = _Regs()
    regs.orig_rax = (1 << 64) - 1               # stopped in user code
    regs.rip = 0x7F0000000500
    assert not _is_safe(regs, libc, wchan)      # inside libc: maybe inside malloc
    regs.rip = 0x555555554000
    assert _is_safe(regs, libc, wchan)
    regs.rip = 0x7F0000000500
    regs.orig_rax = 0                           # blocked in read()
    assert _is_safe(regs, libc, wchan)
    regs.orig_rax = 202                         # futex: maybe malloc's lock
    assert not _is_safe(regs, libc, wchan)
    regs.orig_rax = 219                         # restart_syscall of a futex wait
    assert not _is_safe(regs, libc, wchan)
    wchan.write_bytes(b"hrtimer_nanosleep")
    assert _is_safe(regs, libc, wchan)


def _libc_range(pid: int) -> tuple[int, int]:
    spans = [[int(x, 16) for x in line.split()[0].split("-")] for line in
             Path(f"/proc/{pid}/maps").read_text().splitlines() if line.endswith("/libc.so.6")]
    return min(s for s, _ in spans), max(e for _, e in spans)


def _libc_definitions(pid: int, names: tuple[str, ...]) -> dict[bytes, int]:
    """Where libc's own malloc and free are in pid, from readelf and maps (not
    dlsym: in a non-PIE program it gives the program's PLT stub)."""
    path, base = next((line.split()[5], int(line.split("-")[0], 16)) for line in
                      Path(f"/proc/{pid}/maps").read_text().splitlines()
                      if line.endswith("/libc.so.6") and line.split()[2] == "00000000")
    syms = subprocess.run(["readelf", "-sW", "--dyn-syms", path], capture_output=True,
                          text=True, check=True).stdout
    out = {}
    for name in names:
        m = re.search(rf":\s+([0-9a-f]+)\s+\d+\s+FUNC\s+GLOBAL\s+DEFAULT\s+\d+\s+{name}@@", syms)
        assert m, name
        out[name.encode()] = base + int(m.group(1), 16)
    return out


@pytest.mark.skipif(shutil.which("readelf") is None, reason="no readelf")
def test_slots_planned_in_this_process_hold_glibcs_functions_frees_first():
    """This Python process calls malloc and free through GOT slots (its
    executable's, libc's own): each planned slot holds glibc's function now."""
    procfs = ProcFS()
    pid = os.getpid()
    fake = {name: 0x1000 + 16 * i for i, name in enumerate(INTERPOSED)}
    plan = plan_slots(procfs, pid, procfs.maps(pid), b"/nonexistent", fake)
    slots, skipped, objects = plan.slots, plan.skipped, plan.objects
    assert plan.allocator is None and plan.allocator_funcs == {}    # glibc's malloc
    glibc = _libc_definitions(pid, ("malloc", "free"))
    by_value = {v: k for k, v in fake.items()}
    names = [by_value[s.value] for s in slots]
    assert b"malloc" in names and b"free" in names and skipped == 0
    # glibc's function, or (bound lazily, not called yet) the object's own PLT
    # code, never anything else in libc
    libc_lo, libc_hi = _libc_range(pid)
    for s, name in zip(slots, names, strict=True):
        if name in glibc:
            assert s.old == glibc[name] or not libc_lo <= s.old < libc_hi, name
    for name, there in glibc.items():
        assert any(s.old == there for s, n in zip(slots, names, strict=True) if n == name)
    first_allocator = next(i for i, n in enumerate(names) if n not in RELEASERS)
    assert all(n not in RELEASERS for n in names[first_allocator:])
    assert any(path.endswith(b"/libc.so.6") for path, _ in objects)


def test_slot_tables_are_cut_into_calls_that_stay_near_the_stack_pointer():
    rows = [(0x1000 + 8 * i, 1, 2, -1) for i in range(SLOTS_PER_CALL * 2 + 3)]
    calls = _setter_calls(0xABC, 4096, rows, 2000)
    assert [c[1][2] for c in calls] == [SLOTS_PER_CALL, SLOTS_PER_CALL, 3]
    assert all(fn == 0xABC and args[0] == 4096 and args[1] is DATA and args[3] == 2000
               for fn, args, _ in calls)
    assert all(args[3] == -1 for _, args, _ in _setter_calls(0xABC, 0, rows))   # left as is
    assert b"".join(table for _, _, table in calls) == _slot_table(rows)
    assert max(len(table) for _, _, table in calls) <= 512


def test_only_files_with_code_are_objects():
    def vma(start: int, perms: str, offset: int, path: bytes) -> Vma:
        return Vma(start, start + 0x1000, perms, offset, "08:01", 7, path)

    vmas = [vma(0x1000, "r--p", 0, b"/usr/lib/libz.so.1"),
            vma(0x2000, "r-xp", 0x1000, b"/usr/lib/libz.so.1"),
            vma(0x9000, "rw-s", 0, b"/var/lib/db/data.mdb"),    # a database, mapped whole
            vma(0xA000, "r--p", 0, b"[vdso]")]
    assert list(_objects(vmas)) == [b"/usr/lib/libz.so.1"]


@pytest.mark.skipif(shutil.which("readelf") is None, reason="no readelf")
def test_later_plans_keep_the_allocator_told_at_attach():
    """extend() plans the slots of libraries loaded after attach with the
    allocator the sampler was told then, not one decided again (a library
    dlopened later may define malloc too)."""
    from memtrace.malloc.inject import Interposition
    procfs = ProcFS()
    pid = os.getpid()
    fake = {name: 0x1000 + 16 * i for i, name in enumerate(INTERPOSED)}
    here = plan_slots(procfs, pid, procfs.maps(pid), b"/nonexistent", fake)
    attached = Interposition(pid, 0, fake, 0, [], set(), allocator=b"/lib/other-malloc.so")
    later = plan_slots(procfs, pid, procfs.maps(pid), b"/nonexistent", fake, attached=attached)
    assert later.allocator == b"/lib/other-malloc.so" and later.allocator_funcs == {}
    assert [s.addr for s in later.slots] == [s.addr for s in here.slots]
