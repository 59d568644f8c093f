"""Heap anatomy of glibc malloc, read from outside the process.

`memtrace heap PID` answers "why is this memory not given back?": for the main
arena's brk heap and each thread arena it walks every chunk header, reads the
tcache and fastbin lists (chunks cached there look allocated to the arena but
are free to the program), splits free bytes into resident and not with
PAGEMAP_SCAN, and computes what `malloc_trim(0)` would return.

Nothing here depends on debug symbols: Debian's libc.so.6 exports neither
`main_arena` nor `mp_`. The structures are located at run time in libc's
writable data (main_arena is the malloc_state whose `next` chain comes back to
itself; mp_ is the malloc_par whose `sbrk_base` is the start of [heap]), and
every layout assumption is checked against the heap it describes (bin headers,
the walk landing exactly on `top`, `system_mem` equal to the walked size, the
heap_info of thread heaps pointing back at their arena). A failed check gives
"unsupported glibc layout", never numbers.

The analysis is pure: it reads memory through an `AddressSpace` (maps, reads,
resident runs), so unit tests run it on synthetic heap images.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import functools
import os
import re
import signal
import struct
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import accumulate, compress
from typing import Any, Protocol

from memtrace.trace.procfs import Vma, escape_name, parse_maps
from memtrace.util.elf import PT_INTERP, defined_dynamic_symbols, is_elf64le, program_headers
from memtrace.util.ranges import merge_ranges
from memtrace.util.units import fmt_bytes

SIZE_SZ = 8
MALLOC_ALIGNMENT = 16
MINSIZE = 32
CHUNK_HDR_SZ = 16
PREV_INUSE = 1
IS_MMAPPED = 2
NON_MAIN_ARENA = 4
SIZE_BITS = 7
NFASTBINS = 10
NBINS = 128
MALLOC_CHUNK_SIZE = 48  # sizeof(struct malloc_chunk)
HEAP_MAX_SIZE = 64 << 20  # 2 * DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
MAX_ARENAS = 4096
WINDOW = 4 << 20
_Q = struct.Struct("<Q")
_QQ = struct.Struct("<QQ")


class HeapError(Exception):
    """The analysis cannot give figures; `kind` says why."""

    def __init__(self, message: str, kind: str = "inconsistent") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind  # "inconsistent" (retry may help) | "unsupported" | "gone"


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class GlibcLayout:
    """Offsets of the glibc structures this module reads (64-bit, glibc >= 2.27)."""

    version: tuple[int, int]
    # struct malloc_state
    fastbins: int = 16
    top: int = 96
    last_remainder: int = 104
    bins: int = 112
    next: int = 2160
    next_free: int = 2168
    attached_threads: int = 2176
    system_mem: int = 2184
    max_system_mem: int = 2192
    state_size: int = 2200
    # heap_info
    heap_info_size: int = 48
    # struct malloc_par
    mp_trim_threshold: int = 0
    mp_top_pad: int = 8
    mp_mmap_threshold: int = 16
    mp_thp_pagesize: int | None = 40
    mp_n_mmaps: int = 60
    mp_n_mmaps_max: int = 64
    mp_no_dyn_threshold: int = 72
    mp_mmapped_mem: int = 80
    mp_sbrk_base: int = 96
    mp_tcache_bins: int = 104
    mp_tcache_count: int = 120
    mp_size: int = 136
    # tcache_perthread_struct
    tcache_count_size: int = 2  # uint16_t counts[] since 2.30, char before
    tcache_bins: int = 64
    safe_linking: bool = True  # since 2.32

    @property
    def tcache_entries(self) -> int:
        return self.tcache_bins * self.tcache_count_size

    @property
    def tcache_chunk_size(self) -> int:
        return _request2size(self.tcache_entries + 8 * self.tcache_bins)

    @property
    def name(self) -> str:
        return f"glibc {self.version[0]}.{self.version[1]}"


def layout_for(version: tuple[int, int]) -> GlibcLayout:
    """The layout of a glibc version, or HeapError(unsupported). Only 2.36 is
    tested; the others are derived from glibc's history and checked at run time."""
    if version < (2, 27) or version[0] != 2:
        raise HeapError(f"unsupported glibc layout: glibc {version[0]}.{version[1]} is older "
                        "than 2.27 (no tcache or a different malloc_state)", "unsupported")
    if version >= (2, 35):  # heap_info.pagesize; mp_.thp_pagesize, hp_pagesize, hp_flags
        base = GlibcLayout(version=version)
    else:
        base = GlibcLayout(version=version, heap_info_size=32, mp_thp_pagesize=None,
                           mp_n_mmaps=40, mp_n_mmaps_max=44, mp_no_dyn_threshold=52,
                           mp_mmapped_mem=56, mp_sbrk_base=72, mp_tcache_bins=80,
                           mp_tcache_count=96, mp_size=112)
    if version < (2, 30):
        base = _replace(base, tcache_count_size=1)
    if version < (2, 32):
        base = _replace(base, safe_linking=False)
    return base


def _replace(layout: GlibcLayout, **kw: Any) -> GlibcLayout:
    import dataclasses
    return dataclasses.replace(layout, **kw)


def _request2size(req: int) -> int:
    return max(MINSIZE, (req + SIZE_SZ + MALLOC_ALIGNMENT - 1) & ~(MALLOC_ALIGNMENT - 1))


def parse_glibc_version(data: bytes) -> tuple[int, int] | None:
    m = re.search(rb"GNU C Library [^\n]*?release version (\d+)\.(\d+)", data)
    if m:
        return int(m.group(1)), int(m.group(2))
    return None


# --------------------------------------------------------------------- address space


class AddressSpace(Protocol):
    """What the analysis needs from a process (a fake in unit tests)."""

    page_size: int

    def maps(self) -> list[Vma]: ...

    def read(self, addr: int, size: int) -> bytes: ...

    def resident_runs(self, start: int, end: int) -> list[tuple[int, int]]: ...

    def file_bytes(self, path: bytes, limit: int) -> bytes | None: ...


class ResidentMap:
    """Sorted, merged resident runs with O(log n) byte counts over any range."""

    def __init__(self, runs: Iterable[tuple[int, int]]) -> None:
        merged = merge_ranges(runs)
        self.starts = [s for s, _ in merged]
        self.ends = [e for _, e in merged]
        self.cum = [0]
        for s, e in merged:
            self.cum.append(self.cum[-1] + e - s)

    def bytes_in(self, lo: int, hi: int) -> int:
        if hi <= lo or not self.starts:
            return 0
        i = bisect.bisect_right(self.starts, lo) - 1
        if i >= 0 and self.ends[i] >= hi:  # one run covers it all
            return hi - lo
        return self._upto(hi) - self._upto(lo)

    def _upto(self, x: int) -> int:
        i = bisect.bisect_right(self.starts, x) - 1
        if i < 0:
            return 0
        return self.cum[i] + min(x, self.ends[i]) - self.starts[i]

    def runs_in(self, lo: int, hi: int) -> list[tuple[int, int]]:
        out = []
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        while i < len(self.starts) and self.starts[i] < hi:
            s, e = max(lo, self.starts[i]), min(hi, self.ends[i])
            if s < e:
                out.append((s, e))
            i += 1
        return out


def u64(space: AddressSpace, addr: int) -> int:
    return int(_Q.unpack(space.read(addr, 8))[0])


# ------------------------------------------------------------------ allocator detection

KNOWN_ALLOCATORS = (
    (b"jemalloc", "jemalloc"), (b"tcmalloc", "tcmalloc"), (b"mimalloc", "mimalloc"),
    (b"hoard", "hoard"), (b"libasan", "asan"), (b"libtsan", "tsan"), (b"libmsan", "msan"),
    (b"snmalloc", "snmalloc"), (b"rpmalloc", "rpmalloc"),
)


@dataclass
class AllocatorInfo:
    allocator: str  # "glibc", "musl", "jemalloc", ..., "unknown"
    supported: bool
    reason: str = ""
    libc_path: bytes = b""


def _is_libc(path: bytes) -> bool:
    base = path.rsplit(b"/", 1)[-1]
    return base == b"libc.so.6" or bool(re.fullmatch(rb"libc-2\.\d+\.so", base))


def elf_info(data: bytes) -> tuple[bool, set[bytes]] | None:
    """(has PT_INTERP, names of defined dynamic symbols) of an ELF64 LE file
    (util/elf); None if not such a file. No names if its section table is cut off."""
    if not is_elf64le(data):
        return None
    interp = any(h.type == PT_INTERP for h in program_headers(data) or ())
    return interp, defined_dynamic_symbols(data)


