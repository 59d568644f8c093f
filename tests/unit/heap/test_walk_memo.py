"""The heap walker's memory of its last walk of a process (heap/analysis.WalkMemo)
as ProcessSpace uses it: the maps not read again while the watch loop's layout
token is the same, read again on another token or a retry; and the worker's
line protocol ("pid [token]"). Runs on this test's own process (no root)."""

from __future__ import annotations

import builtins
import io
import json
import os
import sys

import pytest

from memtrace.heap import worker
from memtrace.heap.analysis import WalkMemo
from memtrace.heap.process import ProcessSpace


def maps_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(file).endswith("/maps"):
            reads.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    return reads


def space(memo: WalkMemo, layout: int) -> ProcessSpace:
    return ProcessSpace(os.getpid(), memo=memo, layout=layout)


def test_maps_are_read_again_only_on_another_token_or_a_retry(monkeypatch) -> None:
    reads = maps_reads(monkeypatch)
    memo = WalkMemo()
    first = space(memo, 5)
    vmas = first.maps()
    first.close()
    assert len(reads) == 1 and memo.layout == 5 and vmas

    same = space(memo, 5)
    assert same.maps() is vmas and len(reads) == 1      # same token: not read
    same.refresh()                                      # a retry reads everything again
    same.maps()
    assert len(reads) == 2 and memo.layout == 0
    same.close()

    for token in (6, 0, 0):                             # another token; 0 is never trusted
        s = space(memo, token)
        s.maps()
        s.close()
    assert len(reads) == 5


def test_the_worker_reads_pid_and_token_lines(monkeypatch) -> None:
    seen: list[tuple[int, int]] = []

    def fake_sample(pid: int, memo: WalkMemo | None = None, layout: int = 0) -> dict:
        seen.append((pid, layout))
        return {"status": "ok"}

    monkeypatch.setattr(worker, "sample_once", fake_sample)
    monkeypatch.setattr(worker.signal, "signal", lambda *a: None)
    monkeypatch.setattr(worker.os, "nice", lambda n: 0)
    monkeypatch.setattr(sys, "stdin", io.StringIO("12 7\n13\nnot a pid\n"))
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    worker.worker_main()
    assert seen == [(12, 7), (13, 0)]
    assert [json.loads(x)["status"] for x in out.getvalue().splitlines()] == ["ok", "ok"]
