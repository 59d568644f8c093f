"""The stack views (memtrace/views/folded.py, pprof.py, flamegraph.py) on
StackProfiles built by hand (tests/stackprofiles.py). pprof is also read back
by Go's own pprof in test_stack_pprof_go.py; the flame graph is drawn by
Chromium in tests/root/stacks/."""

from __future__ import annotations

import gzip
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from html.parser import HTMLParser
from typing import Any

import pytest

from memtrace.stacks.profile import Frame, Stack, StackProfile, StackSample
from memtrace.views import flamegraph
from memtrace.views.folded import folded_lines, render_folded
from memtrace.views.pprof import encode_profile, render_pprof
from memtrace.views.stackframes import FrameNamer, module_class
from tests.stackprofiles import CPP, LIBC, LIBHELPER, MIB, PROG, SEMI, two_paths

SVG = "{http://www.w3.org/2000/svg}"
OUTER = "_start;__libc_start_call_main;main"


# -- folded ------------------------------------------------------------------------

def test_folded_held_by_mapping_is_exact():
    assert render_folded(two_paths(), "held") == (
        f"[anon];[truncated];parse\\x3bline;memset {2 * MIB}\n"
        f"[anon];{OUTER};{CPP} {4 * MIB}\n"
        f"[heap];{OUTER};alloc_small;memset {16 * MIB}\n"
        f"libc.so.6;{OUTER};helper [twopaths];helper [libhelper.so.1];[libc.so.6] {MIB}\n")


def test_folded_brought_without_mappings_is_exact():
    assert render_folded(two_paths(), "brought", by_mapping=False) == (
        f"[truncated];parse\\x3bline;memset {3 * MIB}\n"
        f"{OUTER};alloc_big;memset {64 * MIB}\n"
        f"{OUTER};alloc_small;memset {16 * MIB}\n"
        f"{OUTER};helper [twopaths];helper [libhelper.so.1];[libc.so.6] {MIB}\n"
        f"{OUTER};{CPP} {4 * MIB}\n")


def test_folded_lines_add_up_to_the_profile_totals():
    p = two_paths()
    for measure, whole in (("held", p.held_total()), ("brought", p.brought_total())):
        for by_mapping in (True, False):
            lines = folded_lines(p, measure, by_mapping)
            assert sum(lines.values()) == whole
            assert all(n > 0 for n in lines.values())


def test_folded_lines_parse_as_flamegraph_pl_does():
    """flamegraph.pl: the count after the last space, frames split on ';'."""
    for line in render_folded(two_paths(), "brought").splitlines():
        m = re.fullmatch(r"(.*)\s+?(\d+(?:\.\d*)?)", line)
        assert m, line
        frames = m.group(1).split(";")
        assert SEMI not in frames and all(frames), frames


def test_same_stack_in_two_mappings_is_one_line_without_mappings():
    p = two_paths()
    small = p.samples[1]
    p.samples.append(StackSample(small.stack, "[anon]", "anon", 3 * MIB, 5 * MIB, 4))
    lines = folded_lines(p, "held", by_mapping=False)
    assert lines[f"{OUTER};alloc_small;memset"] == 19 * MIB


def test_control_characters_and_empty_stacks():
    odd = Frame(0x10, "a\nb;c", PROG, 0, None)
    p = StackProfile(1, "x", 0.0, [StackSample(Stack(()), "[heap]", "heap", 5, 5, 1),
                                   StackSample(Stack((odd,)), "[heap]", "heap", 7, 7, 1)])
    assert render_folded(p) == "[heap];[unknown] 5\n[heap];a\\nb\\x3bc 7\n"
    assert render_folded(p, by_mapping=False) == "[unknown] 5\na\\nb\\x3bc 7\n"


