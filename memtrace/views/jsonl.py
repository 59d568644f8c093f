"""JSON Lines on stdout: one object per watched process per interval."""

from __future__ import annotations

import sys
from typing import IO, Any

from memtrace.events import SyscallEvent
from memtrace.views.snapshot import encode_parts


class JsonReporter:
    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out or sys.stdout

    def snapshot(self, snap: dict[str, Any]) -> None:
        self.out.writelines(encode_parts(snap))
        self.out.write("\n")
        self.out.flush()

    def events(self, events: list[SyscallEvent]) -> None:
        pass

    def tick_done(self) -> None:
        pass

    def message(self, text: str) -> None:
        print(f"memtrace: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass
