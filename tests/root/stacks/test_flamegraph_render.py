"""The flame graph drawn by a browser: headless Chromium (Debian's `chromium`,
installed by scripts/setup.sh) renders memtrace's HTML flame graph of a
hand-built profile (tests/stackprofiles.py: alloc_big brought in 64 MiB,
alloc_small 16 MiB); the screenshot is decoded and the two paths' frames are
found in their own colours, where the SVG puts them, 4:1 in width. After the
script ran, the DOM says so (data-flamegraph="ready"), and its zoom and search,
asked for in the URL, change what is drawn.

Needs Chromium, not BPF; marked root with the rest of tests/root. Skipped, with
the reason, where Chromium is not installed."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import Any

import pytest

from memtrace.views import flamegraph
from tests.stackprofiles import two_paths

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.root,
              pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not found "
                                 "(Debian package chromium, installed by scripts/setup.sh)")]
SVG = "{http://www.w3.org/2000/svg}"
WINDOW = (1200, 800)
TIMEOUT = 90 * float(os.environ.get("MT_TIMEOUT_SCALE") or 1)
HIT = (230, 0, 230)            # the search's colour (flamegraph_script.py)


# -- PNG, decoded with zlib (8-bit RGB or RGBA, not interlaced: what Chromium writes) --

def read_png(path: Path) -> tuple[int, int, list[bytes], int]:
    """Width, height, the rows (filters undone) and bytes per pixel."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, head = 8, b"", b""
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + size]
        pos += 12 + size
        if kind == b"IHDR":
            head = body
        elif kind == b"IDAT":
            idat += body
    width, height, depth, ctype, _c, _f, interlace = struct.unpack(">IIBBBBB", head)
    assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
    bpp = 4 if ctype == 6 else 3
    raw, stride, rows = zlib.decompress(idat), width * bpp, []
    prev = bytearray(stride)
    for y in range(height):
        at = y * (stride + 1)
        ftype, line = raw[at], bytearray(raw[at + 1:at + 1 + stride])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + b) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, rows, bpp


class Screenshot:
    def __init__(self, path: Path) -> None:
        self.width, self.height, self.rows, self.bpp = read_png(path)

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        i = x * self.bpp
        r, g, b = self.rows[y][i:i + 3]
        return r, g, b

    def run(self, y: int, x0: float, x1: float, colour: tuple[int, int, int]) -> float:
        """The share of pixels of row y between x0 and x1 that have this colour."""
        xs = range(int(x0), int(x1))
        return sum(_near(self.pixel(x, y), colour) for x in xs) / max(len(xs), 1)

    def span(self, y: int, colour: tuple[int, int, int]) -> tuple[int, int]:
        """First and last x of row y in this colour."""
        xs = [x for x in range(self.width) if _near(self.pixel(x, y), colour)]
        assert xs, f"colour {colour} not on row {y}"
        return xs[0], xs[-1]

    def count(self, colour: tuple[int, int, int], y0: int, y1: int) -> int:
        return sum(_near(self.pixel(x, y), colour)
                   for y in range(max(y0, 0), min(y1, self.height)) for x in range(self.width))


def _near(a: tuple[int, int, int], b: tuple[int, int, int], tol: int = 3) -> bool:
    return all(abs(p - q) <= tol for p, q in zip(a, b))


def _rgb(fill: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"rgb\((\d+),(\d+),(\d+)\)", fill)
    assert m, fill
    return int(m[1]), int(m[2]), int(m[3])


# -- Chromium ---------------------------------------------------------------------

