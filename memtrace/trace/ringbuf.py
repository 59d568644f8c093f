"""A BPF ring buffer read in place, without a callback per record.

bcc's `ring_buffer_consume` calls a Python function through ctypes for every
record (libbpf's ring_buffer__consume). For the stack samples (thousands a
second, 8 KiB each) that trampoline and the ctypes views cost more than the
decoding itself, so this reader maps the ring as libbpf does and walks it from
Python (kernel/bpf/ringbuf.c, tools/lib/bpf/ringbuf.c):

- page 0 of the map (read-write): the consumer position, advanced by us;
- page 1 (read-only): the producer position, advanced by BPF;
- from page 2: the data, `size` bytes mapped twice in a row, so a record that
  wraps around the end reads as one run of bytes.

A record is an 8-byte header (its length, with a busy bit while BPF has not
submitted it and a discard bit when BPF dropped it) and the data, rounded up
to 8 bytes. Positions only grow; a position's offset in the data is
`position & (size - 1)`.

The positions are read and written with native 8-byte accesses (struct's
native "Q": one load or store on x86-64, as the kernel's smp_load_acquire /
smp_store_release are there), never byte by byte.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER = 8
_POS = struct.Struct("@Q")
_LEN = struct.Struct("@I")

# (the data: a buffer, where the record's data starts in it, its length)
Handler = Callable[[mmap.mmap | bytearray, int, int], None]


class RingReader:
    """The records of one BPF_MAP_TYPE_RINGBUF map, in order."""

    def __init__(self, consumer: mmap.mmap | bytearray, producer: mmap.mmap | bytearray,
                 size: int, page: int) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"a ring's size is a power of two, not {size}")
        self._consumer = consumer
        self._producer = producer       # the producer page, then the data twice
        self._size = size
        self._page = page
        self.records = 0                # records handed to the handler
        self.discarded = 0              # records BPF reserved and discarded

    @classmethod
    def of_map(cls, map_fd: int, size: int) -> RingReader:
        """Map the ring of a BPF map fd (`size`: its max_entries in bytes)."""
        page = os.sysconf("SC_PAGE_SIZE")
        consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            producer = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                                 offset=page)
        except BaseException:
            consumer.close()
            raise
        return cls(consumer, producer, size, page)

    def close(self) -> None:
        for m in (self._consumer, self._producer):
            if isinstance(m, mmap.mmap):
                m.close()

    def pending(self) -> bool:
        """Whether BPF has written past what was read."""
        return bool(_POS.unpack_from(self._producer, 0)[0]
                    > _POS.unpack_from(self._consumer, 0)[0])

    def consume(self, handle: Handler) -> int:
        """Hand every submitted record to `handle(buffer, offset, length)`,
        which must copy what it keeps before it returns: each record's space
        goes back to BPF once it is handled. Goes on while BPF writes (as
        libbpf does), but reads at most one ring's worth of bytes a call, so a
        busy producer cannot keep the caller here; a record still being
        written ends the call. Returns the number of records handled."""
        data, consumer, page, mask = self._producer, self._consumer, self._page, self._size - 1
        cons = _POS.unpack_from(consumer, 0)[0]
        prod = _POS.unpack_from(data, 0)[0]
        stop = cons + self._size
        done = 0
        try:
            while cons < prod or (cons < stop and cons < (
                    prod := _POS.unpack_from(data, 0)[0])):
                at = page + (cons & mask)
                length = _LEN.unpack_from(data, at)[0]
                if length & BUSY_BIT:
                    break
                size = length & ~(BUSY_BIT | DISCARD_BIT)
                cons += (size + HEADER + 7) & ~7
                if length & DISCARD_BIT:
                    self.discarded += 1
                else:
                    handle(data, at + HEADER, size)
                    done += 1
                # each record's space back at once (as libbpf does): BPF keeps
                # sampling into it while the rest of a long run is handled
                _POS.pack_into(consumer, 0, cons)
        finally:
            _POS.pack_into(consumer, 0, cons)    # past a record whose `handle` raised
            self.records += done
        return done
