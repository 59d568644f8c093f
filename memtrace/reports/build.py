"""The report of a recording as one JSON-able object (docs/report.md): what
`memtrace report --format json` writes and what the HTML page draws.

Snapshots are grouped into ticks (a tick ends where a process shows up a
second time), so that the total over all processes adds each process's
latest figures at every tick, as run's summary does."""

from __future__ import annotations

import re
import time
from typing import Any

from memtrace import __version__
from memtrace.record.reader import Recording
from memtrace.reports.downsample import argmax, pick, summed, take
from memtrace.reports.stackview import SnapshotStacks, StackSource
from memtrace.reports.timeline import (
    EVENT_CALLS,
    KIND_ORDER,
    MAX_LIBRARY_EVENTS,
    MEASURES,
    Track,
)

REPORT_VERSION = 1
DEFAULT_MAX_POINTS = 2000
MAX_MESSAGES = 200
_EXITED = re.compile(r"^(?:memtrace: )?pid (\d+) exited")
HEADER_FIELDS = ("memtrace_version", "created_ts", "hostname", "kernel", "page_size",
                 "interval_seconds", "full_every", "mode", "command", "pids", "options")


class Gatherer:
    """Feeds a recording's records to one Track per process."""

    def __init__(self) -> None:
        self.tracks: dict[str, Track] = {}
        self.current: dict[int, str] = {}      # pid -> key of its live track
        self.exited: set[int] = set()
        self.bucket = 0
        self.bucket_ts: list[float] = []
        self._in_bucket: set[int] = set()
        self.messages: list[dict[str, Any]] = []
        self.messages_total = 0
        self.summary: dict[str, Any] | None = None
        self.dropped = 0
        self.snapshots = 0

    def snapshot(self, snap: dict[str, Any]) -> None:
        pid = int(snap["pid"])
        if pid in self._in_bucket or not self.bucket_ts:
            if self.bucket_ts:
                self.bucket += 1
            self._in_bucket = set()
            self.bucket_ts.append(float(snap["ts"]))
        self._in_bucket.add(pid)
        key = self.current.get(pid)
        if key is None or pid in self.exited:      # a new process (or the PID reused)
            self.exited.discard(pid)
            key = str(pid) if str(pid) not in self.tracks else f"{pid}.{len(self.tracks)}"
            self.current[pid] = key
            self.tracks[key] = Track(key, pid, str(snap.get("comm", "")))
        self.tracks[key].add(snap, self.bucket)
        self.snapshots += 1

    def record(self, kind: str, data: Any, ts: float | None) -> None:
        if kind == "message":
            self.messages_total += 1
            if len(self.messages) < MAX_MESSAGES:
                self.messages.append({"ts": ts, "text": data})
            m = _EXITED.match(str(data))
            if m:
                self.exited.add(int(m.group(1)))
        elif kind == "summary":
            self.summary = data
        elif kind == "dropped":
            self.dropped += 1


def build_report(rec: Recording, max_points: int = DEFAULT_MAX_POINTS,
                 stacks: StackSource | None = None) -> dict[str, Any]:
    """Read the whole recording (up to its end, a cut or a corrupt line) and
    make the report's object; `rec.problem` is then set as the reader left it."""
    g = Gatherer()
    source = stacks or SnapshotStacks()
    for r in rec.records():
        if r.kind == "snapshot":
            g.snapshot(r.data)
        else:
            g.record(r.kind, r.data, r.ts)
            source.record(r.kind, r.data, r.ts)
    processes = []
    for track in g.tracks.values():
        peak_i = argmax(track.totals["rss"])
        peak_stacks = None
        if peak_i is not None and track.peak_snap is not None:
            peak_stacks = source.at_peak(track.pid, track.ts[peak_i], track.peak_snap)
        processes.append(track.report(max_points, peak_stacks))
    return {
        "memtrace_report": REPORT_VERSION,
        "generated_by": f"memtrace {__version__}",
        "generated_ts": time.time(),
        "recording": {
            "path": rec.path, **{k: rec.header.get(k) for k in HEADER_FIELDS},
            "problem": rec.problem, "ended": rec.ended, "corrupt": rec.corrupt,
            "snapshots": g.snapshots, "dropped": g.dropped,
            "first_ts": g.bucket_ts[0] if g.bucket_ts else None,
            "last_ts": max((t.ts[-1] for t in g.tracks.values()), default=None),
            "messages": g.messages, "messages_total": g.messages_total,
            "run_summary": g.summary,
        },
        "total": total(g, max_points),
        "processes": processes,
    }