def test_frame_names_and_module_kinds():
    p = two_paths()
    namer = FrameNamer(p)
    assert namer.mapping("[heap]").text == "[heap]"
    assert namer.mapping(LIBC).text == "libc.so.6"
    assert [module_class(m) for m in (PROG, LIBC, LIBHELPER, "[vdso]", "[unknown]",
                                      "[truncated]", "/lib64/ld-linux-x86-64.so.2", "[py]",
                                      "[jit]", "[anon]")] == [
        "program", "library", "library", "kernel", "kernel", "truncated", "library", "python",
        "jit", "kernel"]
    always = FrameNamer(p, modules="always").frame(p.samples[1].stack.frames[1])
    assert always.text == "alloc_small [twopaths]"
    with pytest.raises(ValueError):
        render_folded(p, "resident")


# -- pprof: a wire-format reader written from the protobuf encoding spec -------------

def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = n = 0
    while True:
        b = data[i]
        n |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return n, i


def _fields(data: bytes) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = defaultdict(list)
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            v, i = data[i:i + size], i + size
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        out[num].append(v)
    return out


def _ints(values: list[Any]) -> list[int]:
    """A repeated integer field, packed (bytes) or not."""
    out = []
    for v in values:
        if isinstance(v, bytes):
            i = 0
            while i < len(v):
                n, i = _varint(v, i)
                out.append(n)
        else:
            out.append(v)
    return out


def _one(f: dict[int, list[Any]], num: int) -> int:
    return f[num][-1] if f.get(num) else 0


def decode(data: bytes) -> dict[str, Any]:
    """profile.proto (github.com/google/pprof/proto/profile.proto) into plain dicts."""
    top = _fields(data)
    st = [s.decode() for s in top[6]]
    functions = {_one(f, 1): st[_one(f, 2)] for f in map(_fields, top[5])}
    mappings = {}
    for f in map(_fields, top[3]):
        mappings[_one(f, 1)] = {"file": st[_one(f, 5)], "build_id": st[_one(f, 6)],
                                "start": _one(f, 2), "limit": _one(f, 3),
                                "has_functions": bool(_one(f, 7))}
    locations = {}
    for f in map(_fields, top[4]):
        lines = [functions[_one(_fields(ln), 1)] for ln in f[4]]
        locations[_one(f, 1)] = {"mapping": _one(f, 2), "address": _one(f, 3), "lines": lines}
    samples = []
    for f in map(_fields, top[2]):
        labels = {}
        for lab in map(_fields, f[3]):
            key = st[_one(lab, 1)]
            labels[key] = st[_one(lab, 2)] if lab.get(2) else (_one(lab, 3), st[_one(lab, 4)])
        samples.append({"locations": _ints(f[1]), "values": _ints(f[2]), "labels": labels})
    types = [(st[_one(t, 1)], st[_one(t, 2)]) for t in map(_fields, top[1])]
    period = _fields(top[11][0]) if top.get(11) else {}
    return {"strings": st, "types": types, "samples": samples, "locations": locations,
            "mappings": mappings, "functions": functions,
            "default": st[_one(top, 14)], "time_nanos": _one(top, 9),
            "period_type": (st[_one(period, 1)], st[_one(period, 2)]),
            "period": _one(top, 12), "comments": [st[c] for c in _ints(top[13])]}


def test_pprof_round_trip_names_values_labels_and_totals():
    p = two_paths()
    prof = decode(gzip.decompress(render_pprof(p, "held")))
    assert prof["strings"][0] == ""
    assert prof["types"] == [("resident_space", "bytes"), ("brought_space", "bytes")]
    assert prof["default"] == "resident_space"
    kept = [s for s in p.samples if s.held_bytes or s.brought_bytes]
    assert len(prof["samples"]) == len(kept) == 5
    for want, got in zip(kept, prof["samples"]):
        assert got["values"] == [want.held_bytes, want.brought_bytes]
        assert got["labels"]["mapping"] == want.mapping
        assert got["labels"]["kind"] == want.kind
        assert got["labels"]["samples"] == (want.samples, "count")
        locs = [prof["locations"][i] for i in got["locations"]]
        assert [loc["address"] for loc in locs] == [f.address for f in want.stack.frames]
        names = [loc["lines"][0] for loc in locs]
        expected = [f.function if f.function != "[unknown]" else "[libc.so.6]"
                    for f in want.stack.frames]
        assert names == expected
    assert sum(s["values"][0] for s in prof["samples"]) == p.held_total()
    assert sum(s["values"][1] for s in prof["samples"]) == p.brought_total()
    assert CPP in prof["functions"].values() and SEMI in prof["functions"].values()


