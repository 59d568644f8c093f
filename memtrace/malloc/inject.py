"""`watch --malloc`: the sampler put into a process that is already running
(docs/malloc.md, "watch --malloc"). What LD_PRELOAD does for `run` at exec,
done once at attach:

1. the GOT slots through which every loaded object calls the process's
   allocation functions (glibc's, or those of the library that provides
   malloc instead, as jemalloc; the slots the dynamic linker would have bound
   to a preloaded library) are read from the objects' files;
2. one thread of the process, borrowed at a safe point (memtrace/malloc/
   borrow.py), calls dlopen(sampler), the sampler's memtrace_malloc_real()
   (the allocator it is to call) and memtrace_malloc_interpose(), which
   stores the sampler's functions in those slots; the thread is put back as it was and goes on;
3. libraries loaded later get the same (extend), and at detach the same call
   puts back the functions the slots held (the sampler stays loaded, unused).

x86-64 only."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

from memtrace.errors import MemtraceError
from memtrace.malloc.borrow import DATA, Calls, InjectError, Libc, with_safe_thread
from memtrace.trace.procfs import ProcFS, Vma, escape_name
from memtrace.util.elf import (
    PT_LOAD,
    dynamic_symbol_values,
    is_elf64le,
    program_headers,
    symbol_slots,
)
from memtrace.util.log import log

# The functions the sampler interposes. Frees first: while the slots are being
# stored, no block is sampled by a path whose free still goes around the sampler.
RELEASERS = (b"free", b"realloc")
ALLOCATORS = (b"malloc", b"calloc", b"memalign", b"aligned_alloc", b"posix_memalign",
              b"valloc", b"pvalloc")
INTERPOSED = RELEASERS + ALLOCATORS
_RTLD_NOW = 2
SLOTS_PER_CALL = 16             # GOT slots stored per call (32 bytes each on its stack)

@dataclass(frozen=True)
class Slot:
    """A GOT slot of a loaded object: its address, the value memtrace stores
    there, the value it held, and the protection to give its page back (-1:
    the page is writable already)."""
    addr: int
    value: int
    old: int
    prot: int


@dataclass
class Plan:
    """What plan_slots found: the slots to take, the number left alone
    (another allocator's function), the objects looked at, and the allocator
    whose functions the sampler calls (None: glibc's)."""
    slots: list[Slot]
    skipped: int
    objects: set[tuple[bytes, int]]
    allocator: bytes | None
    allocator_funcs: dict[bytes, int]


# the order of memtrace_malloc_real's table (shim.c)
REAL_ORDER = (b"malloc", b"calloc", b"realloc", b"free", b"memalign", b"aligned_alloc",
              b"posix_memalign", b"valloc", b"pvalloc")


@dataclass
class Interposition:
    """The sampler in a process: where it is loaded, its functions there, the
    slots it took and the objects (path, load bias) they belong to."""
    pid: int
    shim_base: int
    funcs: dict[bytes, int]
    setter: int                     # memtrace_malloc_interpose in the process
    slots: list[Slot]
    objects: set[tuple[bytes, int]]
    skipped: int = 0                # slots left alone (another allocator's function)
    held_seconds: float = 0.0       # how long one thread was stopped, all calls
    allocator: bytes | None = None  # the library whose malloc the sampler calls (None: glibc)


# ---- where things are in the target ----

def _objects(vmas: list[Vma]) -> dict[bytes, tuple[int, Vma]]:
    """Each file with code mapped (an executable mapping of it), by its mapping
    at offset 0: path -> (lowest start, that mapping). Data files a process
    maps (databases...) are not objects and are never read."""
    with_code = {v.path for v in vmas if "x" in v.perms}
    out: dict[bytes, tuple[int, Vma]] = {}
    for v in vmas:
        if (v.offset == 0 and v.path.startswith(b"/") and v.path in with_code
                and (v.path not in out or v.start < out[v.path][0])):
            out[v.path] = (v.start, v)
    return out


def _read_object(procfs: ProcFS, pid: int, vma: Vma) -> bytes | None:
    """The ELF file behind a mapping, through map_files (the very file, even
    in another mount namespace or deleted), else through the process's root;
    None if it cannot be read or is not a 64-bit little-endian ELF file."""
    tries = (procfs.root / str(pid) / "map_files" / f"{vma.start:x}-{vma.end:x}",
             procfs.root / str(pid) / "root" / os.fsdecode(vma.path).lstrip("/"))
    for path in tries:
        try:
            with open(path, "rb") as f:
                if not is_elf64le(f.read(64)):
                    return None
                f.seek(0)
                return f.read()
        except OSError:
            continue
    return None


def _load_bias(data: bytes, start: int) -> int | None:
    """Where the object's address 0 is in the process, from the start of its
    mapping at offset 0."""
    loads = [h for h in program_headers(data) or () if h.type == PT_LOAD]
    if not loads:
        return None
    return start - (min(h.vaddr for h in loads) & ~0xFFF)


def _is_loader(path: bytes) -> bool:
    return os.path.basename(path).startswith((b"ld-linux", b"ld-musl", b"ld.so"))


def _is_libc(path: bytes) -> bool:
    return os.path.basename(path).startswith(b"libc.so")


def _find_libc(procfs: ProcFS, pid: int, vmas: list[Vma]) -> Libc:
    unsafe = [(v.start, v.end) for v in vmas
              if "x" in v.perms and (_is_libc(v.path) or _is_loader(v.path))]
    for path, (start, vma) in _objects(vmas).items():
        if not _is_libc(path):
            continue
        data = _read_object(procfs, pid, vma)
        bias = _load_bias(data, start) if data else None
        if data is None or bias is None:
            continue
        syms = dynamic_symbol_values(data, {b"dlopen", b"__libc_dlopen_mode",
                                            b"__errno_location"})
        fn = syms.get(b"dlopen") or syms.get(b"__libc_dlopen_mode")
        if fn and b"__errno_location" in syms:
            return Libc(bias + fn, bias + syms[b"__errno_location"], unsafe)
    raise InjectError(f"pid {pid} has no glibc (libc.so.6 with dlopen) loaded: the "
                      "sampler cannot be put into it")


def plan_slots(procfs: ProcFS, pid: int, vmas: list[Vma], shim: bytes,
               shim_funcs: dict[bytes, int], done: AbstractSet[tuple[bytes, int]] = frozenset(),
               attached: Interposition | None = None) -> Plan:
    """The GOT slots to point at the sampler's functions (`shim_funcs`: name ->
    address in the process): in every loaded object but the sampler, the
    loader and those `done` ((path, load bias) each), the slots that hold the
    process's allocator's function of that name (or, bound lazily, not yet
    resolved: an address inside the object, which would bind to it). The
    allocator is glibc's, or the library that provides malloc instead
    (allocator_funcs); for a process the sampler is in (`attached`), the one
    it was told at attach. Frees first."""
    defined: dict[bytes, dict[bytes, int]] = {}   # path -> INTERPOSED it defines, in pid
    objects: list[tuple[bytes, int, Vma, bytes]] = []
    for path, (start, vma) in _objects(vmas).items():
        if path == shim or _is_loader(path):
            continue
        data = _read_object(procfs, pid, vma)
        bias = _load_bias(data, start) if data else None
        if data is None or bias is None:
            continue
        if values := dynamic_symbol_values(data, set(INTERPOSED)):
            defined[path] = {name: bias + value for name, value in values.items()}
        if (path, bias) not in done:
            objects.append((path, bias, vma, data))
    wanted = {path for path, _, _, _ in objects}
    spans: dict[bytes, list[tuple[int, int, str]]] = {path: [] for path in wanted}
    for v in vmas:          # one pass: a process may have 60k mappings
        if v.path in wanted:
            spans[v.path].append((v.start, v.end, v.perms))
    # (path, slot address, name, value, its page's perms) of every slot
    found: list[tuple[bytes, int, bytes, int, str]] = []
    with open(procfs.root / str(pid) / "mem", "rb", buffering=0) as mem:
        for path, bias, _vma, data in objects:
            for offset, name in symbol_slots(data, set(INTERPOSED)):
                addr = bias + offset
                perms = next((p for s, e, p in spans[path] if s <= addr < e), None)
                if perms is not None and name in shim_funcs:
                    old, = struct.unpack("<Q", os.pread(mem.fileno(), 8, addr))
                    found.append((path, addr, name, old, perms))
    libc_funcs = next((f for path, f in defined.items() if _is_libc(path)), {})
    provider = (attached.allocator if attached is not None
                else _allocator(defined, [(name, old) for _, _, name, old, _ in found]))
    allocator_funcs = defined.get(provider, {}) if provider else {}
    funcs = {**libc_funcs, **allocator_funcs}
    slots: list[Slot] = []
    # (name, value) of slots that hold another object's address: taken by
    # that object's own slot when it is a stub of its PLT (a non-PIE program's
    # canonical address of malloc jumps through the program's slot), else
    # another allocator's function, left alone
    elsewhere: list[tuple[bytes, int]] = []
    for path, addr, name, old, perms in found:
        own = any(s <= old < e for s, e, _ in spans[path])
        if old != funcs.get(name) and not own:
            elsewhere.append((name, old))
            continue
        prot = -1 if "w" in perms else _prot(perms)
        slots.append(Slot(addr, shim_funcs[name], old, prot))
    stubs = _stub_ranges(slots, shim_funcs, spans)
    skipped = sum(1 for name, old in elsewhere
                  if not any(n == name and lo <= old < hi for n, lo, hi in stubs))
    order = {name: i for i, name in enumerate(INTERPOSED)}
    by_value = {v: k for k, v in shim_funcs.items()}
    slots.sort(key=lambda s: order.get(by_value.get(s.value, b""), 99))
    return Plan(slots, skipped, {(path, bias) for path, bias, _, _ in objects},
                provider, allocator_funcs)


def _allocator(defined: dict[bytes, dict[bytes, int]],
               slot_values: list[tuple[bytes, int]]) -> bytes | None:
    """The object other than libc that provides the process's malloc (linked
    before libc, as redis-server's libjemalloc, or preloaded), None for glibc's:
    of the objects that define malloc, the one the process's bound malloc
    slots point at, else the first (memtrace.heap.detect's rule)."""
    candidates = [path for path, funcs in defined.items()
                  if b"malloc" in funcs and not _is_libc(path)
                  and not os.path.basename(path).startswith(b"libmemtrace-malloc-")]
    bound = {old for name, old in slot_values if name == b"malloc"}
    return next((p for p in candidates if defined[p][b"malloc"] in bound),
                candidates[0] if candidates else None)


def _stub_ranges(slots: list[Slot], shim_funcs: dict[bytes, int],
                 spans: dict[bytes, list[tuple[int, int, str]]]) -> list[tuple[bytes, int, int]]:
    """(name, start, end) of the executable mappings of each object whose slot
    for that name is taken: a PLT stub there jumps through the taken slot."""
    by_value = {v: k for k, v in shim_funcs.items()}
    out = []
    for slot in slots:
        for ranges in spans.values():
            if any(lo <= slot.addr < hi for lo, hi, _ in ranges):
                out += [(by_value[slot.value], lo, hi) for lo, hi, perms in ranges
                        if "x" in perms]
    return out


def _prot(perms: str) -> int:
    return (1 if "r" in perms else 0) | (2 if "w" in perms else 0) | (4 if "x" in perms else 0)


def _slot_table(slots: Iterable[tuple[int, int, int, int]]) -> bytes:
    """struct mt_slot (shim.c) of each (addr, expect, value, prot)."""
    return b"".join(struct.pack("<QQQq", a, e, v, p) for a, e, v, p in slots)


def _setter_calls(setter: int, period: int, rows: list[tuple[int, int, int, int]],
                  max_rate: int = -1) -> Calls:
    """Calls of memtrace_malloc_interpose storing `rows` ((addr, expect,
    value, prot) each) and setting the period and rate cap (0 and -1 leave
    them), SLOTS_PER_CALL at a time: each call's table is written
    just below the stopped thread's red zone, a few hundred bytes at most, so
    it stays inside the stack mapping however deep the thread is."""
    return [(setter, (period, DATA, len(rows[i:i + SLOTS_PER_CALL]), max_rate),
             _slot_table(rows[i:i + SLOTS_PER_CALL]))
            for i in range(0, len(rows), SLOTS_PER_CALL)]


def _store(procfs: ProcFS, got: Interposition, libc: Libc, slots: list[Slot],
           period: int) -> None:
    """Point `slots` at the sampler, in a thread of the process."""
    rows = [(s.addr, s.old, s.value, s.prot) for s in slots]
    results, held = with_safe_thread(procfs, got.pid, libc,
                                      _setter_calls(got.setter, period, rows))
    stored = sum(results)
    got.held_seconds += held
    if stored != len(slots):
        log(f"--malloc: pid {got.pid}: {len(slots) - stored} of {len(slots)} GOT slots "
            "changed under memtrace and were left alone")


def interpose(procfs: ProcFS, pid: int, shim: str, period: int,
              max_rate: int = -1) -> Interposition:
    """Load the sampler `shim` into pid and point the GOT slots of its loaded
    objects at it (docs/malloc.md), in one stop of one thread: the slots are
    planned before (with the sampler's functions as offsets in its file), and
    where dlopen put it is read from the link_map dlopen returns (l_addr, its
    first field). InjectError if it cannot be done."""
    if os.uname().machine != "x86_64":
        raise InjectError("watch --malloc is x86-64 only (use memtrace run --malloc)")
    vmas = procfs.maps(pid)
    libc = _find_libc(procfs, pid, vmas)
    names = {*INTERPOSED, b"memtrace_malloc_interpose", b"memtrace_malloc_real"}
    offsets = dynamic_symbol_values(Path(shim).read_bytes(), names)
    setter_offset = offsets.pop(b"memtrace_malloc_interpose")
    real_offset = offsets.pop(b"memtrace_malloc_real")
    plan = plan_slots(procfs, pid, vmas, shim.encode(), offsets)
    planned = plan.slots
    real_table = b"".join(struct.pack("<Q", plan.allocator_funcs.get(name, 0))
                          for name in REAL_ORDER)
    where: list[int] = []

    def store(results: list[int], mem: int) -> list[tuple[int, tuple[int, ...], bytes]]:
        if results[0] == 0:
            return []
        where.append(struct.unpack("<Q", os.pread(mem, 8, results[0]))[0])   # l_addr
        rows = [(s.addr, s.old, where[0] + s.value, s.prot) for s in planned]
        # the allocator the sampler calls, before any slot points at it
        return [(where[0] + real_offset, (DATA,), real_table),
                *_setter_calls(where[0] + setter_offset, period, rows, max_rate)]

    path = shim.encode() + b"\0"
    results, held = with_safe_thread(procfs, pid, libc,
                                      [(libc.dlopen, (DATA, _RTLD_NOW), path)], then=store)
    if results[0] == 0 or not where:
        raise InjectError(f"dlopen of the sampler failed in pid {pid}")
    bias = where[0]
    slots = [Slot(s.addr, bias + s.value, s.old, s.prot) for s in planned]
    got = Interposition(pid, bias, {k: bias + v for k, v in offsets.items()},
                        bias + setter_offset, slots, plan.objects, plan.skipped, held,
                        plan.allocator)
    stored = sum(results[2:])       # [dlopen, memtrace_malloc_real, setter calls...]
    if stored != len(slots):
        log(f"--malloc: pid {pid}: {len(slots) - stored} of {len(slots)} GOT slots "
            "changed under memtrace and were left alone")
    return got


def _sampler_in_place(got: Interposition, shim: str, vmas: list[Vma]) -> bool:
    """The sampler is still mapped where it was loaded (not so after an exec)."""
    found = _objects(vmas).get(shim.encode())
    return found is not None and _load_bias(Path(shim).read_bytes(), found[0]) == got.shim_base


def extend(procfs: ProcFS, got: Interposition, shim: str) -> int:
    """Objects loaded since (dlopen) bind to the allocator's functions: point their
    slots at the sampler too. The number of slots taken."""
    vmas = procfs.maps(got.pid)
    if not _sampler_in_place(got, shim, vmas):
        return 0
    plan = plan_slots(procfs, got.pid, vmas, shim.encode(), got.funcs, got.objects, got)
    slots = plan.slots
    got.objects |= plan.objects
    got.skipped += plan.skipped
    if slots:
        _store(procfs, got, _find_libc(procfs, got.pid, vmas), slots, 0)
        got.slots += slots
    return len(slots)


def withdraw(procfs: ProcFS, got: Interposition, shim: str) -> None:
    """Put the functions the slots held back in the slots that still hold the sampler's
    (allocators first); the sampler stays loaded. Nothing if the process is
    gone or no longer has the sampler where it was (an exec)."""
    if not procfs.alive(got.pid):
        return
    vmas = procfs.maps(got.pid)
    if not _sampler_in_place(got, shim, vmas):
        return
    back = [(s.addr, s.value, s.old, s.prot) for s in reversed(got.slots)]
    with_safe_thread(procfs, got.pid, _find_libc(procfs, got.pid, vmas),
                      _setter_calls(got.setter, 0, back))


class Interposer:
    """watch --malloc for a session: the processes the sampler was put into;
    failures after the first one are said, not raised (the process is still
    watched)."""

    def __init__(self, procfs: ProcFS, shim: str, period: int, max_rate: int = -1) -> None:
        self.procfs, self.shim, self.period, self.max_rate = procfs, shim, period, max_rate
        self.done: dict[int, Interposition] = {}

    def add(self, pid: int) -> None:
        """Put the sampler into pid (InjectError if it cannot be done)."""
        try:
            got = interpose(self.procfs, pid, self.shim, self.period, self.max_rate)
        except OSError as e:        # it exited meanwhile, or /proc refused
            raise InjectError(f"pid {pid}: {e.strerror or e}") from None
        self.done[pid] = got
        other = f", {got.skipped} left to another allocator (not sampled)" if got.skipped else ""
        calls = (f"; it calls {escape_name(got.allocator)}'s malloc" if got.allocator
                 else "")
        log(f"--malloc: sampler loaded into pid {pid}: {len(got.slots)} GOT slots point at it"
            f"{other}{calls}; one thread held {got.held_seconds * 1000:.1f} ms")

    def extend(self, pid: int) -> None:
        """A library was loaded in pid (dlopen): its slots bind to the allocator's
        functions; point them at the sampler too."""
        got = self.done.get(pid)
        if got is None:
            return
        try:
            taken = extend(self.procfs, got, self.shim)
        except (MemtraceError, OSError) as e:
            log(f"--malloc: pid {pid}: a library loaded since attach is not sampled: {e}")
            return
        if taken:
            log(f"--malloc: pid {pid}: {taken} GOT slots of libraries loaded since attach "
                "point at the sampler")

    def withdraw(self, pid: int) -> None:
        got = self.done.pop(pid, None)
        if got is None:
            return
        try:
            withdraw(self.procfs, got, self.shim)
        except (MemtraceError, OSError) as e:
            log(f"--malloc: pid {pid}: the allocator's functions not put back: {e}")

    def withdraw_all(self) -> None:
        for pid in list(self.done):
            self.withdraw(pid)
