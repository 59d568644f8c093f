"""`memtrace diff a.mtrace b.mtrace`: what changed between two runs
(docs/gate.md, "diff").

Each run is looked at twice: at its peak (the tick whose tree-summed RSS was
largest) and at its end (its last tick). At both, mappings are grouped by
identity and kind (a library's segments are one row, keyed by the file's name so
that two builds in different directories still match; all anonymous memory is
one `[anon]` row), libraries are listed on their own, stacks (`--stacks`) are
keyed by their frames, and process names by their own peak. A row's change is
b - a; rows that did not change at all are left out."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from memtrace.reports.profile import Moment, RunProfile
from memtrace.trace.procfs import escape_text
from memtrace.util.units import fmt_bytes, fmt_delta

MAX_ROWS = 200          # per section in JSON
TABLE_ROWS = 12         # per section in the table


@dataclass
class DiffRow:
    name: str
    kind: str
    a_peak: int = 0
    b_peak: int = 0
    a_end: int = 0
    b_end: int = 0

    @property
    def delta_peak(self) -> int:
        return self.b_peak - self.a_peak

    @property
    def delta_end(self) -> int:
        return self.b_end - self.a_end

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "a_peak_bytes": self.a_peak,
                "b_peak_bytes": self.b_peak, "delta_peak_bytes": self.delta_peak,
                "a_end_bytes": self.a_end, "b_end_bytes": self.b_end,
                "delta_end_bytes": self.delta_end}


@dataclass
class RunSide:
    """One run's totals, as the diff shows them."""

    path: str
    command: list[str] | None
    duration: float
    ticks: int
    peak_rss: int
    peak_offset: float          # seconds from the first tick to the peak
    peak_pss: int | None
    end_rss: int
    problem: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "command": self.command,
                "duration_seconds": round(self.duration, 3), "ticks": self.ticks,
                "peak_rss_bytes": self.peak_rss, "peak_offset_seconds": round(self.peak_offset, 3),
                "peak_pss_bytes": self.peak_pss, "end_rss_bytes": self.end_rss,
                "problem": self.problem}


@dataclass
class RunDiff:
    a: RunSide
    b: RunSide
    mappings: list[DiffRow] = field(default_factory=list)
    libraries: list[DiffRow] = field(default_factory=list)
    stacks: list[DiffRow] = field(default_factory=list)
    processes: list[DiffRow] = field(default_factory=list)
    unchanged: int = 0          # mapping rows equal at peak and at end

    def as_dict(self) -> dict[str, Any]:
        return {"memtrace_diff": 1, "a": self.a.as_dict(), "b": self.b.as_dict(),
                "delta_peak_rss_bytes": self.b.peak_rss - self.a.peak_rss,
                "delta_end_rss_bytes": self.b.end_rss - self.a.end_rss,
                "mappings": [r.as_dict() for r in self.mappings[:MAX_ROWS]],
                "libraries": [r.as_dict() for r in self.libraries[:MAX_ROWS]],
                "stacks": [r.as_dict() for r in self.stacks[:MAX_ROWS]],
                "processes": [r.as_dict() for r in self.processes[:MAX_ROWS]],
                "unchanged_mappings": self.unchanged}


def _side(p: RunProfile) -> RunSide:
    first = p.first_ts if p.first_ts is not None else p.peak.ts
    command = p.header.get("command")
    return RunSide(p.path, list(command) if command else None, p.duration, p.ticks,
                   p.peak.rss, p.peak.ts - first,
                   p.peak_pss.bytes if p.peak_pss is not None else None, p.end.rss, p.problem)


def _keyed(m: Moment) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    """(mappings but libraries, libraries) of a moment, by (name, kind)."""
    maps: dict[tuple[str, str], int] = {}
    libs: dict[tuple[str, str], int] = {}
    for (mapping, kind), value in m.groups.items():
        if kind in ("library", "executable"):
            key = (os.path.basename(mapping) or mapping, kind)
        else:
            key = (mapping, kind)
        into = libs if kind == "library" else maps
        into[key] = into.get(key, 0) + value
    return maps, libs


