"""What memtrace heap knows of glibc malloc before reading a process: the chunk
constants, the offsets of malloc_state, heap_info, malloc_par and the tcache per
glibc version, and HeapError, the one way an analysis says it has no figures.

Nothing here depends on debug symbols; every offset is checked at run time
against the heap it describes (structures.py, walk.py).
"""

from __future__ import annotations

import dataclasses
import re
import struct
from dataclasses import dataclass
from typing import Any

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
QWORD = struct.Struct("<Q")  # the target is 64-bit little-endian
QWORD_PAIR = struct.Struct("<QQ")  # a chunk header: prev_size, size | flags


class HeapError(Exception):
    """The analysis cannot give figures; `kind` says why."""

    def __init__(self, message: str, kind: str = "inconsistent") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind  # "inconsistent" (retry may help) | "unsupported" | "gone"


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
    return dataclasses.replace(layout, **kw)


def _request2size(req: int) -> int:
    return max(MINSIZE, (req + SIZE_SZ + MALLOC_ALIGNMENT - 1) & ~(MALLOC_ALIGNMENT - 1))


def parse_glibc_version(data: bytes) -> tuple[int, int] | None:
    m = re.search(rb"GNU C Library [^\n]*?release version (\d+)\.(\d+)", data)
    if m:
        return int(m.group(1)), int(m.group(2))
    return None
