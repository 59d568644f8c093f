"""The summary `memtrace run` ends with: the peak resident size of the process
tree it started, from memtrace's own snapshots (the largest sum over one tick,
with the mappings that held it, and each process's own peak) and from the
kernel (ru_maxrss of the command, VmHWM of every process). Shape in
docs/output.md ("The run summary")."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from memtrace.trace.procfs import escape_name
from memtrace.util.units import fmt_bytes

TOP_MAPPINGS = 5        # mappings listed at the tree's peak
MAX_PROCESSES = 100     # processes listed (largest peaks first); all are counted
PRE_EXEC_MARGIN = 1 << 20   # what the waiting child may touch after its VmHWM is read
                            # (the go byte, building the exec arguments)


def top_mappings(snapshots: Sequence[Mapping[str, Any]], n: int = TOP_MAPPINGS,
                 ) -> list[dict[str, Any]]:
    """The n largest mappings (by resident bytes) of these snapshots, the
    segments of one file or library in one process summed as one."""
    sums: dict[tuple[int, str], dict[str, Any]] = {}
    for snap in snapshots:
        for m in snap.get("mappings") or ():
            name = m.get("mapping") or m.get("path") or "[anon]"
            key = (snap["pid"], name)
            row = sums.get(key)
            if row is None:
                row = sums[key] = {"pid": snap["pid"], "comm": snap.get("comm", ""),
                                   "mapping": name, "kind": m.get("kind", ""),
                                   "rss_bytes": 0}
            row["rss_bytes"] += int(m.get("rss_bytes") or 0)
    rows = sorted(sums.values(), key=lambda r: (-r["rss_bytes"], r["pid"], r["mapping"]))
    return [r for r in rows[:n] if r["rss_bytes"] > 0]


@dataclass
class ProcessPeak:
    pid: int
    comm: str
    first_ts: float
    last_ts: float
    peak_rss_bytes: int = -1
    peak_ts: float = 0.0
    vmhwm_bytes: int | None = None      # the largest VmHWM a snapshot carried
    top: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "comm": self.comm, "first_ts": self.first_ts,
                "last_ts": self.last_ts, "peak_rss_bytes": max(0, self.peak_rss_bytes),
                "peak_ts": self.peak_ts, "kernel_peak_rss_bytes": self.vmhwm_bytes,
                "top_mappings": self.top}


class PeakTracker:
    """Fed the latest snapshot of every live process of the tree once per tick
    (observe); keeps the tick whose summed rss_bytes was largest, and per process
    its largest snapshot, with their top mappings."""

    def __init__(self, top: int = TOP_MAPPINGS) -> None:
        self.n_top = top
        self.processes: dict[tuple[int, float], ProcessPeak] = {}  # (pid, first ts)
        self._current: dict[int, tuple[int, float]] = {}
        self.ticks = 0
        self.peak_rss_bytes = 0
        self.peak_ts: float | None = None
        self.peak_processes = 0
        self.peak_top: list[dict[str, Any]] = []

    def observe(self, snapshots: Mapping[int, Mapping[str, Any]]) -> None:
        snaps = list(snapshots.values())
        if not snaps:
            return
        self.ticks += 1
        for pid in set(self._current) - set(snapshots):
            del self._current[pid]       # exited: a later process with its pid is another
        for snap in snaps:
            self._process(snap)
        total = sum(int(s.get("rss_bytes") or 0) for s in snaps)
        if self.peak_ts is None or total > self.peak_rss_bytes:
            self.peak_rss_bytes = total
            self.peak_ts = max(float(s["ts"]) for s in snaps)
            self.peak_processes = len(snaps)
            self.peak_top = top_mappings(snaps, self.n_top)

    def _process(self, snap: Mapping[str, Any]) -> None:
        pid, ts = int(snap["pid"]), float(snap["ts"])
        key = self._current.get(pid)
        proc = self.processes.get(key) if key is not None else None
        if proc is None:
            key = (pid, ts)
            proc = self.processes[key] = ProcessPeak(pid, str(snap.get("comm", "")), ts, ts)
            self._current[pid] = key
        proc.last_ts = max(proc.last_ts, ts)
        proc.comm = str(snap.get("comm", proc.comm))    # an exec changes it
        rss = int(snap.get("rss_bytes") or 0)
        if rss > proc.peak_rss_bytes:
            proc.peak_rss_bytes, proc.peak_ts = rss, ts
            proc.top = top_mappings([snap], 3)
        hwm = snap.get("peak_rss_bytes")
        if hwm is not None:
            proc.vmhwm_bytes = max(int(hwm), proc.vmhwm_bytes or 0)

    def vmhwm_bytes(self) -> int | None:
        values = [p.vmhwm_bytes for p in self.processes.values() if p.vmhwm_bytes is not None]
        return max(values) if values else None


def build_summary(peaks: PeakTracker, *, command: Sequence[str], pid: int,
                  status: int | None, duration: float,
                  ru_maxrss_bytes: int | None, pre_exec_rss_bytes: int | None,
                  ) -> dict[str, Any]:
    """The summary object (docs/output.md). status is the command's wait status
    (None when it was not started). ru_maxrss counts the command's image
    before its exec too (the forked copy of memtrace waiting to exec it,
    pre_exec_rss_bytes, plus what it touched until the exec: PRE_EXEC_MARGIN):
    only a figure above that is the command's."""
    exit_code: int | None = None
    signal_no: int | None = None
    if status is not None:
        if os.WIFSIGNALED(status):
            signal_no = os.WTERMSIG(status)
            exit_code = 128 + signal_no
        else:
            exit_code = os.WEXITSTATUS(status)
    vmhwm = peaks.vmhwm_bytes()
    ru_counts = (ru_maxrss_bytes is not None
                 and (pre_exec_rss_bytes is None
                      or ru_maxrss_bytes > pre_exec_rss_bytes + PRE_EXEC_MARGIN))
    kernel_candidates = [v for v in (vmhwm, ru_maxrss_bytes if ru_counts else None)
                         if v is not None]
    procs = sorted(peaks.processes.values(),
                   key=lambda p: (-p.peak_rss_bytes, p.first_ts, p.pid))
    return {
        "command": [escape_name(os.fsencode(arg)) for arg in command],
        "pid": pid,
        "exit_status": exit_code,
        "signal": signal_no,
        "duration_seconds": round(duration, 3),
        "ticks": peaks.ticks,
        "processes_seen": len(peaks.processes),
        "peak_rss_bytes": peaks.peak_rss_bytes if peaks.peak_ts is not None else None,
        "peak_ts": peaks.peak_ts,
        "peak_processes": peaks.peak_processes,
        "top_mappings": peaks.peak_top,
        "kernel_peak_rss_bytes": max(kernel_candidates) if kernel_candidates else None,
        "kernel": {"ru_maxrss_bytes": ru_maxrss_bytes,
                   "pre_exec_rss_bytes": pre_exec_rss_bytes,
                   "vmhwm_bytes": vmhwm},
        "processes": [p.as_dict() for p in procs[:MAX_PROCESSES]],
    }