def total(g: Gatherer, max_points: int) -> dict[str, Any]:
    """All processes summed at each tick (each one's latest snapshot, while it
    is recorded), stacked by kind, and one row per process."""
    n = len(g.bucket_ts)
    sums = {m: [[0] * n for _ in KIND_ORDER] for m in MEASURES}
    known = {m: [True] * n for m in MEASURES}
    count = [0] * n
    calls = {c: [0] * n for c in EVENT_CALLS}
    kind_at = {k: i for i, k in enumerate(KIND_ORDER)}
    for track in g.tracks.values():
        kinds = [(kind_at.get("library" if k.startswith("lib:") else k, kind_at["special"]), c)
                 for k, c in track.cols.items()]
        j, last = 0, len(track.ts) - 1
        for b in range(track.bucket[0], track.bucket[-1] + 1):
            while j < last and track.bucket[j + 1] <= b:
                j += 1
            count[b] += 1
            if track.bucket[j] == b:            # calls of this tick, counted once
                for call in EVENT_CALLS:
                    calls[call][b] += track.calls[call][j]
            for mi, m in enumerate(MEASURES):
                if track.totals[m][j] is None:
                    known[m][b] = False
                    continue
                col = sums[m]
                for ki, c in kinds:
                    col[ki][b] += c[mi][j]
    totals: dict[str, list[int | None]] = {
        m: [sum(col[b] for col in sums[m]) if known[m][b] else None for b in range(n)]
        for m in MEASURES}
    idx = pick(n, [totals[m] for m in MEASURES], max_points)
    series = {m: [{"name": k, "kind": k,
                   "values": [sums[m][ki][i] if known[m][i] else None for i in idx]}
                  for ki, k in enumerate(KIND_ORDER) if any(sums[m][ki])]
              for m in MEASURES}
    peak_i = argmax(totals["rss"])
    return {
        "ticks": n, "points": len(idx), "downsampled": len(idx) < n,
        "ts": take(g.bucket_ts, idx),
        "totals": {m: take(totals[m], idx) for m in MEASURES},
        "processes_alive": take(count, idx),
        "calls": {c: summed(calls[c], idx) for c in EVENT_CALLS},
        "library_events": sorted((dict(e, pid=t.pid) for t in g.tracks.values()
                                  for e in t.library_events),
                                 key=lambda e: e["ts"] or 0)[:MAX_LIBRARY_EVENTS],
        "series": series,
        "peak": {"ts": g.bucket_ts[peak_i] if peak_i is not None else None,
                 "rss_bytes": totals["rss"][peak_i] if peak_i is not None else None,
                 "processes": count[peak_i] if peak_i is not None else 0},
        "processes": [_process_row(t) for t in g.tracks.values()],
    }


def _process_row(t: Track) -> dict[str, Any]:
    rss = t.totals["rss"]
    peak_i = argmax(rss)
    return {"key": t.key, "pid": t.pid, "comm": t.comm, "first_ts": t.ts[0],
            "last_ts": t.ts[-1], "snapshots": len(t.ts), "start_bytes": rss[0],
            "peak_bytes": rss[peak_i] if peak_i is not None else None,
            "peak_ts": t.ts[peak_i] if peak_i is not None else None, "end_bytes": rss[-1]}
