"""util/batches.joined: the one way pieces are batched for writes (the JSON
writer, /metrics bodies and their gzip)."""

from memtrace.util.batches import joined


def test_batches_keep_order_and_bytes_and_reach_the_size():
    pieces = [bytes([i]) * (i % 7 + 1) for i in range(200)]
    batches = list(joined(pieces, 50))
    assert b"".join(batches) == b"".join(pieces)
    assert all(len(b) >= 50 for b in batches[:-1])
    assert all(len(b) < 50 + 7 for b in batches)     # never more than one piece over


def test_a_lone_piece_is_not_copied_and_nothing_gives_nothing():
    big = b"x" * 100
    assert next(joined([big], 10)) is big
    assert list(joined([], 10)) == []