def test_pprof_mappings_locations_and_header():
    p = two_paths()
    prof = decode(encode_profile(p, "brought"))
    assert prof["default"] == "brought_space"
    maps = prof["mappings"]
    assert sorted(maps) == [1, 2, 3]
    assert maps[1]["file"] == PROG                         # the program first
    by_file = {m["file"]: m for m in maps.values()}
    assert set(by_file) == {PROG, LIBC, LIBHELPER}
    assert by_file[LIBC]["build_id"] == "bb22" * 5
    assert all(m["has_functions"] for m in maps.values())
    ids = {m["file"]: i for i, m in maps.items()}
    for loc in prof["locations"].values():
        name = loc["lines"][0]
        if name == "[truncated]":
            assert loc["mapping"] == 0 and loc["address"] == 0
            continue
        m = maps[loc["mapping"]]
        assert m["start"] <= loc["address"] < m["limit"]
        if name in ("alloc_big", "main", SEMI, CPP):
            assert loc["mapping"] == ids[PROG]
        if name == "memset":
            assert loc["mapping"] == ids[LIBC]
    # a location is made once for each distinct frame
    addresses = [(loc["address"], loc["mapping"]) for loc in prof["locations"].values()]
    assert len(addresses) == len(set(addresses))
    assert prof["period_type"] == ("space", "bytes") and prof["period"] == 512 * 1024
    assert prof["time_nanos"] == 1_750_000_000 * 10**9
    assert prof["comments"] == ["memtrace --stacks: pid 4242 (twopaths)", "samples lost: 3"]


def test_pprof_is_reproducible_and_gzipped():
    a, b = render_pprof(two_paths()), render_pprof(two_paths())
    assert a == b and a[:2] == b"\x1f\x8b"
    assert gzip.decompress(a) == encode_profile(two_paths())


# -- flame graph -------------------------------------------------------------------

def _frames(svg_text: str) -> list[dict[str, Any]]:
    root = ET.fromstring(svg_text)
    out = []
    for g in root.iter(f"{SVG}g"):
        if g.get("class") != "f":
            continue
        rects = g.findall(f"{SVG}rect")
        assert len(rects) == 1
        r = rects[0]
        out.append({"id": g.get("id"), "name": g.get("data-n"), "module": g.get("data-m"),
                    "cls": g.get("data-c"), "value": int(g.get("data-v")),
                    "depth": int(g.get("data-d")), "x": float(r.get("x")),
                    "y": float(r.get("y")), "w": float(r.get("width")), "fill": r.get("fill"),
                    "text": g.find(f"{SVG}text").text or "",
                    "title": g.find(f"{SVG}title").text})
    return out


def _prefixes(lines: dict[str, int]) -> dict[tuple[str, ...], int]:
    """Every node of the flame graph, from the folded lines: each stack prefix."""
    out: dict[tuple[str, ...], int] = defaultdict(int)
    for stack, n in lines.items():
        frames = tuple(f.replace("\\x3b", ";") for f in stack.split(";"))
        out[()] += n
        for i in range(1, len(frames) + 1):
            out[frames[:i]] += n
    return out