def detect_allocator(space: AddressSpace, exe: bytes) -> AllocatorInfo:
    """Which malloc the process uses, from its mappings and their dynamic symbols."""
    vmas = space.maps()
    paths = list(dict.fromkeys(v.path for v in vmas if v.path.startswith(b"/")))
    for p in paths:
        base = p.rsplit(b"/", 1)[-1]
        if b"ld-musl" in base or b"libc.musl" in base or (
                base.startswith(b"libc.so") and b"musl" in p):
            return AllocatorInfo("musl", False, "the process uses musl libc's malloc "
                                 f"({escape_name(p)}); memtrace heap reads only "
                                 "glibc malloc")
    libc = next((p for p in paths if _is_libc(p)), b"")
    for p in paths:
        base = p.rsplit(b"/", 1)[-1]
        if _is_libc(p) or base.startswith((b"ld-linux", b"libc_malloc_debug")):
            continue
        data = space.file_bytes(p, 64 << 20)
        info = elf_info(data) if data else None
        if info is None or b"malloc" not in info[1]:
            continue
        name = next((n for key, n in KNOWN_ALLOCATORS if key in base.lower()), "unknown")
        if name == "unknown" and p == exe:
            name = next((n for key, n in KNOWN_ALLOCATORS if data and key in data), "unknown")
        return AllocatorInfo(name, False, f"malloc is provided by {escape_name(p)}"
                             f"{' (' + name + ')' if name != 'unknown' else ''}, not by glibc; "
                             "memtrace heap reads only glibc malloc")
    if not libc:
        data = space.file_bytes(exe, 64 << 20) if exe else None
        info = elf_info(data) if data else None
        if info is not None and not info[0]:
            return AllocatorInfo("unknown", False, "statically linked executable: no libc.so.6 "
                                 "is mapped, so glibc's malloc state cannot be located")
        return AllocatorInfo("unknown", False, "no glibc (libc.so.6) is mapped in the process")
    return AllocatorInfo("glibc", True, libc_path=libc)


# ----------------------------------------------------------------------- the heap walk


@dataclass
class Walk:
    """Chunks of one heap segment in address order (top and fenceposts excluded)."""

    start: int  # first chunk
    end: int  # end of the segment's chunk area (top end, or fencepost end)
    starts: array = field(default_factory=lambda: array("Q"))
    sizes: array = field(default_factory=lambda: array("Q"))
    free: bytearray = field(default_factory=bytearray)  # 1: in a bin (next PREV_INUSE clear)
    top: int | None = None
    top_size: int = 0
    fence_bytes: int = 0
    candidates: list[int] = field(default_factory=list)  # allocated chunks of keep_size


def walk_segment(read: Callable[[int, int], bytes], first: int, end: int, top: int | None,
                 main: bool, direct: Callable[[int, int], bytes] | None = None,
                 keep_size: int = 0,
                 keep: Callable[[bytes, int], bool] | None = None) -> Walk:
    """Walk chunk headers from `first`. With `top`, the walk must land exactly on it
    and top must end at `end`; without, it ends at the fencepost (a header of size
    0 after a 16-byte chunk) of a heap that is no longer the arena's newest.
    Chunks of `keep_size` whose contents pass `keep(window, offset of the chunk)`
    (or lie past the window) are listed in `candidates` (tcache structs)."""
    w = Walk(first, end)
    sizes = w.sizes
    free_idx: list[int] = []
    limit = top if top is not None else end
    bad = IS_MMAPPED | (NON_MAIN_ARENA if main else 0)
    pos = first
    base = first
    buf = b""
    blen = 0
    n = 0
    prev_size = -1  # the first chunk must have PREV_INUSE
    unpack = _QQ.unpack_from
    append = sizes.append
    mark_free = free_idx.append
    while True:
        off = pos - base
        if off + 16 > blen:
            base, off = pos, 0
            buf = read(pos, min(WINDOW, end - pos))
            blen = len(buf)
            if blen < 16:
                raise HeapError(f"chunk header at {pos:#x} is outside the heap")
        psz, field_ = unpack(buf, off)
        size = field_ & ~SIZE_BITS
        if not field_ & PREV_INUSE:
            if psz != prev_size:
                if size == 0 and direct is not None:  # in a page the window skipped
                    psz, field_ = _QQ.unpack(direct(pos, 16))
                    size = field_ & ~SIZE_BITS
                if not field_ & PREV_INUSE and psz != prev_size:
                    raise HeapError(f"chunk at {pos:#x}: PREV_INUSE clear but prev_size "
                                    f"{psz:#x} is not the previous chunk's size {prev_size:#x}")
            if not field_ & PREV_INUSE:
                mark_free(n - 1)
        if size < MINSIZE or size & 15 or field_ & bad or pos + size > limit:
            # the rare cases: the top, a fencepost, a header in a skipped page, or an error
            if size == 0 and direct is not None and field_ == 0:
                psz, field_ = _QQ.unpack(direct(pos, 16))
                size = field_ & ~SIZE_BITS
            if pos == top:
                if field_ & (IS_MMAPPED | NON_MAIN_ARENA) or size < MINSIZE or size & 15:
                    raise HeapError(f"top chunk at {pos:#x} has an invalid header {field_:#x}")
                if not field_ & PREV_INUSE:  # free() merges a chunk into the top
                    raise HeapError(f"a free chunk lies right before the top at {pos:#x}")
                if pos + size != end:
                    raise HeapError(f"top chunk {pos:#x}+{size:#x} does not end at {end:#x}")
                w.top, w.top_size = pos, size
                break
            if top is None and size == 0:
                # fencepost: [chunk of size 16 | PREV_INUSE][header 0 | PREV_INUSE]
                if n and sizes[-1] == CHUNK_HDR_SZ:
                    sizes.pop()
                    n -= 1
                    pos -= CHUNK_HDR_SZ
                w.fence_bytes = end - pos
                w.end = pos
                break
            if size == CHUNK_HDR_SZ and top is None and not field_ & bad:
                pass  # maybe the 16-byte fencepost chunk; the 0 header must follow
            elif size & 15 or field_ & bad or size < MINSIZE:
                raise HeapError(f"chunk at {pos:#x} has an invalid header {field_:#x}")
            if pos + size > limit:
                raise HeapError(f"chunk at {pos:#x} of size {size:#x} runs past {limit:#x}")
        elif size == keep_size and (keep is None or off + size > blen or keep(buf, off)):
            w.candidates.append(pos)
        append(size)
        n += 1
        prev_size = size
        pos += size
    starts = w.starts
    starts.append(first)
    starts.extend(accumulate(sizes, initial=first))
    del starts[0]
    del starts[-1]
    free = bytearray(n)
    for j in free_idx:
        if j >= n:
            raise HeapError("the chunk before a fencepost is free")
        free[j] = 1
    k = free.find(b"\x01\x01")
    if k >= 0:  # free() coalesces: two free chunks side by side are a free in progress
        raise HeapError(f"two free chunks side by side at {starts[k]:#x}")
    w.free = free
    return w


# ------------------------------------------------------------------ malloc structures


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
    q = lambda off: int(_Q.unpack_from(raw, off)[0])  # noqa: E731
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
        fd, bk = _QQ.unpack_from(raw, slot)
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
        fd, bk = _QQ.unpack_from(a.raw, layout.bins + 16 * i)
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
            q = lambda off, raw=a.raw: int(_Q.unpack_from(raw, off)[0])  # noqa: E731
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
    q = lambda off: int(_Q.unpack_from(raw, off)[0])  # noqa: E731
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


# ------------------------------------------------------------------- cached chunks


class ChunkIndex:
    """Every walked chunk of every arena, to validate list pointers."""

    def __init__(self, walks: list[Walk]) -> None:
        self.walks = sorted(walks, key=lambda w: w.start)
        self.bounds = [w.start for w in self.walks]

    def walk_of(self, addr: int) -> Walk | None:
        i = bisect.bisect_right(self.bounds, addr) - 1
        if i >= 0 and addr < self.walks[i].end:
            return self.walks[i]
        return None

    def find(self, chunk: int) -> tuple[Walk, int] | None:
        i = bisect.bisect_right(self.bounds, chunk) - 1
        if i < 0:
            return None
        w = self.walks[i]
        j = bisect.bisect_left(w.starts, chunk)
        if j < len(w.starts) and w.starts[j] == chunk:
            return w, j
        return None


def _demangle(layout: GlibcLayout, pos: int, stored: int) -> int:
    return stored ^ (pos >> 12) if layout.safe_linking else stored


