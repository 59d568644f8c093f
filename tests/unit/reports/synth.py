"""Synthetic snapshots and recordings for the gate, check and diff tests: a
process is a dict of mapping identity -> resident bytes (kind from the name)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from memtrace.record.writer import RecordingWriter, make_header, open_recording_output

MiB = 1 << 20
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"


def kind_of(name: str) -> str:
    if name == "[heap]":
        return "heap"
    if name == "[stack]":
        return "stack"
    if name.startswith("[anon"):
        return "anon"
    if ".so" in name:
        return "library"
    return "executable" if name.startswith("/bin") else "file"


def snap(pid: int, ts: float, maps: Mapping[str, int], comm: str = "prog",
         pss: float | None = None, stacks: Mapping[tuple[str, ...], int] | None = None,
         ) -> dict[str, Any]:
    """A snapshot: one mapping per name (start by position), PSS = pss * RSS
    per mapping when pss is given (else null)."""
    mappings = []
    for i, (name, rss) in enumerate(sorted(maps.items())):
        start = 0x10000000 * (i + 1)
        mappings.append({"start": start, "end": start + 0x8000000, "perms": "rw-p",
                         "path": "" if name.startswith("[anon") else name,
                         "kind": kind_of(name), "mapping": name, "rss_bytes": rss,
                         "pss_bytes": None if pss is None else int(rss * pss)})
    s: dict[str, Any] = {
        "ts": ts, "pid": pid, "comm": comm, "rss_bytes": sum(maps.values()),
        "pss_bytes": None if pss is None else sum(int(r * pss) for r in maps.values()),
        "mappings": mappings}
    if stacks is not None:
        s["stacks"] = {"held": [{"bytes": b, "mapping": "[heap]", "kind": "heap",
                                 "samples": 1, "truncated": False, "frames": list(f)}
                                for f, b in stacks.items()]}
    return s


def series(values: Iterable[tuple[float, Mapping[str, int]]], pid: int = 100,
           **kw: Any) -> list[dict[int, dict[str, Any]]]:
    """Ticks of one process: [{pid: snapshot}] per (ts, mappings)."""
    return [{pid: snap(pid, ts, maps, **kw)} for ts, maps in values]


def record(path: str, ticks: Sequence[Mapping[int, dict[str, Any]]], *,
           gone: Mapping[int, int] | None = None, end: bool = True,
           interval: float = 1.0, compress: bool = True) -> None:
    """A recording of these ticks; `gone`: pid -> tick index after which a
    "pid N exited" message is written; end=False: no end line (killed);
    compress=False: plain JSON Lines (tests that edit lines)."""
    writer = RecordingWriter(open_recording_output(path),
                             make_header("run", interval, command=["prog"]), compress=compress)
    for i, tick in enumerate(ticks):
        for s in tick.values():
            writer.snapshot(s)
        writer.tick_done()
        for pid, after in (gone or {}).items():
            if after == i:
                writer.detached(pid, "exited")
    if end:
        writer.close()
    else:
        writer.stream_out.close()
