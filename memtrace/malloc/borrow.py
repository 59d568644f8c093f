"""A thread of another process borrowed to make calls in it (`watch --malloc`,
memtrace/malloc/inject.py): stopped with ptrace at a safe point (in user code
outside libc and the dynamic loader, or blocked in a system call malloc never
makes; docs/malloc.md, "watch --malloc"), made to call functions one after the
other (each returns to address 0: the fault says it returned), then put back
exactly as it was: general and vector registers, errno. The other threads of
the process are never stopped. x86-64 ptrace and calling conventions only."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from memtrace.errors import ExitCode, MemtraceError
from memtrace.trace.procfs import ProcFS

_PTRACE_CONT = 7
_PTRACE_GETREGS = 12
_PTRACE_SETREGS = 13
_PTRACE_DETACH = 17
_PTRACE_GETREGSET = 0x4204
_PTRACE_SETREGSET = 0x4205
_PTRACE_SEIZE = 0x4206
_PTRACE_INTERRUPT = 0x4207
_WALL = 0x40000000
_NT_PRFPREG = 2             # x87 and SSE registers (FXSAVE area)
_NT_X86_XSTATE = 0x202      # all of them, AVX and AVX-512 included (XSAVE area)
_XSTATE_MAX = 1 << 14
_RESTART_SYSCALL = 219

# System calls glibc's malloc and free never make (they make brk, mmap, munmap,
# mremap, madvise, mprotect, futex, getrandom): a thread blocked in one of these
# holds no allocator lock (x86-64 numbers). The kernel restarts the first ones
# after a ptrace stop, unseen by the program; the others fail with EINTR after
# any stop (signal(7)), so their threads are stopped only when no other is found.
RESTARTING_SYSCALLS = frozenset({
    0, 1, 7, 17, 18, 19, 20, 23, 35, 43, 44, 45, 46, 47, 61, 230, 247, 270, 271, 288, 299,
    307,
})
EINTR_SYSCALLS = frozenset({34, 128, 130, 232, 281, 441})
SAFE_SYSCALLS = RESTARTING_SYSCALLS | EINTR_SYSCALLS
# How long to look for a safe point, and to wait for the injected calls.
FIND_SECONDS = 5.0
CALL_SECONDS = 30.0

_REG_NAMES = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax",
              "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss",
              "fs_base", "gs_base", "ds", "es", "fs", "gs")


class _Regs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_ulonglong) for name in _REG_NAMES]


_libc = ctypes.CDLL(None, use_errno=True)
_ptrace = _libc.ptrace
_ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
_ptrace.restype = ctypes.c_long


class InjectError(MemtraceError):
    def __init__(self, message: str) -> None:
        super().__init__(f"--malloc: {message}", ExitCode.MALLOC_INJECT)


def _pt(request: int, tid: int, addr: int = 0, data: int | ctypes.c_void_p | None = 0) -> None:
    if _ptrace(request, tid, addr, data) == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _getregs(tid: int) -> _Regs:
    regs = _Regs()
    _pt(_PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def _setregs(tid: int, regs: _Regs) -> None:
    _pt(_PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _get_vector_state(tid: int) -> tuple[int, bytes]:
    """The thread's floating-point and vector registers (XSAVE area, else the
    FXSAVE one): what the called functions (dlopen's memcpy and strlen use
    AVX registers) may change and the interrupted code may still hold."""
    for note in (_NT_X86_XSTATE, _NT_PRFPREG):
        buf = ctypes.create_string_buffer(_XSTATE_MAX)
        iov = _IoVec(ctypes.addressof(buf), _XSTATE_MAX)
        try:
            _pt(_PTRACE_GETREGSET, tid, note, ctypes.addressof(iov))
        except OSError:
            continue
        return note, buf.raw[:iov.len]
    raise InjectError(f"thread {tid}: its vector registers cannot be saved")


def _set_vector_state(tid: int, state: tuple[int, bytes]) -> None:
    note, data = state
    buf = ctypes.create_string_buffer(data, len(data))
    iov = _IoVec(ctypes.addressof(buf), len(data))
    _pt(_PTRACE_SETREGSET, tid, note, ctypes.addressof(iov))


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass(frozen=True)
class Libc:
    """What a borrowed thread needs of the process's glibc: dlopen (in libc
    since 2.34; __libc_dlopen_mode before, same arguments), __errno_location,
    and the executable ranges of libc and the loader (a thread stopped there
    may hold their locks)."""
    dlopen: int
    errno_location: int
    unsafe: list[tuple[int, int]]


def _is_safe(regs: _Regs, unsafe: list[tuple[int, int]], wchan: Path) -> bool:
    nr = _signed(regs.orig_rax)
    if nr == _RESTART_SYSCALL:
        # a sleep restarted after a stop (ours too) or a futex wait with a
        # timeout: the kernel function it waits in tells them apart
        try:
            return b"futex" not in wchan.read_bytes()
        except OSError:
            return False
    if nr >= 0:
        return nr in SAFE_SYSCALLS
    return not any(s <= regs.rip < e for s, e in unsafe)


def _wait_stop(tid: int, deadline: float) -> int:
    """The next stop of tid: its wait status. InjectError when it exits or
    the deadline passes."""
    while True:
        got, status = os.waitpid(tid, os.WNOHANG | _WALL)
        if got == tid:
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                raise InjectError(f"thread {tid} ended while the sampler was being loaded")
            return status
        if time.monotonic() > deadline:
            raise InjectError(f"thread {tid} did not stop within the time allowed")
        time.sleep(0.0005)


def _seize_stopped(tid: int) -> bool:
    """Seize tid and stop it (PTRACE_INTERRUPT). False if it is gone, or a
    signal came first; InjectError if ptrace is refused (another tracer, no
    permission)."""
    try:
        _pt(_PTRACE_SEIZE, tid)
    except OSError as e:
        if e.errno == errno.EPERM:
            raise InjectError(f"thread {tid} cannot be traced: another tracer (a debugger, "
                              "strace) holds it, or ptrace is not permitted "
                              "(CAP_SYS_PTRACE, kernel.yama.ptrace_scope)") from None
        if e.errno == errno.ESRCH:
            return False
        raise
    try:
        _pt(_PTRACE_INTERRUPT, tid)
        status = _wait_stop(tid, time.monotonic() + 2.0)
    except (OSError, InjectError):
        return False        # it exited meanwhile
    if status >> 16 != 0 or os.WSTOPSIG(status) == signal.SIGTRAP:
        return True
    # a signal arrived first: let it be delivered and try this thread later
    _pt(_PTRACE_DETACH, tid, 0, os.WSTOPSIG(status))
    return False


def _call(tid: int, mem: int, saved: _Regs, fn: int, args: tuple[int, ...],
          data: bytes) -> int:
    """Make the stopped thread tid call fn(*args) (up to 4 integer arguments;
    `data` is copied below its stack's red zone first and DATA in args stands
    for its address) and return what fn returned. The call returns to address
    0: the fault stops the thread, which is how memtrace knows it is done."""
    sp = saved.rsp - 256        # below the red zone (128 bytes): nothing of the thread's
    where = (sp - len(data)) & ~0xF
    ret = ((where - 64) & ~0xF) - 8          # at a call, rsp + 8 is 16-byte aligned
    os.pwrite(mem, data, where)
    os.pwrite(mem, b"\0" * 8, ret)
    regs = _Regs.from_buffer_copy(saved)
    for name, value in zip(("rdi", "rsi", "rdx", "rcx"), args, strict=False):
        setattr(regs, name, where if value is DATA else value)
    regs.rip, regs.rsp, regs.rax = fn, ret, 0
    regs.orig_rax = (1 << 64) - 1            # no system call to restart while we call
    _setregs(tid, regs)
    _pt(_PTRACE_CONT, tid)
    deadline = time.monotonic() + CALL_SECONDS
    while True:
        status = _wait_stop(tid, deadline)
        sig = os.WSTOPSIG(status)
        if status >> 16:                     # a group stop or another event: go on
            _pt(_PTRACE_CONT, tid)
            continue
        if sig == signal.SIGSEGV:
            now = _getregs(tid)
            if now.rip == 0:
                return int(now.rax)
        _pt(_PTRACE_CONT, tid, 0, sig)       # the process's own signal: delivered


class _Data:
    """Stands for the address of the data copied with a call."""


DATA: int = _Data()  # type: ignore[assignment]


def _threads(procfs: ProcFS, pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(procfs.root / str(pid) / "task"))
    except OSError:
        raise MemtraceError(f"pid {pid} is gone", ExitCode.NO_SUCH_PROCESS) from None


def candidate_rank(syscall_text: bytes, wchan: bytes) -> int | None:
    """How good a thread looks before it is stopped, from its
    /proc/PID/task/TID/syscall and wchan: 0 running (stopped, then its
    instruction pointer decides), 1 blocked in a system call that restarts
    unseen, 2 blocked in one that would fail with EINTR after a stop, None
    blocked where malloc may be (futex, mmap, ...): not stopped at all."""
    first = syscall_text.split(b" ", 1)[0].strip()
    if first == b"running":
        return 0
    try:
        nr = int(first)
    except ValueError:
        return None
    if nr == _RESTART_SYSCALL:
        return None if b"futex" in wchan else 1
    if nr in RESTARTING_SYSCALLS:
        return 1
    return 2 if nr in EINTR_SYSCALLS else None


def _candidates(procfs: ProcFS, pid: int, worst: int) -> list[int]:
    """Threads worth stopping, best first, none ranked above `worst`."""
    ranked = []
    for tid in _threads(procfs, pid):
        task = procfs.root / str(pid) / "task" / str(tid)
        try:
            rank = candidate_rank((task / "syscall").read_bytes(), (task / "wchan").read_bytes())
        except OSError:
            continue
        if rank is not None and rank <= worst:
            ranked.append((rank, tid))
    return [tid for _, tid in sorted(ranked)]


Calls = list[tuple[int, tuple[int, ...], bytes]]


def with_safe_thread(procfs: ProcFS, pid: int, libc: Libc, calls: Calls,
                      then: Callable[[list[int], int], Calls] | None = None,
                      ) -> tuple[list[int], float]:
    """Find a thread at a safe point, make it run `calls` ((fn, args, data)
    each) one after the other, then those `then(their results, a /proc/PID/mem
    fd)` gives, and put it back as it was: its general and vector registers,
    and its errno (the interrupted code may not have read it yet). The return
    values, and how long that thread was held stopped."""
    started = time.monotonic()
    with open(procfs.root / str(pid) / "mem", "r+b", buffering=0) as mem:
        while (now := time.monotonic()) < started + FIND_SECONDS:
            # threads whose system call would see EINTR only in the second half
            for tid in _candidates(procfs, pid, 1 if now < started + FIND_SECONDS / 2 else 2):
                if not _seize_stopped(tid):
                    continue
                saved = _getregs(tid)
                wchan = procfs.root / str(pid) / "task" / str(tid) / "wchan"
                if not _is_safe(saved, libc.unsafe, wchan):
                    _pt(_PTRACE_DETACH, tid)
                    continue
                held = time.monotonic()
                try:
                    vector = _get_vector_state(tid)
                except InjectError:
                    _pt(_PTRACE_DETACH, tid)
                    raise
                errno_at, errno_was = 0, b""
                try:
                    errno_at = _call(tid, mem.fileno(), saved, libc.errno_location, (), b"")
                    errno_was = os.pread(mem.fileno(), 4, errno_at)
                    results = [_call(tid, mem.fileno(), saved, fn, args, data)
                               for fn, args, data in calls]
                    if then is not None:
                        results += [_call(tid, mem.fileno(), saved, fn, args, data)
                                    for fn, args, data in then(results, mem.fileno())]
                finally:
                    # the thread goes on exactly as it was stopped (if the
                    # process died meanwhile, the error said so already)
                    with contextlib.suppress(OSError):
                        if len(errno_was) == 4:
                            os.pwrite(mem.fileno(), errno_was, errno_at)
                        _setregs(tid, saved)
                        _set_vector_state(tid, vector)
                        _pt(_PTRACE_DETACH, tid)
                return results, time.monotonic() - held
            time.sleep(random.uniform(0.001, 0.005))
    raise InjectError(f"no thread of pid {pid} reached a safe point to load the sampler "
                      f"in {FIND_SECONDS:g} s (each was inside libc or the loader)")