def _rows(a_peak: Mapping[tuple[str, str], int], b_peak: Mapping[tuple[str, str], int],
          a_end: Mapping[tuple[str, str], int], b_end: Mapping[tuple[str, str], int],
          ) -> tuple[list[DiffRow], int]:
    keys = set(a_peak) | set(b_peak) | set(a_end) | set(b_end)
    rows, same = [], 0
    for name, kind in keys:
        row = DiffRow(name, kind, a_peak.get((name, kind), 0), b_peak.get((name, kind), 0),
                      a_end.get((name, kind), 0), b_end.get((name, kind), 0))
        if row.delta_peak == 0 and row.delta_end == 0:
            same += 1
            continue
        rows.append(row)
    rows.sort(key=lambda r: (-max(abs(r.delta_peak), abs(r.delta_end)), r.name, r.kind))
    return rows, same


def _stacks(m: Moment) -> dict[tuple[str, str], int]:
    return {(" < ".join(k), "stack"): v for k, v in m.stacks.items()}


def diff_profiles(a: RunProfile, b: RunProfile) -> RunDiff:
    """What changed from run a to run b (b - a)."""
    out = RunDiff(_side(a), _side(b))
    a_maps_p, a_libs_p = _keyed(a.peak)
    b_maps_p, b_libs_p = _keyed(b.peak)
    a_maps_e, a_libs_e = _keyed(a.end)
    b_maps_e, b_libs_e = _keyed(b.end)
    out.mappings, out.unchanged = _rows(a_maps_p, b_maps_p, a_maps_e, b_maps_e)
    out.libraries, _ = _rows(a_libs_p, b_libs_p, a_libs_e, b_libs_e)
    out.stacks, _ = _rows(_stacks(a.peak), _stacks(b.peak), _stacks(a.end), _stacks(b.end))
    a_procs = {(k, "process"): v.bytes for k, v in a.processes.items()}
    b_procs = {(k, "process"): v.bytes for k, v in b.processes.items()}
    out.processes, _ = _rows(a_procs, b_procs, {}, {})
    return out


# ---- the table (80 columns)

def _cut(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    keep = width - 1
    return text[:keep // 2] + "…" + text[len(text) - (keep - keep // 2):]


def _section(title: str, rows: list[DiffRow], peak_only: bool = False,
             stacks: bool = False) -> list[str]:
    """One block of the table; a stack's row is numbered, its frames on the
    next line (leaf first)."""
    if not rows:
        return []
    name_w = 23         # + kind 7 + 10 + 10 + 11 + 11 and spaces: 77 columns
    lines = [f"{title[:name_w]:<{name_w}} {'kind':<7} {'peak a':>10} {'peak b':>10} "
             f"{'Δ peak':>11} {'' if peak_only else 'Δ end':>11}".rstrip()]
    for i, r in enumerate(rows[:TABLE_ROWS]):
        name = f"#{i + 1}" if stacks else _cut(escape_text(r.name), name_w)
        end = "" if peak_only else fmt_delta(r.delta_end)
        lines.append(f"{name:<{name_w}} {r.kind[:7]:<7} {fmt_bytes(r.a_peak):>10} "
                     f"{fmt_bytes(r.b_peak):>10} {fmt_delta(r.delta_peak):>11} "
                     f"{end:>11}".rstrip())
        if stacks:
            lines.append(_cut("    " + escape_text(r.name), 80))
    if len(rows) > TABLE_ROWS:
        lines.append(f"  … {len(rows) - TABLE_ROWS} more (--format json lists up to {MAX_ROWS})")
    return [*lines, ""]


def _head(label: str, s: RunSide) -> list[str]:
    pss = f", peak PSS {fmt_bytes(s.peak_pss)}" if s.peak_pss is not None else ""
    return [_cut(f"{label}: {escape_text(s.path)} ({s.duration:.1f} s, {s.ticks} ticks)", 80),
            f"   peak RSS {fmt_bytes(s.peak_rss)} at +{s.peak_offset:.1f} s{pss}; "
            f"end RSS {fmt_bytes(s.end_rss)}"]


def render_table(d: RunDiff) -> str:
    """The diff as plain text lines of at most 80 columns."""
    lines = [*_head("a", d.a), *_head("b", d.b),
             f"change (b - a): peak RSS {fmt_delta(d.b.peak_rss - d.a.peak_rss)}, "
             f"end RSS {fmt_delta(d.b.end_rss - d.a.end_rss)}", ""]
    lines += _section("mapping", d.mappings)
    lines += _section("library", d.libraries)
    lines += _section("stack held", d.stacks, stacks=True)
    lines += _section("process", d.processes, peak_only=True)
    if not (d.mappings or d.libraries or d.stacks or d.processes):
        lines.append("no mapping, library, stack or process changed")
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)
