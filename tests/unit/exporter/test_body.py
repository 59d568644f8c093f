"""memtrace.exporter.body: a tick's text kept for every scrape of it, and the
gzip member made of its kept deflate blocks and a fresh tail."""

from __future__ import annotations

import gzip
import random
import zlib

import pytest

from memtrace.exporter.body import WRITE_BYTES, TickText, gzip_body, plain_body


def pieces(seed: int, n: int) -> list[bytes]:
    rng = random.Random(seed)
    return [f'memtrace_x{{pid="{rng.randrange(99999)}"}} {rng.random()}\n'.encode() * 50
            for _ in range(n)]


@pytest.mark.parametrize("module_name", ["zlib", "isal"])
@pytest.mark.parametrize("tail_count", [0, 1, 40])
def test_gzip_body_is_one_member_of_the_whole_text(module_name, tail_count):
    module = pytest.importorskip("isal.isal_zlib") if module_name == "isal" else zlib
    head = TickText(pieces(1, 300))
    assert head.length > 2 * WRITE_BYTES
    for seed in (2, 3):  # two scrapes of the tick: the head's blocks are reused
        tail = pieces(seed, tail_count)
        packed = b"".join(gzip_body(head, tail, module, 1))
        want = b"".join(head.chunks + tail)
        one = zlib.decompressobj(31)
        assert one.decompress(packed) == want and one.eof and not one.unused_data
        assert gzip.decompress(packed) == want
    assert head.deflated(module, 1)[0] is head.deflated(module, 1)[0]


def test_plain_body_writes_are_kept_and_sized():
    head = TickText(pieces(4, 300))
    tail = pieces(5, 3)
    body = plain_body(head, tail)
    assert b"".join(body) == b"".join(head.chunks + tail)
    assert all(len(w) >= WRITE_BYTES for w in head.writes()[:-1])
    assert head.writes() is head.writes()