def read_tcache(space: AddressSpace, layout: GlibcLayout, index: ChunkIndex, chunk: int,
                max_count: int) -> dict[int, int] | None:
    """Cached chunks {chunk address: size} of the tcache_perthread_struct in the
    chunk at `chunk`, or None if it is not one (every list must have exactly
    `counts[i]` entries, each an allocated chunk of bin i's size).

    A tcache whose thread was caught inside tcache_put or tcache_get (no lock:
    the list head and the count are two stores) has exactly one list, of valid
    entries, one longer or shorter than its count: that raises HeapError
    "inconsistent" (take the snapshot again) rather than dropping the tcache,
    which would count its chunks as in use."""
    mem = chunk + CHUNK_HDR_SZ
    raw = space.read(mem, layout.tcache_entries + 8 * layout.tcache_bins)
    fmt = "<64H" if layout.tcache_count_size == 2 else "<64B"
    counts = struct.unpack_from(fmt.replace("64", str(layout.tcache_bins)), raw, 0)
    entries = struct.unpack_from(f"<{layout.tcache_bins}Q", raw, layout.tcache_entries)
    out: dict[int, int] = {}
    torn: tuple[int, int, int] | None = None  # (bin, entries, count)
    for i in range(layout.tcache_bins):
        want = 32 + 16 * i
        count, e = counts[i], entries[i]
        if count > max_count:
            return None
        n = 0
        while e:
            if e & 15 or n > count:
                return None
            hit = index.find(e - CHUNK_HDR_SZ)
            if hit is None:
                return None
            w, j = hit
            if w.sizes[j] != want or w.free[j] or (e - CHUNK_HDR_SZ) in out:
                return None
            out[e - CHUNK_HDR_SZ] = want
            n += 1
            e = _demangle(layout, e, u64(space, e))
        if n != count:
            if n == 0 or abs(n - count) != 1 or torn is not None:
                return None
            torn = (i, n, count)
    if torn is not None:
        raise HeapError(f"the tcache at {chunk:#x} is half-updated (list {torn[0]} has "
                        f"{torn[1]} entries, its count says {torn[2]}: a thread is inside "
                        "malloc or free)")
    return out


def read_fastbins(space: AddressSpace, layout: GlibcLayout, index: ChunkIndex,
                  arena: ArenaState) -> dict[int, int]:
    """Chunks {address: size} in the arena's fastbin lists, each checked to be a
    walked, allocated-looking chunk of its bin's size. The loop is written out
    (no helper calls per entry, pages read once): a heap can hold millions."""
    out: dict[int, int] = {}
    pages: dict[int, bytes] = {}
    bounds, walks = index.bounds, index.walks
    unpack = _Q.unpack_from
    safe = layout.safe_linking
    for i, head in enumerate(arena.fastbins):
        want = 32 + 16 * i
        p = head
        while p:
            if p & 15 or p in out:
                raise HeapError(f"fastbin {i} of arena {arena.addr:#x} is corrupt at {p:#x}")
            k = bisect.bisect_right(bounds, p) - 1
            ok = False
            if k >= 0:
                w = walks[k]
                j = bisect.bisect_left(w.starts, p)
                ok = (j < len(w.starts) and w.starts[j] == p and w.sizes[j] == want
                      and not w.free[j])
            if not ok:
                raise HeapError(f"fastbin {i} entry {p:#x} is not an allocated chunk of "
                                f"{want} bytes")
            out[p] = want
            fd = p + 16  # 16-aligned: the 8 bytes never cross a page
            page = pages.get(fd >> 12)
            if page is None:
                page = pages[fd >> 12] = space.read(fd & ~4095, 4096)
            stored = unpack(page, fd & 4095)[0]
            p = stored ^ (fd >> 12) if safe else stored
    return out


# ------------------------------------------------------------------------ the figures


HISTOGRAM_EDGES = [32 << k for k in range(0, 26)]  # 32 B .. 1 GiB, powers of two


def histogram(sizes: Iterable[int]) -> list[dict[str, int]]:
    chunks = [0] * len(HISTOGRAM_EDGES)
    total = [0] * len(HISTOGRAM_EDGES)
    for s, n in Counter(sizes).items():
        k = min(max(s.bit_length() - 6, 0), len(HISTOGRAM_EDGES) - 1)
        chunks[k] += n
        total[k] += s * n
    return [{"min_bytes": HISTOGRAM_EDGES[k], "max_bytes": HISTOGRAM_EDGES[k] * 2 - 1,
             "chunks": chunks[k], "bytes": total[k]} for k in range(len(chunks)) if chunks[k]]


def trim_ranges(free_runs: list[tuple[int, int]], top: int, top_end: int, page: int,
                main: bool, thp_pagesize: int = 0) -> tuple[list[tuple[int, int]], int]:
    """Address ranges malloc_trim(0) releases: MADV_DONTNEED of the whole pages
    inside every free chunk of the unsorted and large bins (mtrim) and, for the
    main arena, the sbrk shrink of the top chunk (systrim). `free_runs` are the
    chunks free after malloc_consolidate (fastbin chunks merged into neighbours);
    a run ending at `top` merges into it. Returns (ranges, new top start)."""
    out = []
    psm1 = page - 1
    for p, size in free_runs:
        if p + size == top:
            top = p
            continue
        if size > psm1 + MALLOC_CHUNK_SIZE:
            paligned = (p + MALLOC_CHUNK_SIZE + psm1) & ~psm1
            rest = p + size - paligned
            if rest > psm1:
                out.append((paligned, paligned + (rest & ~psm1)))
    if main:
        top_area = top_end - top - MINSIZE - 1
        if top_area > 0:
            unit = thp_pagesize or page
            extra = top_area // unit * unit
            if extra:
                out.append((top_end - extra, top_end))
    return out, top


