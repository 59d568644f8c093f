"""The unwinder on real stopped processes (root): a C program built without
frame pointers blocked in libc, and Debian programs nobody here wrote. Each is
stopped with PTRACE_SEIZE + PTRACE_INTERRUPT, its registers read with
PTRACE_GETREGS and 16 KiB of its stack from /proc/PID/mem: what BPF hands
over at a sampled fault. Also measures the cost of an unwind."""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from memtrace.stacks.profile import Stack
from memtrace.stacks.unwind import Unwinder
from memtrace.trace.events import StackRecord
from memtrace.trace.procfs import ProcFS

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="ptrace of any process needs root")]

HERE = Path(__file__).resolve().parent
LIBC_DEBUG = Path("/usr/lib/debug/.build-id")     # libc6-dbg (scripts/setup.sh)
STACK_COPY = 16384
PTRACE_GETREGS, PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 12, 17, 0x4206, 0x4207
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


class UserRegs(ctypes.Structure):       # struct user_regs_struct (x86-64)
    _fields_ = [(n, ctypes.c_ulonglong) for n in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
        "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
        "gs_base", "ds", "es", "fs", "gs")]


def _ptrace(req: int, pid: int, addr: int = 0, data: object = None) -> None:
    if _libc.ptrace(req, pid, addr, data) == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def capture(pid: int) -> StackRecord:
    """Stop pid, read what a sampled fault would carry, let it go."""
    _ptrace(PTRACE_SEIZE, pid)
    try:
        _ptrace(PTRACE_INTERRUPT, pid)
        os.waitpid(pid, 0x40000000)                     # __WALL
        regs = UserRegs()
        _ptrace(PTRACE_GETREGS, pid, 0, ctypes.byref(regs))
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            mem.seek(regs.rsp)
            try:
                stack = mem.read(STACK_COPY)
            except OSError:
                stack = b""
    finally:
        _ptrace(PTRACE_DETACH, pid)
    return StackRecord(pid, regs.rsp, regs.rip, regs.rsp, regs.rbp, 4096, stack)


