"""The per-process snapshot: one dict that every view renders (JSON contract
in docs/output.md)."""

from __future__ import annotations

from typing import Any

from memtrace.attribution import classify, mapping_identity, segments_for, split
from memtrace.tracker import ProcessTracker


def snapshot(tracker: ProcessTracker, ts: float) -> dict[str, Any]:
    mappings = []
    anon = file = shmem = virtual = 0
    segs = segments_for(tracker.space, tracker.space.vmas, tracker.exe, tracker.pid,
                        tracker.procfs.root)
    for vma in tracker.space.vmas:
        kind = classify(vma, tracker.exe)
        seg = segs.get(vma.start)
        if seg is not None:
            kind = seg.kind           # the bss: anonymous, counted with its library
        parts = split(tracker.space.resident_of(vma), kind)
        anon += parts.anon
        file += parts.file
        shmem += parts.shmem
        virtual += vma.size
        mappings.append({
            "start": vma.start,
            "end": vma.end,
            "perms": vma.perms,
            "offset": vma.offset,
            "path": vma.display_path,
            "kind": kind,
            "mapping": seg.mapping if seg is not None else mapping_identity(vma, kind),
            "segment": seg.name if seg is not None else None,
            "rss_bytes": parts.total,
            "anon_bytes": parts.anon,
            "file_bytes": parts.file,
            "shmem_bytes": parts.shmem,
            "virtual_bytes": vma.size,
            "faults": tracker.faults_by_vma.get(vma.start, 0),
        })
    c = tracker.counters
    statm = tracker.statm
    return {
        "ts": round(ts, 6),
        "pid": tracker.pid,
        "comm": tracker.comm,
        "rss_bytes": anon + file + shmem,
        "anon_bytes": anon,
        "file_bytes": file,
        "shmem_bytes": shmem,
        "virtual_bytes": virtual,
        "statm_rss_bytes": statm.resident_bytes if statm else None,
        "drift_bytes": tracker.drift_bytes(),
        "faults": tracker.faults_total,
        "faults_by_mapping": dict(tracker.faults_by_mapping),
        "syscalls": dict(tracker.stats.calls),
        "syscall_bytes": dict(tracker.stats.bytes),
        "full_rescans": dict(c.full_rescans),
        "events_lost": tracker.stats.events_lost + tracker.stats.ranges_lost,
        "events_sampled_out": tracker.stats.events_sampled_out,
        "tick_seconds": round(c.last_tick_seconds, 6),
        "mappings": mappings,
    }
