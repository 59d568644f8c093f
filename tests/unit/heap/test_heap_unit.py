"""memtrace.heap on synthetic heap images (no root, no process)."""

from __future__ import annotations

import struct

import pytest

from memtrace.commands.heap import render_table
from memtrace.heap.analysis import analyse_glibc
from memtrace.heap.detect import detect_allocator, elf_info
from memtrace.heap.figures import histogram, totals, trim_ranges, verdict
from memtrace.heap.layout import HeapError, layout_for, parse_glibc_version
from memtrace.heap.memory import ResidentMap
from memtrace.trace.procfs import Vma
from memtrace.util.units import fmt_bytes

from .synth import HEAP, LIBC, MAIN_ARENA, MP, PAGE, Chunk, FakeSpace, build


def analyse(img):  # type: ignore[no-untyped-def]
    r = analyse_glibc(img.space, img.layout, LIBC)
    r["totals"] = totals(r["arenas"])
    r["verdict"] = verdict(r)
    return r


def test_walk_counts_in_use_and_free_by_prev_inuse():
    img = build([Chunk(0x40), Chunk(0x100, "free"), Chunk(0x50), Chunk(0x2000, "free"),
                 Chunk(0x30)])
    r = analyse(img)
    a = r["arenas"][0]
    assert r["main_arena_address"] == MAIN_ARENA
    assert r["malloc_par_address"] == MP
    assert a["kind"] == "main" and a["start"] == HEAP
    assert a["in_use_bytes"] == 0x290 + 0x40 + 0x50 + 0x30
    assert a["in_use_chunks"] == 4
    assert a["header_overhead_bytes"] == 4 * 8
    assert a["binned_free_bytes"] == 0x2100
    top_size = img.top_end - img.top
    assert a["top_chunk_bytes"] == top_size
    assert a["free_bytes"] == 0x2100 + top_size
    assert a["in_use_bytes"] + a["free_bytes"] + a["arena_overhead_bytes"] == a["size_bytes"]
    assert a["arena_overhead_bytes"] == 0
    assert a["largest_free_chunk_bytes"] == 0x2000
    hist = {b["min_bytes"]: b["chunks"] for b in a["free_histogram"]}
    assert hist == {256: 1, 8192: 1}


def test_tcache_and_fastbin_chunks_count_as_free():
    chunks = [Chunk(0x20, "fast"), Chunk(0x40), Chunk(0x20, "fast"), Chunk(0x40),
              Chunk(0x90, "tcache"), Chunk(0x40), Chunk(0x90, "tcache"), Chunk(0x40),
              Chunk(0x410, "tcache"), Chunk(0x40)]
    r = analyse(build(chunks))
    a = r["arenas"][0]
    assert r["tcaches"] == 1
    assert a["tcache_bytes"] == 2 * 0x90 + 0x410
    assert a["fastbin_bytes"] == 2 * 0x20
    assert a["cached_bytes"] == a["tcache_bytes"] + a["fastbin_bytes"]
    assert a["in_use_bytes"] == 0x290 + 5 * 0x40
    assert a["in_use_chunks"] == 6
    # malloc's own count (mallinfo2().uordblks): tcache chunks are allocated to
    # the arena, fastbin chunks are not
    assert a["malloc_in_use_bytes"] == a["in_use_bytes"] + a["tcache_bytes"]
    assert a["malloc_in_use_bytes"] == a["size_bytes"] - (a["free_bytes"] - a["tcache_bytes"])


def test_safe_linking_off_before_2_32():
    lay = layout_for((2, 31))
    assert not lay.safe_linking and lay.heap_info_size == 32 and lay.mp_sbrk_base == 72
    assert layout_for((2, 29)).tcache_chunk_size == 0x250
    assert layout_for((2, 36)).tcache_chunk_size == 0x290


def test_old_glibc_is_unsupported():
    with pytest.raises(HeapError) as e:
        layout_for((2, 24))
    assert e.value.kind == "unsupported" and "unsupported glibc layout" in e.value.message


