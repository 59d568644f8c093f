"""User stacks without frame pointers: x86-64 DWARF CFI unwinding over a copy
of the stack taken at a sampled fault (docs/stacks.md).

From the registers at the fault (ip, sp, bp) and the bytes [sp, sp + len):
find the mapping holding ip, its file's CFI row for ip (modules.py, cfi.py),
compute the CFA from rsp or rbp (or a DWARF expression over rsp, rbp, rip),
read the return address and the saved rbp from the copy, continue with
sp = CFA. A caller's row is looked up at return address - 1 (the call, not
the instruction after it), except after a signal frame, whose saved ip is
exact. The walk ends cleanly where the CFI says the return address is
undefined (`_start`, a thread's first frame) or where it reads 0, and with
TRUNCATED where it cannot go on: depth, the end of the copy, an address in no
executable mapping, code with neither CFI nor a frame pointer (below), a rule
over a register the copy cannot restore (only rsp, rbp and rip are known), or
no progress.

Code with no CFI (JIT code in memory with no ELF file, V8's builtins, Go, hand-
written assembly) is unwound by its frame pointer, as perf does: the caller's
rbp at [rbp], its return address at [rbp + 8], its sp = rbp + 16; accepted only
when rbp lies at or above sp and the return address is in executable memory,
else TRUNCATED. A function without an FDE at its first instruction is unwound
as the call just left it (CFA = rsp + 8). PLT stubs have FDEs (with an
expression, which is evaluated). JIT code is named from the process's perf map
(perfmap.py); CPython's perf trampolines (`-X perf`, 3.12+), which keep no
frame pointer, are unwound by their fixed layout once their code is checked."""

from __future__ import annotations

import sys
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from memtrace.stacks.cfi import RBP, RIP, RSP, Read, Row, Rule, evaluate
from memtrace.stacks.modules import Module, ModuleCache
from memtrace.stacks.perfmap import PerfMaps
from memtrace.stacks.profile import JIT_MODULE, TRUNCATED, Frame, Stack
from memtrace.stacks.symbols import UNKNOWN, Demangler
from memtrace.trace.procfs import Vma

_ENTRY_ROW = Row(RSP, 8, None, None, ("o", -8))
# CPython 3.12+'s perf trampoline (Python/asm_trampoline.S, x86-64), copied for
# each code object under `-X perf` and named `py::...` in the perf map: it
# keeps no frame pointer, so its frame is unwound by its known layout instead.
_PY_TRAMPOLINE = bytes.fromhex("4883ec08" "ffd1" "4883c408" "c3")  # sub $8,%rsp; call *%rcx; ...
_PY_TRAMPOLINE_RETURN = 6          # the return address of its call, from its start
_PY_TRAMPOLINE_ROW = Row(RSP, 16, None, None, ("o", -8))
_OUTERMOST = frozenset({"_start"})
Regs = dict[int, "int | None"]


@dataclass(frozen=True)
class RawFrame:
    address: int           # ip, or the return address
    lookup: int            # the address whose function names it (return address - 1)
    vma: Vma | None
    module: Module | None
    bias: int | None
    jit: tuple[str, int] | None = None     # JIT code: (name, start) from the perf map


_Walk = tuple[list[RawFrame], bool]
_MEMO_PER_REGS = 8      # distinct stacks remembered per (ip, sp, bp) in one batch
_LITTLE = sys.byteorder == "little"    # a copy cast to native words reads as the walk does