def _clock(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def _cut(text: str, width: int) -> str:
    """At most width characters, shortened in the middle."""
    if len(text) <= width:
        return text
    keep = width - 1
    return text[:keep // 2] + "…" + text[len(text) - (keep - keep // 2):]


def render_summary(s: Mapping[str, Any], width: int = 80) -> str:
    """The summary as plain text lines of at most `width` columns (docs/output.md)."""
    from memtrace.trace.procfs import escape_text

    lines: list[str] = []
    cmd = escape_text(" ".join(s["command"]))
    if s["exit_status"] is None:
        how = "did not run"
    elif s["signal"] is not None:
        how = f"killed by signal {s['signal']} (exit {s['exit_status']})"
    else:
        how = f"exited with status {s['exit_status']}"
    n = s["processes_seen"]
    tail = f" {how} after {s['duration_seconds']:.2f}s; {n} process{'es' if n != 1 else ''}"
    lines.append(_cut("summary: " + cmd, width - len(tail)) + tail)
    if s["peak_rss_bytes"] is None:
        lines.append("peak RSS (memtrace): - (no snapshot while the command ran)")
    else:
        k = s["peak_processes"]
        lines.append(f"peak RSS (memtrace, tree sum): {fmt_bytes(s['peak_rss_bytes'])} at "
                     f"{_clock(s['peak_ts'])} ({k} process{'es' if k != 1 else ''})")
    kern = s["kernel"]
    if s["kernel_peak_rss_bytes"] is None and kern["ru_maxrss_bytes"] is not None:
        lines.append(f"peak RSS (kernel): at most {fmt_bytes(kern['ru_maxrss_bytes'])} (no more "
                     "than memtrace's copy before exec)")
    else:
        lines.append(f"peak RSS (kernel): {fmt_bytes(s['kernel_peak_rss_bytes'])}")
    detail = f"  ru_maxrss {fmt_bytes(kern['ru_maxrss_bytes'])}"
    if kern["pre_exec_rss_bytes"] is not None:
        detail += f" (before exec {fmt_bytes(kern['pre_exec_rss_bytes'])})"
    detail += f"; largest VmHWM seen {fmt_bytes(kern['vmhwm_bytes'])}"
    lines.append(_cut(detail, width))
    if s["top_mappings"]:
        lines.append("top mappings at the peak:")
        for m in s["top_mappings"]:
            head = f"  {fmt_bytes(m['rss_bytes']):>10}  {m['kind'][:10]:<10} "
            who = f" {m['pid']} {escape_text(m['comm'])}"
            room = width - len(head) - len(who)
            lines.append(head + _cut(escape_text(m["mapping"]), room).ljust(room) + who)
    procs = s["processes"]
    if procs:
        lines.append(f"{'pid':>9} {'comm':<16} {'peak rss':>10} {'at':>12} "
                     f"{'VmHWM':>10} {'seen':>9}")
        for p in procs[:10]:
            seen = f"{p['last_ts'] - p['first_ts']:.1f}s"
            lines.append(f"{p['pid']:>9} {_cut(escape_text(p['comm']), 16):<16} "
                         f"{fmt_bytes(p['peak_rss_bytes']):>10} {_clock(p['peak_ts']):>12} "
                         f"{fmt_bytes(p['kernel_peak_rss_bytes']):>10} {seen:>9}")
        if s["processes_seen"] > 10:
            lines.append(f"  … {s['processes_seen'] - 10} more processes (the JSON "
                         f"summary lists up to {MAX_PROCESSES})")
    return "\n".join(lines)
