"""The HTML page (memtrace.reports.html): its sections are a list that takes
more (a diff against a baseline, say); the stacks come from a StackSource that
can be replaced; an hour of snapshots at 1 s stays far under 5 MB."""

from __future__ import annotations

import json
import re
from typing import Any

from memtrace.record.reader import open_recording
from memtrace.reports.build import build_report
from memtrace.reports.html import render_html
from tests import synthrec


def _report(tmp_path, snaps, **kw):  # type: ignore[no-untyped-def]
    path = str(tmp_path / "r.mtrace")
    synthrec.write(path, snaps)
    return build_report(open_recording(path), **kw)


def test_extra_sections_come_after_the_built_in_ones(tmp_path):  # type: ignore[no-untyped-def]
    report = _report(tmp_path, synthrec.ticks(5))
    seen: list[dict[str, Any]] = []

    def baseline(r: dict[str, Any]) -> str:
        seen.append(r)
        return '<section id="baseline-diff"><h2>Compared with the baseline</h2></section>'

    page = render_html(report, extra=[baseline])
    assert seen == [report]
    assert page.index('id="proc-100"') < page.index('id="baseline-diff"') < page.index("</main>")
    assert 'id="baseline-diff"' not in render_html(report)


def test_a_stack_source_replaces_the_snapshot_stacks(tmp_path):  # type: ignore[no-untyped-def]
    class Fuller:
        def __init__(self) -> None:
            self.kinds: list[str] = []

        def record(self, kind: str, data: Any, ts: float | None) -> None:
            self.kinds.append(kind)

        def at_peak(self, pid: int, ts: float, snapshot: dict[str, Any]) -> dict[str, Any]:
            return {"ts": ts, "source": "a fuller profile", "held_bytes": 8192, "held": [
                {"bytes": 8192, "mapping": "[heap]", "kind": "heap", "samples": 1,
                 "truncated": False, "frames": ["fuller_leaf (prog)", "main (prog)"]}]}

    source = Fuller()
    report = _report(tmp_path, synthrec.ticks(5), stacks=source)
    assert source.kinds == ["end"]                 # the lines that are not snapshots
    assert report["processes"][0]["stacks"]["source"] == "a fuller profile"
    page = render_html(report)
    assert "fuller_leaf" in page and "a fuller profile" in page


def test_names_are_escaped_and_the_data_cannot_close_its_script(tmp_path):  # type: ignore[no-untyped-def]
    snaps = synthrec.ticks(3, comm="</script><b>x")
    for s in snaps:
        s["mappings"][-2]["mapping"] = "/tmp/</script><img src=x>.so"
    page = render_html(_report(tmp_path, snaps))
    assert "<b>x" not in page and "<img src=x>" not in page
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert m and json.loads(m.group(1))["processes"][0]["comm"] == "</script><b>x"


def test_an_hour_at_one_second_stays_small(tmp_path):  # type: ignore[no-untyped-def]
    snaps = synthrec.ticks(3600, pids=(1, 2), extra_anon=30)
    page = render_html(_report(tmp_path, snaps, max_points=2000))
    assert len(page.encode()) <= 5_000_000
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert m
    data = json.loads(m.group(1))
    assert all(p["points"] <= 2000 and p["snapshots"] == 3600 for p in data["processes"])
    assert data["total"]["points"] <= 2000


def test_runs_summary_is_in_the_header(tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "r.mtrace"
    synthrec.write(str(path), synthrec.ticks(3), end=False, compress=False)
    with open(path, "a") as f:
        f.write(json.dumps({"summary": {"exit_status": 3, "duration_seconds": 75.0}}) + "\n")
        f.write(json.dumps({"end": {"ts": synthrec.T0 + 9, "snapshots": 3, "dropped": 0}})
                + "\n")
    report = build_report(open_recording(str(path)))
    assert report["recording"]["run_summary"]["exit_status"] == 3
    assert report["recording"]["problem"] is None
    page = render_html(report)
    assert "exited with status 3 after 1m15s" in page