class _Check:
    """Whether another copy of the same length taken at the same sp holds the
    words one walk read. With the same sp and length a read outside the copy
    is outside it again, so only the words inside are compared: in one C-level
    gather (`itemgetter` over the copy as 64-bit words) when every read is
    word-aligned in a copy of whole words, else word by word."""

    def __init__(self, sp: int, size: int, log: list[tuple[int, int | None]]) -> None:
        inside = sorted({(addr - sp, value) for addr, value in log if value is not None})
        self.offsets = [off for off, _ in inside]
        self.values = [value for _, value in inside]
        self.gather: Callable[[memoryview], Any] | None = None
        if (_LITTLE and size % 8 == 0 and self.offsets
                and all(off % 8 == 0 for off in self.offsets)):
            self.gather = itemgetter(*(off // 8 for off in self.offsets))
            self.want: object = tuple(self.values) if len(self.values) > 1 else self.values[0]

    def holds(self, stack: bytes) -> bool:
        if self.gather is not None:
            return bool(self.gather(memoryview(stack).cast("Q")) == self.want)
        return all(int.from_bytes(stack[off:off + 8], "little") == value
                   for off, value in zip(self.offsets, self.values))


def _word(stack: bytes, base: int, addr: int) -> int | None:
    """The 8-byte word at `addr` of a copy of [base, base + len(stack))."""
    i = addr - base
    if i < 0 or i + 8 > len(stack):
        return None
    return int.from_bytes(stack[i:i + 8], "little")


class _End:
    """The outermost frame was reached (return address undefined)."""


_END = _End()


class Unwinder:
    """Unwinds sampled stacks of any process, keeping what it read of each
    file (modules), the names it demangled and the frames it built."""

    MAX_FRAMES = 100_000

    def __init__(self, proc_root: str = "/proc", max_depth: int = 64) -> None:
        self.proc_root = proc_root
        self.max_depth = max_depth
        self.modules = ModuleCache(proc_root)
        self.perf_maps = PerfMaps(proc_root)
        self._trampolines: dict[tuple[int, int], bool] = {}   # (pid, start): CPython's?
        self.demangler = Demangler()
        self._vmas: Sequence[Vma] | None = None
        self._ends: list[int] = []
        self._frames: dict[tuple[object, ...], Frame] = {}

    # -- the API --------------------------------------------------------------
    def unwind(self, pid: int, vmas: Sequence[Vma], ip: int, sp: int, bp: int,
               stack: bytes) -> Stack:
        return self.unwind_many(pid, vmas, [(ip, sp, bp, stack)])[0]

    def unwind_many(self, pid: int, vmas: Sequence[Vma],
                    regs: Iterable[tuple[int, int, int, bytes]]) -> list[Stack]:
        """Stacks of many samples of one process: the new C++ names of all of
        them are demangled in one batch. A loop faulting in one place gives the
        same registers and stack words again and again: a walk is a function of
        (ip, sp, bp) and the words it read, so a sample whose registers match
        an earlier walk's, and whose copy holds the same words where that walk
        read, gets that walk without unwinding again."""
        memo: dict[tuple[int, int, int, int], list[tuple[_Check, _Walk]]] = {}
        self.perf_maps.new_batch()
        walks = [self._walk_memo(memo, pid, vmas, ip, sp, bp, stack)
                 for ip, sp, bp, stack in regs]
        unique = list({id(w): w for w in walks}.values())
        pending = [f for frames, _ in unique for f in frames if self._key(f) not in self._frames]
        if pending:
            names = [self._raw_name(f)[0] for f in pending]
            self.demangler.prepare(names)
        built = {id(w): self._stack(*w) for w in unique}
        return [built[id(w)] for w in walks]

    def _walk_memo(self, memo: dict[tuple[int, int, int, int], list[tuple[_Check, _Walk]]],
                   pid: int, vmas: Sequence[Vma], ip: int, sp: int, bp: int,
                   stack: bytes) -> _Walk:
        seen = memo.setdefault((ip, sp, bp, len(stack)), [])
        for check, walk in seen:
            if check.holds(stack):
                return walk
        log: list[tuple[int, int | None]] = []
        walk = self.walk(pid, vmas, ip, sp, bp, stack, log)
        if len(seen) < _MEMO_PER_REGS:
            seen.append((_Check(sp, len(stack), log), walk))
        return walk

    # -- unwinding -------------------------------------------------------------
    def walk(self, pid: int, vmas: Sequence[Vma], ip: int, sp: int, bp: int,
             stack: bytes, log: list[tuple[int, int | None]] | None = None) -> _Walk:
        """The frames (leaf first) and whether the walk was cut short; every
        word read from the copy is appended to `log` as (address, value)."""
        base = sp

        def read(addr: int) -> int | None:
            value = _word(stack, base, addr)
            if log is not None:
                log.append((addr, value))
            return value

        regs: Regs = {RSP: sp, RBP: bp, RIP: ip}
        frames: list[RawFrame] = []
        exact = True                   # ip is the faulting one, not a return address
        while len(frames) < self.max_depth:
            if ip == 0:
                return frames, False
            lookup = ip if exact else ip - 1
            vma = self._vma_at(vmas, lookup)
            module = self.modules.get(pid, vma) if vma is not None else None
            bias = module.bias(vma) if module is not None and vma is not None else None
            found = module.cfi(lookup - bias) if module is not None and bias is not None \
                else None
            # a signal trampoline is named at the return address itself: the
            # byte before it (where its FDE starts) belongs to no function
            named_at = ip if found is not None and found[1] else lookup
            jit = None
            if module is None and vma is not None and "x" in vma.perms:
                jit = self.perf_maps.lookup(pid, lookup)
            frames.append(RawFrame(ip, named_at, vma, module, bias, jit))
            step: tuple[int, int, int | None] | _End | None
            if jit is not None and not exact and self._py_trampoline(pid, jit, ip):
                step = _step(_PY_TRAMPOLINE_ROW, regs, read)
            elif module is None or bias is None:
                step = self._frame_pointer_step(vmas, regs, read)
            elif found is not None:
                step = _step(found[0], regs, read)
            elif len(frames) == 1 and _at_entry(module, lookup - bias):
                step = _step(_ENTRY_ROW, regs, read)
            else:
                step = self._frame_pointer_step(vmas, regs, read)
            signal = found is not None and found[1]
            if step is _END:
                return frames, False
            if not isinstance(step, tuple):
                return frames, True
            ip, cfa, rbp = step
            if cfa <= (regs[RSP] or 0):
                return frames, True          # no progress: bad CFI or a corrupt stack
            regs = {RSP: cfa, RBP: rbp, RIP: ip}
            exact = signal
        return frames, True

    def _py_trampoline(self, pid: int, jit: tuple[str, int], ip: int) -> bool:
        """Whether ip returns into the call of a CPython perf trampoline (its
        name in the perf map and its code, read once, say so)."""
        name, start = jit
        if not name.startswith("py::") or ip - start != _PY_TRAMPOLINE_RETURN:
            return False
        known = self._trampolines.get((pid, start))
        if known is None:
            known = self.read_code(pid, start, len(_PY_TRAMPOLINE)) == _PY_TRAMPOLINE
            if len(self._trampolines) >= self.MAX_FRAMES:
                self._trampolines.clear()
            self._trampolines[(pid, start)] = known
        return known

    def read_code(self, pid: int, addr: int, size: int) -> bytes | None:
        """size bytes of the process's memory at addr (None if unreadable)."""
        try:
            with open(f"{self.proc_root}/{pid}/mem", "rb", buffering=0) as mem:
                mem.seek(addr)
                return mem.read(size)
        except (OSError, OverflowError, ValueError):
            return None

    def _frame_pointer_step(self, vmas: Sequence[Vma], regs: Regs,
                            read: Read) -> tuple[int, int, int | None] | None:
        """The caller by the frame-pointer chain, for code with no CFI; None
        unless rbp can be a frame pointer here (8-aligned, at or above sp) and
        the return address it gives lies in executable memory."""
        rbp, rsp = regs.get(RBP), regs.get(RSP)
        if not rbp or rsp is None or rbp < rsp or rbp & 7:
            return None
        ra = read(rbp + 8)
        if not ra:
            return None
        caller = self._vma_at(vmas, ra - 1)
        if caller is None or "x" not in caller.perms:
            return None
        return ra, rbp + 16, read(rbp)

    def _vma_at(self, vmas: Sequence[Vma], addr: int) -> Vma | None:
        if vmas is not self._vmas:
            self._vmas = vmas
            self._ends = [v.end for v in vmas]
        i = bisect_right(self._ends, addr)
        if i < len(vmas) and vmas[i].start <= addr:
            return vmas[i]
        return None

    # -- symbolizing -------------------------------------------------------------
    @staticmethod
    def _key(f: RawFrame) -> tuple[object, ...]:
        v = f.vma
        if v is None:
            return (f.address, f.lookup)
        return (f.address, f.lookup, v.start, v.offset, v.inode, v.path, f.jit)

    @staticmethod
    def _raw_name(f: RawFrame) -> tuple[str, int]:
        """(symbol name, symbol start in the process) or ([unknown], 0)."""
        if f.jit is not None:
            return f.jit
        if f.module is None or f.bias is None:
            return UNKNOWN, 0
        found = f.module.symbols.lookup(f.lookup - f.bias)
        if found is None:
            return UNKNOWN, 0
        return found[0], found[1] + f.bias

    def _frame(self, f: RawFrame) -> Frame:
        key = self._key(f)
        frame = self._frames.get(key)
        if frame is None:
            name, start = self._raw_name(f)
            module = JIT_MODULE if f.jit is not None else \
                UNKNOWN if f.vma is None else f.vma.display_path or "[anon]"
            frame = Frame(f.address, self.demangler(name), module,
                          f.address - start if start else 0,
                          f.module.build_id if f.module is not None else None)
            if len(self._frames) >= self.MAX_FRAMES:
                self._frames.clear()
            self._frames[key] = frame
        return frame

    def _stack(self, frames: list[RawFrame], truncated: bool) -> Stack:
        out = [self._frame(f) for f in frames]
        if truncated and not (out and out[-1].function in _OUTERMOST):
            out.append(TRUNCATED)
        return Stack(tuple(out))


def _at_entry(module: Module, pc: int) -> bool:
    found = module.symbols.lookup(pc)
    return found is not None and found[1] == pc


def _step(row: Row, regs: Regs, read: Read) -> tuple[int, int, int | None] | _End | None:
    """(caller's ip, CFA = caller's sp, caller's rbp); _END at the outermost
    frame; None when this row cannot be applied to what is known."""
    if row.cfa_expr is not None:
        cfa = evaluate(row.cfa_expr, regs, read)
    else:
        base = regs.get(row.cfa_reg) if row.cfa_reg is not None else None
        cfa = base + row.cfa_offset if base is not None else None
    if cfa is None:
        return None
    if row.ra is not None and row.ra[0] == "u":
        return _END
    ra = _recover(row.ra, cfa, regs, read, RIP)
    if ra is None:
        return None
    rbp = regs.get(RBP) if row.rbp is None else _recover(row.rbp, cfa, regs, read, RBP)
    return ra, cfa, rbp


def _recover(rule: Rule | None, cfa: int, regs: Regs, read: Read, reg: int) -> int | None:
    """A caller's register by its rule; None if unknown or unreadable."""
    if rule is None:
        return None
    kind = rule[0]
    if kind == "o":
        return read(cfa + rule[1])
    if kind == "vo":
        return cfa + rule[1]
    if kind == "s":
        return regs.get(reg)
    if kind == "r":
        return regs.get(rule[1])
    if kind in ("e", "ve"):
        value = evaluate(rule[1], regs, read, initial=cfa)
        if value is None or kind == "ve":
            return value
        return read(value)
    return None
