"""memtrace.trace.ringbuf on a ring laid out as the kernel maps it (consumer
page; producer page, then the data twice), written by a fake producer."""

from __future__ import annotations

import struct

import pytest

from memtrace.trace.ringbuf import BUSY_BIT, DISCARD_BIT, HEADER, RingReader

PAGE = 4096
SIZE = 4096


class FakeRing:
    """A producer writing records as BPF's bpf_ringbuf_reserve/submit do."""

    def __init__(self, size: int = SIZE) -> None:
        self.size = size
        self.consumer = bytearray(PAGE)
        self.producer = bytearray(PAGE + 2 * size)
        self.pos = 0

    def _put(self, pos: int, data: bytes) -> None:
        for i, b in enumerate(data):          # the data is mapped twice in a row
            at = (pos + i) % self.size
            self.producer[PAGE + at] = b
            self.producer[PAGE + self.size + at] = b

    def reserve(self, data: bytes) -> int:
        at = self.pos
        self._put(at, struct.pack("<II", len(data) | BUSY_BIT, 0) + data)
        self.pos += (len(data) + HEADER + 7) & ~7
        struct.pack_into("<Q", self.producer, 0, self.pos)
        return at

    def submit(self, at: int, discard: bool = False) -> None:
        length = struct.unpack_from("<I", self.producer, PAGE + at % self.size)[0] & ~BUSY_BIT
        self._put(at, struct.pack("<I", length | (DISCARD_BIT if discard else 0)))

    def write(self, data: bytes) -> None:
        self.submit(self.reserve(data))

    def consumed(self) -> int:
        return int(struct.unpack_from("<Q", self.consumer, 0)[0])

    def reader(self) -> RingReader:
        return RingReader(self.consumer, self.producer, self.size, PAGE)


def _collect(reader: RingReader) -> list[bytes]:
    got: list[bytes] = []
    reader.consume(lambda buf, off, n: got.append(bytes(buf[off:off + n])))
    return got


def test_records_come_in_order_and_their_space_is_given_back():
    ring = FakeRing()
    reader = ring.reader()
    assert not reader.pending() and _collect(reader) == []
    ring.write(b"a")
    ring.write(b"bcdefghij")        # 9 bytes: 8 + 9 rounds up to 24
    assert reader.pending()
    assert _collect(reader) == [b"a", b"bcdefghij"]
    assert ring.consumed() == 16 + 24 == ring.pos and reader.records == 2
    assert not reader.pending() and _collect(reader) == []


def test_a_record_still_being_written_ends_the_run():
    ring = FakeRing()
    reader = ring.reader()
    ring.write(b"first")
    busy = ring.reserve(b"second")
    ring.write(b"third")             # submitted, but behind a busy one
    assert _collect(reader) == [b"first"] and ring.consumed() == busy
    ring.submit(busy)
    assert _collect(reader) == [b"second", b"third"] and ring.consumed() == ring.pos


def test_discarded_records_are_skipped_and_counted():
    ring = FakeRing()
    reader = ring.reader()
    ring.submit(ring.reserve(b"dropped"), discard=True)
    ring.write(b"kept")
    assert _collect(reader) == [b"kept"] and reader.discarded == 1
    assert ring.consumed() == ring.pos


def test_a_record_across_the_end_of_the_ring_reads_whole():
    ring = FakeRing()
    reader = ring.reader()
    filler = bytes(SIZE - 64 - HEADER)
    ring.write(filler)
    assert _collect(reader) == [filler]
    record = bytes(range(200))       # starts 64 bytes before the end, wraps
    ring.write(record)
    assert _collect(reader) == [record] and ring.consumed() == ring.pos > SIZE


def test_a_failing_handler_does_not_stall_the_ring():
    ring = FakeRing()
    reader = ring.reader()
    ring.write(b"bad")
    ring.write(b"good")

    def handle(buf, off, n):
        if bytes(buf[off:off + n]) == b"bad":
            raise ValueError("bad record")

    with pytest.raises(ValueError):
        reader.consume(handle)
    assert ring.consumed() == 16                  # past the bad record only
    assert _collect(reader) == [b"good"]


@pytest.mark.parametrize("size", [0, 3000])
def test_a_ring_size_is_a_power_of_two(size):
    with pytest.raises(ValueError):
        RingReader(bytearray(PAGE), bytearray(PAGE), size, PAGE)


def test_records_written_during_a_call_are_read_up_to_one_ring_a_call():
    """Like libbpf, a call goes on with what BPF writes meanwhile; unlike it,
    never past one ring's worth of bytes, so a busy producer cannot keep the
    reader (and the lock it holds) forever."""
    ring = FakeRing()
    reader = ring.reader()
    record = 112                        # 100 bytes of data, the header, rounded up
    ring.write(b"0" * 100)
    got: list[int] = []

    def handle(buf, off, n):
        got.append(n)
        if ring.pos + record - ring.consumed() <= SIZE:   # BPF writes only into free space
            ring.write(b"x" * 100)

    reader.consume(handle)
    assert SIZE <= len(got) * record < SIZE + record      # one ring's worth, then stops
    assert ring.consumed() == len(got) * record < ring.pos
    left = (ring.pos - ring.consumed()) // record
    assert left > 0 and len(_collect(reader)) == left
