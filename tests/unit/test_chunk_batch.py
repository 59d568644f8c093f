"""ChunkBatch (memtrace/trace/probes.py): the dirty-chunk map read and deleted in
batches into buffers allocated once, against a stand-in for libbcc's
bpf_lookup_and_delete_batch that follows the kernel's contract (entries in
batches of at most `count`, ENOENT with the last ones, a bucket token)."""

from __future__ import annotations

import ctypes
import errno
from types import SimpleNamespace
from typing import Any

import pytest

from memtrace.trace.probes import ChunkBatch


class FakeMap:
    def __init__(self, entries: list[tuple[int, int, int, int, int]], fail: int = 0,
                 stall_after: int | None = None, fail_after: int | None = None) -> None:
        self.entries = list(entries)
        self.fail = fail                # an errno to fail the first call with
        self.fail_after = fail_after    # calls after which every call fails (EINVAL)
        self.stall_after = stall_after  # calls after which no progress is made
        self.calls: list[int | None] = []

    def bpf_lookup_and_delete_batch(self, fd: int, in_batch: Any, out_batch: Any, keys: Any,
                                    values: Any, count: Any) -> int:
        self.calls.append(None if in_batch is None else in_batch._obj.value)
        if self.fail or (self.fail_after is not None and len(self.calls) > self.fail_after):
            count._obj.value = 0
            ctypes.set_errno(self.fail or errno.EINVAL)
            return -1
        if self.stall_after is not None and len(self.calls) > self.stall_after:
            count._obj.value = 0
            return 0
        n = min(count._obj.value, len(self.entries))
        taken, self.entries = self.entries[:n], self.entries[n:]
        kbuf = b"".join(ChunkBatch.KEY.pack(*e[:3]) for e in taken)
        vbuf = b"".join(ChunkBatch.VALUE.pack(*e[3:]) for e in taken)
        ctypes.memmove(keys._obj, kbuf, len(kbuf))
        ctypes.memmove(values._obj, vbuf, len(vbuf))
        count._obj.value = n
        out_batch._obj.value = len(self.calls)
        if not self.entries:
            ctypes.set_errno(errno.ENOENT)
            return -1
        return 0


def _batch(fake: FakeMap, n: int) -> ChunkBatch:
    return ChunkBatch(SimpleNamespace(libbcc=SimpleNamespace(lib=fake)), batch=n)


ENTRIES = [(100 + i % 3, i % 2, 0x7F000 + i, i * 10, (0x7F000 + i) << 21) for i in range(23)]


def test_every_entry_is_read_across_batches_with_the_token_passed_on():
    fake = FakeMap(ENTRIES)
    assert _batch(fake, 5).drain(3) == ENTRIES
    assert fake.calls == [None, 1, 2, 3, 4]      # the first call starts, the rest resume


def test_an_empty_map_and_an_exact_multiple_of_the_batch():
    assert _batch(FakeMap([]), 8).drain(3) == []
    fake = FakeMap(ENTRIES[:10])
    assert _batch(fake, 5).drain(3) == ENTRIES[:10]


def test_no_progress_returns_what_was_read():
    fake = FakeMap(ENTRIES, stall_after=2)
    assert _batch(fake, 4).drain(3) == ENTRIES[:8]


def test_no_batch_operations_is_an_oserror_for_the_caller_to_fall_back():
    with pytest.raises(OSError):
        _batch(FakeMap(ENTRIES, fail=errno.EINVAL), 4).drain(3)


def test_an_error_after_some_batches_keeps_what_was_read_and_leaves_the_rest():
    fake = FakeMap(ENTRIES, fail_after=2)
    assert _batch(fake, 4).drain(3) == ENTRIES[:8]
    assert fake.entries == ENTRIES[8:]          # still in the map for its next drain
