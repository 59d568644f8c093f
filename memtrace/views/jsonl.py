"""JSON Lines on stdout: one object per watched process per interval."""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from memtrace.events import SyscallEvent
from memtrace.procfs import escape_text
from memtrace.views.output import OutputStream
from memtrace.views.snapshot import encode_parts


class JsonReporter:
    wants_json_text = True          # snapshots carry their mappings' JSON text

    def __init__(self, out: IO[str] | OutputStream | None = None) -> None:
        """Write to an OutputStream (stdout when None: written by a background
        thread, never blocking the loop; see views/output.py), or to a text
        file object (tests)."""
        self.stream: OutputStream | None = None
        self.out: IO[str] | None = None
        if out is None:
            self.stream = OutputStream(sys.stdout.fileno(), "stdout")
        elif isinstance(out, OutputStream):
            self.stream = out
        else:
            self.out = out

    def snapshot(self, snap: dict[str, Any]) -> None:
        parts = encode_parts(snap)
        parts.append(b"\n")
        if self.stream is not None:
            self.stream.write_record(parts)     # JSON is ASCII: bytes as they are
        else:
            assert self.out is not None
            self.out.write(b"".join(parts).decode("ascii"))
            self.out.flush()

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
        print(f"memtrace: {escape_text(text)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
