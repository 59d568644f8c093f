"""Library load and unload events of a real `memtrace watch` (root + BPF):
scenarios dlopen's libdummy.so, touches it and dlclose's it; memtrace must
report a load with the bytes mapped and resident at that point and an unload
with the bytes given back, and no unload when the library was opened with
RTLD_NODELETE (dlclose keeps it mapped).

    sudo .venv/bin/python -m pytest tests/root/accuracy/test_libevents.py -v
"""

from __future__ import annotations

import queue
import subprocess
from typing import Any

import pytest

from tests import groundtruth as gt
from tests.root.harness import AccuracyHarness, Memtrace, SyncEvent

from .test_accuracy import PHASES

pytestmark = [pytest.mark.root]


class _Recording(queue.Queue):
    """The per-pid snapshot queue of memtrace's JSON stream, keeping every
    library event it passes on (the harness drops snapshots it does not need)."""

    def __init__(self, sink: list[dict[str, Any]]) -> None:
        super().__init__()
        self.sink = sink

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self.sink.extend(item.get("library_events") or ())
        super().put(item, block, timeout)


class EventHarness(AccuracyHarness):
    def __init__(self, tmp_path):
        super().__init__(tmp_path)
        self.events: list[dict[str, Any]] = []

    def start_watch(self, pid: int) -> Memtrace:
        mt = super().start_watch(pid)
        with mt.stream._lock:   # before the first snapshot: BCC takes seconds to compile
            assert pid not in mt.stream._queues
            mt.stream._queues[pid] = _Recording(self.events)
        return mt


def _bss_end(pid: int, first: dict) -> int:
    """End of the library's zero-fill pages, from readelf (the bss VMA's end)."""
    r = subprocess.run(["readelf", "-lW", f"/proc/{pid}/map_files/{first['start']:x}-"
                        f"{first['end']:x}"], capture_output=True, text=True, check=True)
    loads = [ln.split() for ln in r.stdout.splitlines() if ln.strip().startswith("LOAD ")]
    rw = [f for f in loads if "W" in "".join(f[6:-1])][-1]
    bias = first["start"] - (int(loads[0][2], 16) & ~4095)
    return bias + ((int(rw[2], 16) + int(rw[5], 16) + 4095) & ~4095)


def library_truth(pid: int, lib: str) -> dict[str, int] | None:
    """The library's VMAs in smaps (its path, plus the anonymous bss right after
    its data): sizes and Rss summed. None when it is not mapped."""
    smaps = gt.read_smaps(pid)
    idx = [i for i, m in enumerate(smaps) if m["path"] == lib]
    if not idx:
        return None
    vmas = [smaps[i] for i in idx]
    nxt = smaps[idx[-1] + 1] if idx[-1] + 1 < len(smaps) else None
    if (nxt and not nxt["path"] and nxt["start"] == vmas[-1]["end"]
            and nxt["end"] <= _bss_end(pid, vmas[0])):
        vmas.append(nxt)
    return {"base": vmas[0]["start"], "vmas": len(vmas),
            "mapped": sum(m["size_bytes"] for m in vmas),
            "rss": sum(m["rss_bytes"] for m in vmas)}


def run_dlopen(tmp_path, workloads, nodelete: bool):
    h = EventHarness(tmp_path)
    lib = str(workloads.libdummy)
    truth: dict[str, dict[str, int] | None] = {}

    def record(ev: SyncEvent) -> None:
        truth[ev.phase] = library_truth(ev.pid, lib)

    argv = [workloads.scenarios, "dlopen", lib] + (["nodelete"] if nodelete else [])
    try:
        result = h.watch(argv, label=f"dlopen{' nodelete' if nodelete else ''}",
                         hooks={p: record for p in PHASES["dlopen"]})
    finally:
        h.close()
    assert result.phases() == ["start"] + PHASES["dlopen"], result.failure_report()
    result.assert_accurate()
    mine = [e for e in h.events if e["mapping"] == lib]
    return result, truth, mine, h.events


def test_dlopen_dlclose_events(tmp_path, workloads):
    result, truth, mine, everything = run_dlopen(tmp_path, workloads, nodelete=False)
    loaded, touched = truth["loaded"], truth["touched"]
    assert loaded and touched and truth["closed"] is None, truth
    assert [e["event"] for e in mine] == ["library_load", "library_unload"], everything
    load, unload = mine
    print(f"\nload: {load}\nunload: {unload}\ntruth: {truth}")
    assert load["pid"] == result.main_pid and load["base"] == loaded["base"]
    assert (load["mapped_bytes"], load["rss_bytes"], load["vmas"]) == (
        loaded["mapped"], loaded["rss"], loaded["vmas"]), (load, loaded)
    assert load["settled"] is True
    assert sum(load["segments_rss_bytes"].values()) == load["rss_bytes"]
    # touched: data written (192 KiB), rodata read (128 KiB), bss written (384 KiB,
    # counted only when the kernel did not merge the bss VMA with a neighbour);
    # dlclose gives all of it back
    assert touched["rss"] >= loaded["rss"] + 150 * 1024
    assert (unload["unmapped_bytes"], unload["rss_bytes"]) == (
        touched["mapped"], touched["rss"]), (unload, touched)
    assert load["ts"] < unload["ts"]


def test_dlopen_nodelete_shows_no_unload(tmp_path, workloads):
    _, truth, mine, everything = run_dlopen(tmp_path, workloads, nodelete=True)
    assert truth["closed"] is not None and truth["closed"]["mapped"] == truth["loaded"][
        "mapped"], truth
    assert [e["event"] for e in mine] == ["library_load"], everything
    assert mine[0]["mapped_bytes"] == truth["loaded"]["mapped"]
    assert mine[0]["rss_bytes"] == truth["loaded"]["rss"]
