"""Heap figures in watch/run/agent (no root): the `heap` summary of a snapshot,
the background sampler, and the memtrace_heap_* metric rows on synthetic state."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from typing import Any

import pytest

from memtrace.exporter.families import HEAP_FAMILIES
from memtrace.heap.sampler import HeapSampler
from memtrace.heap.worker import KIND_FIELDS, heap_summary, sample_once
from memtrace.published import TickState

from ..exporter.helpers import realistic_process, registry_for, render, scrape, state_of
from .synth import Chunk, build
from .test_heap_unit import analyse

NAMES = [name for name, _, _ in HEAP_FAMILIES]


def glibc_report() -> dict[str, Any]:
    t1 = [Chunk(0x100), Chunk(0x200, "free"), Chunk(0x100)]
    t2 = [Chunk(0x80), Chunk(0x30, "fast"), Chunk(0x80)]
    img = build([Chunk(0x100), Chunk(4 << 20, "free"), Chunk(0xD0)], heap_size=5 << 20,
                thread_chunks=[t1, t2])
    r = analyse(img)
    r.update(attempts=1, analysis_seconds=0.01)
    return r


def figures(main: int, thread: int) -> dict[str, Any]:
    """A heap summary whose figures are all `main` (main arena) and `thread`."""
    by_kind = {
        "main": {"arenas": 1, **{k: main for k in KIND_FIELDS}, "top_pinned": False},
        "thread": {"arenas": 2 if thread else 0, **{k: thread for k in KIND_FIELDS},
                   "top_pinned": False},
    }
    return {"status": "ok", "allocator": "glibc", "supported": True, "by_kind": by_kind,
            "totals": {k: main + thread for k in KIND_FIELDS}, "ts": 1.0}


def with_heap(pid: int, comm: str, h: dict[str, Any]) -> dict[str, Any]:
    snap = realistic_process(pid, comm)
    snap["heap"] = h
    return snap


# ------------------------------------------------------------------ the summary


def test_summary_sums_each_arena_kind_and_matches_the_report():
    r = glibc_report()
    s = heap_summary(r)
    assert s["status"] == "ok" and s["supported"] is True and s["allocator"] == "glibc"
    assert s["by_kind"]["main"]["arenas"] == 1 and s["by_kind"]["thread"]["arenas"] == 2
    for kind in ("main", "thread"):
        arenas = [a for a in r["arenas"] if a["kind"] == kind]
        for k in KIND_FIELDS:
            assert s["by_kind"][kind][k] == sum(a[k] for a in arenas), (kind, k)
    for k in KIND_FIELDS:
        assert s["totals"][k] == r["totals"][k] == \
            s["by_kind"]["main"][k] + s["by_kind"]["thread"][k]
    assert s["by_kind"]["main"]["top_pinned"] is True
    assert s["verdict"] == r["verdict"]
    assert s["mmapped"]["count"] == r["mmapped"]["count"]


def test_summary_of_a_single_threaded_heap_has_zero_thread_figures():
    r = analyse(build([Chunk(0x100)]))
    r.update(attempts=1, analysis_seconds=0.0)
    t = heap_summary(r)["by_kind"]["thread"]
    assert t["arenas"] == 0 and all(t[k] == 0 for k in KIND_FIELDS)


def test_summary_of_another_allocator_says_why():
    s = heap_summary({"pid": 1, "comm": "x", "allocator": "jemalloc", "supported": False,
                      "reason": "malloc is jemalloc's (/usr/lib/libjemalloc.so.2)"})
    assert s == {"status": "unsupported", "allocator": "jemalloc", "supported": False,
                 "reason": "malloc is jemalloc's (/usr/lib/libjemalloc.so.2)"}
    assert "by_kind" not in s


# ------------------------------------------------------------------ metric rows


def test_three_gauge_families_per_process_and_arena_kind():
    state = state_of(with_heap(100, "server", figures(1000, 200)),
                     with_heap(200, "worker", figures(7, 0)),
                     heap_walks={"ok": 5, "unsupported": 1})
    s = scrape(registry_for(state)[0])
    for name in NAMES:
        fam = s.families[name]
        assert fam.type == "gauge" and fam.documentation and name.endswith("_bytes")
        assert s.value(name, pid="100", comm="server", arena="main") == 1000
        assert s.value(name, pid="100", comm="server", arena="thread") == 200
        assert s.value(name, pid="200", comm="worker", arena="main") == 7
        assert s.value(name, pid="200", comm="worker", arena="thread") == 0
        assert {tuple(sorted(lab)) for lab, _ in s.series(name)} == {("arena", "comm", "pid")}
    assert s.value("memtrace_heap_walks_total", result="ok") == 5
    assert s.value("memtrace_heap_walks_total", result="unsupported") == 1
    assert s.value("memtrace_heap_walks_total", result="failed") == 0
    assert not s.duplicates()


def test_values_come_from_the_right_fields():
    h = figures(0, 0)
    for i, k in enumerate(KIND_FIELDS):
        h["by_kind"]["main"][k] = 10 + i
    s = scrape(registry_for(state_of(with_heap(1, "a", h), heap_walks={"ok": 1}))[0])
    for name, key, _ in HEAP_FAMILIES:
        assert s.value(name, pid="1", arena="main") == h["by_kind"]["main"][key]
    assert [k for _, k, _ in HEAP_FAMILIES] == ["in_use_bytes", "free_resident_bytes",
                                                "trimmable_bytes"]


def test_no_series_without_figures():
    """Another allocator, no walk yet, a failed first walk, heap walks off."""
    unsupported = {"status": "unsupported", "allocator": "jemalloc", "supported": False,
                   "reason": "jemalloc"}
    state = state_of(with_heap(1, "jem", unsupported), with_heap(2, "new", {"status": "pending"}),
                     with_heap(3, "bad", {"status": "failed", "reason": "kept changing"}),
                     realistic_process(4, "plain"), heap_walks={"unsupported": 1, "failed": 1})
    s = scrape(registry_for(state)[0])
    for name in NAMES:
        assert name in s.families and s.series(name) == []
    off = scrape(registry_for(state_of(realistic_process(4, "plain")))[0])
    assert not [n for n in off.families if n.startswith("memtrace_heap_")]


def test_failed_walk_after_a_good_one_keeps_its_figures():
    h = {**figures(50, 0), "status": "failed", "reason": "kept changing", "failed_ts": 2.0}
    s = scrape(registry_for(state_of(with_heap(1, "a", h), heap_walks={"ok": 1}))[0])
    assert s.value("memtrace_heap_in_use_bytes", pid="1", arena="main") == 50


def test_group_mode_sums_the_group_and_carries_no_pid():
    state = state_of(with_heap(11, "nginx", figures(100, 10)),
                     with_heap(12, "nginx", figures(300, 30)),
                     with_heap(13, "postgres", figures(5, 0)),
                     groups={11: "web", 12: "web", 13: "db"}, heap_walks={"ok": 3})
    s = scrape(registry_for(state)[0])
    for name in NAMES:
        assert s.value(name, group="web", comm="nginx", arena="main") == 400
        assert s.value(name, group="web", comm="nginx", arena="thread") == 40
        assert s.value(name, group="db", comm="postgres", arena="main") == 5
        assert not [lab for lab, _ in s.series(name) if "pid" in lab]
    assert not s.duplicates()


def test_fast_text_path_renders_the_same_rows():
    state = state_of(with_heap(100, "server", figures(1000, 200)), heap_walks={"ok": 1})
    reg, _, collector = registry_for(state)
    fast = collector.render_text()
    for name in NAMES:
        for arena, v in (("main", 1000), ("thread", 200)):
            assert f'{name}{{pid="100",comm="server",arena="{arena}"}} {v}\n' in fast
        assert f"# HELP {name} " in fast and f"# TYPE {name} gauge" in fast
    assert 'memtrace_heap_walks_total{result="ok"} 1\n' in fast
    assert "memtrace_heap_in_use_bytes" in render(reg)


def test_promtool_accepts_the_heap_families():
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed (Debian package prometheus): cannot lint")
    state = state_of(with_heap(100, "server", figures(1000, 200)), heap_walks={"ok": 1})
    r = subprocess.run([promtool, "check", "metrics"], input=render(registry_for(state)[0]),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


# ------------------------------------------------------------------ the sampler


class Walker:
    def __init__(self, results: dict[int, list[dict[str, Any]]], cost: float = 0.0,
                 clock: list[float] | None = None) -> None:
        self.results = results
        self.calls: list[int] = []
        self.cost = cost
        self.clock = clock
        self.done = threading.Event()

    def __call__(self, pid: int) -> dict[str, Any]:
        self.calls.append(pid)
        if self.clock is not None:
            self.clock[0] += self.cost  # the walk "took" cost seconds
        out = self.results[pid].pop(0) if len(self.results[pid]) > 1 else self.results[pid][0]
        self.done.set()
        return out


def wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_sampler_walks_new_targets_at_once_then_at_its_interval():
    w = Walker({7: [figures(1, 0)]})
    s = HeapSampler(0.2, walker=w)
    try:
        assert s.latest(7, 100) == {"status": "pending"}
        s.track(7, 100)
        wait_for(lambda: s.latest(7, 100)["status"] == "ok")
        assert s.latest(7, 100)["by_kind"]["main"]["in_use_bytes"] == 1 and "ts" in s.latest(7, 100)
        assert s.latest(7, 999) == {"status": "pending"}  # another process, same pid
        wait_for(lambda: len(w.calls) >= 3, timeout=3)
        assert s.counts()["ok"] >= 3
    finally:
        s.close()


def test_a_slow_walk_spaces_the_next_one_by_the_cpu_budget():
    clock = [0.0]
    w = Walker({7: [figures(1, 0)]}, cost=1.0, clock=clock)  # 1 s walk: next after 20 s
    s = HeapSampler(0.01, walker=w, clock=lambda: clock[0])
    try:
        s.track(7, 100)
        wait_for(lambda: len(w.calls) == 1)
        clock[0] += 19.0
        time.sleep(0.3)
        assert len(w.calls) == 1
        clock[0] += 1.5
        wait_for(lambda: len(w.calls) == 2, timeout=3)
    finally:
        s.close()


def test_failures_are_counted_and_keep_the_last_good_figures():
    w = Walker({7: [figures(5, 0), {"status": "failed", "reason": "kept changing"}],
                8: [{"status": "unsupported", "allocator": "musl", "supported": False,
                     "reason": "musl"}]})
    s = HeapSampler(0.05, walker=w)
    try:
        s.track(7, 1)
        s.track(8, 1)
        wait_for(lambda: s.latest(7, 1)["status"] == "failed")
        wait_for(lambda: s.latest(8, 1)["status"] == "unsupported")
        h = s.latest(7, 1)
        assert h["reason"] == "kept changing" and h["by_kind"]["main"]["in_use_bytes"] == 5
        assert h["failed_ts"] >= h["ts"]
        assert s.latest(8, 1)["status"] == "unsupported"
        c = s.counts()
        assert c["ok"] >= 1 and c["failed"] >= 1 and c["unsupported"] >= 1
        s.forget(7)
        assert s.latest(7, 1) == {"status": "pending"}
    finally:
        s.close()


def test_a_first_walk_without_figures_is_confirmed_before_it_is_reported():
    """`run` attaches right after exec: libc may not be mapped yet."""
    musl = {"status": "unsupported", "allocator": "unknown", "supported": False,
            "reason": "no libc.so.6 mapped"}
    clock = [0.0]
    w = Walker({7: [musl, figures(3, 0)]})
    s = HeapSampler(30.0, walker=w, clock=lambda: clock[0])
    try:
        s.track(7, 1)
        wait_for(lambda: len(w.calls) == 1)
        time.sleep(0.1)
        assert s.latest(7, 1) == {"status": "pending"}
        clock[0] += 1.0  # sampler.RECHECK_SECONDS later
        wait_for(lambda: s.latest(7, 1)["status"] == "ok")
        assert s.counts() == {"unsupported": 1, "ok": 1}
        w.results[7] = [musl]
        clock[0] += 30.0  # an ok process that turns unsupported is reported at once
        wait_for(lambda: s.latest(7, 1)["status"] == "unsupported")
    finally:
        s.close()


def test_sample_once_on_a_missing_process_is_gone():
    assert sample_once(999_999_999)["status"] == "gone"


def test_session_puts_the_latest_summary_under_heap_and_says_why_once():
    from memtrace.session import Session

    class Rep:
        def __init__(self) -> None:
            self.messages: list[str] = []

        def message(self, text: str) -> None:
            self.messages.append(text)

    class Space:
        layout_token = 77

    class Tracker:
        pid, start_time, space = 42, 1234, Space()

    class Fixed:
        def __init__(self, h: dict[str, Any]) -> None:
            self.h = h
            self.tracked: list[tuple[int, int, int]] = []

        def track(self, pid: int, start: int, layout: int = 0) -> None:
            self.tracked.append((pid, start, layout))

        def latest(self, pid: int, start: int) -> dict[str, Any]:
            return self.h

        def counts(self) -> dict[str, int]:
            return {"unsupported": 1}

        def forget(self, pid: int) -> None:
            self.tracked.clear()

    rep = Rep()
    session = Session(rep, 1.0, 0.0)  # type: ignore[arg-type]
    snap: dict[str, Any] = {}
    session._add_heap(snap, Tracker())  # type: ignore[arg-type]
    assert "heap" not in snap  # --heap-interval 0
    h = {"status": "unsupported", "allocator": "musl", "supported": False, "reason": "musl"}
    session.heap = Fixed(h)  # type: ignore[assignment]
    for _ in range(3):
        session._add_heap(snap, Tracker())  # type: ignore[arg-type]
    assert snap["heap"] is h
    assert session.heap.tracked[-1] == (42, 1234, 77)     # the layout token goes along
    assert rep.messages == ["pid 42: no heap figures: musl"]
    session.publish()
    state: TickState = session.exporter_box.get()
    assert state.heap_walks == {"unsupported": 1}
    session._forget_heap(42)