@pytest.mark.parametrize("measure", ["held", "brought"])
def test_flame_graph_one_rect_per_node_widths_proportional(measure):
    p = two_paths()
    svg = flamegraph.render_svg(p, measure)
    assert svg.startswith("<?xml")
    frames = _frames(svg)
    nodes = _prefixes(folded_lines(p, measure))
    assert len(frames) == len(nodes)
    full = flamegraph.WIDTH - 2 * flamegraph.PAD
    whole = p.held_total() if measure == "held" else p.brought_total()
    height = float(ET.fromstring(svg).get("height"))
    by_path: dict[tuple[str, ...], dict[str, Any]] = {}
    for f in sorted(frames, key=lambda f: f["depth"]):
        parent = next((k for k, v in by_path.items() if len(k) == f["depth"] - 1
                       and v["x"] - 0.01 <= f["x"] and f["x"] + f["w"] <= v["x"] + v["w"] + 0.01),
                      None) if f["depth"] else None
        path = () if f["depth"] == 0 else (*parent, f["name"])    # type: ignore[misc]
        by_path[path] = f
        assert f["value"] == nodes[path], path
        assert f["w"] == pytest.approx(full * f["value"] / whole, abs=0.002)
        assert f["y"] == height - flamegraph.BOTTOM - (f["depth"] + 1) * flamegraph.ROW
    assert set(by_path) == set(nodes)
    for path, f in by_path.items():                            # callees sorted by name
        kids = sorted((k for k in by_path if k[:-1] == path and len(k) == len(path) + 1),
                      key=lambda k: by_path[k]["x"])
        assert [k[-1] for k in kids] == sorted(k[-1] for k in kids)
        if kids:
            assert by_path[kids[0]]["x"] == pytest.approx(f["x"], abs=0.002)
    assert by_path[()]["name"] == "all" and by_path[()]["w"] == pytest.approx(full, abs=0.002)


def test_flame_graph_kinds_colours_and_text():
    frames = _frames(flamegraph.render_svg(two_paths(), "brought"))
    by_name = {f["name"]: f for f in frames}
    assert by_name["alloc_big"]["cls"] == "program"
    assert by_name["memset"]["cls"] == "library" and by_name["memset"]["module"] == LIBC
    assert by_name["[truncated]"]["cls"] == "truncated"
    assert by_name["[heap]"]["cls"] == "mapping" and by_name["all"]["cls"] == "root"
    assert by_name[CPP]["name"] == CPP                          # escaped, read back whole
    assert by_name[SEMI]["cls"] == "program"
    assert by_name["alloc_big"]["fill"] != by_name["memset"]["fill"]
    for f in frames:
        r, g, b = map(int, re.fullmatch(r"rgb\((\d+),(\d+),(\d+)\)", f["fill"]).groups())
        (r0, rs), (g0, gs), (b0, bs) = flamegraph.PALETTES[f["cls"]]
        assert r0 <= r <= r0 + rs and g0 <= g <= g0 + gs and b0 <= b <= b0 + bs
        text = f["text"]
        assert len(text) * flamegraph.FONT * flamegraph.CHAR <= max(f["w"] - 6, 0) + 1e-9
        assert text == f["name"] or (text.endswith("..") and f["name"].startswith(text[:-2])) \
            or text == ""
    big = by_name["alloc_big"]
    assert big["title"].splitlines() == [
        "alloc_big", f"module: {PROG}",
        f"64.0 MiB ({64 * MIB} bytes), {100 * 64 / 88:.2f}% of brought in since attach"]


