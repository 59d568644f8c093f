"""One pass over a recording: what `diff` and `check` compare. The tree's peak
(the tick whose summed RSS was largest) and its end (the last tick), each with
its mappings grouped by identity and kind, and its stacks; the peak PSS; each
process name's and each library's own peak. A gate can ride along the same
pass (build_profile(gate=...))."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from memtrace.record.reader import Recording, open_recording
from memtrace.reports.gate import Gate, GroupKey, group_totals
from memtrace.reports.ticks import RecordingInfo, Tick, iter_ticks

StackKey = tuple[str, ...]          # frames, leaf first


@dataclass
class Moment:
    """The tree at one tick: totals, mappings by (identity, kind), stacks held."""

    ts: float = 0.0
    rss: int = 0
    pss: int | None = None
    processes: int = 0
    groups: dict[GroupKey, int] = field(default_factory=dict)
    pss_groups: dict[GroupKey, int] | None = None
    stacks: dict[StackKey, int] = field(default_factory=dict)


@dataclass
class Peak:
    bytes: int = 0
    ts: float = 0.0


@dataclass
class RunProfile:
    path: str
    header: dict[str, Any]
    ticks: int = 0
    first_ts: float | None = None
    peak: Moment = field(default_factory=Moment)
    end: Moment = field(default_factory=Moment)
    peak_pss: Peak | None = None
    processes: dict[str, Peak] = field(default_factory=dict)    # by comm (summed per tick)
    libraries: dict[str, Peak] = field(default_factory=dict)    # by file name
    info: RecordingInfo = field(default_factory=RecordingInfo)
    problem: str | None = None
    ended: bool = False
    corrupt: bool = False

    @property
    def duration(self) -> float:
        return 0.0 if self.first_ts is None else self.end.ts - self.first_ts

    @property
    def cut(self) -> bool:
        """Unreadable past some point: a line cut short or corrupt (not merely
        missing its end line, which a killed recorder leaves)."""
        return self.corrupt or (self.problem is not None and "cut short" in self.problem)


def stacks_held(snaps: Iterable[Mapping[str, Any]]) -> dict[StackKey, int]:
    """The top held stacks of the snapshots (`--stacks`), summed by frames."""
    out: dict[StackKey, int] = {}
    for snap in snaps:
        for s in (snap.get("stacks") or {}).get("held") or ():
            key = tuple(str(f) for f in s.get("frames") or ()) or (str(s.get("mapping", "?")),)
            out[key] = out.get(key, 0) + int(s.get("bytes") or 0)
    return out


def moment(tick: Tick, groups: dict[GroupKey, int] | None = None) -> Moment:
    snaps = list(tick.snapshots.values())
    pss_values = [s.get("pss_bytes") for s in snaps]
    has_pss = None not in pss_values
    return Moment(
        ts=tick.ts, rss=sum(int(s.get("rss_bytes") or 0) for s in snaps),
        pss=sum(int(v or 0) for v in pss_values) if has_pss else None,
        processes=len(snaps), groups=groups if groups is not None else group_totals(snaps),
        pss_groups=group_totals(snaps, "pss_bytes") if has_pss else None,
        stacks=stacks_held(snaps))


def _raise(peaks: dict[str, Peak], key: str, value: int, ts: float) -> None:
    p = peaks.get(key)
    if p is None:
        peaks[key] = Peak(value, ts)
    elif value > p.bytes:
        p.bytes, p.ts = value, ts


@functools.lru_cache(maxsize=65536)
def library_name(mapping: str) -> str:
    return os.path.basename(mapping) or mapping


class _Builder:
    def __init__(self, profile: RunProfile, gate: Gate | None) -> None:
        self.p = profile
        self.gate = gate
        self.last: Tick | None = None
        self.peak: Tick | None = None       # its Moment is made once, at the end

    def tick(self, tick: Tick) -> None:
        p = self.p
        snaps = list(tick.snapshots.values())
        p.ticks += 1
        if p.first_ts is None:
            p.first_ts = tick.ts
        if self.gate is not None:
            self.gate.observe(tick.snapshots)
        rss = sum(int(s.get("rss_bytes") or 0) for s in snaps)
        groups = group_totals(snaps)
        if self.peak is None or rss > p.peak.rss:
            self.peak = tick
            p.peak.rss = rss
        pss_values = [s.get("pss_bytes") for s in snaps]
        if None not in pss_values:
            pss = sum(int(v or 0) for v in pss_values)
            if p.peak_pss is None or pss > p.peak_pss.bytes:
                p.peak_pss = Peak(pss, tick.ts)
        by_comm: dict[str, int] = {}
        for s in snaps:
            comm = str(s.get("comm", "?"))
            by_comm[comm] = by_comm.get(comm, 0) + int(s.get("rss_bytes") or 0)
        for comm, value in by_comm.items():
            _raise(p.processes, comm, value, tick.ts)
        libs: dict[str, int] = {}
        for (mapping, kind), value in groups.items():
            if kind == "library":
                name = library_name(mapping)
                libs[name] = libs.get(name, 0) + value
        for name, value in libs.items():
            _raise(p.libraries, name, value, tick.ts)
        self.last = tick


def build_profile(path: str, gate: Gate | None = None) -> RunProfile:
    """The profile of the recording at `path` (RecordingError, exit 16, when it
    is not one); `problem` says when it was not read to its end line."""
    rec: Recording = open_recording(path)
    profile = RunProfile(path=path, header=rec.header)
    builder = _Builder(profile, gate)
    for tick in iter_ticks(rec, profile.info):
        builder.tick(tick)
    if builder.peak is not None and builder.last is not None:
        profile.peak = moment(builder.peak)
        profile.end = moment(builder.last)
    profile.problem, profile.ended, profile.corrupt = rec.problem, rec.ended, rec.corrupt
    return profile
