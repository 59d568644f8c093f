"""JSON Lines on stdout: one object per watched process per interval."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any

from memtrace.reporter import Reporter
from memtrace.snapshot import encode_parts
from memtrace.trace.events import SyscallEvent
from memtrace.trace.procfs import escape_text
from memtrace.util.log import log
from memtrace.views.output import OutputStream

_encode = json.JSONEncoder(separators=(",", ":")).encode
# A whole snapshot bigger than this gets one hint, once, that --changed-only exists
# (60k mappings: 17 MB a snapshot, 61 GB an hour at --interval 1).
BIG_SNAPSHOT_BYTES = 1 << 20


class JsonReporter(Reporter):
    wants_json_text = True          # snapshots carry their mappings' JSON text

    def __init__(self, out: IO[str] | OutputStream | None = None,
                 changed_only: bool = False, full_every: int = 0) -> None:
        """Write to an OutputStream (stdout when None: written by a background
        thread, never blocking the loop; see views/output.py), or to a text
        file object (tests). `changed_only` (--changed-only): after a process's
        first snapshot, list only the mappings that changed since its previous
        one, and the starts of those that are gone (docs/output.md; full_snapshots
        rebuilds the whole ones); `full_every` (--full-every N): with it, every
        Nth snapshot of a process is whole again (0: only the first)."""
        self.changed_only = changed_only
        self.full_every = full_every
        # --changed-only: pid -> its previous snapshot's mappings list, and the
        # snapshots written since its last whole one
        self._last: dict[int, list[dict[str, Any]]] = {}
        self._since_whole: dict[int, int] = {}
        self._hinted = changed_only
        self.stream: OutputStream | None = None
        self.out: IO[str] | None = None
        if out is None:
            self.stream = OutputStream(sys.stdout.fileno(), "stdout")
        elif isinstance(out, OutputStream):
            self.stream = out
        else:
            self.out = out

    def snapshot(self, snap: dict[str, Any]) -> None:
        parts = self._changes(snap) if self.changed_only else encode_parts(snap)
        parts.append(b"\n")
        if not self._hinted:
            self._hint(snap, sum(map(len, parts)))
        if self.stream is not None:
            self.stream.write_record(parts)     # JSON is ASCII: bytes as they are
        else:
            assert self.out is not None
            self.out.write(b"".join(parts).decode("ascii"))
            self.out.flush()

    def _changes(self, snap: dict[str, Any]) -> list[bytes]:
        """--changed-only: the snapshot with only the mappings whose content changed
        since the previous snapshot of its pid (a mapping is named by its start),
        `removed_starts` for the ones that are gone and `changed_only: true`; the
        first snapshot of a pid is whole (no `changed_only` key), and so is every
        `full_every`th one."""
        pid = snap["pid"]
        before = self._last.get(pid)
        self._last[pid] = snap["mappings"]
        n = self._since_whole.get(pid, 0) + 1
        if before is None or (self.full_every and n >= self.full_every):
            self._since_whole[pid] = 0
            return encode_parts(snap)
        self._since_whole[pid] = n
        head = _encode({k: v for k, v in snap.items() if k != "mappings"}).encode("ascii")
        if getattr(snap, "delta_base", None) is before:
            # the builder knows what changed since `before`: no pass over every mapping
            texts: list[bytes] = snap.delta_texts     # type: ignore[attr-defined]
            removed: list[int] = snap.delta_removed   # type: ignore[attr-defined]
        else:
            old = {m["start"]: m for m in before}
            now = {m["start"]: m for m in snap["mappings"]}
            # a quiet process's snapshots share their mapping dicts: `is` first
            texts = [_encode(m).encode("ascii") for start, m in now.items()
                     if (o := old.get(start)) is not m and o != m]
            removed = [start for start in old if start not in now]
        return [head[:-1], b',"mappings":[', b",".join(texts), b'],"removed_starts":',
                _encode(removed).encode("ascii"), b',"changed_only":true}']

    def _hint(self, snap: dict[str, Any], size: int) -> None:
        if size > BIG_SNAPSHOT_BYTES:
            self._hinted = True
            log(f"pid {snap['pid']}: a JSON snapshot of {len(snap['mappings'])} mappings is "
                f"{size / 1e6:.1f} MB; --changed-only writes only the mappings that changed "
                "(`memtrace rebuild` gives the whole snapshots back)")

    def events(self, events: list[SyscallEvent]) -> None:
        pass

    def summary(self, summary: dict[str, Any]) -> None:
        """`run`'s last line: {"summary": {...}} (docs/output.md)."""
        line = json.dumps({"summary": summary}, ensure_ascii=True, separators=(",", ":"))
        if self.stream is not None:
            self.stream.write_record([line.encode("ascii"), b"\n"])
        else:
            assert self.out is not None
            self.out.write(line + "\n")
            self.out.flush()

    def tick_done(self) -> None:
        if self.stream is not None:
            self.stream.check()

    def message(self, text: str) -> None:
        log(escape_text(text))

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def full_snapshots(lines: Iterable[str | bytes]) -> Iterator[dict[str, Any]]:
    """Whole snapshots from JSON Lines written with or without --changed-only
    (docs/output.md): a `changed_only` snapshot's mappings are applied to the
    previous snapshot of its pid (by start) and its `removed_starts` dropped.
    The mappings come back in address order, as whole snapshots list them."""
    import json

    current: dict[int, dict[int, dict[str, Any]]] = {}
    for line in lines:
        snap = json.loads(line)
        if snap.pop("changed_only", False):
            maps = current[snap["pid"]]
            for start in snap.pop("removed_starts"):
                maps.pop(start, None)
            maps.update((m["start"], m) for m in snap["mappings"])
        else:
            maps = current[snap["pid"]] = {m["start"]: m for m in snap["mappings"]}
        snap["mappings"] = sorted(maps.values(), key=lambda m: m["start"])
        yield snap