@contextmanager
def running(argv: list[str], ready: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        if ready:
            assert p.stdout is not None and p.stdout.readline() == b"READY\n"
        else:
            time.sleep(0.5)
        _wait_blocked(p.pid)
        yield p
    finally:
        p.kill()
        p.wait()


def _wait_blocked(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "S":
                return
        time.sleep(0.02)


def unwind(pid: int, unwinder: Unwinder | None = None) -> tuple[Stack, StackRecord, list]:
    rec = capture(pid)
    assert len(rec.stack) >= 1024           # up to 16 KiB, or up to the stack's top
    vmas = ProcFS("/proc").maps(pid)
    unwinder = unwinder or Unwinder()
    return unwinder.unwind(pid, vmas, rec.ip, rec.sp, rec.bp, rec.stack), rec, vmas


def names(stack: Stack) -> list[str]:
    return [f.function for f in stack.frames]


def assert_in_order(got: list[str], want: list[str]) -> None:
    positions = [got.index(w) for w in want]
    assert positions == sorted(positions), got


def assert_ends_well(stack: Stack) -> None:
    fs = names(stack)
    if stack.truncated:
        assert fs[-2] in ("__libc_start_call_main", "_start"), fs
    else:
        assert fs[-1] in ("_start", "__libc_start_main", "__libc_start_call_main"), fs


@pytest.fixture(scope="module")
def blocker(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("stacks") / "blocker"
    subprocess.run(["cc", "-O2", "-fomit-frame-pointer", "-o", str(exe),
                    str(HERE / "blocker.c")], check=True)
    return exe


@pytest.mark.parametrize("mode", ["read", "sleep"])
def test_c_program_through_libc_without_frame_pointers(blocker, mode):
    with running([str(blocker), mode], ready=True) as p:
        stack, _rec, _ = unwind(p.pid)
    fs = names(stack)
    assert_in_order(fs, ["inner", "outer", "main"])
    assert fs.index("inner") >= 1, fs           # at least one libc frame below inner
    leaf = stack.frames[0]
    assert "libc.so" in leaf.module and leaf.build_id, leaf
    if mode == "sleep":
        assert "usleep" in fs[:fs.index("inner")], fs
    assert_ends_well(stack)


def test_c_program_through_a_signal_handler(blocker):
    with running([str(blocker), "signal"], ready=True) as p:
        stack, _rec, _ = unwind(p.pid)
    fs = names(stack)
    assert_in_order(fs, ["on_usr1", "inner", "outer", "main"])
    trampoline = stack.frames[fs.index("on_usr1") + 1]
    assert trampoline.module.endswith("libc.so.6") and trampoline.build_id
    debug = LIBC_DEBUG / trampoline.build_id[:2] / (trampoline.build_id[2:] + ".debug")
    if debug.exists():              # a local symbol: named only with libc6-dbg
        assert trampoline.function == "__restore_rt", fs
    assert_ends_well(stack)


def test_debian_python_reaches_py_runmain_untruncated():
    with running(["/usr/bin/python3", "-c", "import time; time.sleep(60)"]) as p:
        stack, _, _ = unwind(p.pid)
    fs = names(stack)
    assert not stack.truncated, fs
    assert "Py_RunMain" in fs and fs.index("Py_RunMain") > 3, fs
    assert any("python3" in f.module for f in stack.frames)


def test_debian_sleep_reaches_libc_start_untruncated():
    with running(["/usr/bin/sleep", "60"]) as p:
        stack, _, _ = unwind(p.pid)
    fs = names(stack)
    assert not stack.truncated, fs
    assert any("/usr/bin/sleep" in f.module for f in stack.frames), stack
    assert "__libc_start_call_main" in fs or "__libc_start_main" in fs, fs


def test_cost_of_an_unwind_cold_and_warm(blocker, capsys):
    """Cold: a new Unwinder (files read, FDEs decoded; median of 5). Warm: the
    same stack again with everything cached. Printed for the report; loosely
    bounded."""
    figures = {}
    with running(["/usr/bin/python3", "-c", "import time; time.sleep(60)"]) as py, \
            running([str(blocker), "sleep"], ready=True) as c:
        for label, pid in (("python3", py.pid), ("blocker", c.pid)):
            rec = capture(pid)
            vmas = ProcFS("/proc").maps(pid)
            colds = []
            for _ in range(5):
                t0 = time.perf_counter()
                u = Unwinder()
                stack = u.unwind(pid, vmas, rec.ip, rec.sp, rec.bp, rec.stack)
                colds.append(time.perf_counter() - t0)
            cold = sorted(colds)[2]                     # the median of 5
            n = 2000
            t0 = time.perf_counter()
            for _ in range(n):
                again = u.unwind(pid, vmas, rec.ip, rec.sp, rec.bp, rec.stack)
            warm = (time.perf_counter() - t0) / n
            assert again == stack
            depth = len(stack.frames)
            figures[label] = (depth, cold * 1e6, warm * 1e6, warm * 1e6 / depth)
    with capsys.disabled():
        for label, (depth, cold, warm, per_frame) in figures.items():
            print(f"\nunwind {label}: {depth} frames, cold {cold:.0f} us (median of 5), "
                  f"warm {warm:.1f} us per stack ({per_frame:.2f} us per frame)")
    for _depth, _cold, warm, _ in figures.values():
        assert warm < 5000


def test_a_profile_of_a_real_process_adds_up_to_its_model(blocker):
    """The unwinder and the netting on a live process and its real model
    (PAGEMAP_SCAN, no BPF): the sampled stack page is held by its stack, the
    held total is the model's resident total."""
    from memtrace.stacks.netting import UNSAMPLED, StackTracker
    from memtrace.trace.tracker import ProcessTracker

    with running([str(blocker), "sleep"], ready=True) as p:
        rec = capture(p.pid)
        tracker = ProcessTracker(p.pid, ProcFS("/proc"))
        tracker.start()
        try:
            st = StackTracker(p.pid, Unwinder())
            st.add([rec], tracker.space.vmas)
            prof = st.profile(tracker.space, tracker.space.vmas, tracker.exe, "blocker", 0.0)
        finally:
            tracker.close()
    assert prof.held_total() == tracker.space.totals().total > 0
    mine = [s for s in prof.samples if s.stack != UNSAMPLED]
    assert len(mine) == 1 and mine[0].mapping == "[stack]" and mine[0].kind == "stack"
    stack_vma = tracker.space.vma_at(rec.sp)
    assert mine[0].held_bytes == tracker.space.resident_of(stack_vma).total
    assert_in_order(names(mine[0].stack), ["inner", "outer", "main"])
    assert mine[0].brought_bytes == rec.weight and mine[0].samples == 1
