"""The live terminal view (rich). Names (paths, comm, messages that hold
them) are never read as Rich markup: every cell is a rich.text.Text of plain
text, with control characters escaped (memtrace.procfs.escape_text)."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from memtrace.events import SyscallEvent
from memtrace.explain import meminfo_summary
from memtrace.libevents import describe as describe_library_event
from memtrace.procfs import escape_text
from memtrace.views.output import TextOutput, open_output


def human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if abs(n) >= 1 << shift:
            return f"{n / (1 << shift):.1f}{unit}"
    return str(n)


def plain(text: str, style: str = "") -> Text:
    """Text shown as it is: no markup, no control characters."""
    return Text(escape_text(text), style=style)


class TableReporter:
    wants_events = True             # shows the latest syscall records

    def __init__(self, console: Console | None = None, max_rows: int | None = None) -> None:
        # stdout through an OutputStream: a terminal or pipe that stops taking
        # bytes never holds the loop or shutdown (views/output.py)
        self.console = console or Console(file=TextOutput(open_output(None)).as_io())
        self.max_rows = max_rows
        self.snaps: dict[int, dict[str, Any]] = {}
        self.ended: dict[int, dict[str, Any]] = {}
        self.recent: deque[SyscallEvent] = deque(maxlen=8)
        self.notes: deque[str] = deque(maxlen=5)
        self.live = Live(console=self.console, auto_refresh=False, screen=False)
        self.live.start()

    def snapshot(self, snap: dict[str, Any]) -> None:
        self.snaps[snap["pid"]] = snap
        for ev in snap.get("library_events") or ():
            self.notes.append(f"{time.strftime('%H:%M:%S')} {describe_library_event(ev)}")
        self._render()

    def events(self, events: list[SyscallEvent]) -> None:
        self.recent.extend(events)

    def tick_done(self) -> None:
        self._render()

    def message(self, text: str) -> None:
        self.notes.append(f"{time.strftime('%H:%M:%S')} {text}")
        ended = {p: s for p, s in self.snaps.items() if f"pid {p} " in text}
        self.ended.update(ended)      # run's final frame shows their last snapshot
        self.snaps = {p: s for p, s in self.snaps.items() if p not in ended}
        self._render()

    def summary(self, summary: dict[str, Any]) -> None:
        """`run`'s summary, as plain text after the live view stops; its last
        frame, with the last snapshot of every process seen, stays above it."""
        from memtrace.views.summary import render_summary

        self.snaps = {**self.ended, **self.snaps}    # the last frame: every process
        self._render()
        self.live.stop()
        if not self.console.is_terminal:
            self.console.line()     # the last frame, written at stop, ends without one
        width = min(self.console.size.width, 100)
        for line in render_summary(summary, width).splitlines():
            self.console.print(plain(line), soft_wrap=True)

    def close(self) -> None:
        try:
            self.live.stop()
        finally:
            if isinstance(self.console.file, TextOutput):
                self.console.file.close()   # drained, bounded in time (views/output.py)

    def _rows_per_process(self) -> int:
        if self.max_rows is not None:
            return self.max_rows
        height = self.console.size.height
        n = max(1, len(self.snaps))
        return max(3, (height - 14) // n - 6)

    def _render(self) -> None:
        parts: list[Any] = []
        machine = meminfo_summary()
        if machine:
            parts.append(plain(machine, style="dim"))
        for snap in self.snaps.values():
            parts.append(self._process(snap))
        if self.recent:
            parts.append(Text("recent calls:", style="bold"))
            for ev in self.recent:
                parts.append(plain(f"  [{ev.tgid}] {ev.describe()}"))
        for note in self.notes:
            parts.append(plain(note, style="dim"))
        self.live.update(Group(*parts), refresh=True)

    def _process(self, snap: dict[str, Any]) -> Any:
        swap = f"  swap {human(snap['swap_bytes'])}" if snap.get("swap_bytes") else ""
        head = Text.assemble(
            plain(f"{snap['pid']} {snap['comm']}", style="bold"),
            f"  rss {human(snap['rss_bytes'])} (anon {human(snap['anon_bytes'])}, "
            f"file {human(snap['file_bytes'])}, shmem {human(snap['shmem_bytes'])})"
            f"  pss {human(snap.get('pss_bytes'))}  uss {human(snap.get('uss_bytes'))}{swap}"
            f"  virt {human(snap['virtual_bytes'])}  statm {human(snap['statm_rss_bytes'])}"
            f"  drift {snap['drift_bytes']}B  faults {snap['faults']}",
        )
        calls = ", ".join(f"{k} {v}" for k, v in snap["syscalls"].items() if v)
        rescans = ", ".join(f"{k} {v}" for k, v in snap["full_rescans"].items())
        info = plain(f"calls: {calls or '-'}   full rescans: {rescans or '-'}   "
                    f"lost {snap['events_lost']}", style="dim")
        table = Table(box=None, pad_edge=False, header_style="bold")
        for col, justify in (("range", "left"), ("perms", "left"), ("kind", "left"),
                             ("seg", "left"),
                             ("virt", "right"), ("rss", "right"), ("pss", "right"),
                             ("uss", "right"), ("anon", "right"),
                             ("file", "right"), ("shmem", "right"), ("faults", "right"),
                             ("path", "left")):
            table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        maps = sorted(snap["mappings"], key=lambda m: m["rss_bytes"], reverse=True)
        limit = self._rows_per_process()
        for m in maps[:limit]:
            cells = (f"{m['start']:x}-{m['end']:x}", m["perms"], m["kind"],
                     m.get("segment") or "", human(m["virtual_bytes"]),
                     human(m["rss_bytes"]), human(m.get("pss_bytes")),
                     human(m.get("uss_bytes")),
                     human(m["anon_bytes"]), human(m["file_bytes"]),
                     human(m["shmem_bytes"]), str(m["faults"]),
                     m["path"] or (m["mapping"] if m.get("segment") == "bss" else ""))
            table.add_row(*map(plain, cells))
        parts: list[Any] = [head, info, table]
        hidden = maps[limit:]
        if hidden:
            parts.append(plain(
                f"… {len(hidden)} more mappings not shown "
                f"({human(sum(m['rss_bytes'] for m in hidden))} resident)", style="dim"))
        return Group(*parts)
