"""The report as one self-contained HTML page (docs/report.md): the report's
object (build.py) embedded as JSON, drawn by an inline script
(page_script.py); tables written here, so they read without the script; the
flame graph at each process's peak (memtrace.views.flamegraph) in an inline
frame. Nothing is fetched: a Content-Security-Policy forbids it.

The page is a list of sections, each a function of the report that returns
HTML (`SECTIONS`); `render_html(report, extra=...)` appends more (a diff
against a baseline, for one), so other reports can be added without touching
these."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from html import escape
from typing import Any

from memtrace.reports.page_script import SCRIPT, STYLE
from memtrace.reports.stackview import profile_of
from memtrace.util.units import fmt_bytes, fmt_delta
from memtrace.views import flamegraph

Section = Callable[[dict[str, Any]], str]

CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src data: blob:; frame-src 'self' about: data:")


def _e(text: Any) -> str:
    return escape(str(text), quote=True)


def _when(ts: float | None, day: bool = False) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S" if day else "%H:%M:%S", time.localtime(ts))


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else (
        f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{seconds:.1f}s")


def _b(n: int | None) -> str:
    return f'<td data-bytes="{n}">{_e(fmt_bytes(n))}</td>' if n is not None else "<td>-</td>"


def _d(n: int) -> str:
    cls = "up" if n > 0 else "down" if n < 0 else ""
    return f'<td class="{cls}" data-bytes="{n}">{_e(fmt_delta(n)) if n else "0"}</td>'


def table(head: Sequence[str], rows: Iterable[str], left: int = 1, cls: str = "") -> str:
    """An HTML table; the first `left` columns are text (left-aligned)."""
    ths = "".join(f'<th class="l">{_e(h)}</th>' if i < left else f"<th>{_e(h)}</th>"
                  for i, h in enumerate(head))
    body = "".join(rows)
    if not body:
        return '<p class="muted">none</p>'
    return f'<table class="{cls}"><thead><tr>{ths}</tr></thead><tbody>{body}</tbody></table>'


# -- sections --------------------------------------------------------------------

def header_section(report: dict[str, Any]) -> str:
    rec = report["recording"]
    cmd = " ".join(rec.get("command") or []) or ", ".join(
        f"{p['comm']} ({p['pid']})" for p in report["processes"][:6])
    span = ((rec["last_ts"] or 0) - (rec["first_ts"] or 0)) if rec["first_ts"] else 0
    meta = (f"{_e(rec.get('mode') or '?')} on {_e(rec.get('hostname') or '?')} (kernel "
            f"{_e(rec.get('kernel') or '?')}), from {_e(_when(rec['first_ts'], True))} for "
            f"{_e(_duration(span))}; {rec['snapshots']} snapshots of "
            f"{len(report['processes'])} process(es), every "
            f"{_e(rec.get('interval_seconds'))} s; {_e(report['generated_by'])}")
    run = rec.get("run_summary") or {}
    if run.get("exit_status") is not None:
        meta += (f"<br>the command exited with status {_e(run['exit_status'])} after "
                 f"{_e(_duration(float(run.get('duration_seconds') or 0)))}")
    return (f"<header><h1>memtrace report: {_e(cmd)}</h1>"
            f'<div class="meta">{meta}<br>{_e(rec["path"])}</div></header>')


def banner_section(report: dict[str, Any]) -> str:
    rec = report["recording"]
    out = []
    if rec.get("problem"):
        cls = "banner" if rec.get("corrupt") else "banner warn"
        what = ("The recording is corrupt: this report shows what was read before the "
                "corrupt line." if rec.get("corrupt") else
                "The recording was not closed: this report shows what was written up to "
                "the end of the file.")
        out.append(f'<div class="{cls}" id="problem">{_e(what)} {_e(rec["problem"])}</div>')
    if rec.get("dropped"):
        out.append(f'<div class="banner warn">{rec["dropped"]} snapshot(s) could not be '
                   "written in time and are missing (the next one of the process is whole)."
                   "</div>")
    if not report["processes"]:
        out.append('<div class="banner">The recording holds no snapshot.</div>')
    return "".join(out)


def selector_section(report: dict[str, Any]) -> str:
    procs = report["processes"]
    opts = []
    if len(procs) != 1:
        opts.append('<option value="total">all processes (total)</option>')
    opts += [f'<option value="{_e(p["key"])}">{_e(p["comm"])} (pid {p["pid"]}), peak '
             f'{_e(fmt_bytes(p["peak"]["rss_bytes"]))}</option>' for p in procs]
    return ('<div class="bar"><label for="view"><b>Show</b></label>'
            f'<select id="view">{"".join(opts)}</select></div>')


def _measure_tools(key: str, png: bool = True) -> str:
    buttons = "".join(f'<button data-measure="{m}">{m.upper()}</button>'
                      for m in ("rss", "pss", "uss"))
    export = (f'<button class="png" data-key="{_e(key)}" title="Save this chart as a PNG '
              'image">Save PNG</button>' if png else "")
    return (f'<div class="tools">{buttons}{export}<span class="note">hover for the figures '
            "at a time; dashed lines: libraries loaded (green) or unloaded (purple)"
            "</span></div>")


def total_section(report: dict[str, Any]) -> str:
    t = report["total"]
    if len(report["processes"]) == 1:
        return ""
    rows = [f'<tr><td class="l">{_e(p["comm"])}</td><td>{p["pid"]}</td>'
            f'<td>{_e(_when(p["first_ts"]))}</td><td>{_e(_when(p["last_ts"]))}</td>'
            f'{_b(p["start_bytes"])}{_b(p["peak_bytes"])}<td>{_e(_when(p["peak_ts"]))}</td>'
            f'{_b(p["end_bytes"])}{_d(p["end_bytes"] - p["start_bytes"])}</tr>'
            for p in sorted(t["processes"], key=lambda p: -(p["peak_bytes"] or 0))]
    peak = t["peak"]
    return (
        '<section class="proc" id="proc-total"><h2>All processes</h2>'
        f'<div class="facts">{_fact(fmt_bytes(peak["rss_bytes"]), "peak RSS, summed")}'
        f'{_fact(_when(peak["ts"]), "at")}{_fact(peak["processes"], "processes then")}</div>'
        f'<div class="card">{_measure_tools("total")}'
        '<div class="chart" id="mem-total"></div></div>'
        "<h3>Processes</h3>"
        + table(["process", "pid", "first", "last", "start", "peak", "peak at", "end",
                 "change"], rows) + "</section>")


def _fact(value: Any, label: str) -> str:
    return f'<div class="fact"><b>{_e(value)}</b><span>{_e(label)}</span></div>'


def process_section(p: dict[str, Any]) -> str:
    key, peak = p["key"], p["peak"]
    at = peak["at_peak"]
    facts = "".join([
        _fact(fmt_bytes(peak["rss_bytes"]), "peak RSS"),
        _fact(_when(peak["ts"]), "at"),
        _fact(fmt_bytes(at.get("pss_bytes")), "PSS then"),
        _fact(fmt_bytes(at.get("uss_bytes")), "USS then"),
        _fact(fmt_bytes(p["totals"]["rss"][-1] if p["totals"]["rss"] else None), "RSS at end"),
        _fact(fmt_bytes(at.get("peak_rss_bytes")), "kernel VmHWM at the peak"),
        _fact(_duration(p["last_ts"] - p["first_ts"]), f'{p["snapshots"]} snapshots'),
    ])
    down = (f' <span class="muted">({p["snapshots"]} snapshots drawn as {p["points"]} points: '
            "the lowest and highest of each stretch, the peak exact)</span>"
            if p["downsampled"] else "")
    parts = [
        f'<section class="proc" id="proc-{_e(key)}"><h2>{_e(p["comm"])} (pid {p["pid"]})</h2>',
        f'<div class="facts">{facts}</div>',
        f'<div class="card">{_measure_tools(key)}<div class="chart" id="mem-{_e(key)}"></div>'
        f"{down}</div>",
        heap_part(p), growth_part(p), peak_part(p), libraries_part(p), events_part(p),
        flame_part(p), "</section>"]
    return "".join(parts)


def processes_section(report: dict[str, Any]) -> str:
    return "".join(process_section(p) for p in report["processes"])


def heap_part(p: dict[str, Any]) -> str:
    h = p["heap"]
    out = ["<h3>glibc malloc heap</h3>"]
    if h.get("verdict_at_peak"):
        out.append(f'<div class="verdict"><b>At the peak</b> (heap walk of '
                   f'{_e(_when(h.get("verdict_ts")))}): {_e(h["verdict_at_peak"])}</div>')
    if h["ts"]:
        out.append(f'<div class="card"><div class="chart" id="heap-{_e(p["key"])}"></div>'
                   '<span class="muted">in use: allocated chunks; kept: free chunks still '
                   "resident that malloc_trim would not return; trimmable: what "
                   "malloc_trim(0) would return (docs/heap.md)</span></div>")
    elif h.get("status") in (None, "pending"):
        out.append('<p class="muted">No heap walk finished in this recording '
                   "(--heap-interval 0, or the recording is shorter than its interval).</p>")
    else:
        out.append(f'<p class="muted">No heap figures: {_e(h.get("status"))}'
                   f'{": " + _e(h["reason"]) if h.get("reason") else ""}</p>')
    return "".join(out)


def growth_part(p: dict[str, Any]) -> str:
    rows = [f'<tr><td class="l">{_e(g["mapping"])}</td><td class="l">{_e(g["kind"])}</td>'
            f'{_b(g["start_bytes"])}{_b(g["peak_bytes"])}<td>{_e(_when(g["peak_ts"]))}</td>'
            f'{_b(g["end_bytes"])}{_d(g["peak_bytes"] - g["start_bytes"])}'
            f'{_d(g["growth_bytes"])}</tr>' for g in p["growth"]]
    return ("<h3>What grew most</h3>" + table(
        ["mapping", "kind", "start", "peak", "peak at", "end", "peak - start", "end - start"],
        rows, left=2))


def peak_part(p: dict[str, Any]) -> str:
    rows = [f'<tr><td class="l">{_e(m["mapping"])}</td><td class="l">{_e(m["kind"])}</td>'
            f'<td>{m["vmas"]}</td>{_b(m["rss_bytes"])}{_b(m["pss_bytes"])}'
            f'{_b(m["uss_bytes"])}{_b(m["anon_bytes"])}{_b(m["file_bytes"])}'
            f'{_b(m["shmem_bytes"])}{_b(m["swap_bytes"])}</tr>'
            for m in p["peak"]["top_mappings"]]
    return (f'<h3>At the peak, {_e(_when(p["peak"]["ts"]))}: the largest mappings</h3>'
            + table(["mapping", "kind", "VMAs", "rss", "pss", "uss", "anon", "file", "shmem",
                     "swap"], rows, left=2))


SEGMENTS = ("text", "rodata", "relro", "data", "bss")


def libraries_part(p: dict[str, Any], top: int = 40) -> str:
    rows = []
    for lib in p["libraries"][:top]:
        at = lib.get("at_peak") or {}
        segs = at.get("segments") or {}
        rows.append(f'<tr><td class="l" title="{_e(lib["mapping"])}">'
                    f'{_e(_basename(lib["mapping"]))}</td>{_b(lib["start_bytes"])}'
                    f'{_b(lib["peak_bytes"])}{_b(lib["end_bytes"])}{_b(at.get("rss_bytes"))}'
                    f'{_b(at.get("pss_bytes"))}{_b(at.get("uss_bytes"))}'
                    + "".join(_b(segs.get(s, 0)) for s in SEGMENTS)
                    + f'<td>{lib["loads"]}</td><td>{lib["unloads"]}</td></tr>')
    more = len(p["libraries"]) - top
    note = f'<p class="muted">{more} more not shown (all are in --format json)</p>' \
        if more > 0 else ""
    return ("<h3>Libraries and the executable</h3>" + table(
        ["library", "start", "peak", "end", "rss at peak", "pss", "uss", *SEGMENTS, "loads",
         "unloads"], rows) + note)


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] or path


def events_part(p: dict[str, Any]) -> str:
    events = p["library_events"]
    if not events:
        return ""
    rows = [f'<tr><td>{_e(_when(e["ts"]))}</td><td class="l">'
            f'{"load" if e["event"] == "library_load" else "unload"}</td>'
            f'<td class="l">{_e(e["mapping"])}</td>{_b(e.get("rss_bytes"))}'
            f'{_b(e.get("mapped_bytes"))}</tr>' for e in events]
    return ("<h3>Libraries loaded and unloaded</h3>"
            + table(["time", "event", "library", "rss", "mapped"], rows, left=0))


def flame_part(p: dict[str, Any]) -> str:
    stacks = p.get("stacks")
    if not stacks:
        return ('<h3>Flame graph at the peak</h3><p class="muted">No stacks in this recording '
                "(record with --stacks).</p>")
    doc = flamegraph.render_html(profile_of(p["pid"], p["comm"], stacks), "held")
    m = re.search(r'<svg[^>]* height="(\d+)"', doc)
    height = int(m.group(1)) + 20 if m else 600
    return (f'<h3>Flame graph at the peak, {_e(_when(stacks.get("ts")))}: resident bytes by '
            f'the stack that made them resident</h3><p class="muted">{_e(stacks["source"])}; '
            "click a frame to zoom, search by regular expression</p>"
            f'<iframe class="flame" id="flame-{_e(p["key"])}" height="{height}" '
            f'title="flame graph" srcdoc="{_e(doc)}"></iframe>')


def messages_section(report: dict[str, Any]) -> str:
    rec = report["recording"]
    msgs = rec["messages"]
    if not msgs:
        return ""
    rows = [f'<tr><td>{_e(_when(m["ts"]))}</td><td class="l">{_e(m["text"])}</td></tr>'
            for m in msgs]
    more = rec["messages_total"] - len(msgs)
    return ("<h2>Messages</h2>" + table(["time", "message"], rows, left=0)
            + (f'<p class="muted">{more} more</p>' if more > 0 else ""))


SECTIONS: list[Section] = [banner_section, selector_section, total_section,
                           processes_section, messages_section]


def render_html(report: dict[str, Any], extra: Sequence[Section] = ()) -> str:
    """The whole page; `extra` sections come after the built-in ones."""
    body = "".join(section(report) for section in (*SECTIONS, *extra))
    # no "<" at all in the data: nothing in it can end or restart its <script>
    data = json.dumps(report, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    title = f"memtrace report: {', '.join(p['comm'] for p in report['processes'][:4])}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head><body>\n"
        f"{header_section(report)}<main>{body}</main>\n"
        '<div id="tip"></div><pre id="summary"></pre>\n'
        f'<script type="application/json" id="report-data">{data}</script>\n'
        f"<script>\n{SCRIPT}</script>\n</body></html>\n")
