"""memtrace.stacks.unwind.Unwinder on a stack built by hand for prog.c's real
CFI (as readelf decodes it): main -> outer -> inner, the file opened through a
fake /proc/PID/root, no process involved. Checks the walk's arithmetic, where
it stops cleanly and where it truncates."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from memtrace.stacks.profile import TRUNCATED
from memtrace.stacks.unwind import Unwinder, _Check
from memtrace.trace.procfs import Vma
from memtrace.util.elf import PT_LOAD, program_headers

from .helpers import nm_functions, readelf_fdes

PID = 4242
BIAS = 0x555555554000
STACK_TOP = 0x7FFC00100000


def _fake_proc(tmp_path: Path) -> str:
    root = tmp_path / "proc"
    (root / str(PID)).mkdir(parents=True)
    os.symlink("/", root / str(PID) / "root")
    return str(root)


def _vmas(exe: Path) -> list[Vma]:
    st = os.stat(exe)
    out = []
    for h in program_headers(exe.read_bytes()) or ():
        if h.type != PT_LOAD:
            continue
        perms = "r-xp" if h.flags & 1 else "r--p"
        start = BIAS + (h.vaddr & ~0xFFF)
        end = BIAS + ((h.vaddr + h.filesz + 0xFFF) & ~0xFFF)
        out.append(Vma(start, end, perms, h.offset & ~0xFFF, "fe:01", st.st_ino,
                       os.fsencode(exe)))
    out.append(Vma(0x7F0000000000, 0x7F0000010000, "rwxp", 0, "00:00", 0, b""))  # JIT-like
    out.append(Vma(STACK_TOP - 0x21000, STACK_TOP, "rw-p", 0, "00:00", 0, b"[stack]"))
    return out


def _body_row(prog: Path, name: str) -> tuple[int, int]:
    """(pc, CFA offset from rsp) in the body of a function: its row with the
    largest rsp-based CFA (after the prologue, before the epilogue)."""
    addr, _ = nm_functions(prog)[name]
    fde = next(f for f in readelf_fdes(prog) if f.start == addr)
    best = max((r for r in fde.rows if r.cfa.startswith("rsp+")),
               key=lambda r: int(r.cfa[4:]))
    return best.loc, int(best.cfa[4:])


class Frames:
    """A stack copy for leaf inner -> outer -> main -> (return address 0)."""

    def __init__(self, prog: Path) -> None:
        self.pcs, offsets = {}, {}
        for name in ("inner", "outer", "main"):
            self.pcs[name], offsets[name] = _body_row(prog, name)
        self.sp = STACK_TOP - 0x8000
        mem: dict[int, int] = {}
        cfa = self.sp
        self.cfas = []
        for name, caller in (("inner", "outer"), ("outer", "main"), ("main", None)):
            cfa += offsets[name]
            self.cfas.append(cfa)
            # the return address into the caller: the caller's row is found at ra - 1
            mem[cfa - 8] = BIAS + self.pcs[caller] + 1 if caller else 0
        self.size = cfa - self.sp
        buf = bytearray(self.size)
        for addr, value in mem.items():
            struct.pack_into("<Q", buf, addr - self.sp, value)
        self.stack = bytes(buf)


@pytest.fixture
def setup(prog, tmp_path):
    return Unwinder(_fake_proc(tmp_path)), _vmas(prog), Frames(prog)


def test_unwinds_main_outer_inner_and_ends_cleanly(setup, prog):
    unwinder, vmas, f = setup
    stack = unwinder.unwind(PID, vmas, BIAS + f.pcs["inner"], f.sp, 0x1234, f.stack)
    assert [fr.function for fr in stack.frames] == ["inner", "outer", "main"]
    assert not stack.truncated
    funcs = nm_functions(prog)
    leaf, caller = stack.frames[0], stack.frames[1]
    assert leaf.address == BIAS + f.pcs["inner"]
    assert leaf.offset == f.pcs["inner"] - funcs["inner"][0]
    assert caller.address == BIAS + f.pcs["outer"] + 1      # the return address
    assert caller.module == str(prog) and caller.build_id == leaf.build_id


def test_a_short_copy_truncates_where_the_return_address_is_missing(setup):
    unwinder, vmas, f = setup
    cut = f.cfas[1] - 8 - f.sp            # outer's return address slot left out
    stack = unwinder.unwind(PID, vmas, BIAS + f.pcs["inner"], f.sp, 0, f.stack[:cut])
    assert [fr.function for fr in stack.frames] == ["inner", "outer", "[truncated]"]
    assert stack.frames[-1] == TRUNCATED


def test_depth_limit_truncates(setup, tmp_path):
    _, vmas, f = setup
    unwinder = Unwinder(_fake_proc(tmp_path / "d"), max_depth=2)
    stack = unwinder.unwind(PID, vmas, BIAS + f.pcs["inner"], f.sp, 0, f.stack)
    assert [fr.function for fr in stack.frames] == ["inner", "outer", "[truncated]"]


def test_code_with_no_file_is_one_unknown_frame_and_truncated(setup):
    unwinder, vmas, f = setup
    stack = unwinder.unwind(PID, vmas, 0x7F0000000100, f.sp, 0, f.stack)
    assert [(fr.function, fr.module) for fr in stack.frames] == [
        ("[unknown]", "[anon]"), ("[truncated]", "[truncated]")]
    stack = unwinder.unwind(PID, vmas, 0x1000, f.sp, 0, f.stack)     # no mapping at all
    assert [fr.function for fr in stack.frames] == ["[unknown]", "[truncated]"]


def test_start_ends_the_stack_without_truncation(setup, prog):
    unwinder, vmas, f = setup
    start, _ = nm_functions(prog)["_start"]
    stack = unwinder.unwind(PID, vmas, BIAS + start + 4, f.sp, 0, f.stack)
    assert [fr.function for fr in stack.frames] == ["_start"]
    assert not stack.truncated


def test_a_leaf_at_its_first_instruction_has_cfa_rsp_plus_8(setup, prog):
    unwinder, vmas, f = setup
    inner, _ = nm_functions(prog)["inner"]
    buf = bytearray(f.stack[:16])
    struct.pack_into("<Q", buf, 0, BIAS + f.pcs["outer"] + 1)
    stack = unwinder.unwind(PID, vmas, BIAS + inner, f.sp, 0, bytes(buf))
    assert [fr.function for fr in stack.frames] == ["inner", "outer", "[truncated]"]


def test_code_without_cfi_is_unwound_only_at_its_first_instruction(setup, prog):
    unwinder, vmas, f = setup
    nocfi, _ = nm_functions(prog)["nocfi"]
    buf = bytearray(f.stack[:16])
    struct.pack_into("<Q", buf, 0, BIAS + f.pcs["outer"] + 1)
    at_entry = unwinder.unwind(PID, vmas, BIAS + nocfi, f.sp, 0, bytes(buf))
    assert [fr.function for fr in at_entry.frames] == ["nocfi", "outer", "[truncated]"]
    inside = unwinder.unwind(PID, vmas, BIAS + nocfi + 1, f.sp, 0, bytes(buf))
    assert [fr.function for fr in inside.frames] == ["nocfi", "[truncated]"]


def test_the_file_is_read_once_and_stacks_repeat_identically(setup):
    unwinder, vmas, f = setup
    a = unwinder.unwind(PID, vmas, BIAS + f.pcs["inner"], f.sp, 0, f.stack)
    b = unwinder.unwind_many(PID, vmas, [(BIAS + f.pcs["inner"], f.sp, 0, f.stack)] * 3)
    assert all(s == a for s in b) and unwinder.modules.loads == 1
    assert a.frames[0] is b[2].frames[0]      # frames are shared, not rebuilt


def test_a_batch_reuses_a_walk_only_where_the_words_it_read_agree(setup):
    """Same registers, different return address in the copy: a new walk (as
    unwound alone); same words where the walk read (others differ): the same
    stack as the first sample's."""
    unwinder, vmas, f = setup
    ip = BIAS + f.pcs["inner"]
    moved = bytearray(f.stack)     # outer's return address now points into main
    struct.pack_into("<Q", moved, f.cfas[0] - 8 - f.sp, BIAS + f.pcs["main"] + 1)
    unread = bytearray(f.stack)    # a word no walk reads (inner's frame body)
    unread[0] ^= 0xFF
    batch = unwinder.unwind_many(PID, vmas, [(ip, f.sp, 0, f.stack), (ip, f.sp, 0, bytes(moved)),
                                             (ip, f.sp, 0, bytes(unread))])
    assert [fr.function for fr in batch[0].frames] == ["inner", "outer", "main"]
    assert [fr.function for fr in batch[1].frames] == ["inner", "main"]
    assert batch[1] == unwinder.unwind(PID, vmas, ip, f.sp, 0, bytes(moved))
    assert batch[2] is batch[0]


