"""glibc's malloc structures read from a process: malloc_state (the arenas and
their `next` chain) and malloc_par (mp_), located without debug symbols in
libc's writable data and checked for plausibility before they are trusted."""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

from memtrace.heap.layout import (
    HEAP_MAX_SIZE,
    MAX_ARENAS,
    NBINS,
    NFASTBINS,
    QWORD,
    QWORD_PAIR,
    GlibcLayout,
    HeapError,
)
from memtrace.heap.memory import AddressSpace
from memtrace.trace.procfs import Vma


@dataclass
class ArenaState:
    addr: int
    main: bool
    fastbins: list[int]
    top: int
    next: int
    attached_threads: int
    system_mem: int
    max_system_mem: int
    raw: bytes = b""


def read_arena(space: AddressSpace, layout: GlibcLayout, addr: int, main: bool) -> ArenaState:
    raw = space.read(addr, layout.state_size)
    q = lambda off: int(QWORD.unpack_from(raw, off)[0])  # noqa: E731
    return ArenaState(
        addr=addr, main=main,
        fastbins=[q(layout.fastbins + 8 * i) for i in range(NFASTBINS)],
        top=q(layout.top), next=q(layout.next),
        attached_threads=q(layout.attached_threads), system_mem=q(layout.system_mem),
        max_system_mem=q(layout.max_system_mem), raw=raw)


def arena_plausible(layout: GlibcLayout, a: ArenaState) -> bool:
    """Layout checks on one malloc_state image: bin headers are self-linked when
    empty (which pins the bins' offset), pointers are aligned, counters sane."""
    raw = a.raw
    if a.top == 0 or a.top & 15 or a.max_system_mem < a.system_mem or a.system_mem >> 47:
        return False
    if a.attached_threads > 1 << 22:
        return False
    if any(fb & 15 for fb in a.fastbins):
        return False
    empty = 0
    for i in range(NBINS - 1):
        slot = layout.bins + 16 * i
        fd, bk = QWORD_PAIR.unpack_from(raw, slot)
        own = a.addr + slot - 16
        if fd == own and bk == own:
            empty += 1
        elif fd == own or bk == own or fd == 0 or bk == 0 or fd & 15 or bk & 15:
            return False
    return empty >= 1


def arena_locked(a: ArenaState) -> bool:
    """The arena's mutex (the int at offset 0: 0 free, 1 held, 2 held with waiters)
    is held: a thread is inside malloc or free on this arena."""
    return int.from_bytes(a.raw[:4], "little") in (1, 2)


def arena_being_updated(layout: GlibcLayout, a: ArenaState) -> bool:
    """A malloc_state that fails `arena_plausible` only the way one does while the
    thread holding its lock is between two stores: a bin header half-linked (fd
    moved on, bk still itself, or the reverse) or system_mem already raised and
    max_system_mem not yet. Everything else must still hold."""
    if not arena_locked(a) or arena_plausible(layout, a):
        return False
    if a.top == 0 or a.top & 15 or a.system_mem >> 47 or a.attached_threads > 1 << 22:
        return False
    if any(fb & 15 for fb in a.fastbins):
        return False
    for i in range(NBINS - 1):
        fd, bk = QWORD_PAIR.unpack_from(a.raw, layout.bins + 16 * i)
        if fd == 0 or bk == 0 or fd & 15 or bk & 15:
            return False
    return True


def arena_chain(space: AddressSpace, layout: GlibcLayout, main: int) -> list[ArenaState]:
    """main_arena, then every arena on its `next` chain until it comes back."""
    out = [read_arena(space, layout, main, True)]
    seen = {main}
    nxt = out[0].next
    while nxt != main:
        if nxt in seen or nxt == 0 or nxt & 15 or len(out) >= MAX_ARENAS:
            raise HeapError(f"arena chain broken at {nxt:#x}")
        seen.add(nxt)
        out.append(read_arena(space, layout, nxt, False))
        nxt = out[-1].next
    return out


def libc_data_regions(vmas: list[Vma], libc: bytes) -> list[tuple[int, int]]:
    """libc's writable data: its rw mappings and the anonymous one right after (.bss)."""
    out = []
    for i, v in enumerate(vmas):
        if v.path == libc and v.perms.startswith("rw"):
            out.append((v.start, v.end))
            if i + 1 < len(vmas):
                n = vmas[i + 1]
                if n.start == v.end and not n.path and n.perms.startswith("rw"):
                    out.append((n.start, n.end))
    return out


