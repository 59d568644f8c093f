"""The diff of two runs as an HTML fragment the report can embed (issue 14):
one <section>, its own scoped CSS, no script, nothing fetched. Side by side:
run a and run b at their peaks and ends, and per mapping, library, stack and
process the two peaks drawn as bars on one scale."""

from __future__ import annotations

import html
import os

from memtrace.reports.diff import DiffRow, RunDiff, RunSide
from memtrace.util.units import fmt_bytes, fmt_delta

ROWS = 25               # rows per table (the JSON diff has them all)

_CSS = """
.mt-diff{font:13px/1.35 system-ui,sans-serif;color:#222}
.mt-diff h3{font-size:15px;margin:14px 0 6px}
.mt-diff table{border-collapse:collapse;width:100%;margin-bottom:10px}
.mt-diff th,.mt-diff td{padding:2px 6px;border-bottom:1px solid #eee;text-align:right;
 white-space:nowrap}
.mt-diff th:first-child,.mt-diff td:first-child{text-align:left;white-space:normal;
 word-break:break-all;max-width:420px}
.mt-diff .bars{width:180px}
.mt-diff .bar{height:6px;margin:1px 0;border-radius:2px}
.mt-diff .a{background:#8aa9d6}.mt-diff .b{background:#e39a5a}
.mt-diff .up{color:#b3261e}.mt-diff .down{color:#1e7b34}
.mt-diff .legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _delta(n: int) -> str:
    cls = "up" if n > 0 else "down" if n < 0 else ""
    return f'<td class="{cls}">{_e(fmt_delta(n))}</td>'


def _bars(a: int, b: int, scale: int) -> str:
    def bar(v: int, cls: str) -> str:
        width = 0.0 if scale <= 0 else 100.0 * v / scale
        return f'<div class="bar {cls}" style="width:{width:.1f}%"></div>'
    return f'<td class="bars">{bar(a, "a")}{bar(b, "b")}</td>'


def _runs(d: RunDiff) -> str:
    def row(label: str, s: RunSide) -> str:
        pss = fmt_bytes(s.peak_pss) if s.peak_pss is not None else "-"
        cmd = " ".join(s.command) if s.command else os.path.basename(s.path)
        return (f"<tr><td>{_e(label)}: {_e(cmd)}</td><td>{_e(fmt_bytes(s.peak_rss))}</td>"
                f"<td>+{s.peak_offset:.1f} s</td><td>{_e(pss)}</td>"
                f"<td>{_e(fmt_bytes(s.end_rss))}</td><td>{s.duration:.1f} s</td></tr>")
    change = (f"<tr><td>change (b - a)</td>{_delta(d.b.peak_rss - d.a.peak_rss)}<td></td>"
              f"<td></td>{_delta(d.b.end_rss - d.a.end_rss)}<td></td></tr>")
    return ("<table><tr><th>run</th><th>peak RSS</th><th>at</th><th>peak PSS</th>"
            f"<th>end RSS</th><th>duration</th></tr>{row('a', d.a)}{row('b', d.b)}"
            f"{change}</table>")


def _table(title: str, rows: list[DiffRow], peak_only: bool = False) -> str:
    if not rows:
        return ""
    shown = rows[:ROWS]
    scale = max(max(r.a_peak, r.b_peak) for r in shown)
    head = ("<tr><th>name</th><th>kind</th><th>peak a</th><th>peak b</th><th>Δ peak</th>"
            + ("" if peak_only else "<th>Δ end</th>") + "<th>a / b at peak</th></tr>")
    body = []
    for r in shown:
        end = "" if peak_only else _delta(r.delta_end)
        body.append(f"<tr><td>{_e(r.name)}</td><td>{_e(r.kind)}</td>"
                    f"<td>{_e(fmt_bytes(r.a_peak))}</td><td>{_e(fmt_bytes(r.b_peak))}</td>"
                    f"{_delta(r.delta_peak)}{end}{_bars(r.a_peak, r.b_peak, scale)}</tr>")
    more = (f"<p>{len(rows) - ROWS} more rows in <code>memtrace diff --format json</code>.</p>"
            if len(rows) > ROWS else "")
    return f"<h3>{_e(title)}</h3><table>{head}{''.join(body)}</table>{more}"


def render_diff_section(diff: RunDiff) -> str:
    """The diff as one self-contained <section class="mt-diff"> (no script, no
    network): embed it in a page as it is."""
    parts = [
        f'<section class="mt-diff"><style>{_CSS}</style>',
        "<h3>Run a vs run b</h3>",
        '<p class="legend">Peaks are each run\'s own (the tick of its largest tree RSS); '
        'ends are each run\'s last tick.<span class="a"></span>a<span class="b"></span>b</p>',
        _runs(diff),
        _table("Mappings (by identity and kind)", diff.mappings),
        _table("Libraries", diff.libraries),
        _table("Stacks held (leaf first)", diff.stacks),
        _table("Processes (by name, own peak)", diff.processes, peak_only=True),
    ]
    if not (diff.mappings or diff.libraries or diff.stacks or diff.processes):
        parts.append("<p>No mapping, library, stack or process changed.</p>")
    parts.append("</section>")
    return "".join(parts)