# -- code with no CFI: the frame-pointer chain, and JIT names from perf maps ------

JIT_PC = 0x7F0000000100       # in _vmas' file-less rwxp mapping


def _below(f: Frames, ra: int, saved_rbp: int = 0x4321) -> tuple[int, int, bytes]:
    """(sp, rbp, copy) of a frame-pointer frame called by inner's body: its
    rbp points at [saved rbp][return address into inner], and the caller's sp
    (rbp + 16) is where f's stack starts."""
    sp, rbp = f.sp - 0x30, f.sp - 0x10
    frame = bytearray(0x30)
    struct.pack_into("<QQ", frame, rbp - sp, saved_rbp, ra)
    return sp, rbp, bytes(frame) + f.stack


def test_jit_code_is_unwound_by_its_frame_pointer_into_code_with_cfi(setup):
    unwinder, vmas, f = setup
    sp, rbp, copy = _below(f, BIAS + f.pcs["inner"] + 1)
    stack = unwinder.unwind(PID, vmas, JIT_PC, sp, rbp, copy)
    assert [(fr.function, fr.module) for fr in stack.frames][:1] == [("[unknown]", "[anon]")]
    assert [fr.function for fr in stack.frames] == ["[unknown]", "inner", "outer", "main"]
    assert not stack.truncated


