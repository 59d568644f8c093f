"""`memtrace watch --heap-interval` on the C test programs (root, BCC): the `heap`
figures in the JSON snapshots and the memtrace_heap_* metrics equal what
`memtrace heap PID --format json` reports at the same quiescent point."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from memtrace.exporter.families import HEAP_FAMILIES
from memtrace.heap.worker import KIND_FIELDS

from .test_heap_root import JEMALLOC, REPO, Prog

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="memtrace watch needs root")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def by_kind(report: dict[str, Any]) -> dict[str, dict[str, int]]:
    """`memtrace heap --format json` summed per arena kind."""
    return {kind: {k: sum(a[k] for a in report["arenas"] if a["kind"] == kind)
                   for k in KIND_FIELDS} for kind in ("main", "thread")}


def heap_json(pid: int) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "memtrace", "heap", str(pid), "--format", "json"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


class Watch:
    def __init__(self, pids: list[int], port: int) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-m", "memtrace", "watch", *map(str, pids), "--format", "json",
             "--heap-interval", "1", "--web.listen-address", f"127.0.0.1:{port}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)))
        self.port = port
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, args=(self.p.stdout, self.lines.put),
                         daemon=True).start()
        threading.Thread(target=self._read, args=(self.p.stderr, self.stderr.append),
                         daemon=True).start()

    @staticmethod
    def _read(f: Any, put: Any) -> None:
        for line in f:
            put(line)

    def heap_of(self, pids: list[int], timeout: float = 120) -> dict[int, dict[str, Any]]:
        """The first snapshot of each pid whose heap walk is done."""
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(pids):
            assert self.p.poll() is None, "".join(self.stderr)
            try:
                snap = json.loads(self.lines.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError("no heap figures in time:\n" + "".join(self.stderr)) \
                    from None
            assert "heap" in snap
            if snap["heap"]["status"] != "pending":
                got.setdefault(snap["pid"], snap)
        return got

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    def close(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def test_watch_heap_figures_and_metrics_equal_memtrace_heap(build: Path) -> None:
    hole = Prog([str(build / "heapprog"), "hole", "200000"])
    threads = Prog([str(build / "heapprog"), "threads", "4"])
    progs = [hole, threads]
    jem = None
    if JEMALLOC.exists():
        jem = Prog([str(build / "heapprog"), "hole", "1000"],
                   env=dict(os.environ, LD_PRELOAD=str(JEMALLOC)))
        progs.append(jem)
    watch = Watch([p.pid for p in progs], free_port())
    try:
        mi = {p.pid: p.mallinfo() for p in (hole, threads)}
        snaps = watch.heap_of([p.pid for p in progs])
        metrics = watch.metrics()
        reports = {p.pid: heap_json(p.pid) for p in (hole, threads)}
        for p in (hole, threads):  # quiescent: nothing moved while we looked
            assert p.mallinfo() == mi[p.pid]
        for p in (hole, threads):
            h = snaps[p.pid]["heap"]
            assert h["status"] == "ok" and h["supported"] is True, h
            want = by_kind(reports[p.pid])
            for kind in ("main", "thread"):
                got = {k: h["by_kind"][kind][k] for k in KIND_FIELDS}
                assert got == want[kind], (p.pid, kind)
                for name, key, _ in HEAP_FAMILIES:
                    labels = (("arena", kind), ("comm", "heapprog"), ("pid", str(p.pid)))
                    assert metrics[(name, labels)] == want[kind][key], (name, labels)
            assert h["totals"]["malloc_in_use_bytes"] == mi[p.pid]["uordblks"]
        assert snaps[threads.pid]["heap"]["by_kind"]["thread"]["arenas"] == 4
        assert snaps[hole.pid]["heap"]["by_kind"]["main"]["top_pinned"] is True
        assert snaps[hole.pid]["heap"]["by_kind"]["thread"]["in_use_bytes"] == 0
        if jem is not None:
            h = snaps[jem.pid]["heap"]
            assert h["status"] == "unsupported" and h["allocator"] == "jemalloc", h
            assert h["supported"] is False and h["reason"]
            assert not [k for k in metrics if k[0].startswith("memtrace_heap_")
                        and ("pid", str(jem.pid)) in k[1]]
            assert any(f"pid {jem.pid}: no heap figures" in line for line in watch.stderr)
        assert metrics[("memtrace_heap_walks_total", (("result", "ok"),))] >= 2
        # the watch tick is not slowed by the walks (they run in another process)
        assert metrics[("memtrace_tick_duration_seconds", ())] < 0.5
    finally:
        watch.close()
        for p in progs:
            p.close()
