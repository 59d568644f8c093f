"""Synthetic process images for memtrace.heap: a libc data region holding
main_arena and mp_, a brk heap and thread-arena heaps, laid out as glibc 2.36
lays them out on x86_64, readable through the AddressSpace interface."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from memtrace.heap.layout import HEAP_MAX_SIZE, GlibcLayout, layout_for
from memtrace.trace.procfs import Vma

PAGE = 4096
LIBC = b"/usr/lib/x86_64-linux-gnu/libc.so.6"
LIBC_DATA = 0x7F0000001000  # libc's rw mapping
MAIN_ARENA = LIBC_DATA + 0xC60
MP = LIBC_DATA + 0x340
HEAP = 0x555555560000
TCACHE_SIZE = 0x290


class FakeSpace:
    """Sparse memory: regions of bytes, maps, resident runs (all by default)."""

    def __init__(self) -> None:
        self.page_size = PAGE
        self.regions: dict[int, bytearray] = {}
        self.vmas: list[Vma] = []
        self.nonresident: list[tuple[int, int]] = []
        self.files: dict[bytes, bytes] = {}

    def map(self, start: int, size: int, path: bytes = b"", perms: str = "rw-p") -> bytearray:
        buf = bytearray(size)
        self.regions[start] = buf
        inode = 1234 if path.startswith(b"/") else 0
        self.vmas.append(Vma(start, start + size, perms, 0, "00:00", inode, path))
        self.vmas.sort(key=lambda v: v.start)
        return buf

    def _region(self, addr: int) -> tuple[int, bytearray]:
        for start, buf in self.regions.items():
            if start <= addr < start + len(buf):
                return start, buf
        raise OSError(14, f"bad address {addr:#x}")

    def read(self, addr: int, size: int) -> bytes:
        start, buf = self._region(addr)
        if addr + size > start + len(buf):
            raise OSError(14, f"bad address {addr + size:#x}")
        return bytes(buf[addr - start:addr - start + size])

    def write(self, addr: int, data: bytes) -> None:
        start, buf = self._region(addr)
        buf[addr - start:addr - start + len(data)] = data

    def q(self, addr: int, value: int) -> None:
        self.write(addr, struct.pack("<Q", value))

    def maps(self) -> list[Vma]:
        return list(self.vmas)

    def resident_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        out = []
        for s, buf in sorted(self.regions.items()):
            lo, hi = max(s, start), min(s + len(buf), end)
            if lo < hi:
                out.append((lo, hi))
        for ns, ne in self.nonresident:
            cut = []
            for lo, hi in out:
                if ne <= lo or ns >= hi:
                    cut.append((lo, hi))
                    continue
                if lo < ns:
                    cut.append((lo, ns))
                if ne < hi:
                    cut.append((ne, hi))
            out = cut
        return out

    def file_bytes(self, path: bytes, limit: int) -> bytes | None:
        return self.files.get(path)


@dataclass
class Chunk:
    size: int
    state: str = "used"  # used | free | tcache | fast
    addr: int = 0


@dataclass
class Image:
    space: FakeSpace
    layout: GlibcLayout
    chunks: list[Chunk]
    top: int
    top_end: int
    thread_arenas: list[int] = field(default_factory=list)


def _mangle(pos: int, ptr: int) -> int:
    return (pos >> 12) ^ ptr


def write_arena(space: FakeSpace, lay: GlibcLayout, addr: int, top: int, system_mem: int,
                nxt: int, fast_heads: list[int] | None = None) -> None:
    space.write(addr, bytes(lay.state_size))
    for i in range(127):
        slot = addr + lay.bins + 16 * i
        space.q(slot, slot - 16)
        space.q(slot + 8, slot - 16)
    for i, h in enumerate(fast_heads or []):
        space.q(addr + lay.fastbins + 8 * i, h)
    space.q(addr + lay.top, top)
    space.q(addr + lay.next, nxt)
    space.q(addr + lay.attached_threads, 1)
    space.q(addr + lay.system_mem, system_mem)
    space.q(addr + lay.max_system_mem, system_mem)


def lay_chunks(space: FakeSpace, lay: GlibcLayout, first: int, chunks: list[Chunk], end: int,
               non_main: bool) -> int:
    """Write chunk headers from `first`; returns the top chunk address."""
    pos = first
    prev_free = False
    for c in chunks:
        c.addr = pos
        flags = (0 if prev_free else 1) | (4 if non_main and c.state != "free" else 0)
        space.q(pos + 8, c.size | flags)
        if c.state == "free":
            space.q(pos + 16, pos)  # fd/bk: not read by the analysis
            space.q(pos + 24, pos)
            space.q(pos + c.size, c.size)  # footer: prev_size of the next chunk
        prev_free = c.state == "free"
        pos += c.size
    top = pos
    space.q(top + 8, (end - top) | (0 if prev_free else 1))
    return top


def link_lists(space: FakeSpace, lay: GlibcLayout, chunks: list[Chunk], tcache_at: int,
               arena: int) -> None:
    """tcache entries (in the struct at tcache_at) and fastbin heads of `arena`."""
    bins: dict[int, list[int]] = {}
    fast: dict[int, list[int]] = {}
    for c in chunks:
        idx = (c.size - 32) // 16
        if c.state == "tcache":
            bins.setdefault(idx, []).append(c.addr)
        elif c.state == "fast":
            fast.setdefault(idx, []).append(c.addr)
    mem = tcache_at + 16
    for idx, addrs in bins.items():
        space.write(mem + 2 * idx, struct.pack("<H", len(addrs)))
        space.q(mem + lay.tcache_entries + 8 * idx, addrs[0] + 16)
        for a, b in zip(addrs, addrs[1:] + [None]):
            e = a + 16
            space.q(e, _mangle(e, b + 16 if b is not None else 0))
            space.q(e + 8, 0x1234567890ABCDEF)  # tcache_key
    for idx, addrs in fast.items():
        space.q(arena + lay.fastbins + 8 * idx, addrs[0])
        for a, b in zip(addrs, addrs[1:] + [None]):
            space.q(a + 16, _mangle(a + 16, b if b is not None else 0))


def build(chunks: list[Chunk], heap_size: int = 1 << 20, mmapped: list[int] | None = None,
          thread_chunks: list[list[Chunk]] | None = None,
          version: tuple[int, int] = (2, 36)) -> Image:
    """A process with the main heap made of a tcache struct then `chunks`, then top."""
    lay = layout_for(version)
    space = FakeSpace()
    space.map(LIBC_DATA - 0x1D3000, 0x1000, LIBC, "r--p")
    space.map(LIBC_DATA, 0x2000, LIBC)
    space.map(LIBC_DATA + 0x2000, 0xD000)  # .bss
    space.map(HEAP, heap_size, b"[heap]")
    all_chunks = [Chunk(TCACHE_SIZE)] + chunks
    top = lay_chunks(space, lay, HEAP, all_chunks, HEAP + heap_size, False)
    # mp_
    space.q(MP + lay.mp_trim_threshold, 128 << 10)
    space.q(MP + lay.mp_top_pad, 128 << 10)
    space.q(MP + lay.mp_mmap_threshold, 128 << 10)
    space.q(MP + 24, 8)
    space.write(MP + lay.mp_n_mmaps_max, struct.pack("<i", 65536))
    space.q(MP + lay.mp_sbrk_base, HEAP)
    space.q(MP + lay.mp_tcache_bins, 64)
    space.q(MP + 112, 1032)
    space.q(MP + lay.mp_tcache_count, 7)
    arenas = [MAIN_ARENA]
    thread_images = []
    for k, tchunks in enumerate(thread_chunks or []):
        h = 0x7E0000000000 + k * HEAP_MAX_SIZE
        size = 1 << 20
        space.map(h, size)
        space.map(h + size, HEAP_MAX_SIZE - size, perms="---p")
        a = h + lay.heap_info_size
        space.q(h, a)
        space.q(h + 16, size)
        space.q(h + 24, size)
        first = a + lay.state_size
        first += (16 - (first + 16) % 16) % 16
        ttop = lay_chunks(space, lay, first, tchunks, h + size, True)
        arenas.append(a)
        thread_images.append((a, ttop, size, tchunks))
    nexts = arenas[1:] + [MAIN_ARENA]
    write_arena(space, lay, MAIN_ARENA, top, heap_size, nexts[0])
    for (a, ttop, size, tchunks), nxt in zip(thread_images, nexts[1:]):
        write_arena(space, lay, a, ttop, size, nxt)
        link_lists(space, lay, tchunks, all_chunks[0].addr, a)
    link_lists(space, lay, all_chunks, all_chunks[0].addr, MAIN_ARENA)
    n_mm = 0
    for k, size in enumerate(mmapped or []):
        base = 0x7F1000000000 + k * (size + PAGE * 16)
        space.map(base, size)
        space.q(base + 8, size | 2)
        n_mm += 1
    space.write(MP + lay.mp_n_mmaps, struct.pack("<i", n_mm))
    space.q(MP + lay.mp_mmapped_mem, sum(mmapped or []))
    return Image(space, lay, all_chunks, top, HEAP + heap_size,
                 [t[0] for t in thread_images])
