"""Synthetic recordings for the report's tests and benchmark: snapshots of the
shape docs/output.md gives (a few kinds, libraries with segments, a growing
anon mapping, a heap walk, library events, calls, stacks), written through the
real RecordingWriter (changed-only lines, a whole one every `full_every`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from memtrace.record.writer import RecordingWriter, make_header, open_recording_output

PAGE = 4096
T0 = 1_700_000_000.0
SEGMENTS = ("rodata", "text", "relro", "data", "bss")


def _mapping(start: int, kind: str, mapping: str, rss: int, segment: str | None = None,
             pss: int | None = None) -> dict[str, Any]:
    pss = rss if pss is None else pss
    return {"start": start, "end": start + max(rss, PAGE) * 2, "perms": "rw-p", "offset": 0,
            "path": "" if kind == "anon" else mapping, "kind": kind, "mapping": mapping,
            "segment": segment, "rss_bytes": rss,
            "anon_bytes": rss if kind in ("anon", "heap", "stack") else 0,
            "file_bytes": rss if kind in ("library", "executable", "file") else 0,
            "shmem_bytes": rss if kind == "shmem" else 0, "virtual_bytes": max(rss, PAGE) * 2,
            "faults": 0, "pss_bytes": pss,
            "uss_bytes": pss if kind != "library" else pss // 4 // PAGE * PAGE,
            "swap_bytes": 0}


def snapshot(pid: int, tick: int, libraries: int = 12, extra_anon: int = 0,
             growth: int = 64 * PAGE, comm: str = "synth", pss: bool = True,
             heap: bool = True, stacks: bool = True, interval: float = 1.0,
             churn_every: int = 0) -> dict[str, Any]:
    """Snapshot `tick` of process `pid`: a heap and an anon mapping that grow
    (anon grows for 60 of every 90 ticks, then shrinks), a stack, `libraries`
    libraries of 5 segments (the first loaded at tick 5), `extra_anon` quiet
    anon mappings (to make ~1,000 mappings), one file and one shmem mapping.
    With `churn_every` N, the PSS of every quiet mapping changes every N ticks
    (as a PSS refresh can), so that every Nth line lists them all."""
    ts = T0 + tick * interval + pid * 0.001
    maps: list[dict[str, Any]] = []
    addr = 0x10000000 + pid * 0x1000000000
    phase = tick % 90
    anon = (phase if phase < 60 else max(0, 60 - 2 * (phase - 60))) * growth + PAGE
    heap_rss = (16 + tick % 7) * PAGE
    maps.append(_mapping(addr, "executable", "/usr/bin/synth", 40 * PAGE, "text"))
    maps.append(_mapping(addr + 0x100000, "heap", "[heap]", heap_rss))
    maps.append(_mapping(addr + 0x1000000, "anon", "[anon]", anon))
    for i in range(extra_anon):
        rss = PAGE * (1 + (i + tick // 600) % 3)
        share = 1 + (tick // churn_every) % 2 if churn_every else 1
        maps.append(_mapping(addr + 0x2000000 + i * 0x10000, "anon", "[anon]", rss,
                             pss=rss // share))
    for lib in range(libraries):
        if lib == 0 and tick < 5:
            continue
        for s, seg in enumerate(SEGMENTS):
            rss = (lib + 1) * (s + 1) * PAGE
            maps.append(_mapping(addr + 0x40000000 + lib * 0x100000 + s * 0x10000, "library",
                                 f"/usr/lib/libsynth{lib}.so.1", rss, seg, pss=rss // 2))
    maps.append(_mapping(addr + 0x70000000, "file", "/var/data.bin", 8 * PAGE))
    maps.append(_mapping(addr + 0x71000000, "shmem", "/dev/shm/x", 4 * PAGE))
    maps.append(_mapping(addr + 0x7f000000, "stack", "[stack]", 33 * PAGE))
    if not pss:
        for m in maps:
            m["pss_bytes"] = m["uss_bytes"] = m["swap_bytes"] = None
    rss = sum(m["rss_bytes"] for m in maps)
    snap: dict[str, Any] = {
        "ts": ts, "pid": pid, "comm": comm, "rss_bytes": rss,
        "anon_bytes": sum(m["anon_bytes"] for m in maps),
        "file_bytes": sum(m["file_bytes"] for m in maps),
        "shmem_bytes": sum(m["shmem_bytes"] for m in maps),
        "virtual_bytes": sum(m["virtual_bytes"] for m in maps),
        "pss_bytes": sum(m["pss_bytes"] for m in maps) if pss else None,
        "uss_bytes": sum(m["uss_bytes"] for m in maps) if pss else None,
        "swap_bytes": 0 if pss else None, "statm_rss_bytes": rss, "drift_bytes": 0,
        "peak_rss_bytes": rss, "faults": tick,
        "syscalls": {"brk": tick // 3, "mmap": tick, "munmap": tick // 2, "mremap": 0,
                     "madvise": 0, "mprotect": 0},
        "tick_seconds": 0.001, "generation": tick,
        "library_events": ([{"event": "library_load", "ts": ts, "pid": pid, "comm": comm,
                             "mapping": "/usr/lib/libsynth0.so.1", "rss_bytes": 15 * PAGE,
                             "mapped_bytes": 30 * PAGE}] if tick == 5 and libraries else []),
        "mappings": maps,
    }
    if heap:
        walk = tick // 10 * 10
        snap["heap"] = {"status": "ok", "allocator": "glibc", "supported": True,
                        "ts": T0 + walk * interval, "verdict": f"verdict of walk {walk}",
                        "totals": {"in_use_bytes": (10 + walk % 7) * PAGE,
                                   "free_resident_bytes": 6 * PAGE, "trimmable_bytes": 2 * PAGE,
                                   "resident_bytes": (16 + walk % 7) * PAGE},
                        "mmapped": {"count": 0, "bytes": 0, "resident_bytes": 0}}
    if stacks:
        snap["stacks"] = {"period_bytes": 524288, "samples": tick, "lost": 0,
                          "held_bytes": rss, "brought_bytes": rss, "held": [
                              {"bytes": anon, "mapping": "[anon]", "kind": "anon", "samples": 3,
                               "truncated": False,
                               "frames": ["memset (libc.so.6)", "grow (synth)", "main (synth)"]}],
                          "brought": []}
    return snap


def write(path: str, snaps: Iterable[dict[str, Any]], full_every: int = 600,
          end: bool = True, interval: float = 1.0, pids: list[int] | None = None,
          compress: bool = True) -> None:
    """A recording of these snapshots (with an end line unless `end` is False);
    with `pids` given, `snaps` may be a generator (written as it goes)."""
    snaps = list(snaps) if pids is None else snaps
    pids = sorted({s["pid"] for s in snaps}) if pids is None else pids  # type: ignore[union-attr]
    stream = open_recording_output(path)
    stream.max_queued = 1 << 40         # a generator outruns the disk: wait, never drop
    writer = RecordingWriter(stream,
                             make_header("watch", interval, pids=pids, full_every=full_every,
                                         options={"stacks": True}), compress=compress)
    for snap in snaps:
        writer.snapshot(snap)
    if end:
        writer.close()
    else:
        writer.stream_out.close()


def ticks(n: int, pids: tuple[int, ...] = (100,), **kw: Any) -> list[dict[str, Any]]:
    """n ticks of these processes, interleaved as the loop writes them."""
    return [snapshot(pid, t, **kw) for t in range(n) for pid in pids]