def test_a_function_without_cfi_is_unwound_by_its_frame_pointer_past_its_entry(setup, prog):
    unwinder, vmas, f = setup
    nocfi, _ = nm_functions(prog)["nocfi"]
    sp, rbp, copy = _below(f, BIAS + f.pcs["inner"] + 1)
    stack = unwinder.unwind(PID, vmas, BIAS + nocfi + 1, sp, rbp, copy)
    assert [fr.function for fr in stack.frames] == ["nocfi", "inner", "outer", "main"]


@pytest.mark.parametrize("why", ["rbp below sp", "rbp unaligned", "return into data",
                                 "return address 0"])
def test_a_frame_pointer_that_cannot_be_one_truncates(setup, why):
    unwinder, vmas, f = setup
    ra = {"return into data": STACK_TOP - 0x100, "return address 0": 0}.get(
        why, BIAS + f.pcs["inner"] + 1)
    sp, rbp, copy = _below(f, ra)
    if why == "rbp below sp":
        rbp = sp - 0x10
    elif why == "rbp unaligned":
        rbp += 4
    stack = unwinder.unwind(PID, vmas, JIT_PC, sp, rbp, copy)
    assert [fr.function for fr in stack.frames] == ["[unknown]", "[truncated]"]


def test_jit_code_is_named_from_the_process_perf_map(prog, tmp_path):
    """The map is read through /proc/PID/root (here a directory holding it and
    a link to the program), at the pid the process has in its namespace."""
    line = f"{JIT_PC - 0x40:x} 80 JS:*hot /app/server.js:12:3\n"
    proc = _proc_with_perf_map(prog, tmp_path, line)
    unwinder, vmas, f = Unwinder(proc), _vmas(prog), Frames(prog)
    sp, rbp, copy = _below(f, BIAS + f.pcs["inner"] + 1)
    stack = unwinder.unwind(PID, vmas, JIT_PC, sp, rbp, copy)
    leaf = stack.frames[0]
    assert (leaf.function, leaf.module, leaf.offset) == ("JS:*hot /app/server.js:12:3",
                                                         "[jit]", 0x40)
    assert [fr.function for fr in stack.frames[1:]] == ["inner", "outer", "main"]


