"""A flame graph of a stack profile: one self-contained HTML file (inline SVG, a
little inline JavaScript, no network, no external font or script), or the SVG
alone, which renders without any script.

Layout (Brendan Gregg's): the root `all` at the bottom, callers below callees,
each frame as wide as its bytes of the chosen measure ("held" or "brought");
siblings sorted by name; frames narrower than MIN_WIDTH pixels are left out
(with their callees), and beyond MAX_FRAMES frames the narrowest ones (the
subtitle says how many and below which width). With by_mapping, the row above `all` is the mappings
(`[heap]`, `[anon]`, ...). Colours tell the kind of module: the program (red to
orange), libraries (blue-green), kernel/vdso/unknown (grey), `[truncated]`
(purple), mappings (green), Python (yellow) and JIT code (cyan) where there are;
the shade within a kind comes from the name, so a frame has the same colour in
every graph. Frame text is cut to fit (`..`).

Without script: each frame's tooltip (SVG <title>) gives function, module,
bytes and share of the total; hovering outlines a frame (CSS). With script
(HTML): click a frame to zoom to it (its callers stay, dimmed), "Reset zoom";
the search box (a regular expression) paints matching frames magenta and
shows their share; the line at the bottom shows the frame under the pointer.
URL parameters `?s=REGEX` and `?x=FRAME_ID` search and zoom on load. When the
script has run, the <html> element carries data-flamegraph="ready".
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from html import escape

from memtrace.stacks.profile import StackProfile
from memtrace.util.units import fmt_bytes
from memtrace.views.flamegraph_script import SCRIPT, STYLE
from memtrace.views.stackframes import Node, check_measure, clean, paths, total

WIDTH = 1200          # px, the whole image
PAD = 10              # px, left and right margins
ROW = 16              # px per stack level
FONT = 12             # px, frame text
CHAR = 0.62           # width of a character in FONT units (Verdana, DejaVu Sans: to cut text)
TOP = 80              # px above the deepest row: title, subtitle, legend
BOTTOM = 30           # px below `all`: the details line
MIN_WIDTH = 0.1       # px, narrower frames are left out
MAX_FRAMES = 30_000   # beyond, the narrowest are left out too (a browser stays quick)
MEASURE_TITLE = {"held": "held now", "brought": "brought in since attach"}
# what a graph shows: resident bytes (--stacks) or sampled allocations (--malloc,
# where "held" is the bytes still outstanding and "brought" those allocated)
KINDS = {"resident": ("Resident bytes by call stack", MEASURE_TITLE),
         "malloc": ("Allocations by call stack",
                    {"held": "outstanding now", "brought": "allocated since attach"})}

PALETTES: dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] = {
    # kind: (red, green, blue) as (base, spread); the shade comes from the name
    "program": ((215, 40), (70, 120), (30, 35)),
    "library": ((50, 60), (160, 50), (195, 45)),
    "kernel": ((165, 40), (165, 40), (165, 40)),
    "truncated": ((150, 30), (100, 25), (215, 35)),
    "python": ((215, 30), (185, 40), (40, 40)),
    "jit": ((40, 40), (185, 40), (185, 40)),
    "mapping": ((70, 50), (175, 45), (70, 45)),
    "root": ((215, 0), (215, 0), (205, 0)),
}
LEGEND = (("program", "program"), ("library", "libraries"), ("kernel", "kernel, unknown"),
          ("truncated", "[truncated]"), ("mapping", "mapping"), ("python", "Python"),
          ("jit", "JIT (perf map)"))
OPTIONAL = frozenset({"python", "jit"})      # in the legend only when the graph has such frames


@dataclass
class _Tree:
    node: Node
    value: int = 0
    children: dict[tuple[str, str, str], _Tree] = field(default_factory=dict)


@dataclass(frozen=True)
class DrawnFrame:
    """One drawn frame: where it is and what it says (also what the tests read)."""

    id: str
    node: Node
    value: int
    depth: int
    x: float
    width: float


def colour(node: Node) -> str:
    """The fill of a frame: its kind's palette, the shade from its name (stable)."""
    palette = PALETTES.get(node.cls, PALETTES["kernel"])
    h = zlib.crc32(node.text.encode("utf-8", "surrogatepass"))
    shades = (h & 0xFF, (h >> 8) & 0xFF, (h >> 16) & 0xFF)
    if node.cls in ("kernel", "root"):
        shades = (shades[0],) * 3                     # greys stay grey
    r, g, b = (base + spread * s // 255 for (base, spread), s in zip(palette, shades))
    return f"rgb({r},{g},{b})"


def build_tree(profile: StackProfile, measure: str, by_mapping: bool = True) -> _Tree:
    root = _Tree(Node("all", "all", "", "root"))
    for nodes, _sample, n in paths(profile, measure, by_mapping):
        root.value += n
        here = root
        for node in nodes:
            key = (node.text, node.module, node.cls)
            here = here.children.setdefault(key, _Tree(node))
            here.value += n
    return root


def layout(root: _Tree, width: float = WIDTH - 2 * PAD) -> list[DrawnFrame]:
    """Every frame wide enough to draw, root first; x from the left margin."""
    frames: list[DrawnFrame] = []
    if root.value <= 0:
        return frames
    scale = width / root.value
    todo: list[tuple[_Tree, int, float]] = [(root, 0, PAD)]
    while todo:
        tree, depth, x = todo.pop()
        w = tree.value * scale
        if w < MIN_WIDTH:
            continue
        frames.append(DrawnFrame(f"f{len(frames)}", tree.node, tree.value, depth, x, w))
        cx = x
        kids = sorted(tree.children.values(), key=lambda t: (t.node.text, t.node.module))
        placed = []
        for kid in kids:
            placed.append((kid, depth + 1, cx))
            cx += kid.value * scale
        todo.extend(reversed(placed))
    return frames


def fit(text: str, width: float) -> str:
    """The text cut to fit a frame of this width ("" when not even 3 characters fit)."""
    chars = int((width - 6) / (FONT * CHAR))
    if chars < 3:
        return ""
    return text if len(text) <= chars else text[: chars - 2] + ".."


def _x(text: str) -> str:
    """Text for XML: escaped, without the characters XML 1.0 forbids."""
    text = "".join(c if c not in "\ufffe\uffff" else f"\\u{ord(c):04x}" for c in text)
    return escape(text, quote=True)


def _tooltip(f: DrawnFrame, whole: int, measure: str, kind: str) -> str:
    share = 100.0 * f.value / whole if whole else 0.0
    where = {"mapping": "mapping", "root": ""}.get(f.node.cls, "module")
    lines = [f.node.function if f.node.cls not in ("mapping", "root") else f.node.text]
    if where and f.node.module:
        lines.append(f"{where}: {f.node.module}")
    lines.append(f"{fmt_bytes(f.value)} ({f.value} bytes), {share:.2f}% of "
                 f"{KINDS[kind][1][measure]}")
    return "\n".join(lines)


def _frame_svg(f: DrawnFrame, height: int, whole: int, measure: str, kind: str) -> str:
    y = height - BOTTOM - (f.depth + 1) * ROW
    return (f'<g class="f" id="{f.id}" data-n="{_x(f.node.text)}" data-m="{_x(f.node.module)}"'
            f' data-c="{f.node.cls}" data-v="{f.value}" data-d="{f.depth}">'
            f"<title>{_x(_tooltip(f, whole, measure, kind))}</title>"
            f'<rect x="{f.x:.3f}" y="{y}" width="{f.width:.3f}" height="{ROW - 1}"'
            f' rx="2" ry="2" fill="{colour(f.node)}"/>'
            f'<text x="{f.x + 3:.3f}" y="{y + ROW - 4.5}">{_x(fit(f.node.text, f.width))}</text>'
            "</g>")


def _legend(y: int, classes: set[str]) -> Iterator[str]:
    """One square per kind of module, in its palette's middle shade."""
    x = float(PAD)
    for cls, label in LEGEND:
        if cls in OPTIONAL and cls not in classes:
            continue
        (r, rs), (g, gs), (b, bs) = PALETTES[cls]
        yield (f'<rect class="legend" x="{x:.1f}" y="{y - 10}" width="11" height="11"'
               f' fill="rgb({r + rs // 2},{g + gs // 2},{b + bs // 2})"/>'
               f'<text x="{x + 15:.1f}" y="{y}">{_x(label)}</text>')
        x += len(label) * FONT * CHAR + 26


def svg_document(profile: StackProfile, measure: str = "held", by_mapping: bool = True,
                 standalone: bool = True, kind: str = "resident") -> str:
    """The flame graph's <svg> element (with an XML declaration when standalone)."""
    check_measure(measure)
    frames = layout(build_tree(profile, measure, by_mapping))
    dropped, cut = 0, 0.0
    if len(frames) > MAX_FRAMES:        # a callee is never wider than its caller:
        cut = sorted((f.width for f in frames), reverse=True)[MAX_FRAMES]  # the tree holds
        kept = [f for f in frames if f.width > cut]
        dropped, frames = len(frames) - len(kept), kept
    whole = total(profile, measure)
    depth = max((f.depth for f in frames), default=0)
    height = TOP + (depth + 1) * ROW + BOTTOM
    heading, measures = KINDS[kind]
    title = f"{heading}: {measures[measure]}"
    sub = (f"pid {profile.pid} ({clean(profile.comm)}), total {fmt_bytes(whole)}"
           f" ({whole} bytes); {len(profile.samples)} stacks")
    if profile.sample_period_bytes:
        sub += f", one sample per {fmt_bytes(profile.sample_period_bytes)} on average"
        if profile.sample_period_max_bytes > profile.sample_period_bytes:
            sub += (f" (up to {fmt_bytes(profile.sample_period_max_bytes)} while the rate cap "
                    "held the samples down)")
    if profile.samples_lost:
        sub += f", {profile.samples_lost} samples lost"
    if dropped:
        sub += f"; {dropped} frames narrower than {cut:.2f} px left out"
    if not frames:
        sub += "; no bytes to show"
    out = ['<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n' if standalone else "",
           f'<svg xmlns="http://www.w3.org/2000/svg" id="flamegraph" version="1.1"'
           f' width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}"'
           f' data-width="{WIDTH}" data-pad="{PAD}" data-font="{FONT}" data-char="{CHAR}"'
           f' data-total="{whole}"'
           f' data-measure="{measure}">',
           f"<style>{STYLE}</style>",
           f'<rect class="bg" x="0" y="0" width="{WIDTH}" height="{height}" fill="#f8f8f4"/>',
           f'<text id="title" x="{WIDTH // 2}" y="24" text-anchor="middle">{_x(title)}</text>',
           f'<text id="subtitle" x="{PAD}" y="46">{_x(sub)}</text>',
           *_legend(TOP - 12, {f.node.cls for f in frames}),
           f'<text id="unzoom" x="{PAD}" y="24" visibility="hidden">Reset zoom'
           "</text>",
           f'<text id="matched" x="{WIDTH - PAD}" y="{height - 10}"'
           ' text-anchor="end"> </text>',
           f'<text id="details" x="{PAD}" y="{height - 10}"> </text>',
           '<g id="frames">',
           *(_frame_svg(f, height, whole, measure, kind) for f in frames),
           "</g></svg>\n"]
    return "".join(out)


def render_svg(profile: StackProfile, measure: str = "held", by_mapping: bool = True,
               kind: str = "resident") -> str:
    """The flame graph as one SVG file (no script: tooltips and hover only)."""
    return svg_document(profile, measure, by_mapping, standalone=True, kind=kind)


def render_html(profile: StackProfile, measure: str = "held", by_mapping: bool = True,
                kind: str = "resident") -> str:
    """The flame graph as one self-contained HTML file (zoom, search, details)."""
    svg = svg_document(profile, measure, by_mapping, standalone=False, kind=kind)
    title = (f"memtrace: pid {profile.pid} ({clean(profile.comm)}), "
             f"{KINDS[kind][1][check_measure(measure)]}")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        # nothing may be fetched: the file is the whole graph
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\';'
        " script-src 'unsafe-inline'; style-src 'unsafe-inline'\">\n"
        f"<title>{_x(title)}</title>\n"
        "<style>body{margin:0;background:#f8f8f4}"
        "#search{position:absolute;top:6px;right:10px;width:220px;font-size:12px}</style>\n"
        '</head><body>\n<input id="search" type="search" placeholder="search (regular expression)"'
        ' aria-label="search">\n'
        f"{svg}<script>\n{SCRIPT}</script>\n</body></html>\n")


def render_flamegraph(profile: StackProfile, measure: str = "held", fmt: str = "html",
                      by_mapping: bool = True, kind: str = "resident") -> str:
    """The flame graph as "html" or "svg" (`kind`: see KINDS)."""
    if fmt == "svg":
        return render_svg(profile, measure, by_mapping, kind)
    if fmt == "html":
        return render_html(profile, measure, by_mapping, kind)
    raise ValueError(f"format must be html or svg, not {fmt!r}")