def chromium(tmp_path: Path, *args: str) -> str:
    cmd = [str(CHROMIUM), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
           "--force-device-scale-factor=1", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def screenshot(tmp_path: Path, url: str, name: str) -> Screenshot:
    png = tmp_path / name
    chromium(tmp_path, f"--screenshot={png}", f"--window-size={WINDOW[0]},{WINDOW[1]}", url)
    assert png.exists(), f"Chromium wrote no screenshot for {url}"
    return Screenshot(png)


@pytest.fixture
def page(tmp_path: Path) -> dict[str, Any]:
    """The HTML flame graph of two_paths() ("brought": both paths) and its frames."""
    html = flamegraph.render_html(two_paths(), "brought")
    path = tmp_path / "flamegraph.html"
    path.write_text(html)
    svg = ET.fromstring(html[html.index("<svg"):html.index("</svg>") + 6])
    frames = []
    for g in svg.iter(f"{SVG}g"):
        if g.get("class") == "f":
            r = g.find(f"{SVG}rect")
            assert r is not None
            frames.append({"name": g.get("data-n"), "id": g.get("id"),
                           "x": float(r.get("x") or 0), "y": int(r.get("y") or 0),
                           "w": float(r.get("width") or 0), "fill": _rgb(r.get("fill") or "")})
    return {"url": path.as_uri(), "all": frames,
            "frames": {f["name"]: f for f in frames}}   # names drawn once (alloc_big, ...)


def test_the_two_paths_are_drawn_in_their_colours_and_proportions(tmp_path, page):
    shot = screenshot(tmp_path, page["url"], "flamegraph.png")
    assert (shot.width, shot.height) == WINDOW
    big, small = page["frames"]["alloc_big"], page["frames"]["alloc_small"]
    memset = next(f for f in page["all"] if f["name"] == "memset" and f["x"] == big["x"])
    assert big["y"] == small["y"] and big["fill"] != small["fill"]
    for f in (big, small):
        y = f["y"] + 1                       # above the text of the frame
        assert shot.run(y, f["x"] + 3, f["x"] + f["w"] - 3, f["fill"]) >= 0.98
        left, right = shot.span(y, f["fill"])
        assert abs(left - f["x"]) <= 2 and abs(right + 1 - (f["x"] + f["w"])) <= 2
        f["drawn"] = right + 1 - left
    assert big["drawn"] / small["drawn"] == pytest.approx(64 / 16, rel=0.02)
    # memset (libc) is drawn on both, one row up, in its own colour
    assert shot.run(memset["y"] + 1, big["x"] + 3, small["x"] + small["w"] - 3,
                    memset["fill"]) >= 0.9
    # nowhere else: not in the title rows above the frames
    assert shot.count(big["fill"], 0, min(f["y"] for f in page["all"])) == 0


def test_the_script_ran_and_zoom_and_search_redraw(tmp_path, page):
    big, small = page["frames"]["alloc_big"], page["frames"]["alloc_small"]
    dom = chromium(tmp_path, "--dump-dom", page["url"] + f"?s=^alloc_&x={small['id']}")
    html = re.search(r"<html[^>]*>", dom)
    assert html, dom[:500]
    tag = html.group(0)
    assert 'data-flamegraph="ready"' in tag, tag
    assert f'data-frames="{len(page["all"])}"' in tag
    assert f'data-zoom="{small["id"]}"' in tag and 'data-matched="2"' in tag

    zoomed = screenshot(tmp_path, page["url"] + f"?x={small['id']}", "zoomed.png")
    full = (flamegraph.PAD + 3, flamegraph.WIDTH - flamegraph.PAD - 3)
    assert zoomed.run(small["y"] + 1, *full, small["fill"]) >= 0.98
    assert zoomed.count(big["fill"], big["y"], big["y"] + flamegraph.ROW) == 0

    found = screenshot(tmp_path, page["url"] + "?s=^alloc_big$", "search.png")
    assert found.run(big["y"] + 1, big["x"] + 3, big["x"] + big["w"] - 3, HIT) >= 0.98
    assert found.run(small["y"] + 1, small["x"] + 3, small["x"] + small["w"] - 3,
                     small["fill"]) >= 0.98


def test_the_svg_alone_renders_without_script(tmp_path, page):
    svg = tmp_path / "flamegraph.svg"
    svg.write_text(flamegraph.render_svg(two_paths(), "brought"))
    assert "<script" not in svg.read_text()
    shot = screenshot(tmp_path, svg.as_uri(), "svg.png")
    big, small = page["frames"]["alloc_big"], page["frames"]["alloc_small"]
    for f in (big, small):                  # the same layout as the HTML's
        assert shot.run(f["y"] + 1, f["x"] + 3, f["x"] + f["w"] - 3, f["fill"]) >= 0.98