def _proc_with_perf_map(prog: Path, tmp_path: Path, line: str) -> str:
    """A fake /proc whose PID/root holds the program (a link) and a perf map."""
    proc, rootfs = tmp_path / "proc", tmp_path / "rootfs"
    (rootfs / "tmp").mkdir(parents=True)
    exe_in_root = rootfs / str(prog).lstrip("/")
    exe_in_root.parent.mkdir(parents=True)
    exe_in_root.symlink_to(prog)
    (proc / str(PID)).mkdir(parents=True)
    (proc / str(PID) / "root").symlink_to(rootfs)
    (proc / str(PID) / "status").write_text(f"Pid:\t{PID}\nNSpid:\t{PID}\t1\n")
    (rootfs / "tmp" / "perf-1.map").write_text(line)
    return str(proc)


@pytest.mark.parametrize("code_is_cpythons", [True, False])
def test_a_cpython_perf_trampoline_is_unwound_by_its_layout(prog, tmp_path, code_is_cpythons):
    """inner returns into a `py::` trampoline (sub $8,%rsp; call *%rcx: no frame
    pointer), which returns into outer: CFA = its sp + 16, checked against its
    code in the process's memory (a JIT region that only looks like one: rbp
    is no frame pointer there, so the stack ends)."""
    tramp = 0x7F0000000200
    proc = _proc_with_perf_map(prog, tmp_path, f"{tramp:x} b py::handler:/app/views.py\n")
    unwinder, vmas, f = Unwinder(proc), _vmas(prog), Frames(prog)
    code = bytes.fromhex("4883ec08ffd14883c408c3") if code_is_cpythons else bytes(11)
    unwinder.read_code = lambda pid, addr, size: code if addr == tramp else None  # type: ignore
    off = [f.cfas[0] - f.sp, f.cfas[1] - f.cfas[0], f.cfas[2] - f.cfas[1]]
    sp = f.sp
    mem = {}
    inner_cfa = sp + off[0]
    mem[inner_cfa - 8] = tramp + 6                  # inner returns into the trampoline
    mem[inner_cfa + 8] = BIAS + f.pcs["outer"] + 1  # the trampoline's return address
    outer_cfa = inner_cfa + 16 + off[1]
    mem[outer_cfa - 8] = BIAS + f.pcs["main"] + 1
    mem[outer_cfa + off[2] - 8] = 0
    buf = bytearray(outer_cfa + off[2] - sp)
    for addr, value in mem.items():
        struct.pack_into("<Q", buf, addr - sp, value)
    stack = unwinder.unwind(PID, vmas, BIAS + f.pcs["inner"], sp, 0, bytes(buf))
    names = [fr.function for fr in stack.frames]
    if code_is_cpythons:
        assert names == ["inner", "py::handler:/app/views.py", "outer", "main"]
        assert stack.frames[1].module == "[jit]" and not stack.truncated
    else:
        assert names == ["inner", "py::handler:/app/views.py", "[truncated]"]


@pytest.mark.parametrize("size, offsets",
                         [(64, (8, 24)), (64, (16,)), (60, (8, 24)), (64, (4, 24))])
def test_a_memo_check_compares_the_words_read_inside_the_copy(size, offsets):
    """_Check gathers aligned words of a whole-word copy at once and falls
    back to word by word otherwise (odd length, unaligned read); reads past
    the copy (None) are not compared; any other word may differ."""
    sp = 0x7FFD0000
    copy = bytearray(range(size))
    log = [(sp + off, int.from_bytes(copy[off:off + 8], "little")) for off in offsets]
    log.append((sp + 4096, None))
    check = _Check(sp, size, log)
    assert (check.gather is not None) == (size % 8 == 0 and all(o % 8 == 0 for o in offsets))
    assert check.holds(bytes(copy))
    other = bytearray(copy)
    other[0] ^= 0xFF                  # no read covers byte 0
    assert check.holds(bytes(other))
    for off in offsets:
        changed = bytearray(copy)
        changed[off + 3] ^= 0x01
        assert not check.holds(bytes(changed))
