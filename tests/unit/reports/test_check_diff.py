"""`memtrace check` and `memtrace diff` on recordings written by
memtrace.record.writer from synthetic snapshots: exit codes (0, 17, 16, 2),
the lines naming what broke, the diff at peak and at end (table within 80
columns, JSON, the HTML section); parsing of sizes, rates and percentages."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET

import pytest

from memtrace.commands.gate import parse_percent, parse_rate
from memtrace.record.gzipped import decompressed
from memtrace.record.reader import open_recording
from memtrace.reports.diff import diff_profiles
from memtrace.reports.diffhtml import render_diff_section
from memtrace.reports.profile import build_profile
from memtrace.reports.ticks import iter_ticks

from .synth import LIBC, MiB, record, snap

LIBFOO = "/opt/app/lib/libfoo.so.1"


def _main(monkeypatch, capsys, argv):  # type: ignore[no-untyped-def]
    from memtrace.commands import main as cli

    monkeypatch.setitem(sys.modules, "bcc", None)
    monkeypatch.setattr(sys, "argv", ["memtrace", *argv])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _run(heap_mib: int, foo_mib: int, n: int = 20, leak: int = 0, child: bool = True,
         stacks: bool = True):  # type: ignore[no-untyped-def]
    """Ticks of a parent (heap grows to heap_mib at tick n/2, back to half at
    the end; libfoo foo_mib) and a child (32 MiB anon, exits at tick 15)."""
    ticks = []
    for t in range(n):
        heap = heap_mib * MiB * min(t, n // 2) // (n // 2) + leak * t * MiB
        if t == n - 1:
            heap //= 2
        st = {("malloc (libc.so.6)", "grow (prog)"): heap,
              ("malloc (libc.so.6)", "cache (prog)"): MiB} if stacks else None
        tick = {1: snap(1, 1000.0 + t, {"[heap]": heap, LIBC: 2 * MiB, LIBFOO: foo_mib * MiB},
                        pss=0.5, stacks=st)}
        if child and t <= 15:
            tick[2] = snap(2, 1000.1 + t, {"[anon]": 32 * MiB, LIBC: 2 * MiB}, comm="worker",
                           pss=0.5)
        ticks.append(tick)
    return ticks


@pytest.fixture
def runs(tmp_path):  # type: ignore[no-untyped-def]
    a, b = str(tmp_path / "a.mtrace"), str(tmp_path / "b.mtrace")
    record(a, _run(100, 4), gone={2: 15})
    record(b, _run(130, 10), gone={2: 15})
    return a, b


# ---- reading ticks back


def test_ticks_come_back_as_the_tree_had_them(runs):  # type: ignore[no-untyped-def]
    ticks = list(iter_ticks(open_recording(runs[0])))
    assert len(ticks) == 20
    assert [sorted(t.snapshots) for t in ticks[:16]] == [[1, 2]] * 16
    assert [sorted(t.snapshots) for t in ticks[16:]] == [[1]] * 4   # the child exited


def test_the_profile_has_peak_end_processes_and_libraries(runs):  # type: ignore[no-untyped-def]
    p = build_profile(runs[0])
    assert p.ticks == 20 and p.ended and p.problem is None
    # peak: the heap at 100 MiB from tick 10 on; the child (34 MiB) alive until 15
    assert p.peak.rss == (100 + 2 + 4 + 34) * MiB and p.peak.ts == pytest.approx(1010.1)
    assert p.end.rss == (50 + 2 + 4) * MiB
    assert p.peak_pss is not None and p.peak_pss.bytes == p.peak.rss // 2
    assert p.processes["prog"].bytes == 106 * MiB and p.processes["worker"].bytes == 34 * MiB
    assert p.libraries["libc.so.6"].bytes == 4 * MiB
    assert p.libraries["libfoo.so.1"].bytes == 4 * MiB


# ---- diff


def test_diff_names_what_changed_at_peak_and_at_end(runs):  # type: ignore[no-untyped-def]
    d = diff_profiles(build_profile(runs[0]), build_profile(runs[1]))
    assert d.b.peak_rss - d.a.peak_rss == 36 * MiB
    heap = d.mappings[0]
    assert (heap.name, heap.kind, heap.delta_peak, heap.delta_end) == (
        "[heap]", "heap", 30 * MiB, 15 * MiB)
    assert [(r.name, r.delta_peak) for r in d.libraries] == [("libfoo.so.1", 6 * MiB)]
    assert d.stacks[0].name == "malloc (libc.so.6) < grow (prog)"
    assert d.stacks[0].delta_peak == 30 * MiB
    assert {r.name for r in d.processes} == {"prog"}      # worker did not change
    assert d.unchanged >= 1                               # [anon] of the child


def test_diff_table_fits_80_columns_and_json_parses(runs, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    code, out, err = _main(monkeypatch, capsys, ["diff", *runs])
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    assert any(ln.startswith("[heap]") and "+30.0 MiB" in ln and "+15.0 MiB" in ln
               for ln in lines), out
    assert any(ln.startswith("libfoo.so.1") and "+6.0 MiB" in ln for ln in lines), out
    code, out, _ = _main(monkeypatch, capsys, ["diff", "--format", "json", *runs])
    doc = json.loads(out)
    assert code == 0 and doc["delta_peak_rss_bytes"] == 36 * MiB
    assert doc["mappings"][0]["name"] == "[heap]"
    assert doc["mappings"][0]["delta_end_bytes"] == 15 * MiB


def test_diff_html_section_is_self_contained(runs):  # type: ignore[no-untyped-def]
    d = diff_profiles(build_profile(runs[0]), build_profile(runs[1]))
    d.mappings[0].name = "<script>alert(1)</script>"
    html = render_diff_section(d)
    assert html.startswith('<section class="mt-diff">') and html.endswith("</section>")
    assert "<script" not in html and "&lt;script&gt;" in html
    assert "http" not in html and "url(" not in html
    assert "libfoo.so.1" in html and "+30.0 MiB" in html
    ET.fromstring(html.replace("<style>", "<style><![CDATA[").replace(
        "</style>", "]]></style>"))         # well-formed


def test_diff_of_a_corrupt_recording_is_one_line_and_16(runs, tmp_path, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.mtrace"
    lines = decompressed(runs[1]).split(b"\n")
    lines[5] = b"{garbage"
    bad.write_bytes(b"\n".join(lines))
    code, out, err = _main(monkeypatch, capsys, ["diff", runs[0], str(bad)])
    assert code == 16 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if "error:" in ln] == [
        ln for ln in err.splitlines() if "corrupt line 6" in ln]
    assert out                     # the readable prefix was still compared


# ---- check


def test_check_against_its_own_baseline_passes(runs, tmp_path, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    j = tmp_path / "j.xml"
    code, _, err = _main(monkeypatch, capsys, ["check", runs[0], "--baseline", runs[0],
                                               "--junit", str(j)])
    assert code == 0, err
    suite = ET.parse(j).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0" and suite.get("tests") == "4"


def test_check_names_the_increase_and_exits_17(runs, tmp_path, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    j, res = tmp_path / "j.xml", tmp_path / "r.json"
    code, _, err = _main(monkeypatch, capsys, [
        "check", runs[1], "--baseline", runs[0], "--max-increase", "5%",
        "--junit", str(j), "--results", str(res)])
    assert code == 17, err
    lines = [ln for ln in err.splitlines() if "budget:" in ln]
    assert any("tree RSS peak 176.0 MiB (+36.0 MiB) > baseline 140.0 MiB + 5%" in ln
               for ln in lines), err
    assert any("library libfoo.so.1 peak 10.0 MiB (+6.0 MiB)" in ln for ln in lines), err
    assert any("process prog" in ln for ln in lines), err
    assert not any("worker" in ln for ln in lines)
    doc = json.loads(res.read_text())
    assert doc["exit_code"] == 17 and doc["baseline"] == runs[0]
    suite = ET.parse(j).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "4"       # tree, PSS, prog, libfoo


def test_check_ignores_small_increases_and_respects_the_percentage(runs, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    code, _, err = _main(monkeypatch, capsys, [
        "check", runs[1], "--baseline", runs[0], "--max-increase", "200%"])
    assert code == 0, err
    code, _, err = _main(monkeypatch, capsys, [
        "check", runs[1], "--baseline", runs[0], "--max-increase", "0%",
        "--ignore-below", "100M"])
    assert code == 0, err


def test_check_absolute_budgets_on_a_recording(tmp_path, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    path = str(tmp_path / "leak.mtrace")
    record(path, _run(10, 1, n=120, leak=1, child=False, stacks=False))
    code, _, err = _main(monkeypatch, capsys, ["check", path, "--max-growth", "20MiB/min"])
    assert code == 17 and "budget: rss growth" in err and "[heap]" in err
    code, _, err = _main(monkeypatch, capsys, ["check", path, "--max-rss", "1G",
                                               "--max-pss", "1G"])
    assert code == 0, err


def test_check_a_recording_without_end_line_warns(runs, tmp_path, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    path = str(tmp_path / "killed.mtrace")
    record(path, _run(100, 4), end=False)
    code, _, err = _main(monkeypatch, capsys, ["check", path, "--baseline", runs[0]])
    assert code == 0 and "warning:" in err and "no end line" in err


@pytest.mark.parametrize("how", ["cut", "corrupt", "not a recording"])
def test_check_an_unreadable_recording_is_16(runs, tmp_path, monkeypatch, capsys, how):  # type: ignore[no-untyped-def]
    data = decompressed(runs[1])
    bad = tmp_path / "bad.mtrace"
    if how == "cut":
        bad.write_bytes(data[:len(data) // 2])
    elif how == "corrupt":
        bad.write_bytes(data.replace(b'"pid":1,', b'"pid":"x",', 3))
    else:
        bad.write_bytes(b"hello\n")
    code, _, err = _main(monkeypatch, capsys, ["check", str(bad), "--baseline", runs[0]])
    assert code == 16 and "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("memtrace: error:")]
    assert len(errors) == 1 and str(bad) in errors[0]


@pytest.mark.parametrize("argv", [
    ["check", "x.mtrace"],                                   # no baseline, no budget
    ["check", "x.mtrace", "--max-growth", "20MiB"],          # a rate needs /s, /min, /h
    ["check", "x.mtrace", "--max-growth", "0MiB/min"],
    ["check", "x.mtrace", "--max-increase", "-5%", "--baseline", "y"],
    ["check", "x.mtrace", "--max-rss", "inf"],
    ["run", "--junit", "j.xml", "--", "/bin/true"],          # --junit needs a budget
    ["run", "--fail-fast", "--", "/bin/true"],
    ["run", "--max-pss", "1G", "--pss-interval", "0", "--", "/bin/true"],
    ["run", "--max-growth", "1M/fortnight", "--", "/bin/true"],
])
def test_bad_gate_options_are_one_usage_line(argv, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    code, out, err = _main(monkeypatch, capsys, argv)
    assert code == 2 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("memtrace: error: ")


def test_rates_and_percentages_parse():
    assert parse_rate("20MiB/min") == pytest.approx(20 * MiB / 60)
    assert parse_rate("1M/s") == MiB and parse_rate("1 G / h") == pytest.approx((1 << 30) / 3600)
    assert parse_rate("60MiB/minute") == MiB
    assert parse_percent("5%") == pytest.approx(0.05) and parse_percent("0.5") == 0.005
    for bad in ("20", "x/min", "-1M/s", "nanM/s", ""):
        with pytest.raises(ValueError):
            parse_rate(bad)
    for bad in ("x", "-1%", "nan", "2000%"):
        with pytest.raises(ValueError):
            parse_percent(bad)
