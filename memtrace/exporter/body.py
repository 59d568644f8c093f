"""A /metrics response in two parts, so that many scrapes of one tick cost little:
the text of one published tick (TickText: the same for every scrape of that tick,
built by the first of them, and deflated once when a client asks for gzip) and a
small tail made fresh for every scrape (memtrace's self-monitoring families, the
process collector). A gzip body is one gzip member: header, the tick's deflate
blocks (ending in a sync flush, so byte-aligned and not final), the tail's own
deflate stream, and the CRC-32 and length of the whole text."""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Iterable
from typing import Any

from memtrace.util.batches import joined

# Bytes per write: the pieces of a response are joined into writes of about this
# size (and gzipped in pieces of this size). A whole scrape in one buffer (3.4 MB
# at 100 processes x 200 mappings) is handed back to the kernel by malloc after
# every scrape and faulted in again page by page on the next: ~1,000 page faults,
# several ms of CPU. A tick's writes are kept for every scrape of that tick.
WRITE_BYTES = 64 * 1024

# magic, deflate, no flags, no mtime, XFL 4 (fastest), OS 3 (Unix): what zlib
# writes for a gzip stream at level 1
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\x03"


class TickText:
    """The part of every scrape of one tick that does not change between them:
    UTF-8 pieces, joined into writes and deflated on first use, then kept."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.length = sum(map(len, chunks))
        self._lock = threading.Lock()
        self._writes: list[bytes] | None = None
        self._deflated: tuple[Any, int, list[bytes], int] | None = None

    def writes(self) -> list[bytes]:
        """The pieces joined into writes of about WRITE_BYTES (made once)."""
        with self._lock:
            if self._writes is None:
                self._writes = list(joined(self.chunks, WRITE_BYTES))
            return self._writes

    def deflated(self, module: Any, level: int) -> tuple[list[bytes], int]:
        """Raw deflate blocks of the text by `module` (zlib's interface) at
        `level`, ending in a sync flush, and the text's CRC-32 (made once per
        module and level; a concurrent scrape waits for the first one)."""
        with self._lock:
            cached = self._deflated
            if cached is None or cached[0] is not module or cached[1] != level:
                z = module.compressobj(level, module.DEFLATED, -15)
                blocks: list[bytes] = []
                crc = 0
                for group in joined(self.chunks, WRITE_BYTES):
                    blocks.append(z.compress(group))
                    crc = zlib.crc32(group, crc)
                blocks.append(z.flush(module.Z_SYNC_FLUSH))
                cached = self._deflated = (module, level, blocks, crc)
            return cached[2], cached[3]


def plain_body(head: TickText, tail: Iterable[bytes]) -> list[bytes]:
    """The text as writes: the tick's, then the tail joined."""
    return [*head.writes(), *joined(tail, WRITE_BYTES)]


def gzip_body(head: TickText, tail: list[bytes], module: Any, level: int) -> list[bytes]:
    """The text as one gzip member: the tick's deflate blocks (kept) and the
    tail's, deflated now."""
    blocks, crc = head.deflated(module, level)
    z = module.compressobj(level, module.DEFLATED, -15)
    packed = [_GZIP_HEADER, *blocks]
    size = head.length
    for group in joined(tail, WRITE_BYTES):
        packed.append(z.compress(group))
        crc = zlib.crc32(group, crc)
        size += len(group)
    packed.append(z.flush())
    packed.append(struct.pack("<II", crc, size & 0xFFFFFFFF))
    return packed