def find_main_arena(space: AddressSpace, layout: GlibcLayout,
                    regions: list[tuple[int, int]]) -> int:
    """The address of main_arena: a plausible malloc_state in libc's data whose
    `next` chain returns to itself. If the only such chain has arenas that a
    thread is updating right now (lock held, half-linked), that is a transient
    state (HeapError "inconsistent": take the snapshot again), not a layout
    that cannot be verified."""
    found = []
    busy: list[tuple[int, int]] = []  # (candidate, the arena being updated)
    for start, end in regions:
        data = space.read(start, end - start)
        words = array("Q")
        words.frombytes(data[: len(data) // 8 * 8])
        for i, v in enumerate(words):
            m = start + 8 * i - layout.next
            if m < start or m + layout.state_size > end or m & 15:
                continue
            if v != m and (v == 0 or v & 15 or regions[0][0] <= v < regions[-1][1]):
                continue
            a = ArenaState(m, True, [], 0, 0, 0, 0, 0,
                           raw=data[m - start:m - start + layout.state_size])
            q = lambda off, raw=a.raw: int(QWORD.unpack_from(raw, off)[0])  # noqa: E731
            a.fastbins = [q(layout.fastbins + 8 * k) for k in range(NFASTBINS)]
            a.top, a.next = q(layout.top), q(layout.next)
            a.attached_threads = q(layout.attached_threads)
            a.system_mem, a.max_system_mem = q(layout.system_mem), q(layout.max_system_mem)
            if not arena_plausible(layout, a) and not arena_being_updated(layout, a):
                continue
            try:
                chain = arena_chain(space, layout, m)
            except (HeapError, OSError):
                continue
            chain[0] = a
            odd = [x for x in chain if not arena_plausible(layout, x)]
            if not odd:
                found.append(m)
            elif all(arena_being_updated(layout, x) for x in odd):
                busy.append((m, odd[0].addr))
    if len(found) + len(busy) != 1:
        n = len(found) + len(busy)
        raise HeapError("unsupported glibc layout: "
                        + ("no malloc_state found in libc's data" if not n else
                           f"{n} candidate malloc_states in libc's data"),
                        "unsupported")
    if busy:
        raise HeapError(f"arena {busy[0][1]:#x} is half-updated (its lock is held: a thread "
                        "is inside malloc or free)")
    return found[0]


@dataclass
class MallocPar:
    addr: int
    trim_threshold: int
    top_pad: int
    mmap_threshold: int
    thp_pagesize: int
    n_mmaps: int
    n_mmaps_max: int
    no_dyn_threshold: int
    mmapped_mem: int
    sbrk_base: int
    tcache_bins: int
    tcache_count: int


def read_mp(space: AddressSpace, layout: GlibcLayout, addr: int) -> MallocPar:
    raw = space.read(addr, layout.mp_size)
    q = lambda off: int(QWORD.unpack_from(raw, off)[0])  # noqa: E731
    i = lambda off: int(struct.unpack_from("<i", raw, off)[0])  # noqa: E731
    return MallocPar(
        addr=addr, trim_threshold=q(layout.mp_trim_threshold), top_pad=q(layout.mp_top_pad),
        mmap_threshold=q(layout.mp_mmap_threshold),
        thp_pagesize=q(layout.mp_thp_pagesize) if layout.mp_thp_pagesize is not None else 0,
        n_mmaps=i(layout.mp_n_mmaps), n_mmaps_max=i(layout.mp_n_mmaps_max),
        no_dyn_threshold=i(layout.mp_no_dyn_threshold), mmapped_mem=q(layout.mp_mmapped_mem),
        sbrk_base=q(layout.mp_sbrk_base), tcache_bins=q(layout.mp_tcache_bins),
        tcache_count=q(layout.mp_tcache_count))


def mp_plausible(mp: MallocPar) -> bool:
    return (0 <= mp.mmap_threshold <= HEAP_MAX_SIZE // 2 and 0 <= mp.n_mmaps <= mp.n_mmaps_max
            and mp.no_dyn_threshold in (0, 1) and mp.tcache_bins <= 1024
            and mp.tcache_count <= 65535 and mp.thp_pagesize < 1 << 31
            and mp.mmapped_mem >> 47 == 0 and mp.trim_threshold >> 47 == 0)


def find_mp(space: AddressSpace, layout: GlibcLayout, regions: list[tuple[int, int]],
            sbrk_base: int | None) -> MallocPar | None:
    """mp_ (malloc_par): anchored on sbrk_base == [heap] start when there is a
    heap, else on the default tcache parameters (64 bins, 7 per bin)."""
    found = []
    for start, end in regions:
        data = space.read(start, end - start)
        words = array("Q")
        words.frombytes(data[: len(data) // 8 * 8])
        for i, v in enumerate(words):
            a = start + 8 * i
            if sbrk_base is not None:
                if v != sbrk_base:
                    continue
                addr = a - layout.mp_sbrk_base
            else:
                if v != 64:
                    continue
                addr = a - layout.mp_tcache_bins
            if addr < start or addr + layout.mp_size > end:
                continue
            mp = read_mp(space, layout, addr)
            if not mp_plausible(mp):
                continue
            if sbrk_base is None and (mp.sbrk_base != 0 or mp.tcache_count != 7):
                continue
            found.append(mp)
    return found[0] if len(found) == 1 else None
