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


class JsonReporter(Reporter):
    wants_json_text = True          # snapshots carry their mappings' JSON text

    def __init__(self, out: IO[str] | OutputStream | None = None,
                 changed_only: bool = False) -> None:
        """Write to an OutputStream (stdout when None: written by a background
        thread, never blocking the loop; see views/output.py), or to a text
        file object (tests). `changed_only` (--changed-only): after a process's
        first snapshot, list only the mappings that changed since its previous
        one, and the starts of those that are gone (docs/output.md; full_snapshots
        rebuilds the whole ones)."""
        self.changed_only = changed_only
        # --changed-only: pid -> its previous snapshot's mappings by start
        self._last: dict[int, dict[int, dict[str, Any]]] = {}
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
        first snapshot of a pid is whole (no `changed_only` key)."""
        now = {m["start"]: m for m in snap["mappings"]}
        before = self._last.get(snap["pid"])
        self._last[snap["pid"]] = now
        if before is None:
            return encode_parts(snap)
        delta = {k: v for k, v in snap.items() if k != "mappings"}
        # a quiet process's snapshots share their mapping dicts: `is` first
        delta["mappings"] = [m for start, m in now.items()
                             if (old := before.get(start)) is not m and old != m]
        delta["removed_starts"] = [start for start in before if start not in now]
        delta["changed_only"] = True
        return encode_parts(delta)

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