def merge_runs(chunks: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(address, size) chunks merged where one ends where the next begins (the
    chunks of a heap never overlap)."""
    return [(s, e - s) for s, e in merge_ranges((p, p + z) for p, z in chunks)]


@dataclass
class ArenaReport:
    kind: str
    addr: int
    start: int
    end: int
    heaps: list[tuple[int, int]]
    walks: list[Walk]
    resident: ResidentMap
    system_mem: int
    attached_threads: int
    figures: dict[str, Any] = field(default_factory=dict)


def arena_figures(rep: ArenaReport, tcached: dict[int, int], fastbin: dict[int, int],
                  page: int, thp_pagesize: int) -> dict[str, Any]:
    res = rep.resident
    in_use = in_use_n = 0
    free_sizes: list[int] = []
    free_chunks: list[tuple[int, int]] = []  # truly free (in bins), address order
    free_res = 0
    cached_t = cached_f = 0
    for w in rep.walks:
        starts, sizes, free = w.starts, w.sizes, w.free
        fs = list(compress(starts, free))
        fz = list(compress(sizes, free))
        free_chunks += zip(fs, fz)
        free_sizes += fz
        free_total = sum(fz)
        last = w.top if w.top is not None else w.end
        if res.bytes_in(w.start, last) == last - w.start:  # all chunks resident
            free_res += free_total
        else:
            free_res += sum(res.bytes_in(p, p + z) for p, z in zip(fs, fz))
        in_use += sum(sizes) - free_total
        in_use_n += len(starts) - len(fs)
    for table, is_t in ((tcached, True), (fastbin, False)):
        for p, z in table.items():
            free_sizes.append(z)
            free_res += res.bytes_in(p, p + z)
            in_use -= z
            in_use_n -= 1
            if is_t:
                cached_t += z
            else:
                cached_f += z
    top_walk = next(w for w in rep.walks if w.top is not None)
    top, top_size = top_walk.top or 0, top_walk.top_size
    top_end = top + top_size
    top_res = res.bytes_in(top, top_end)
    free_bytes = sum(free_sizes) + top_size
    free_res += top_res
    overhead = rep.system_mem - sum(sum(w.sizes) for w in rep.walks) - top_size
    # what malloc_trim(0) returns: resident pages in the released ranges. Free
    # chunks in bins are never adjacent (free() coalesces): only fastbin chunks
    # merge with neighbours in malloc_consolidate.
    runs = merge_runs(free_chunks + list(fastbin.items())) if fastbin else free_chunks
    run_starts = [p for p, _ in runs]
    ranges: list[tuple[int, int]] = []
    for w in rep.walks:
        seg_runs = runs[bisect.bisect_left(run_starts, w.start):
                        bisect.bisect_left(run_starts, w.end)]
        if w.top is not None:
            r, _ = trim_ranges(seg_runs, top, top_end, page, rep.kind == "main", thp_pagesize)
        else:
            r, _ = trim_ranges(seg_runs, -1, -1, page, False)
        ranges += r
    trimmable = sum(res.bytes_in(a, b) for a, b in ranges)
    trim_top = 0
    if rep.kind == "main" and ranges and ranges[-1][1] == top_end:
        trim_top = res.bytes_in(*ranges[-1])
    # the pin: live chunks between the top chunk and the highest free chunk
    # (chunks cached in a tcache pin too: the arena sees them allocated)
    pin_bytes = pin_chunks = hole = hole_res = 0
    j = len(top_walk.starts) - 1
    while j >= 0 and not top_walk.free[j] and top_walk.starts[j] not in fastbin:
        pin_bytes += top_walk.sizes[j]
        pin_chunks += 1
        j -= 1
    if j >= 0:
        end_free = top_walk.starts[j] + top_walk.sizes[j]
        k = bisect.bisect_right(run_starts, top_walk.starts[j]) - 1
        if k >= 0 and runs[k][0] + runs[k][1] == end_free:
            hole = runs[k][1]
            hole_res = res.bytes_in(runs[k][0], end_free)
    top_pinned = bool(pin_chunks) and hole >= page and hole > pin_bytes
    largest = max(free_sizes, default=0)
    binned = sum(z for _, z in free_chunks)
    return {
        "kind": rep.kind,
        "arena_address": rep.addr,
        "start": rep.start,
        "end": rep.end,
        "heaps": [{"start": a, "end": b} for a, b in rep.heaps],
        "size_bytes": sum(b - a for a, b in rep.heaps),
        "system_mem_bytes": rep.system_mem,
        "attached_threads": rep.attached_threads,
        "resident_bytes": sum(res.bytes_in(a, b) for a, b in rep.heaps),
        "in_use_bytes": in_use,
        "in_use_chunks": in_use_n,
        # malloc's own count (mallinfo2().uordblks): chunks cached in a tcache are
        # allocated to the arena, and so are the headers of thread heaps
        "malloc_in_use_bytes": in_use + cached_t + overhead,
        "header_overhead_bytes": in_use_n * SIZE_SZ,
        "arena_overhead_bytes": overhead,
        "free_bytes": free_bytes,
        "free_chunks": len(free_sizes),
        "free_resident_bytes": free_res,
        "binned_free_bytes": binned,
        "cached_bytes": cached_t + cached_f,
        "tcache_bytes": cached_t,
        "fastbin_bytes": cached_f,
        "largest_free_chunk_bytes": largest,
        "top_chunk": top,
        "top_chunk_bytes": top_size,
        "top_resident_bytes": top_res,
        "top_pinned": top_pinned,
        "pin_bytes": pin_bytes,
        "pin_chunks": pin_chunks,
        "hole_bytes": hole,
        "hole_resident_bytes": hole_res,
        "trimmable_bytes": trimmable,
        "trimmable_top_bytes": trim_top,
        "trim_ranges": len(ranges),
        "free_histogram": histogram(free_sizes),
    }


# ------------------------------------------------------------------- whole process


def _align_chunk(addr: int) -> int:
    """First chunk at or after addr whose user pointer is MALLOC_ALIGNMENT aligned."""
    mis = (addr + CHUNK_HDR_SZ) & (MALLOC_ALIGNMENT - 1)
    return addr + (MALLOC_ALIGNMENT - mis if mis else 0)


def _reader(space: AddressSpace, res: ResidentMap) -> Callable[[int, int], bytes]:
    read_resident = getattr(space, "read_resident", None)
    if read_resident is None:
        return space.read
    return lambda addr, n: read_resident(addr, n, res.runs_in(addr, addr + n))  # type: ignore[no-any-return]


def analyse_glibc(space: AddressSpace, layout: GlibcLayout, libc: bytes) -> dict[str, Any]:
    """One consistent read of every arena; raises HeapError if anything disagrees."""
    page = space.page_size
    vmas = space.maps()
    regions = libc_data_regions(vmas, libc)
    if not regions:
        raise HeapError("unsupported glibc layout: libc has no writable data mapping",
                        "unsupported")
    main_addr = find_main_arena(space, layout, regions)
    arenas = arena_chain(space, layout, main_addr)
    heap_vma = next((v for v in vmas if v.path == b"[heap]"), None)
    mp = find_mp(space, layout, regions, heap_vma.start if heap_vma else None)
    max_count = mp.tcache_count if mp else 65535
    counts_fmt = struct.Struct(
        f"<{layout.tcache_bins}{'H' if layout.tcache_count_size == 2 else 'B'}")

    def tcache_like(buf: bytes, off: int) -> bool:
        return max(counts_fmt.unpack_from(buf, off + CHUNK_HDR_SZ)) <= max_count

    reports: list[ArenaReport] = []
    tcache_candidates: list[tuple[int, bool]] = []
    tcache_size = layout.tcache_chunk_size
    for a in arenas:
        if a.main:
            if a.top == a.addr + layout.top:  # initial_top: the main heap was never used
                continue
            if heap_vma is None or not heap_vma.start <= a.top < heap_vma.end:
                raise HeapError(f"main arena top {a.top:#x} is not in [heap] "
                                "(non-contiguous main arena)", "unsupported")
            base = mp.sbrk_base if mp else heap_vma.start
            first = _align_chunk(base)
            end = base + a.system_mem
            res = ResidentMap(space.resident_runs(heap_vma.start, heap_vma.end))
            w = walk_segment(_reader(space, res), first, end, a.top, True, space.read,
                             tcache_size, tcache_like)
            segs = [(base, end)]
            walks = [w]
            if w.starts and w.sizes[0] == tcache_size:
                tcache_candidates.append((w.starts[0], True))
        else:
            walks, segs, res = _walk_thread_arena(space, layout, a, tcache_size, tcache_like)
        for w in walks:
            tcache_candidates += ((p, False) for p in w.candidates
                                  if not (a.main and p == w.start))
        reports.append(ArenaReport(
            kind="main" if a.main else "thread", addr=a.addr,
            start=min(s for s, _ in segs), end=max(e for _, e in segs), heaps=segs,
            walks=walks, resident=res, system_mem=a.system_mem,
            attached_threads=a.attached_threads))
    index = ChunkIndex([w for r in reports for w in r.walks])
    tcached: dict[int, int] = {}
    tcaches = 0
    for chunk, expected in tcache_candidates:
        got = read_tcache(space, layout, index, chunk, max_count)
        if got is None:
            if expected and any(u64(space, chunk + CHUNK_HDR_SZ + 8 * k) for k in range(2)):
                raise HeapError(f"the main thread's tcache at {chunk:#x} is inconsistent")
            continue
        if set(got) & set(tcached):
            raise HeapError("a chunk is in two tcaches")
        tcaches += 1
        tcached.update(got)
    fast: dict[int, int] = {}
    for a in arenas:
        fast.update(read_fastbins(space, layout, index, a))
    thp = mp.thp_pagesize if mp else 0
    out_arenas = []
    owner = {id(w): k for k, r in enumerate(reports) for w in r.walks}
    split_t: list[dict[int, int]] = [{} for _ in reports]
    split_f: list[dict[int, int]] = [{} for _ in reports]
    for table, split in ((tcached, split_t), (fast, split_f)):
        for p, s in table.items():
            hit = index.walk_of(p)
            assert hit is not None  # validated by read_tcache/read_fastbins
            split[owner[id(hit)]][p] = s
    for k, rep in enumerate(reports):
        rep.figures = arena_figures(rep, split_t[k], split_f[k], page, thp)
        out_arenas.append(rep.figures)
    # the walk raced nothing if the arenas still say the same
    for a in arenas:
        again = read_arena(space, layout, a.addr, a.main)
        if (again.top, again.system_mem, again.next) != (a.top, a.system_mem, a.next):
            raise HeapError(f"arena {a.addr:#x} changed during the walk")
    heap_ranges = [(h[0], h[0] + HEAP_MAX_SIZE) for r in reports if r.kind == "thread"
                   for h in r.heaps]
    mmapped = find_mmapped_chunks(space, vmas, heap_ranges, mp.n_mmaps if mp else None)
    return {
        "allocator": "glibc",
        "supported": True,
        "glibc_version": f"{layout.version[0]}.{layout.version[1]}",
        "main_arena_address": main_addr,
        "malloc_par_address": mp.addr if mp else None,
        "tcaches": tcaches,
        "arenas": out_arenas,
        "mmapped": _mmapped_figures(mmapped, mp),
        "thresholds": {
            "mmap_threshold_bytes": mp.mmap_threshold if mp else None,
            "mmap_threshold_dynamic": (not mp.no_dyn_threshold) if mp else None,
            "trim_threshold_bytes": mp.trim_threshold if mp else None,
            "top_pad_bytes": mp.top_pad if mp else None,
            "tcache_count": mp.tcache_count if mp else None,
        },
    }


def _walk_thread_arena(space: AddressSpace, layout: GlibcLayout, a: ArenaState,
                       keep_size: int, keep: Callable[[bytes, int], bool]
                       ) -> tuple[list[Walk], list[tuple[int, int]], ResidentMap]:
    heaps = []
    h = a.top & ~(HEAP_MAX_SIZE - 1)
    while h:
        ar_ptr, prev, size = struct.unpack("<QQQ", space.read(h, 24))
        if ar_ptr != a.addr:
            raise HeapError(f"heap_info at {h:#x} does not point to its arena {a.addr:#x}")
        if size > HEAP_MAX_SIZE or size & 15:
            raise HeapError(f"heap_info at {h:#x} has size {size:#x}")
        heaps.append((h, size, prev))
        if len(heaps) > 1 << 16:
            raise HeapError("heap_info chain does not end")
        h = prev
    heaps.reverse()
    first_h = heaps[0][0]
    if a.addr != first_h + layout.heap_info_size:
        raise HeapError(f"unsupported glibc layout: arena {a.addr:#x} is not right after its "
                        f"heap_info at {first_h:#x} (+{layout.heap_info_size})", "unsupported")
    runs: list[tuple[int, int]] = []
    for h, size, _ in heaps:
        runs += space.resident_runs(h, h + size)
    res = ResidentMap(runs)
    walks = []
    segs = []
    for k, (h, size, _) in enumerate(heaps):
        first = _align_chunk(a.addr + layout.state_size if k == 0 else h + layout.heap_info_size)
        newest = k == len(heaps) - 1
        walks.append(walk_segment(_reader(space, res), first, h + size,
                                  a.top if newest else None, False, space.read, keep_size, keep))
        segs.append((h, h + size))
    if sum(s for _, s, _ in heaps) != a.system_mem:
        raise HeapError(f"arena {a.addr:#x}: heaps total {sum(s for _, s, _ in heaps):#x}, "
                        f"system_mem {a.system_mem:#x}")
    return walks, segs, res


def find_mmapped_chunks(space: AddressSpace, vmas: list[Vma], exclude: list[tuple[int, int]],
                        expected: int | None = None) -> list[tuple[int, int, int]]:
    """Chunks served by their own mmap: (address, size, resident bytes). A chunk
    starts a page with prev_size 0 and flags exactly IS_MMAPPED, its size a page
    multiple within the mapping. Adjacent anonymous mappings merge into one VMA,
    so the chunks are looked for at VMA starts (and after each chunk found) and,
    when malloc_par says some are still missing, at every resident page start."""
    page = space.page_size
    anon = [v for v in vmas if not v.path and not v.inode and v.perms == "rw-p"
            and not any(s <= v.start < e for s, e in exclude)]
    found: dict[int, tuple[int, int]] = {}

    def chunk_at(p: int, head: bytes, v: Vma) -> int:
        psz, f = _QQ.unpack(head)
        size = f & ~SIZE_BITS
        if psz != 0 or f & SIZE_BITS != IS_MMAPPED or not size or size % page or p + size > v.end:
            return 0
        return int(size)

    def follow(p: int, v: Vma) -> None:
        while p + page <= v.end and p not in found:
            if not space.resident_runs(p, p + page):
                return
            try:
                size = chunk_at(p, space.read(p, 16), v)
            except OSError:
                return
            if not size:
                return
            found[p] = (size, ResidentMap(space.resident_runs(p, p + size)).bytes_in(p, p + size))
            p += size

    for v in anon:
        follow(v.start, v)
    if expected is not None and len(found) < expected:
        read_heads = getattr(space, "read_heads", None)
        for v in anon:
            covered = ResidentMap((p, p + s) for p, (s, _) in found.items())
            pages = [a for s, e in space.resident_runs(v.start, v.end)
                     for a in range(s, e, page) if not covered.bytes_in(a, a + 1)]
            if not pages:
                continue
            heads = read_heads(pages, 16) if read_heads else b"".join(
                space.read(a, 16) for a in pages)
            for k, a in enumerate(pages):
                if a not in found and chunk_at(a, heads[16 * k:16 * k + 16], v):
                    follow(a, v)
            if len(found) >= expected:
                break
    return sorted((p, s, r) for p, (s, r) in found.items())


def _mmapped_figures(chunks: list[tuple[int, int, int]], mp: MallocPar | None) -> dict[str, Any]:
    found_bytes = sum(s for _, s, _ in chunks)
    return {
        "count": mp.n_mmaps if mp else len(chunks),
        "bytes": mp.mmapped_mem if mp else found_bytes,
        "located_count": len(chunks),
        "located_bytes": found_bytes,
        "resident_bytes": sum(r for _, _, r in chunks),
        "threshold_bytes": mp.mmap_threshold if mp else None,
        "threshold_dynamic": (not mp.no_dyn_threshold) if mp else None,
        "source": "malloc_par" if mp else "mappings",
        "largest": sorted(({"address": p, "bytes": s, "resident_bytes": r}
                           for p, s, r in chunks), key=lambda c: -c["bytes"])[:10],
    }


def totals(arenas: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ["size_bytes", "resident_bytes", "in_use_bytes", "malloc_in_use_bytes",
            "in_use_chunks",
            "header_overhead_bytes", "arena_overhead_bytes", "free_bytes", "free_chunks",
            "free_resident_bytes", "cached_bytes", "tcache_bytes", "fastbin_bytes",
            "top_chunk_bytes", "top_resident_bytes", "trimmable_bytes"]
    return {k: sum(a[k] for a in arenas) for k in keys}


# ----------------------------------------------------------------------- the verdict


def verdict(report: dict[str, Any]) -> str:
    if not report.get("supported"):
        return str(report.get("reason", "not supported"))
    arenas = report["arenas"]
    mm = report["mmapped"]
    if not arenas:
        return (f"the heap is unused; {mm['count']} allocation(s) of {fmt_bytes(mm['bytes'])} "
                "have their own mmap")
    t = report["totals"]
    trim = t["trimmable_bytes"]
    hole_free = t["free_resident_bytes"] - t["top_resident_bytes"]
    resident = max(t["resident_bytes"], 1)
    pinned = [a for a in arenas if a["top_pinned"] and a["hole_resident_bytes"] >= (1 << 20)]
    parts = []
    if pinned:
        a = max(pinned, key=lambda x: x["hole_resident_bytes"])
        where = "the heap top" if a["kind"] == "main" else "the top of a thread arena"
        pin = (f"a live {a['pin_bytes']}-byte chunk" if a["pin_chunks"] == 1 else
               f"{a['pin_chunks']} live chunks ({fmt_bytes(a['pin_bytes'])})")
        parts.append(f"{fmt_bytes(a['hole_resident_bytes'])} free but resident below {pin} at "
                     f"{where}")
    elif hole_free >= max(1 << 20, resident // 10):
        parts.append(f"{fmt_bytes(hole_free)} free but resident in {t['free_chunks']} chunks "
                     f"between live ones (fragmentation: largest free chunk "
                     f"{fmt_bytes(max(a['largest_free_chunk_bytes'] for a in arenas))})")
    else:
        thr = report.get("thresholds", {}).get("trim_threshold_bytes")
        kept = (f" (the top chunk is kept while below the trim threshold, {fmt_bytes(thr)})"
                if thr else "")
        if t["top_resident_bytes"] >= max(1 << 20, resident // 10):
            parts.append(f"{fmt_bytes(t['top_resident_bytes'])} resident in the free top chunk"
                         + kept)
        elif t["in_use_bytes"] * 2 >= t["resident_bytes"]:
            parts.append(f"{fmt_bytes(t['in_use_bytes'])} of "
                         f"{fmt_bytes(t['resident_bytes'])} resident "
                         "heap bytes are in use: the memory is held by live allocations")
        else:
            parts.append(f"small heap: {fmt_bytes(t['in_use_bytes'])} of "
                         f"{fmt_bytes(t['resident_bytes'])} resident bytes in use, "
                         f"{fmt_bytes(t['top_resident_bytes'])} in the top chunk" + kept)
    parts.append(f"malloc_trim(0) would return {fmt_bytes(trim)}")
    if mm["bytes"] >= max(1 << 20, resident // 10):
        parts.append(f"{mm['count']} allocation(s) of {fmt_bytes(mm['bytes'])} have their own "
                     "mmap (returned to the system by free)")
    return "; ".join(parts)


# ------------------------------------------------------------------ the real process


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                                   ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
_libc.process_vm_readv.restype = ctypes.c_ssize_t
IOV_MAX = 1024


class ProcessSpace:
    """A live process: maps, process_vm_readv, PAGEMAP_SCAN."""

    def __init__(self, pid: int, proc_root: str = "/proc") -> None:
        from memtrace.trace.pagemap import open_scanner

        self.pid = pid
        self.proc_root = proc_root
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self._maps: list[Vma] | None = None
        self._cache: dict[int, bytes] = {}
        self.reads = 0
        self.bytes_read = 0
        self.scanner = open_scanner(pid, proc_root, self._vmas_in)

    def close(self) -> None:
        self.scanner.close()

    def _vmas_in(self, start: int, end: int) -> list[tuple[int, int, bytes]]:
        return [(v.start, v.end, v.path) for v in self.maps() if v.start < end and v.end > start]

    def refresh(self) -> None:
        self._maps = None
        self._cache = {}

    def maps(self) -> list[Vma]:
        if self._maps is None:
            try:
                with open(f"{self.proc_root}/{self.pid}/maps", "rb") as f:
                    self._maps = parse_maps(f.read())
            except FileNotFoundError:
                raise HeapError(f"process {self.pid} has gone", "gone") from None
        return self._maps

    def _readv(self, buf: Any, segs: list[tuple[int, int, int]]) -> None:
        """segs: (remote address, length, offset in buf, a writable buffer)."""
        base = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf)) if len(buf) else 0
        for k in range(0, len(segs), IOV_MAX):
            part = segs[k:k + IOV_MAX]
            local = (_IoVec * len(part))()
            remote = (_IoVec * len(part))()
            want = 0
            for i, (addr, n, off) in enumerate(part):
                local[i].iov_base = base + off
                local[i].iov_len = n
                remote[i].iov_base = addr
                remote[i].iov_len = n
                want += n
            got = _libc.process_vm_readv(self.pid, local, len(part), remote, len(part), 0)
            self.reads += 1
            if got < 0:
                err = ctypes.get_errno()
                if err == errno.ESRCH:
                    raise HeapError(f"process {self.pid} has gone", "gone")
                raise OSError(err, f"process_vm_readv: {os.strerror(err)}")
            self.bytes_read += got
            if got != want:
                raise HeapError(f"short read at {part[0][0]:#x}: {got} of {want} bytes "
                                "(mapping changed)")

    def read(self, addr: int, size: int) -> bytes:
        """Small reads go through a cache of 4 KiB blocks (list walks read one
        word per chunk); the cache lives until refresh()."""
        block = addr >> 12
        if size <= 64 and (addr + size - 1) >> 12 == block:
            data = self._cache.get(block)
            if data is None:
                data = self.read(block << 12, 4096)
                self._cache[block] = data
            off = addr & 4095
            return data[off:off + size]
        buf = bytearray(size)
        if size:
            self._readv(buf, [(addr, size, 0)])
        return bytes(buf)

    def read_resident(self, addr: int, size: int, runs: list[tuple[int, int]]) -> bytearray:
        """Only the resident pages of [addr, addr+size); the rest reads as zeros
        (reading them would map the zero page or swap them in)."""
        buf = bytearray(size)
        segs = [(s, e - s, s - addr) for s, e in runs]
        if segs:
            self._readv(buf, segs)
        return buf

    def copy_resident(self, addr: int, size: int, runs: list[tuple[int, int]]) -> Any:
        """Like read_resident into a fresh anonymous mapping: its pages are
        touched once, by the copy (a bytearray would be zero-filled first)."""
        import mmap

        buf = mmap.mmap(-1, max(size, 1))
        segs = [(s, e - s, s - addr) for s, e in runs]
        if segs:
            self._readv(buf, segs)
        return buf

    def read_heads(self, addrs: list[int], size: int) -> bytes:
        """`size` bytes at each address, concatenated (batched process_vm_readv)."""
        buf = bytearray(size * len(addrs))
        if addrs:
            self._readv(buf, [(a, size, size * k) for k, a in enumerate(addrs)])
        return bytes(buf)

    def resident_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        try:
            return [(s, e) for s, e, _ in self.scanner.scan(start, end)]
        except ProcessLookupError:
            raise HeapError(f"process {self.pid} has gone", "gone") from None

    def file_bytes(self, path: bytes, limit: int) -> bytes | None:
        full = os.fsencode(f"{self.proc_root}/{self.pid}/root") + path
        try:
            with open(full, "rb") as f:
                if os.fstat(f.fileno()).st_size > limit:
                    return None
                return f.read()
        except OSError:
            return None


def snapshot_regions(vmas: list[Vma], libc: bytes) -> list[tuple[int, int]]:
    """Where malloc state lives: libc's data, [heap], and 64 MiB-aligned anonymous
    mappings (thread heaps start at HEAP_MAX_SIZE-aligned addresses)."""
    picked = list(libc_data_regions(vmas, libc))
    for v in vmas:
        if v.perms.startswith("rw") and (v.path == b"[heap]" or (
                not v.path and not v.inode and v.start % HEAP_MAX_SIZE == 0)):
            picked.append((v.start, v.end))
    return sorted(picked)


def populated_buffer(size: int) -> Any:
    """An anonymous mapping with its pages already faulted in (so that copying
    into it while the target is stopped costs a memcpy, not page faults)."""
    import mmap

    buf = mmap.mmap(-1, max(size, 1))
    try:
        buf.madvise(23)  # MADV_POPULATE_WRITE (Linux 5.14+)
    except (OSError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        for off in range(0, len(buf), page):
            buf[off] = 0
    return buf


class SnapshotSpace:
    """The resident pages of the regions malloc state lives in, copied while the
    process is stopped so that it runs again during the analysis. Pages are
    stored compactly (resident runs back to back); non-resident ones read as
    zeros. Reads elsewhere (files, own-mmap chunk headers) go to the live process."""

    def __init__(self, live: ProcessSpace, libc: bytes, buffer: Any = None) -> None:
        self.live = live
        self.page_size = live.page_size
        self._maps = live.maps()
        self.regions: list[tuple[int, int, ResidentMap, int]] = []  # start, end, runs, offset
        total = 0
        for start, end in snapshot_regions(self._maps, libc):
            res = ResidentMap(live.resident_runs(start, end))
            self.regions.append((start, end, res, total))
            total += res.cum[-1]
        self.copied_bytes = total
        if buffer is None or len(buffer) < total:
            if buffer is not None:
                buffer.close()
            buffer = populated_buffer(total)
        self.buf = buffer
        segs = []
        for _, _, res, base in self.regions:
            segs += [(s, e - s, base + res.cum[i])
                     for i, (s, e) in enumerate(zip(res.starts, res.ends))]
        if segs:
            live._readv(self.buf, segs)
        self.bounds = [r[0] for r in self.regions]

    @property
    def bytes_read(self) -> int:
        return self.live.bytes_read

    def close(self) -> None:
        self.buf.close()

    def _find(self, addr: int, size: int) -> tuple[int, int, ResidentMap, int] | None:
        i = bisect.bisect_right(self.bounds, addr) - 1
        if i >= 0 and addr + size <= self.regions[i][1]:
            return self.regions[i]
        return None

    def maps(self) -> list[Vma]:
        return self._maps

    def read(self, addr: int, size: int) -> bytes:
        r = self._find(addr, size)
        if r is None:
            return self.live.read(addr, size)
        res, base = r[2], r[3]
        i = bisect.bisect_right(res.starts, addr) - 1
        if i >= 0 and addr + size <= res.ends[i]:  # within one run
            off = base + res.cum[i] + addr - res.starts[i]
            return self.buf[off:off + size]  # type: ignore[no-any-return]
        out = bytearray(size)
        for s, e in res.runs_in(addr, addr + size):
            j = bisect.bisect_right(res.starts, s) - 1
            off = base + res.cum[j] + s - res.starts[j]
            out[s - addr:e - addr] = self.buf[off:off + e - s]
        return bytes(out)

    def read_resident(self, addr: int, size: int, runs: list[tuple[int, int]]) -> Any:
        return self.read(addr, size)

    def read_heads(self, addrs: list[int], size: int) -> bytes:
        return self.live.read_heads(addrs, size)

    def resident_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        r = self._find(start, end - start)
        if r is None:
            return self.live.resident_runs(start, end)
        return r[2].runs_in(start, end)

    def file_bytes(self, path: bytes, limit: int) -> bytes | None:
        return self.live.file_bytes(path, limit)


def _threads_stopped(pid: int, proc_root: str) -> bool:
    try:
        tids = os.listdir(f"{proc_root}/{pid}/task")
    except FileNotFoundError:
        raise HeapError(f"process {pid} has gone", "gone") from None
    for tid in tids:
        try:
            with open(f"{proc_root}/{pid}/task/{tid}/stat", "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        state = data[data.rindex(b")") + 2:data.rindex(b")") + 3]
        if state not in (b"T", b"t", b"Z", b"X"):
            return False
    return True


@contextlib.contextmanager
def stopped(pid: int, proc_root: str = "/proc") -> Any:
    """SIGSTOP the process until the block ends (SIGCONT always, unless it was
    already stopped before). Yields a dict that gets `pause_seconds`."""
    info: dict[str, Any] = {"pause_seconds": None, "was_stopped": _threads_stopped(pid, proc_root)}
    t0 = time.monotonic()
    if not info["was_stopped"]:
        os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 5
        while not _threads_stopped(pid, proc_root):
            if time.monotonic() > deadline:
                raise HeapError(f"process {pid} did not stop within 5 s")
            time.sleep(0.0005)
        yield info
    finally:
        if not info["was_stopped"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        info["pause_seconds"] = time.monotonic() - t0


def analyse_process(pid: int, stop: bool = False, retries: int = 5,
                    proc_root: str = "/proc", comm: str = "") -> dict[str, Any]:
    """The report for a live process. Not stopped, a walk that meets a changing
    heap is retried (`retries` times); with `stop`, the process is paused with
    SIGSTOP for one exact snapshot and `pause_seconds` says for how long."""
    t_start = time.monotonic()
    exe = b""
    with contextlib.suppress(OSError):
        exe = os.readlink(os.fsencode(f"{proc_root}/{pid}/exe"))
    space = ProcessSpace(pid, proc_root)
    try:
        alloc = detect_allocator(space, exe)
        base: dict[str, Any] = {"pid": pid, "comm": comm}
        if not alloc.supported:
            return {**base, "allocator": alloc.allocator, "supported": False,
                    "reason": alloc.reason}
        data = space.file_bytes(alloc.libc_path, 64 << 20) or b""
        version = parse_glibc_version(data)
        if version is None:
            return {**base, "allocator": "glibc", "supported": False,
                    "reason": "unsupported glibc layout: cannot read the glibc version of "
                    f"{escape_name(alloc.libc_path)}"}
        try:
            layout = layout_for(version)
        except HeapError as e:
            return {**base, "allocator": "glibc", "supported": False, "reason": e.message}
        attempts = 0
        last: HeapError | None = None
        pause: float | None = None
        report: dict[str, Any] | None = None
        while attempts <= retries and report is None:
            attempts += 1
            space.refresh()
            info: dict[str, Any] = {}
            try:
                if stop:
                    # copy the heap while stopped into a buffer faulted in before;
                    # analyse the copy once the process runs again
                    space.refresh()
                    size = sum(e - s for a, b in snapshot_regions(space.maps(), alloc.libc_path)
                               for s, e in space.resident_runs(a, b))
                    buffer = populated_buffer(size + size // 8 + (1 << 20))
                    try:
                        with stopped(pid, proc_root) as info:
                            space.refresh()
                            snap = SnapshotSpace(space, alloc.libc_path, buffer)
                    except BaseException:
                        buffer.close()
                        raise
                    finally:
                        pause = info.get("pause_seconds")
                    try:
                        report = analyse_glibc(snap, layout, alloc.libc_path)
                    finally:
                        snap.close()
                else:
                    report = analyse_glibc(space, layout, alloc.libc_path)
            except HeapError as e:
                if e.kind == "gone":
                    raise
                if e.kind != "inconsistent":
                    return {**base, "allocator": "glibc", "supported": False,
                            "reason": e.message, "glibc_version": f"{version[0]}.{version[1]}"}
                last = e
                if stop and info.get("was_stopped"):
                    break  # stopped by someone else: another look sees the same state
                time.sleep(0.01 * attempts)
        if report is None:
            assert last is not None
            if stop:
                raise HeapError(
                    f"the heap kept changing during {attempts} stopped snapshot(s) "
                    f"({last.message})" + ("; the process was already stopped, so another "
                                           "snapshot would see the same" if info.get(
                                               "was_stopped") else ""))
            raise HeapError(f"the heap kept changing during {attempts} walks ({last.message})"
                            "; try --stop for an exact snapshot")
        report = {**base, **report}
        report["totals"] = totals(report["arenas"])
        report["stopped"] = stop
        report["pause_seconds"] = pause
        report["attempts"] = attempts
        report["analysis_seconds"] = time.monotonic() - t_start
        report["bytes_read"] = space.bytes_read
        report["verdict"] = verdict(report)
        return report
    finally:
        space.close()


# ------------------------------------------------------------------------ the table


def render_table(report: dict[str, Any], exact: bool = False) -> str:
    """The table of `memtrace heap`; exact: byte counts (--bytes) instead of
    IEC units (the verdict keeps its units)."""

    human = functools.partial(fmt_bytes, exact=exact)   # sizes in the table

    head = f"{report.get('comm') or ''} (pid {report['pid']})".strip()
    if not report.get("supported"):
        return f"{head}: allocator {report.get('allocator')}: {report.get('reason')}"
    lines = [f"{head}: glibc {report['glibc_version']} malloc, {len(report['arenas'])} "
             f"arena heap(s)"
             + (f"; paused {report['pause_seconds'] * 1000:.1f} ms" if report["stopped"]
                and report["pause_seconds"] is not None else "")]
    cols = ["arena", "start", "size", "resident", "in use", "free", "free res", "cached",
            "top", "top res", "pinned", "trimmable"]
    rows = []
    for a in report["arenas"]:
        rows.append([a["kind"], f"{a['start']:#x}", human(a["size_bytes"]),
                     human(a["resident_bytes"]), human(a["in_use_bytes"]),
                     human(a["free_bytes"]), human(a["free_resident_bytes"]),
                     human(a["cached_bytes"]), human(a["top_chunk_bytes"]),
                     human(a["top_resident_bytes"]),
                     (f"yes ({a['pin_bytes']} B)" if a["top_pinned"] else "no"),
                     human(a["trimmable_bytes"])])
    if len(rows) > 1:
        t = report["totals"]
        rows.append(["total", "", human(t["size_bytes"]), human(t["resident_bytes"]),
                     human(t["in_use_bytes"]), human(t["free_bytes"]),
                     human(t["free_resident_bytes"]), human(t["cached_bytes"]),
                     human(t["top_chunk_bytes"]), human(t["top_resident_bytes"]), "",
                     human(t["trimmable_bytes"])])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(cols)]
    fmt = "  ".join(("{:<" if i < 2 else "{:>") + f"{w}}}" for i, w in enumerate(widths))
    lines.append(fmt.format(*cols))
    lines += [fmt.format(*r) for r in rows]
    t = report["totals"]
    mm = report["mmapped"]
    thr = mm["threshold_bytes"]
    lines.append(
        f"chunks: {t['in_use_chunks']} in use (header overhead {human(t['header_overhead_bytes'])}"
        f"), {t['free_chunks']} free ({human(t['cached_bytes'])} cached in tcache/fastbins)")
    lines.append(
        f"malloc's own in-use count (mallinfo2().uordblks): "
        f"{human(t['malloc_in_use_bytes'])}, more than 'in use' by the "
        f"{human(t['tcache_bytes'])} cached in tcaches (free to the program, allocated "
        f"to the arena) and {human(t['arena_overhead_bytes'])} of thread-heap headers")
    lines.append(
        f"own mmap: {mm['count']} allocation(s), {human(mm['bytes'])} "
        f"({human(mm['resident_bytes'])} resident); threshold "
        + (f"{human(thr)}{' (dynamic)' if mm['threshold_dynamic'] else ' (fixed)'}"
           if thr is not None else "unknown"))
    hist: dict[int, list[int]] = {}
    for a in report["arenas"]:
        for b in a["free_histogram"]:
            h = hist.setdefault(b["min_bytes"], [0, 0])
            h[0] += b["chunks"]
            h[1] += b["bytes"]
    if hist:
        lines.append("free chunks by size: " + ", ".join(
            f"{human(k)}+: {v[0]} ({human(v[1])})" for k, v in sorted(hist.items())))
    lines.append(f"verdict: {report['verdict']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command


def heap_command(pid: int, fmt: str, stop: bool, retries: int, exact: bool = False) -> str:
    """What `memtrace heap` prints; MemtraceError (with its exit code) otherwise."""
    import json

    from memtrace.errors import ExitCode, MemtraceError
    from memtrace.trace.procfs import ProcFS

    st = ProcFS().check_target(pid)
    try:
        report = analyse_process(pid, stop=stop, retries=retries, comm=st.comm)
    except HeapError as e:
        if e.kind == "gone":
            raise MemtraceError(f"no such process: {pid} (it exited)",
                                ExitCode.NO_SUCH_PROCESS) from None
        raise MemtraceError(e.message, ExitCode.HEAP_UNREADABLE) from None
    except PermissionError as e:
        raise MemtraceError(f"cannot read the memory of {pid}: {e.strerror} (memtrace heap "
                            "needs root, or CAP_SYS_PTRACE)", ExitCode.NOT_ROOT) from None
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            raise MemtraceError(f"cannot read the memory of {pid}: {e.strerror} (memtrace "
                                "heap needs root, or CAP_SYS_PTRACE)", ExitCode.NOT_ROOT) from None
        raise
    if fmt == "json":
        return json.dumps(report)
    return render_table(report, exact)


# ------------------------------------------------ background walks for watch/run/agent

# Figures summed per arena kind for the `heap` key of watch/run snapshots and for
# the memtrace_heap_* metrics.
KIND_FIELDS = ("size_bytes", "resident_bytes", "in_use_bytes", "malloc_in_use_bytes",
               "free_bytes", "free_resident_bytes", "tcache_bytes", "fastbin_bytes",
               "top_chunk_bytes", "trimmable_bytes")
ARENA_KINDS = ("main", "thread")
DEFAULT_HEAP_INTERVAL = 30.0
HEAP_CPU_BUDGET = 0.05  # a process's next walk waits at least last walk / budget
SAMPLER_RETRIES = 3
RECHECK_SECONDS = 1.0  # a first walk without figures is repeated this much later


def heap_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The compact form of a report, for the `heap` key of a snapshot: figures
    summed per arena kind (both kinds always present, 0 when there is none)."""
    if not report.get("supported"):
        return {"status": "unsupported", "allocator": report.get("allocator"),
                "supported": False, "reason": report.get("reason")}
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in ARENA_KINDS:
        arenas = [a for a in report["arenas"] if a["kind"] == kind]
        row: dict[str, Any] = {"arenas": len(arenas)}
        row.update({k: sum(a[k] for a in arenas) for k in KIND_FIELDS})
        row["top_pinned"] = any(a["top_pinned"] for a in arenas)
        by_kind[kind] = row
    mm = report["mmapped"]
    return {
        "status": "ok", "allocator": "glibc", "supported": True,
        "glibc_version": report.get("glibc_version"),
        "by_kind": by_kind,
        "totals": {k: report["totals"][k] for k in KIND_FIELDS},
        "mmapped": {k: mm[k] for k in ("count", "bytes", "resident_bytes", "threshold_bytes")},
        "verdict": report["verdict"],
        "attempts": report["attempts"],
        "analysis_seconds": round(report["analysis_seconds"], 6),
    }


def sample_once(pid: int, retries: int = SAMPLER_RETRIES) -> dict[str, Any]:
    """One walk of a live process, never stopped; the summary, or why there is none
    (`status`: ok, unsupported, failed, gone)."""
    try:
        return heap_summary(analyse_process(pid, stop=False, retries=retries))
    except HeapError as e:
        return {"status": "gone" if e.kind == "gone" else "failed", "reason": e.message}
    except OSError as e:
        why = ("cannot read its memory (needs root or CAP_SYS_PTRACE)"
               if e.errno in (errno.EPERM, errno.EACCES) else f"cannot read it: {e}")
        gone = e.errno in (errno.ESRCH, errno.ENOENT) and not os.path.exists(f"/proc/{pid}")
        return {"status": "gone" if gone else "failed", "reason": "process exited" if gone
                else why}
    except Exception as e:  # a walk must never take watch down
        return {"status": "failed", "reason": f"internal error: {type(e).__name__}: {e}"}


def worker_main() -> None:
    """The walker process: one pid a line on stdin, one JSON summary a line on
    stdout. Runs at nice 19 so that walks yield the CPU to the targets."""
    import json
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(19)
    for line in sys.stdin:
        try:
            pid = int(line)
        except ValueError:
            continue
        sys.stdout.write(json.dumps(sample_once(pid)) + "\n")
        sys.stdout.flush()


class HeapSampler:
    """Walks the heaps of watched processes in a separate process (no GIL shared
    with the watch loop; nice 19), one process at a time, each at most every
    `interval` seconds and never more often than `1/HEAP_CPU_BUDGET` times its last
    walk's duration. The watch loop only reads the latest summaries (`latest`)."""

    def __init__(self, interval: float, walker: Callable[[int], dict[str, Any]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        import threading

        self.interval = interval
        self._walker = walker  # in-process walker for tests; else the worker process
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._targets: dict[int, int] = {}           # pid -> start time (identity)
        self._due: dict[int, float] = {}
        self._latest: dict[int, tuple[int, dict[str, Any]]] = {}
        self._rechecked: set[int] = set()
        self.walks: Counter[str] = Counter()         # by status
        self._proc: Any = None
        self._thread = threading.Thread(target=self._run, name="memtrace-heap", daemon=True)
        self._thread.start()

    # ---- called from the watch loop (cheap, never blocks on a walk)

    def track(self, pid: int, start_time: int) -> None:
        with self._lock:
            if self._targets.get(pid) != start_time:
                self._targets[pid] = start_time
                self._due[pid] = self._clock()
                self._latest.pop(pid, None)
                self._rechecked.discard(pid)
                self._wake.set()

    def forget(self, pid: int) -> None:
        with self._lock:
            self._targets.pop(pid, None)
            self._due.pop(pid, None)
            self._latest.pop(pid, None)
            self._rechecked.discard(pid)

    def latest(self, pid: int, start_time: int) -> dict[str, Any]:
        with self._lock:
            got = self._latest.get(pid)
        if got is None or got[0] != start_time:
            return {"status": "pending"}
        return got[1]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.walks)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
        self._thread.join(timeout=2)

    # ---- the sampler thread

    def _next(self) -> tuple[int, int] | float:
        """(pid, start_time) of the walk due now, or seconds to wait."""
        with self._lock:
            if not self._due:
                return 1.0
            pid = min(self._due, key=self._due.__getitem__)
            wait = self._due[pid] - self._clock()
            if wait > 0:
                return min(wait, 1.0)
            return pid, self._targets[pid]

    def _run(self) -> None:
        while not self._stop.is_set():
            nxt = self._next()
            if isinstance(nxt, float):
                self._wake.wait(nxt)
                self._wake.clear()
                continue
            pid, start_time = nxt
            t0 = self._clock()
            result = self._walk(pid)
            took = self._clock() - t0
            result = {**result, "ts": round(time.time(), 6)}
            with self._lock:
                self.walks[result["status"]] += 1
                if self._targets.get(pid) != start_time:
                    continue  # forgotten or replaced while we walked
                # the budget counts the walk itself, not the walker's start-up
                cost = float(result.get("analysis_seconds", took))
                self._due[pid] = t0 + max(self.interval, cost / HEAP_CPU_BUDGET)
                prev = self._latest.get(pid)
                if result["status"] != "ok" and prev is None and pid not in self._rechecked:
                    # a first walk that gives no figures is confirmed a second later
                    # before it is reported: a process just started by `run` may not
                    # have libc mapped yet, or may be busy building its heap
                    self._rechecked.add(pid)
                    self._due[pid] = t0 + took + min(self.interval, RECHECK_SECONDS)
                    continue
                if result["status"] in ("failed", "gone") and prev and "by_kind" in prev[1]:
                    # keep the last good figures (their `ts` says when), say what failed
                    result = {**prev[1], "status": result["status"],
                              "reason": result["reason"], "failed_ts": result["ts"]}
                self._latest[pid] = (start_time, result)

    def _walk(self, pid: int) -> dict[str, Any]:
        if self._walker is not None:
            return self._walker(pid)
        import json
        for _ in range(2):  # restart a worker that died once
            try:
                proc = self._worker()
                proc.stdin.write(f"{pid}\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if line:
                    return dict(json.loads(line))
            except (OSError, ValueError):
                pass
            if self._stop.is_set():
                break
            self._reap()
        return {"status": "failed", "reason": "the heap walker process died"}

    def _worker(self) -> Any:
        import subprocess
        import sys
        from pathlib import Path

        if self._stop.is_set():
            raise OSError("closing")
        if self._proc is None or self._proc.poll() is not None:
            root = str(Path(__file__).resolve().parents[2])
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from memtrace.heap.core import worker_main; worker_main()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                start_new_session=True)  # no terminal signals; EOF on stdin ends it
        return self._proc

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
