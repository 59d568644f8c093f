"""The live terminal view (rich). Names (paths, comm, messages that hold
them) are never read as Rich markup: every cell is a rich.text.Text of plain
text, with control characters escaped (memtrace.trace.procfs.escape_text).

Fitting the width (docs/output.md, "The live table"): numeric columns are as
wide as their widest value and never cut; the path is shortened from the
middle (the file name is kept); when the terminal is too narrow for every
column, columns are left out in the order of DROP_ORDER.

On a terminal the table is redrawn in place (rich Live); on a pipe or a file
each interval writes one plain frame (no cursor movement), flushed.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from memtrace.explain import meminfo_summary
from memtrace.libevents import describe as describe_library_event
from memtrace.reporter import Reporter
from memtrace.trace.events import SyscallEvent
from memtrace.trace.procfs import escape_text
from memtrace.util.units import fmt_bytes, fmt_delta
from memtrace.views.output import TextOutput, open_output

# Every column, in display order; `range` is shown only when asked for.
COLUMNS = ("range", "perms", "kind", "seg", "virt", "rss", "pss", "uss", "Δrss", "anon",
           "file", "shmem", "faults", "faults/s", "path")
NUMERIC = frozenset({"virt", "rss", "pss", "uss", "Δrss", "anon", "file", "shmem",
                     "faults", "faults/s"})
DEFAULT_COLUMNS = tuple(c for c in COLUMNS if c != "range")
# Left out first when the terminal is narrow; `rss` and `path` always stay.
DROP_ORDER = ("range", "virt", "shmem", "faults", "seg", "perms", "faults/s", "file",
              "anon", "Δrss", "kind", "uss", "pss")
PATH_MIN = 24           # a path column narrower than this makes another column go
# Which columns fit is decided with the widest text a column can hold in IEC
# units (`1023.9 KiB`), so the set of columns does not change from frame to frame
# as values grow; each column is then as wide as its widest value.
FIT_WIDTHS = {"virt": 10, "rss": 10, "pss": 10, "uss": 10, "anon": 10, "file": 10,
              "shmem": 10, "Δrss": 11, "faults/s": 8}
GAP = 1                 # spaces between columns
SORTS = ("rss", "pss", "uss", "anon", "file", "faults", "delta", "name")
KINDS = ("heap", "anon", "stack", "library", "executable", "file", "shmem", "special")


@dataclass
class TableOptions:
    """What the table shows (watch/run options, docs/output.md)."""

    sort: str = "rss"
    top: int | None = None                  # rows per process; None: fit the height
    kinds: frozenset[str] = frozenset()     # empty: every kind
    path: re.Pattern[str] | None = None
    by_library: bool = False
    exact: bool = False                     # --bytes
    columns: tuple[str, ...] = DEFAULT_COLUMNS
    extra: dict[str, Any] = field(default_factory=dict)


def rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 10 or x == 0 else f"{x:.1f}"


def plain(text: str, style: str = "") -> Text:
    """Text shown as it is: no markup, no control characters."""
    return Text(escape_text(text), style=style)


def shorten_path(path: str, width: int) -> str:
    """`path` in at most `width` characters, cut from the middle: the leading
    directories that fit, `…`, the file name (`/usr/lib/…/libpython3.11.so.1.0`).
    A file name longer than the width is itself cut in its middle
    (`_contextvars.c…6_64-linux-gnu.so`)."""
    if len(path) <= width:
        return path
    if width <= 1:
        return "…"[:width]
    slash = path.rfind("/")
    name = path[slash + 1:] if slash >= 0 else path
    if len(name) + 2 > width:
        keep = (width - 1) // 2
        return name[:keep] + "…" + name[len(name) - (width - 1 - keep):]
    room = width - len(name) - 2          # for the head, before "…/"
    head = path[:slash][:room]
    cut = head.rfind("/")
    head = head[:cut + 1] if cut > 0 else ""  # the head ends at a directory boundary
    return f"{head}…/{name}"


# ------------------------------------------------------------------ rows


@dataclass
class Row:
    key: tuple[Any, ...]
    start: int
    end: int
    perms: str
    kind: str
    seg: str
    path: str
    virt: int
    rss: int
    pss: int | None
    uss: int | None
    anon: int
    file: int
    shmem: int
    faults: int
    pss_stale: bool = False
    delta: int | None = None
    fault_rate: float | None = None


def _row(m: dict[str, Any]) -> Row:
    seg = m.get("segment") or ""
    path = m["path"] or (m["mapping"] if seg == "bss" else "")
    pss = m.get("pss_bytes")
    uss = m.get("uss_bytes")
    return Row(key=(m["start"], m.get("mapping")), start=m["start"], end=m["end"],
               perms=m["perms"], kind=m["kind"], seg=seg, path=path,
               virt=m["virtual_bytes"], rss=m["rss_bytes"], pss=pss, uss=uss,
               anon=m["anon_bytes"], file=m["file_bytes"], shmem=m["shmem_bytes"],
               faults=m["faults"], pss_stale=pss is not None and pss > m["rss_bytes"])


def _fold(maps: list[dict[str, Any]]) -> list[Row]:
    """--by-library: the segments of one loaded object (same `mapping`, a
    `segment` set) become one row; other mappings stay one row each."""
    rows: list[Row] = []
    groups: dict[str, Row] = {}
    counts: dict[str, int] = {}
    for m in maps:
        r = _row(m)
        ident = m.get("mapping")
        if not m.get("segment") or not ident:
            rows.append(r)
            continue
        g = groups.get(ident)
        if g is None:
            g = groups[ident] = Row(key=("lib", ident), start=r.start, end=r.end, perms="",
                                    kind=r.kind, seg="", path=ident, virt=0, rss=0, pss=0,
                                    uss=0, anon=0, file=0, shmem=0, faults=0)
            rows.append(g)
        counts[ident] = counts.get(ident, 0) + 1
        g.start, g.end = min(g.start, r.start), max(g.end, r.end)
        g.virt += r.virt
        g.rss += r.rss
        g.anon += r.anon
        g.file += r.file
        g.shmem += r.shmem
        g.faults += r.faults
        g.pss = None if g.pss is None or r.pss is None else g.pss + r.pss
        g.uss = None if g.uss is None or r.uss is None else g.uss + r.uss
        g.pss_stale = g.pss_stale or r.pss_stale
    for ident, g in groups.items():
        g.seg = f"{counts[ident]} seg"
        if g.kind == "library" and g.pss is not None and g.pss > g.rss:
            g.pss_stale = True
    return rows


def _end_key(r: Row) -> tuple[Any, ...]:
    return ("end", r.end, r.key[-1])


def row_figures(rows: list[Row]) -> dict[tuple[Any, ...], tuple[int, int]]:
    """(rss, faults) of each row, by its key and by its end (for the next deltas)."""
    out: dict[tuple[Any, ...], tuple[int, int]] = {}
    for r in rows:
        out[r.key] = out[_end_key(r)] = (r.rss, r.faults)
    return out


_SORT_KEYS: dict[str, Callable[[Row], Any]] = {
    "rss": lambda r: -r.rss,
    "pss": lambda r: -(r.pss or 0),
    "uss": lambda r: -(r.uss or 0),
    "anon": lambda r: -r.anon,
    "file": lambda r: -r.file,
    "faults": lambda r: (-(r.fault_rate or 0), -r.faults),
    "delta": lambda r: -abs(r.delta or 0),
    "name": lambda r: (r.path == "", r.path, r.start),
}


def select_rows(snap: dict[str, Any], opts: TableOptions,
                previous: dict[tuple[Any, ...], tuple[int, int]] | None,
                seconds: float | None) -> list[Row]:
    """The rows of one process: filtered, folded, with deltas, sorted (not cut)."""
    maps = snap["mappings"]
    if opts.kinds:
        maps = [m for m in maps if m["kind"] in opts.kinds]
    if opts.path is not None:
        pat = opts.path
        maps = [m for m in maps if pat.search(m["path"] or "") or pat.search(m.get("mapping")
                                                                             or "")]
    rows = _fold(maps) if opts.by_library else [_row(m) for m in maps]
    if previous is not None:
        for r in rows:
            # the same mapping: same start, or else same end (an anonymous
            # mapping that grew downwards: a new mmap merged below it)
            before = previous.get(r.key) or previous.get(_end_key(r))
            if before is None:
                continue
            r.delta = r.rss - before[0]
            if seconds and seconds > 0:
                r.fault_rate = max(0, r.faults - before[1]) / seconds
    rows.sort(key=_SORT_KEYS[opts.sort])
    return rows


def _cells(r: Row, exact: bool) -> dict[str, Text]:
    pss = r.pss
    stale = r.pss_stale and pss is not None
    return {
        "range": plain(f"{r.start:x}-{r.end:x}"),
        "perms": plain(r.perms),
        "kind": plain(r.kind),
        "seg": plain(r.seg),
        "virt": plain(fmt_bytes(r.virt, exact)),
        "rss": plain(fmt_bytes(r.rss, exact)),
        # a PSS older than the RSS beside it (refreshed on its own schedule) can
        # be above it: shown clamped to the RSS, dim (docs/output.md)
        "pss": plain(fmt_bytes(min(pss, r.rss) if stale and pss is not None else pss, exact),
                     style="dim" if stale else ""),
        "uss": plain(fmt_bytes(min(r.uss, r.rss) if r.uss is not None else None, exact)),
        # no change: an empty cell, so the rows that change stand out
        "Δrss": plain(fmt_delta(r.delta, exact) if r.delta else ""),
        "anon": plain(fmt_bytes(r.anon, exact)),
        "file": plain(fmt_bytes(r.file, exact)),
        "shmem": plain(fmt_bytes(r.shmem, exact)),
        "faults": plain(str(r.faults)),
        "faults/s": plain(rate(r.fault_rate) if r.fault_rate else ""),
        "path": plain(r.path),
    }


def fit_columns(wanted: Iterable[str], widths: dict[str, int], width: int,
                path_width: int) -> list[str]:
    """The columns of `wanted` that fit in `width` (DROP_ORDER goes first),
    leaving the path min(path_width, PATH_MIN) characters."""
    cols = [c for c in COLUMNS if c in set(wanted) | {"rss", "path"}]
    need_path = min(max(path_width, 4), PATH_MIN)

    def total(cs: list[str]) -> int:
        return sum(widths[c] for c in cs if c != "path") + GAP * (len(cs) - 1) + need_path

    for c in DROP_ORDER:
        if total(cols) <= width:
            break
        if c in cols:
            cols.remove(c)
    return cols


def pack(items: list[str], width: int, sep: str = "  ") -> list[str]:
    """Items on lines of at most `width` characters, never splitting an item
    (an item longer than a line gets a line of its own)."""
    lines: list[str] = []
    cur = ""
    for it in items:
        if cur and len(cur) + len(sep) + len(it) > width:
            lines.append(cur)
            cur = it
        else:
            cur = f"{cur}{sep}{it}" if cur else it
    if cur:
        lines.append(cur)
    return lines


_UNIT_WORD = re.compile(r"^(B|KiB|MiB|GiB|TiB)\W*$")


def wrap_words(text: str, width: int) -> list[str]:
    """`text` on lines of at most `width` characters, broken at spaces but
    never between a number and its unit (`50.6 MiB` stays on one line)."""
    words: list[str] = []
    for w in text.split(" "):
        if words and _UNIT_WORD.match(w):
            words[-1] = f"{words[-1]} {w}"
        else:
            words.append(w)
    lines: list[str] = []
    for line in pack(words, width, sep=" "):
        while len(line) > width:          # one word longer than a line
            lines.append(line[:width])
            line = line[width:]
        lines.append(line)
    return lines


def wrapped(text: str, width: int, style: str = "") -> list[Text]:
    return [plain(line, style=style) for line in wrap_words(escape_text(text), width)]


def stacks_line(stacks: dict[str, Any], exact: bool = False) -> str:
    """--stacks in the table: the stack holding the most now and the one that
    brought the most in, innermost three functions first (docs/stacks.md)."""
    def top(measure: str) -> str:
        entry = next((e for e in stacks.get(measure, ())
                      if e["frames"] and e["frames"][0] != "[unsampled]"), None)
        if entry is None:
            return "-"
        names = [f.split(" (")[0] for f in entry["frames"][:3]]
        more = " < ..." if len(entry["frames"]) > 3 else ""
        return f"{' < '.join(names)}{more} {fmt_bytes(entry['bytes'], exact)} {entry['mapping']}"
    return f"held most: {top('held')}   brought most: {top('brought')}"


class TableReporter(Reporter):
    wants_events = True             # shows the latest syscall records

    def __init__(self, console: Console | None = None, max_rows: int | None = None,
                 options: TableOptions | None = None) -> None:
        # stdout through an OutputStream: a terminal or pipe that stops taking
        # bytes never holds the loop or shutdown (views/output.py)
        self.console = console or Console(file=TextOutput(open_output(None)).as_io())
        self.opts = options or TableOptions()
        if max_rows is not None:
            self.opts.top = max_rows
        self.snaps: dict[int, dict[str, Any]] = {}
        # per pid: the previous snapshot's (ts, rss, faults, rows' (rss, faults))
        self._prev: dict[int, tuple[float, int, int, dict[tuple[Any, ...], tuple[int, int]]]] = {}
        self._deltas: dict[int, tuple[float | None, int | None, float | None,
                                      dict[tuple[Any, ...], tuple[int, int]] | None]] = {}
        self.ended: dict[int, dict[str, Any]] = {}     # exited: run's final frame shows them
        self.recent: deque[SyscallEvent] = deque(maxlen=8)
        self.notes: deque[str] = deque(maxlen=5)
        self.live_mode = self.console.is_terminal
        self._dirty = False
        self.live: Live | None = None
        if self.live_mode:
            self.live = Live(console=self.console, auto_refresh=False, screen=False)
            self.live.start()

    # ---- the reporter interface

    def snapshot(self, snap: dict[str, Any]) -> None:
        pid = snap["pid"]
        old = self._prev.get(pid)
        rows_now = row_figures(select_rows(
            snap, TableOptions(by_library=self.opts.by_library), None, None))
        if old is not None and snap.get("ts") is not None and old[0] != snap["ts"]:
            seconds = snap["ts"] - old[0]
            self._deltas[pid] = (seconds, snap["rss_bytes"] - old[1],
                                 max(0, snap["faults"] - old[2]) / seconds if seconds > 0
                                 else None, old[3])
        elif old is None:
            self._deltas[pid] = (None, None, None, None)
        if snap.get("ts") is not None and (old is None or old[0] != snap["ts"]):
            self._prev[pid] = (snap["ts"], snap["rss_bytes"], snap["faults"], rows_now)
        self.snaps[pid] = snap
        for ev in snap.get("library_events") or ():
            self._note(f"{time.strftime('%H:%M:%S')} {describe_library_event(ev)}")
        self._dirty = True
        if self.live_mode:
            self._render()

    def events(self, events: list[SyscallEvent]) -> None:
        self.recent.extend(events)

    def tick_done(self) -> None:
        if self.live_mode:
            self._render()
        elif self._dirty:
            self._frame()

    def message(self, text: str) -> None:
        self._note(f"{time.strftime('%H:%M:%S')} {text}")
        if self.live_mode:
            self._render()

    def detached(self, pid: int, why: str) -> None:
        """The process leaves the live rows; run's last frame still shows it."""
        if pid in self.snaps:
            self.ended[pid] = self.snaps.pop(pid)
        self._prev.pop(pid, None)
        self._deltas.pop(pid, None)
        self.message(f"pid {pid} {why}")

    def summary(self, summary: dict[str, Any]) -> None:
        """`run`'s summary, as plain text after the live view stops; its last
        frame, with the last snapshot of every process seen, stays above it."""
        from memtrace.views.summary import render_summary

        self.snaps = {**self.ended, **self.snaps}    # the last frame: every process
        if self.live is not None:
            self._render()
            self.live.stop()
            self.live = None
        else:
            self._frame()
        width = min(self.console.size.width, 100)
        for line in render_summary(summary, width).splitlines():
            self.console.print(plain(line), soft_wrap=True)

    def close(self) -> None:
        try:
            if self.live is not None:
                self.live.stop()
            elif self._dirty:
                self._frame()          # the last figures, not drawn yet
        finally:
            if isinstance(self.console.file, TextOutput):
                self.console.file.close()   # drained, bounded in time (views/output.py)

    # ---- drawing

    def _note(self, text: str) -> None:
        if self.live_mode:
            self.notes.append(text)
        else:                          # a pipe: said once, in order, when it happens
            self.console.print(plain(text), soft_wrap=False, overflow="fold")

    def _frame(self) -> None:
        """One plain frame (a pipe or a file): the table, then a blank line."""
        self._dirty = False
        self.console.print(self._group(), Text(""))

    def _render(self) -> None:
        assert self.live is not None
        self._dirty = False
        self.live.update(self._group(), refresh=True)

    def _group(self) -> Group:
        parts: list[Any] = []
        width = self.console.size.width
        if not self.live_mode:         # a pipe: each frame starts with its time
            parts.append(plain(f"-- {time.strftime('%Y-%m-%d %H:%M:%S')}", style="bold"))
        machine = meminfo_summary()
        if machine:
            parts.extend(wrapped(machine, width, style="dim"))
        for snap in self.snaps.values():
            parts.extend(self._process(snap, width))
        if self.recent and self.live_mode:
            parts.append(Text("recent calls:", style="bold"))
            for ev in self.recent:
                parts.append(plain(f"  [{ev.tgid}] {ev.describe()}"))
        if not self.live_mode:
            self.recent.clear()
        for note in self.notes:
            parts.extend(wrapped(note, width, style="dim"))
        return Group(*parts)

    def _rows_per_process(self) -> int:
        if self.opts.top is not None:
            return self.opts.top
        if not self.live_mode and "LINES" not in os.environ:
            return 20                  # a pipe or a file: no height to fit
        height = self.console.size.height
        n = max(1, len(self.snaps))
        return max(3, (height - 14) // n - 6)

    def _head(self, snap: dict[str, Any], width: int) -> list[Text]:
        x = self.opts.exact
        seconds, drss, frate, _ = self._deltas.get(snap["pid"], (None, None, None, None))
        items = [f"rss {fmt_bytes(snap['rss_bytes'], x)}"]
        if drss is not None:
            items[0] += f" (Δ {fmt_delta(drss, x)})"
        items += [f"pss {fmt_bytes(snap.get('pss_bytes'), x)}",
                  f"uss {fmt_bytes(snap.get('uss_bytes'), x)}",
                  f"anon {fmt_bytes(snap['anon_bytes'], x)}",
                  f"file {fmt_bytes(snap['file_bytes'], x)}",
                  f"shmem {fmt_bytes(snap['shmem_bytes'], x)}"]
        if snap.get("swap_bytes"):
            items.append(f"swap {fmt_bytes(snap['swap_bytes'], x)}")
        if snap.get("peak_rss_bytes"):
            items.append(f"peak {fmt_bytes(snap['peak_rss_bytes'], x)}")
        items += [f"virt {fmt_bytes(snap['virtual_bytes'], x)}",
                  f"statm {fmt_bytes(snap['statm_rss_bytes'], x)}",
                  f"drift {fmt_delta(snap['drift_bytes'], x)}",
                  f"faults {snap['faults']}"]
        if frate is not None:
            items.append(f"faults/s {rate(frate)}")
        name = escape_text(f"{snap['pid']} {snap['comm']}")
        lines = pack([name] + items, width)
        out = [Text.assemble(plain(name, style="bold"), plain(lines[0][len(name):]))
               if lines[0].startswith(name) else plain(lines[0])]
        out += [plain(line) for line in lines[1:]]
        heap = snap.get("heap")
        if isinstance(heap, dict) and heap.get("verdict"):
            out.extend(wrapped(f"heap: {heap['verdict']}", width, style="dim"))
        elif isinstance(heap, dict) and heap.get("status") in ("unsupported", "failed"):
            out.extend(wrapped(f"heap: {heap['status']}: {heap.get('reason', '')}", width,
                               style="dim"))
        stacks = snap.get("stacks")
        if isinstance(stacks, dict):
            out.extend(wrapped(stacks_line(stacks, x), width, style="dim"))
        return out

    def _process(self, snap: dict[str, Any], width: int) -> list[Any]:
        parts: list[Any] = self._head(snap, width)
        calls = ", ".join(f"{k} {v}" for k, v in snap["syscalls"].items() if v)
        rescans = ", ".join(f"{k} {v}" for k, v in snap["full_rescans"].items())
        parts.extend(wrapped(f"calls: {calls or '-'}   full rescans: {rescans or '-'}   "
                             f"lost {snap['events_lost']}", width, style="dim"))
        seconds, _, _, previous = self._deltas.get(snap["pid"], (None, None, None, None))
        rows = select_rows(snap, self.opts, previous, seconds)
        limit = self._rows_per_process()
        shown, hidden = rows[:limit], rows[limit:]
        cells = [_cells(r, self.opts.exact) for r in shown]
        widths = {c: max([len(c)] + [len(row[c]) for row in cells]) for c in COLUMNS}
        fit = widths if self.opts.exact else {
            c: max(widths[c], FIT_WIDTHS.get(c, 0)) for c in COLUMNS}
        cols = fit_columns(self.opts.columns, fit, width, widths["path"])
        fixed = sum(widths[c] for c in cols if c != "path") + GAP * (len(cols) - 1)
        path_width = max(4, min(widths["path"], width - fixed))
        table = Table(box=None, pad_edge=False, header_style="bold", padding=(0, GAP, 0, 0),
                      show_edge=False, expand=False)
        for c in cols:
            if c == "path":
                table.add_column(c, justify="left", no_wrap=True, max_width=path_width,
                                 overflow="ellipsis")
            else:
                table.add_column(c, justify="right" if c in NUMERIC else "left", no_wrap=True,
                                 min_width=widths[c], width=widths[c], overflow="fold")
        for row in cells:
            path = row["path"]
            row["path"] = Text(shorten_path(path.plain, path_width), style=path.style)
            table.add_row(*(row[c] for c in cols))
        parts.append(table)
        if hidden:
            parts.append(plain(
                f"… {len(hidden)} more mappings not shown "
                f"({fmt_bytes(sum(r.rss for r in hidden), self.opts.exact)} resident)",
                style="dim"))
        if any(r.pss_stale for r in shown) and "pss" in cols:
            parts.append(plain("dim pss: refreshed before the latest rss change; shown as "
                               "the rss until the next PSS refresh", style="dim"))
        return parts
