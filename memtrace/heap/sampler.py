"""HeapSampler: the heaps of watched processes walked in the background, in a
separate walker process (memtrace/heap/worker.py), for the `heap` key of
watch/run snapshots and the memtrace_heap_* metrics."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_HEAP_INTERVAL = 30.0
HEAP_CPU_BUDGET = 0.05  # a process's next walk waits at least last walk / budget
RECHECK_SECONDS = 1.0  # a first walk without figures is repeated this much later


class HeapSampler:
    """Walks the heaps of watched processes in a separate process (no GIL shared
    with the watch loop; nice 19), one process at a time, each at most every
    `interval` seconds and never more often than `1/HEAP_CPU_BUDGET` times its last
    walk's duration. The watch loop only reads the latest summaries (`latest`)."""

    def __init__(self, interval: float, walker: Callable[[int], dict[str, Any]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._walker = walker  # in-process walker for tests; else the worker process
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._targets: dict[int, int] = {}           # pid -> start time (identity)
        self._layouts: dict[int, int] = {}           # pid -> its layout token
        self._due: dict[int, float] = {}
        self._latest: dict[int, tuple[int, dict[str, Any]]] = {}
        self._rechecked: set[int] = set()
        self.walks: Counter[str] = Counter()         # by status
        self._proc: Any = None
        self._thread = threading.Thread(target=self._run, name="memtrace-heap", daemon=True)
        self._thread.start()

    # ---- called from the watch loop (cheap, never blocks on a walk)

    def track(self, pid: int, start_time: int, layout: int = 0) -> None:
        """Walk pid (every interval). `layout`: a token of its VMA list as the
        watch loop knows it (model.AddressSpace.layout_token; 0: unknown), with
        which the walker reuses its last read of the maps while it is the same."""
        with self._lock:
            self._layouts[pid] = layout
            if self._targets.get(pid) != start_time:
                self._targets[pid] = start_time
                self._due[pid] = self._clock()
                self._latest.pop(pid, None)
                self._rechecked.discard(pid)
                self._wake.set()

    def forget(self, pid: int) -> None:
        with self._lock:
            self._targets.pop(pid, None)
            self._layouts.pop(pid, None)
            self._due.pop(pid, None)
            self._latest.pop(pid, None)
            self._rechecked.discard(pid)

    def latest(self, pid: int, start_time: int) -> dict[str, Any]:
        with self._lock:
            got = self._latest.get(pid)
        if got is None or got[0] != start_time:
            return {"status": "pending"}
        return got[1]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.walks)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
        self._thread.join(timeout=2)

    # ---- the sampler thread

    def _next(self) -> tuple[int, int, int] | float:
        """(pid, start_time, layout token) of the walk due now, or seconds to wait."""
        with self._lock:
            if not self._due:
                return 1.0
            pid = min(self._due, key=self._due.__getitem__)
            wait = self._due[pid] - self._clock()
            if wait > 0:
                return min(wait, 1.0)
            return pid, self._targets[pid], self._layouts.get(pid, 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            nxt = self._next()
            if isinstance(nxt, float):
                self._wake.wait(nxt)
                self._wake.clear()
                continue
            pid, start_time, layout = nxt
            t0 = self._clock()
            result = self._walk(pid, layout)
            took = self._clock() - t0
            result = {**result, "ts": round(time.time(), 6)}
            with self._lock:
                self.walks[result["status"]] += 1
                if self._targets.get(pid) != start_time:
                    continue  # forgotten or replaced while we walked
                # the budget counts the walk itself, not the walker's start-up
                cost = float(result.get("analysis_seconds", took))
                self._due[pid] = t0 + max(self.interval, cost / HEAP_CPU_BUDGET)
                prev = self._latest.get(pid)
                if result["status"] != "ok" and prev is None and pid not in self._rechecked:
                    # a first walk that gives no figures is confirmed a second later
                    # before it is reported: a process just started by `run` may not
                    # have libc mapped yet, or may be busy building its heap
                    self._rechecked.add(pid)
                    self._due[pid] = t0 + took + min(self.interval, RECHECK_SECONDS)
                    continue
                if result["status"] in ("failed", "gone") and prev and "by_kind" in prev[1]:
                    # keep the last good figures (their `ts` says when), say what failed
                    result = {**prev[1], "status": result["status"],
                              "reason": result["reason"], "failed_ts": result["ts"]}
                self._latest[pid] = (start_time, result)

    def _walk(self, pid: int, layout: int = 0) -> dict[str, Any]:
        if self._walker is not None:
            return self._walker(pid)
        for _ in range(2):  # restart a worker that died once
            try:
                proc = self._worker()
                proc.stdin.write(f"{pid} {layout}\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if line:
                    return dict(json.loads(line))
            except (OSError, ValueError):
                pass
            if self._stop.is_set():
                break
            self._reap()
        return {"status": "failed", "reason": "the heap walker process died"}

    def _worker(self) -> Any:
        if self._stop.is_set():
            raise OSError("closing")
        if self._proc is None or self._proc.poll() is not None:
            root = str(Path(__file__).resolve().parents[2])
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "memtrace.heap"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                start_new_session=True)  # no terminal signals; EOF on stdin ends it
        return self._proc

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