def test_hole_below_a_pinned_top_and_trim_prediction():
    hole = 8 << 20
    img = build([Chunk(0x100), Chunk(hole, "free"), Chunk(0xD0)], heap_size=9 << 20)
    r = analyse(img)
    a = r["arenas"][0]
    assert a["top_pinned"] and a["pin_bytes"] == 0xD0 and a["pin_chunks"] == 1
    assert a["hole_bytes"] == hole and a["hole_resident_bytes"] == hole
    hole_start = HEAP + 0x290 + 0x100
    paligned = (hole_start + 48 + PAGE - 1) & ~(PAGE - 1)
    inner = (hole_start + hole - paligned) & ~(PAGE - 1)
    top_size = img.top_end - img.top
    top_trim = (top_size - 33) // PAGE * PAGE
    assert a["trimmable_bytes"] == inner + top_trim
    assert a["trimmable_top_bytes"] == top_trim
    assert "free but resident below a live 208-byte chunk at the heap top" in r["verdict"]
    assert "malloc_trim(0) would return" in r["verdict"]


def test_nonresident_parts_of_a_hole_are_not_resident_nor_trimmable():
    hole = 4 << 20
    img = build([Chunk(0x100), Chunk(hole, "free"), Chunk(0xD0)], heap_size=5 << 20)
    start = HEAP + 0x1000
    img.space.nonresident.append((start + PAGE, start + PAGE + (1 << 20)))
    a = analyse(img)["arenas"][0]
    assert a["hole_resident_bytes"] == hole - (1 << 20)
    full = analyse(build([Chunk(0x100), Chunk(hole, "free"), Chunk(0xD0)],
                         heap_size=5 << 20))["arenas"][0]
    assert full["trimmable_bytes"] - a["trimmable_bytes"] == 1 << 20


def test_fastbin_chunk_next_to_a_free_chunk_merges_before_trim():
    # malloc_trim consolidates fastbins first: [fast 0x20][free 0x3000] -> one chunk
    assert trim_ranges([(0x10000, 0x3020)], top=0x20000, top_end=0x21000, page=PAGE,
                       main=False)[0] == [(0x11000, 0x13000)]
    img = build([Chunk(0x40), Chunk(0x20, "fast"), Chunk(0x1FE0, "free"), Chunk(0x40)])
    a = analyse(img)["arenas"][0]
    chunk = HEAP + 0x290 + 0x40
    paligned = (chunk + 48 + PAGE - 1) & ~(PAGE - 1)
    inner = (chunk + 0x2000 - paligned) & ~(PAGE - 1)
    top_size = img.top_end - img.top
    assert a["trimmable_bytes"] == inner + (top_size - 33) // PAGE * PAGE