class _Checker(HTMLParser):
    """Well-formed HTML: every element closed in order (void elements aside)."""

    VOID = {"meta", "input", "br", "img", "link", "hr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.names: list[str] = []
        self.titles: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        assert "src" not in a and "href" not in a, (tag, a)
        if a.get("class") == "f":
            self.names.append(a["data-n"] or "")
        if tag not in self.VOID:
            self.open.append(tag)
        self._in_title = tag == "title"

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        assert "src" not in dict(attrs)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, (self.open[-3:], tag)
        self.open.pop()
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title and self.open and self.open[-1] == "title":
            self.titles.append(data)


def test_flame_graph_html_is_well_formed_self_contained_and_escaped():
    p = two_paths()
    html = flamegraph.render_html(p, "held")
    checker = _Checker()
    checker.feed(html)
    checker.close()
    assert checker.open == []
    assert CPP in checker.names and SEMI in checker.names
    assert CPP not in html and "&lt;std::pair&lt;int, char&gt;" in html and "int&amp;" in html
    svg = html[html.index("<svg"):html.index("</svg>") + len("</svg>")]
    assert len(_frames(svg)) == len(_frames(flamegraph.render_svg(p, "held")))
    # nothing to fetch: the only URL is the SVG namespace
    assert re.findall(r"https?://[^\"' ]+", html) == ["http://www.w3.org/2000/svg"]
    assert "<link" not in html and "url(" not in html and "@import" not in html
    head = checker.titles[0]
    assert "4242" in head and "twopaths" in head and "held now" in head
    title = ET.fromstring(svg).find(f"{SVG}text[@id='title']")
    sub = ET.fromstring(svg).find(f"{SVG}text[@id='subtitle']")
    assert title is not None and "held now" in (title.text or "")
    assert sub is not None and "pid 4242 (twopaths)" in (sub.text or "")
    assert f"total 23.0 MiB ({p.held_total()} bytes)" in (sub.text or "")


def test_malloc_flame_graph_says_it_shows_allocations():
    """--malloc-output's flame graphs: the same drawing, titled as allocations
    (outstanding, allocated), never as resident bytes."""
    p = two_paths()
    for measure, words in (("held", "outstanding now"), ("brought", "allocated since attach")):
        html = flamegraph.render_flamegraph(p, measure, by_mapping=False, kind="malloc")
        svg = html[html.index("<svg"):html.index("</svg>") + len("</svg>")]
        title = ET.fromstring(svg).find(f"{SVG}text[@id='title']")
        assert title is not None and title.text == f"Allocations by call stack: {words}"
        assert "Resident" not in html and "held now" not in html
        assert f"of {words}" in html              # each frame's tooltip
        assert len(_frames(svg)) == len(_frames(flamegraph.render_svg(p, measure, False)))


def test_flame_graph_of_nothing_and_bad_arguments():
    empty = StackProfile(7, "idle", 0.0, [])
    svg = flamegraph.render_svg(empty, "held")
    assert _frames(svg) == [] and "no bytes to show" in svg
    with pytest.raises(ValueError):
        flamegraph.render_flamegraph(empty, "held", fmt="png")
    with pytest.raises(ValueError):
        flamegraph.render_html(empty, "resident")


def test_fit_cuts_text_to_the_frame():
    assert flamegraph.fit("alloc_small", 1000) == "alloc_small"
    cut = flamegraph.fit("alloc_small", 60)
    assert cut.endswith("..") and len(cut) * flamegraph.FONT * flamegraph.CHAR <= 54
    assert flamegraph.fit("alloc_small", 20) == ""


def test_flame_graph_keeps_the_widest_frames_beyond_its_cap(monkeypatch):
    p = two_paths()
    every = _frames(flamegraph.render_svg(p, "brought"))
    monkeypatch.setattr(flamegraph, "MAX_FRAMES", 6)
    svg = flamegraph.render_svg(p, "brought")
    kept = _frames(svg)
    assert 0 < len(kept) <= 6
    narrowest_kept = min(f["w"] for f in kept)
    assert all(f["w"] <= narrowest_kept for f in every if f["id"] not in {k["id"] for k in kept})
    for f in kept:                     # every kept frame's caller is kept: still one tree
        assert f["depth"] == 0 or any(
            k["depth"] == f["depth"] - 1 and k["x"] <= f["x"] + 0.01
            and f["x"] + f["w"] <= k["x"] + k["w"] + 0.01 for k in kept)
    assert f"{len(every) - len(kept)} frames narrower than" in svg


def test_jit_frames_have_their_own_colour_and_legend_entry_only_when_present():
    from memtrace.stacks.profile import JIT_MODULE, Frame, Stack, StackSample
    plain = two_paths()
    assert "JIT (perf map)" not in flamegraph.render_svg(plain, "held")
    jit = Frame(0x7F0000001000, "JS:*step /app/server.js:3:14", JIT_MODULE, 0x40)
    plain.samples.append(StackSample(Stack((jit, *plain.samples[0].stack.frames[1:])),
                                     "[anon]", "anon", 1 * MIB, 1 * MIB, 2))
    svg = flamegraph.render_svg(plain, "held")
    assert "JIT (perf map)" in svg
    by_name = {f["name"]: f for f in _frames(svg)}
    assert by_name["JS:*step /app/server.js:3:14"]["cls"] == "jit"
