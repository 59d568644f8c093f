"""Hostile names through every view (issue 16, items 6 and 9): a fake process
whose files are named with Rich markup, terminal escapes, a newline, a byte
that is not UTF-8 and the texts that used to collide with them. The names
come from the fake /proc (maps + map_files) through the tracker into the JSON
snapshot, the live table, /metrics and the libs CSV."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
from rich.console import Console

from memtrace.commands.libs import (
    Library,
    ProcessUsage,
    Report,
    render_csv,
    render_json,
    render_table,
)
from memtrace.exporter.collector import MemtraceCollector
from memtrace.pss.accounting import Usage
from memtrace.published import StateBox, TickState
from memtrace.snapshot import snapshot
from memtrace.trace.tracker import ProcessTracker
from memtrace.views.table import TableReporter
from tests import groundtruth as gt

from .fakes import PAGE

NAMES = [
    b"/tmp/h/tag[/bold]name",
    b"/tmp/h/[link=http://x]a[/link]",
    b"/tmp/h/[blink]b[/blink]",
    b"/tmp/h/esc\x1b[31mred",
    b"/tmp/h/osc\x1b]8;;http://x\x07link",
    b"/tmp/h/nl\nline",
    b"/tmp/h/nl\\012line",
    b"/tmp/h/ff\xff",
    b"/tmp/h/ff\\xff",
    b"/tmp/h/cr\rline",
    b"/tmp/h/bidi\xe2\x80\xaeevil",
]
COMM = b"x\n[/b]\x1b[2J"
BASE = 0x7F0000000000
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@pytest.fixture
def hostile(world):
    """A tracked fake process mapping each name, file i with i+1 resident pages."""
    p = world.process(700, comm=COMM, exe=b"/usr/bin/hostile")
    for i, name in enumerate(NAMES):
        start = BASE + i * 0x100000
        p.map(start, start + 16 * PAGE, name, "r--p", inode=100 + i, dev="fe:00")
        p.touch(start, start + (i + 1) * PAGE, anon=False)
    p.map(BASE + 0x4000000, BASE + 0x4010000, b"[heap]")
    p.touch(BASE + 0x4000000, BASE + 0x4001000)
    p.map(0x7FFD00000000, 0x7FFD00021000, b"[stack]")
    p.touch(0x7FFD00020000, 0x7FFD00021000)
    p.map(0x7FFD00100000, 0x7FFD00102000, b"[vdso]", "r-xp")
    p.touch(0x7FFD00100000, 0x7FFD00101000, anon=False)
    p.map_files = True
    p.sync()
    tr = ProcessTracker(p.pid, world.procfs())
    tr.start()
    return tr


def by_start(snap):
    return {m["start"]: m for m in snap["mappings"]}


def test_json_snapshot_names_are_distinct_and_escaped(hostile):
    snap = snapshot(hostile, 1.0)
    maps = by_start(snap)
    shown = [maps[BASE + i * 0x100000]["path"] for i in range(len(NAMES))]
    assert shown == [gt.decode_path(n) for n in NAMES]
    assert len(set(shown)) == len(NAMES)           # no two names collide
    assert "/tmp/h/ff\\xff" in shown and "/tmp/h/ff\\\\xff" in shown
    assert "/tmp/h/nl\\nline" in shown and "/tmp/h/nl\\\\012line" in shown
    for m in snap["mappings"]:
        assert not CONTROL.search(m["path"]) and not CONTROL.search(m["mapping"])
    assert snap["comm"] == "x\\n[/b]\\u001b[2J"
    line = json.dumps(snap)
    assert json.loads(line)["mappings"] == snap["mappings"]


def _render(tr, *, terminal: bool) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=400, force_terminal=terminal, color_system=(
        "standard" if terminal else None), legacy_windows=False)
    reporter = TableReporter(console, max_rows=50)
    snap = snapshot(tr, 1.0)
    snap["library_events"] = [{"event": "library_load", "ts": 1.0, "pid": 700,
                               "comm": snap["comm"], "mapping": snap["mappings"][0]["mapping"],
                               "base": BASE, "vmas": 1, "mapped_bytes": PAGE,
                               "rss_bytes": PAGE}]
    reporter.snapshot(snap)
    reporter.message(f"pid 701 ({snap['comm']}) exited; raw \x1b[5m and [blink]x[/blink]")
    reporter.tick_done()
    reporter.close()
    return buf.getvalue()


def test_table_shows_names_as_text(hostile):
    out = _render(hostile, terminal=False)
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out
    for name in NAMES:
        assert gt.decode_path(name) in out, gt.decode_path(name)
    for special in ("[heap]", "[stack]", "[vdso]"):
        assert special in out
    assert "x\\n[/b]\\u001b[2J" in out        # the comm, on the header's line
    assert "raw \\u001b[5m and [blink]x[/blink]" in out


def test_table_on_a_terminal_writes_no_escape_from_a_name(hostile):
    """Rich styles its own text (bold, dim) on a terminal; no escape sequence
    may come from a name: no colour, no OSC 8 link, no blink, no clear."""
    out = _render(hostile, terminal=True)
    assert "\x1b[31m" not in out and "\x1b]8" not in out and "\x1b[5m" not in out
    assert "\x1b[2J" not in out and "\x07" not in out
    assert "[/bold]" in out and "[link=http://x]a[/link]" in out and "[heap]" in out


def _exporter_text(tr) -> str:
    box = StateBox()
    box.set(TickState(snapshots={700: snapshot(tr, 1.0)}))
    return MemtraceCollector(box, 100).render_text()


def test_metrics_series_do_not_collide(hostile):
    from prometheus_client.parser import text_string_to_metric_families

    text = _exporter_text(hostile)
    got = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "memtrace_mapping_resident_bytes" and s.labels["type"] == "file":
                assert s.labels["mapping"] not in got, s.labels["mapping"]
                got[s.labels["mapping"]] = s.value
            if s.name == "memtrace_process_resident_bytes":
                assert s.labels["comm"] == "x\\n[/b]\\u001b[2J"
    for i, name in enumerate(NAMES):      # each file its own series, its own bytes
        assert got[gt.decode_path(name)] == (i + 1) * PAGE, gt.decode_path(name)


def _report() -> Report:
    report = Report()
    for i, name in enumerate(NAMES):
        lib = Library(("fe:00", 100 + i), gt.decode_path(name))
        lib.per_pid[700] = Usage(PAGE * (i + 1), (PAGE * (i + 1)) << 12, PAGE, 0)
        report.libraries[lib.key] = lib
    report.processes.append(ProcessUsage(700, "x\\n[/b]\\u001b[2J", Usage(PAGE, PAGE << 12)))
    return report


def test_libs_csv_json_and_table_keep_names_apart():
    report = _report()
    rows = list(csv.reader(io.StringIO(render_csv(report, "name"))))
    libs = [r[0] for r in rows[1:] if r[1] == ""]
    assert sorted(libs) == sorted(gt.decode_path(n) for n in NAMES)
    doc = json.loads(render_json(report, "name"))
    assert {lib["path"] for lib in doc["libraries"]} == {gt.decode_path(n) for n in NAMES}
    for text in (render_csv(report, "name"), render_table(report, "name")):
        assert not CONTROL.search(text.replace("\n", ""))