def test_free_chunk_merging_into_top_after_consolidation():
    runs, top = trim_ranges([(0x10000, 0x20)], top=0x10020, top_end=0x30000, page=PAGE,
                            main=True)
    assert top == 0x10000
    assert runs == [(0x30000 - (0x20000 - 33) // PAGE * PAGE, 0x30000)]


def test_footer_mismatch_is_an_inconsistent_walk():
    img = build([Chunk(0x100, "free"), Chunk(0x40)])
    img.space.q(img.chunks[1].addr + 0x100, 0x999)  # wrong prev_size
    with pytest.raises(HeapError) as e:
        analyse(img)
    assert e.value.kind == "inconsistent"


def test_walk_must_land_on_top():
    img = build([Chunk(0x100), Chunk(0x40)])
    img.space.q(img.chunks[1].addr + 8, 0x1000 | 1)  # overshoots top
    with pytest.raises(HeapError):
        analyse(img)


def test_arena_changed_during_walk_is_detected():
    img = build([Chunk(0x100)])
    real_read = img.space.read
    calls = {"n": 0}

    def read(addr: int, size: int) -> bytes:
        data = real_read(addr, size)
        if addr == MAIN_ARENA and size == img.layout.state_size:
            calls["n"] += 1
            if calls["n"] >= 3:  # the re-read after the walk: system_mem moved on
                off = img.layout.system_mem
                data = data[:off] + struct.pack("<Q", 1 << 21) + data[off + 8:]
        return data

    img.space.read = read  # type: ignore[method-assign]
    with pytest.raises(HeapError) as e:
        analyse(img)
    assert "changed" in e.value.message or "system_mem" in e.value.message


def test_no_malloc_state_is_unsupported_layout():
    img = build([Chunk(0x100)])
    img.space.q(MAIN_ARENA + img.layout.next, 0)  # break the next chain
    with pytest.raises(HeapError) as e:
        analyse(img)
    assert e.value.kind == "unsupported"
    assert "unsupported glibc layout" in e.value.message


def test_thread_arenas_are_listed():
    t1 = [Chunk(0x100), Chunk(0x200, "free"), Chunk(0x100)]
    t2 = [Chunk(0x80), Chunk(0x30, "fast"), Chunk(0x80)]
    img = build([Chunk(0x100)], thread_chunks=[t1, t2])
    r = analyse(img)
    kinds = [a["kind"] for a in r["arenas"]]
    assert kinds == ["main", "thread", "thread"]
    a1, a2 = r["arenas"][1], r["arenas"][2]
    assert a1["binned_free_bytes"] == 0x200
    assert a1["in_use_bytes"] == 0x200
    assert a2["fastbin_bytes"] == 0x30
    assert a2["in_use_bytes"] == 0x100
    for a in (a1, a2):  # mallinfo2 counts thread-heap headers as allocated
        assert a["malloc_in_use_bytes"] == a["in_use_bytes"] + a["arena_overhead_bytes"] > 0x100
    # heap_info + malloc_state + alignment
    assert a1["arena_overhead_bytes"] == 48 + 2200 + 8
    assert a1["in_use_bytes"] + a1["free_bytes"] + a1["arena_overhead_bytes"] == a1["size_bytes"]
    assert a1["trimmable_bytes"] == 0  # malloc_trim does not shrink thread heaps' tops


def test_thread_heap_info_pointing_elsewhere_is_inconsistent():
    img = build([Chunk(0x100)], thread_chunks=[[Chunk(0x100)]])
    h = img.thread_arenas[0] - 48
    img.space.q(h, 0xDEAD0)
    with pytest.raises(HeapError):
        analyse(img)


def test_mmapped_chunks_counted_apart():
    img = build([Chunk(0x100)], mmapped=[1 << 20, 300 << 10])
    r = analyse(img)
    mm = r["mmapped"]
    assert mm["count"] == 2 and mm["located_count"] == 2
    assert mm["bytes"] == (1 << 20) + (300 << 10)
    assert mm["threshold_bytes"] == 128 << 10 and mm["threshold_dynamic"] is True
    assert r["arenas"][0]["size_bytes"] == 1 << 20


def test_mmapped_chunk_inside_a_merged_vma_is_found():
    img = build([Chunk(0x100)], mmapped=[1 << 20])
    # prepend another anonymous mapping to the chunk's VMA (as if they merged)
    base = 0x7F1000000000
    buf = img.space.regions.pop(base)
    merged = bytearray(b"\x55" * PAGE * 4) + buf
    img.space.regions[base - PAGE * 4] = merged
    img.space.vmas = [v for v in img.space.vmas if v.start != base]
    img.space.vmas.append(Vma(base - PAGE * 4, base + len(buf), "rw-p", 0, "00:00", 0, b""))
    img.space.vmas.sort(key=lambda v: v.start)
    mm = analyse(img)["mmapped"]
    assert mm["located_count"] == 1 and mm["located_bytes"] == 1 << 20


def test_main_heap_never_used():
    img = build([Chunk(0x100)])
    img.space.q(MAIN_ARENA + img.layout.top, MAIN_ARENA + img.layout.top)  # initial_top
    r = analyse(img)
    assert r["arenas"] == []


def test_histogram_buckets():
    h = histogram([32, 48, 64, 4096, 5000])
    assert h == [{"min_bytes": 32, "max_bytes": 63, "chunks": 2, "bytes": 80},
                 {"min_bytes": 64, "max_bytes": 127, "chunks": 1, "bytes": 64},
                 {"min_bytes": 4096, "max_bytes": 8191, "chunks": 2, "bytes": 9096}]


def test_resident_map_counts():
    m = ResidentMap([(0, 4096), (8192, 16384), (4096, 6000)])
    assert m.bytes_in(0, 20000) == 6000 + 8192
    assert m.bytes_in(5000, 9000) == 1000 + 808
    assert m.runs_in(5000, 9000) == [(5000, 6000), (8192, 9000)]


def test_glibc_version_string():
    banner = b"xx GNU C Library (Debian GLIBC 2.36-9+deb12u14) stable release version 2.36.\n"
    assert parse_glibc_version(banner) == (2, 36)
    assert parse_glibc_version(b"nothing") is None


def _elf_defining(*names: bytes, interp: bool = True) -> bytes:
    """A minimal ELF64 with PT_INTERP (optional) and a .dynsym defining `names`."""
    strtab = b"\0" + b"".join(n + b"\0" for n in names)
    syms = bytes(24)
    off = 1
    for n in names:
        syms += struct.pack("<IBBHQQ", off, 0x12, 0, 12, 0x1000, 16)
        off += len(n) + 1
    phoff = 64
    ph = struct.pack("<IIQQQQQQ", 3 if interp else 1, 4, 0, 0, 0, 0, 0, 1)
    data_off = phoff + len(ph)
    dynsym_off = data_off
    dynstr_off = dynsym_off + len(syms)
    shoff = dynstr_off + len(strtab)
    sh = bytes(64)
    sh += struct.pack("<IIQQQQIIQQ", 0, 11, 0, 0, dynsym_off, len(syms), 2, 0, 8, 24)
    sh += struct.pack("<IIQQQQIIQQ", 0, 3, 0, 0, dynstr_off, len(strtab), 0, 0, 1, 0)
    hdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    hdr += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, phoff, shoff, 0, 64, 56, 1, 64, 3, 2)
    return hdr + ph + syms + strtab + sh


def test_elf_info_reads_dynsym():
    interp, names = elf_info(_elf_defining(b"malloc", b"free")) or (None, set())
    assert interp is True and {b"malloc", b"free"} <= names


def _space_with(paths: list[bytes]) -> FakeSpace:
    s = FakeSpace()
    for k, p in enumerate(paths):
        s.map(0x7F0000000000 + k * 0x10000, 0x1000, p, "r-xp")
    return s


def test_detects_jemalloc():
    je = b"/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    s = _space_with([b"/usr/bin/app", je, LIBC])
    s.files[je] = _elf_defining(b"malloc", b"free")
    s.files[b"/usr/bin/app"] = _elf_defining(b"main")
    info = detect_allocator(s, b"/usr/bin/app")
    assert (info.allocator, info.supported) == ("jemalloc", False)
    assert "libjemalloc.so.2" in info.reason


def test_detects_musl_and_static():
    s = _space_with([b"/app", b"/lib/ld-musl-x86_64.so.1"])
    info = detect_allocator(s, b"/app")
    assert (info.allocator, info.supported) == ("musl", False)
    s = _space_with([b"/app", b"/usr/lib/x86_64-linux-musl/libc.so"])  # Debian's musl
    assert detect_allocator(s, b"/app").allocator == "musl"
    s = _space_with([b"/static-app"])
    s.files[b"/static-app"] = _elf_defining(b"main", interp=False)
    info = detect_allocator(s, b"/static-app")
    assert not info.supported and "statically linked" in info.reason


def test_detects_glibc():
    s = _space_with([b"/usr/bin/python3", LIBC])
    s.files[b"/usr/bin/python3"] = _elf_defining(b"PyMem_Malloc")
    info = detect_allocator(s, b"/usr/bin/python3")
    assert (info.allocator, info.supported, info.libc_path) == ("glibc", True, LIBC)


def test_memtrace_sampler_is_not_another_allocator():
    """--malloc's sampler defines malloc but hands every call to glibc's: the
    heap is still glibc's (it was reported as another allocator's)."""
    shim = b"/var/cache/memtrace/libmemtrace-malloc-0123456789abcdef.so"
    s = _space_with([b"/usr/bin/app", shim, LIBC])
    s.files[shim] = _elf_defining(b"malloc", b"free")
    s.files[b"/usr/bin/app"] = _elf_defining(b"main")
    info = detect_allocator(s, b"/usr/bin/app")
    assert (info.allocator, info.supported) == ("glibc", True)


def test_table_renders():
    img = build([Chunk(0x100), Chunk(4 << 20, "free"), Chunk(0xD0)], heap_size=5 << 20)
    r = analyse(img)
    r.update(pid=1, comm="x", stopped=True, pause_seconds=0.012)
    text = render_table(r)
    assert "paused 12.0 ms" in text and "verdict:" in text and "yes (208 B)" in text
    assert "malloc's own in-use count (mallinfo2().uordblks)" in text
    exact = render_table(r, exact=True)       # --bytes (issue 11)
    size = str(r["arenas"][0]["size_bytes"])
    assert f" {size} " in exact and f" {fmt_bytes(r['arenas'][0]['size_bytes'])} " in text
    assert exact.splitlines()[-1] == text.splitlines()[-1]   # the verdict keeps its units
    un = render_table({"pid": 2, "comm": "y", "supported": False, "allocator": "musl",
                            "reason": "musl"})
    assert "allocator musl" in un


# A process stopped with SIGSTOP (heap --stop) may have a thread inside malloc or
# free: the snapshot then holds a half-made update. Each such state must be
# "inconsistent" (the snapshot is taken again), never "unsupported", never figures.

def _half_link_unsorted_bin(img, arena: int, locked: bool) -> None:  # type: ignore[no-untyped-def]
    """The unsorted bin between `bck->fd = p` and `fwd->bk = p` of an insert into
    the empty bin: fd points at the chunk, bk still at the bin itself."""
    lay = img.layout
    slot = arena + lay.bins
    img.space.q(slot, img.chunks[1].addr)
    if locked:
        img.space.write(arena, struct.pack("<i", 1))  # mutex held


def test_half_linked_bin_of_a_locked_thread_arena_is_retaken_not_unsupported():
    img = build([Chunk(0x100), Chunk(0x40)], thread_chunks=[[Chunk(0x100), Chunk(0x80)]])
    _half_link_unsorted_bin(img, img.thread_arenas[0], locked=True)
    with pytest.raises(HeapError) as e:
        analyse(img)
    assert e.value.kind == "inconsistent", e.value.message
    assert "half-updated" in e.value.message and f"{img.thread_arenas[0]:#x}" in e.value.message


def test_half_linked_bin_of_the_locked_main_arena_is_retaken_not_unsupported():
    img = build([Chunk(0x100), Chunk(0x40)])
    _half_link_unsorted_bin(img, MAIN_ARENA, locked=True)
    with pytest.raises(HeapError) as e:
        analyse(img)
    assert e.value.kind == "inconsistent", e.value.message
    assert "half-updated" in e.value.message


def test_half_linked_bin_of_an_unlocked_arena_is_still_unsupported():
    # nobody is updating it: the layout is not the one we know
    img = build([Chunk(0x100), Chunk(0x40)], thread_chunks=[[Chunk(0x100)]])
    _half_link_unsorted_bin(img, img.thread_arenas[0], locked=False)
    with pytest.raises(HeapError) as e:
        analyse(img)
    assert e.value.kind == "unsupported"


def test_system_mem_ahead_of_max_in_a_locked_arena_is_retaken():
    # sysmalloc: `av->system_mem += size` comes before max_system_mem follows
    img = build([Chunk(0x100)], thread_chunks=[[Chunk(0x100)]])
    a = img.thread_arenas[0]
    img.space.q(a + img.layout.max_system_mem, 1 << 19)
    img.space.write(a, struct.pack("<i", 2))  # held, with waiters
    with pytest.raises(HeapError) as e:
        analyse(img)
    assert e.value.kind == "inconsistent"


def _thread_tcache(count: int, entries: int):  # type: ignore[no-untyped-def]
    """A thread arena whose first chunk is its thread's tcache, list 7 (0x90)
    holding `entries` of the two 0x90 chunks with `counts[5] = count`."""
    img = build([Chunk(0x100)], thread_chunks=[[Chunk(0x290), Chunk(0x90), Chunk(0x40),
                                                Chunk(0x90), Chunk(0x40)]])
    sp, lay = img.space, img.layout
    first = img.thread_arenas[0] + lay.state_size
    first += (16 - (first + 16) % 16) % 16  # as synth lays it out
    mem = first + 16
    c1, c2 = first + 0x290, first + 0x290 + 0x90 + 0x40
    sp.write(mem + 2 * 7, struct.pack("<H", count))
    chain = [c1 + 16, c2 + 16][:entries]
    if chain:
        sp.q(mem + lay.tcache_entries + 8 * 7, chain[0])
    for a, b in zip(chain, chain[1:] + [0]):
        sp.q(a, (a >> 12) ^ b)
    return img


def test_thread_tcache_is_found():
    r = analyse(_thread_tcache(2, 2))
    assert r["tcaches"] == 2
    assert r["arenas"][1]["tcache_bytes"] == 2 * 0x90


@pytest.mark.parametrize("count,entries", [(0, 1), (1, 2), (2, 1)])
def test_tcache_caught_between_its_list_and_its_count_is_retaken(count, entries):
    # tcache_put/tcache_get take no lock: the list head and the count are two
    # stores; dropping the tcache would count its chunks as in use
    with pytest.raises(HeapError) as e:
        analyse(_thread_tcache(count, entries))
    assert e.value.kind == "inconsistent"
    assert "tcache" in e.value.message and "half-updated" in e.value.message


def test_two_free_chunks_side_by_side_are_a_free_in_progress():
    # free() coalesces: only a thread between unlink and set_head leaves two
    img = build([Chunk(0x40), Chunk(0x100, "free"), Chunk(0x100, "free"), Chunk(0x40)])
    with pytest.raises(HeapError) as e:
        analyse(img)
    assert e.value.kind == "inconsistent" and "side by side" in e.value.message


def test_free_chunk_right_before_the_top_is_a_free_in_progress():
    img = build([Chunk(0x40), Chunk(0x100, "free")])
    with pytest.raises(HeapError) as e:
        analyse(img)
    assert e.value.kind == "inconsistent" and "before the top" in e.value.message


def test_the_brk_heap_is_every_heap_vma_right_after_the_first() -> None:
    """The kernel may split [heap] (a forked child that grows it; Debian's
    nginx workers): the main arena runs across the pieces."""
    from memtrace.heap.analysis import brk_heap
    from memtrace.trace.procfs import Vma

    def vma(start: int, end: int, path: bytes) -> Vma:
        return Vma(start, end, "rw-p", 0, "00:00", 0, path)

    assert brk_heap([vma(0x1000, 0x2000, b"/bin/x")]) is None
    assert brk_heap([vma(0x1000, 0x2000, b"/bin/x"), vma(0x5000, 0x9000, b"[heap]"),
                     vma(0x9000, 0xC000, b"[heap]"), vma(0xC000, 0xD000, b"")]) == (0x5000, 0xC000)
    # a [heap] VMA that is not adjacent is not part of it
    assert brk_heap([vma(0x5000, 0x9000, b"[heap]"),
                     vma(0xA000, 0xC000, b"[heap]")]) == (0x5000, 0x9000)
