"""`memtrace report` as a subprocess (bcc unimportable): the HTML page is one
self-contained file holding the report's data; a recording cut short gives
the report of its prefix with a banner and one warning line (exit 0), a
corrupt one the same and exit 16, a file that is not a recording one line and
exit 16; `--format json` is the same content."""

from __future__ import annotations

import json
import re
from pathlib import Path

from memtrace.errors import ExitCode
from tests import synthrec
from tests.unit.test_cli import assert_one_line_error, memtrace


def _data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html,
                  re.S)
    assert m, "no report data in the page"
    return json.loads(m.group(1))


def _record(tmp_path: Path, n: int = 30, **kw) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / "run.mtrace"
    synthrec.write(str(path), synthrec.ticks(n, pids=(10, 11)), **kw)
    return path


def test_html_is_one_self_contained_page(tmp_path):  # type: ignore[no-untyped-def]
    rec = _record(tmp_path)
    out = tmp_path / "report.html"
    r = memtrace("report", str(rec), "-o", str(out))
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r.stderr
    html = out.read_text()
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    # nothing fetched: no external script, style, image, font or frame source
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html)
    assert "<link" not in html and "@import" not in html and "url(" not in html
    data = _data(html)
    assert [p["pid"] for p in data["processes"]] == [10, 11]
    for pid in (10, 11):
        assert f'id="proc-{pid}"' in html and f'id="mem-{pid}"' in html
        assert f'id="flame-{pid}"' in html and f'id="heap-{pid}"' in html
    assert 'id="proc-total"' in html and 'id="problem"' not in html
    assert '<option value="total">' in html
    assert "/usr/lib/libsynth0.so.1" in html          # the library tables


def test_json_is_the_same_content_in_full(tmp_path):  # type: ignore[no-untyped-def]
    rec = _record(tmp_path, n=2100)
    r = memtrace("report", str(rec), "--format", "json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert all(p["points"] == 2100 and not p["downsampled"] for p in data["processes"])
    html = tmp_path / "r.html"
    assert memtrace("report", str(rec), "-o", str(html)).returncode == 0
    page = _data(html.read_text())
    for full, drawn in zip(data["processes"], page["processes"]):
        assert drawn["downsampled"] and drawn["points"] <= 2000
        assert drawn["peak"] == full["peak"] and drawn["growth"] == full["growth"]


def test_a_recording_without_its_end_line(tmp_path):  # type: ignore[no-untyped-def]
    rec = _record(tmp_path, end=False)
    data = rec.read_bytes()
    rec.write_bytes(data[:len(data) - 100])             # killed mid-line, too
    out = tmp_path / "report.html"
    r = memtrace("report", str(rec), "-o", str(out))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memtrace: warning: ") and \
        "cut short" in lines[0], r.stderr
    html = out.read_text()
    assert 'id="problem"' in html and "cut short" in html
    assert 0 < _data(html)["recording"]["snapshots"] < 60


def test_a_corrupt_recording_gives_its_prefix_and_exit_16(tmp_path):  # type: ignore[no-untyped-def]
    rec = _record(tmp_path, compress=False)
    lines = rec.read_bytes().split(b"\n")
    lines[21] = b'{"pid": 10, "mappings": [}'
    rec.write_bytes(b"\n".join(lines))
    out = tmp_path / "report.html"
    r = memtrace("report", str(rec), "-o", str(out))
    assert_one_line_error(r, ExitCode.RECORDING_UNREADABLE, "corrupt line 22")
    html = out.read_text()
    assert 'id="problem"' in html and "corrupt line 22" in html
    assert _data(html)["recording"]["snapshots"] == 20


def test_not_a_recording_is_one_line_and_exit_16(tmp_path):  # type: ignore[no-untyped-def]
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"pid": 1, "mappings": []}\n')
    out = tmp_path / "report.html"
    r = memtrace("report", str(bad), "-o", str(out))
    assert_one_line_error(r, ExitCode.RECORDING_UNREADABLE, "not a memtrace recording")
    assert not out.exists()
    r = memtrace("report", str(tmp_path / "missing.mtrace"))
    assert_one_line_error(r, ExitCode.RECORDING_UNREADABLE, "cannot read")


def test_an_unwritable_output_is_exit_14(tmp_path):  # type: ignore[no-untyped-def]
    rec = _record(tmp_path, n=3)
    r = memtrace("report", str(rec), "-o", str(tmp_path / "no" / "such" / "dir.html"))
    assert_one_line_error(r, ExitCode.OUTPUT_FAILED, "cannot write")
    assert list(tmp_path.iterdir()) == [rec]


def test_baseline_adds_the_diff_section_and_json_key(tmp_path):  # type: ignore[no-untyped-def]
    base = tmp_path / "base.mtrace"
    synthrec.write(str(base), synthrec.ticks(20, pids=(10,)))
    rec = tmp_path / "run.mtrace"
    synthrec.write(str(rec), synthrec.ticks(20, pids=(10,), extra_anon=3))   # 3 pages more
    out = tmp_path / "report.html"
    r = memtrace("report", str(rec), "--baseline", str(base), "-o", str(out))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert 'class="mt-diff"' in out.read_text()
    r = memtrace("report", str(rec), "--baseline", str(base), "--format", "json")
    assert r.returncode == 0, r.stderr
    diff = json.loads(r.stdout)["diff"]
    assert diff["a"]["path"] == str(base) and diff["b"]["path"] == str(rec)
    assert diff["delta_peak_rss_bytes"] > 0
    assert [(m["name"], m["delta_peak_bytes"]) for m in diff["mappings"]] == [
        ("[anon]", diff["delta_peak_rss_bytes"])]
    plain = memtrace("report", str(rec), "--format", "json")
    assert "diff" not in json.loads(plain.stdout)
    assert 'class="mt-diff"' not in memtrace("report", str(rec)).stdout


def test_a_baseline_that_is_not_a_recording_is_exit_16(tmp_path):  # type: ignore[no-untyped-def]
    rec = tmp_path / "run.mtrace"
    synthrec.write(str(rec), synthrec.ticks(5, pids=(10,)))
    bad = tmp_path / "bad.mtrace"
    bad.write_text("hello\n")
    r = memtrace("report", str(rec), "--baseline", str(bad), "-o", str(tmp_path / "r.html"))
    assert_one_line_error(r, ExitCode.RECORDING_UNREADABLE, "bad.mtrace",
                          "not a memtrace recording")
    assert not (tmp_path / "r.html").exists()
