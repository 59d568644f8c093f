"""A recording read back as ticks: the latest snapshot of every process alive
at each tick, as the live loop had them (what the gate and the peak finders are
fed). A recording has no tick marker: a tick ends when a process already
snapshotted in it comes again; a process leaves at its "pid N exited" message
(or when it has not been snapshotted for STALE_INTERVALS intervals)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from memtrace.record.reader import Recording

STALE_INTERVALS = 5
_GONE = re.compile(r"pid (\d+) [a-z]")      # "pid N exited", any detach reason


@dataclass
class Tick:
    ts: float                               # the latest snapshot's ts
    snapshots: dict[int, dict[str, Any]]    # pid -> its latest snapshot


@dataclass
class RecordingInfo:
    """What a recording says besides its ticks (filled while iterating)."""

    summary: dict[str, Any] | None = None   # run's closing summary, when recorded
    messages: list[str] = field(default_factory=list)


def iter_ticks(rec: Recording, info: RecordingInfo | None = None) -> Iterator[Tick]:
    """The ticks of `rec` in order (each a fresh dict; snapshots are shared)."""
    interval = float(rec.header.get("interval_seconds") or 1.0)
    stale = STALE_INTERVALS * max(interval, 0.01)
    alive: dict[int, dict[str, Any]] = {}
    batch: set[int] = set()
    for record in rec.records():
        if record.kind == "snapshot":
            snap = record.data
            pid = int(snap["pid"])
            if pid in batch:
                yield _tick(alive)
                batch.clear()
            batch.add(pid)
            alive[pid] = snap
            ts = float(snap["ts"])
            for old in [p for p, s in alive.items() if ts - float(s["ts"]) > stale]:
                del alive[old]
        elif record.kind == "message":
            text = str(record.data)
            if info is not None:
                info.messages.append(text)
            m = _GONE.match(text)
            if m and int(m.group(1)) in alive:
                if batch:
                    yield _tick(alive)
                    batch.clear()
                del alive[int(m.group(1))]
        elif record.kind == "summary" and info is not None:
            info.summary = record.data
    if batch and alive:
        yield _tick(alive)


def _tick(alive: dict[int, dict[str, Any]]) -> Tick:
    return Tick(max(float(s["ts"]) for s in alive.values()), dict(alive))
