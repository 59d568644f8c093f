"""The report's content (memtrace.reports.build) from synthetic recordings
(tests/synthrec.py, written by the real RecordingWriter): every series is the
sum of its mappings, the peak is exact, downsampling keeps the peak and the
call counts, several processes add up to the total, the heap and the stacks
are those of the snapshots."""

from __future__ import annotations

import json
import random

import pytest

from memtrace.record.reader import open_recording
from memtrace.reports import downsample
from memtrace.reports.build import build_report
from memtrace.reports.stackview import parse_frame, profile_of
from memtrace.reports.timeline import OTHER_LIBRARIES, TOP_LIBRARIES
from tests import synthrec


def _report(tmp_path, snaps, max_points=0, **kw):  # type: ignore[no-untyped-def]
    path = str(tmp_path / "r.mtrace")
    synthrec.write(path, snaps, **kw)
    rec = open_recording(path)
    return build_report(rec, max_points=max_points), rec


def _expected(snap, name, field="rss_bytes"):  # type: ignore[no-untyped-def]
    """The sum of the snapshot's mappings in series `name`."""
    return sum(m[field] for m in snap["mappings"]
               if (m["mapping"] if m["kind"] == "library" else m["kind"]) == name)


def test_each_series_is_the_sum_of_its_mappings(tmp_path):  # type: ignore[no-untyped-def]
    snaps = synthrec.ticks(40, libraries=TOP_LIBRARIES + 3)
    report, rec = _report(tmp_path, snaps)
    assert rec.problem is None
    (p,) = report["processes"]
    assert p["snapshots"] == p["points"] == 40 and not p["downsampled"]
    names = [s["name"] for s in p["series"]["rss"]]
    libs = [n for n in names if n.startswith("/usr/lib/")]
    assert len(libs) == TOP_LIBRARIES and OTHER_LIBRARIES in names
    assert names[:3] == ["heap", "anon", "stack"] or names[:2] == ["heap", "anon"]
    for measure, field in (("rss", "rss_bytes"), ("pss", "pss_bytes"), ("uss", "uss_bytes")):
        series = {s["name"]: s["values"] for s in p["series"][measure]}
        for i, snap in enumerate(snaps):
            for name in names:
                if name == OTHER_LIBRARIES:
                    want = sum(m[field] for m in snap["mappings"]
                               if m["kind"] == "library" and m["mapping"] not in libs)
                else:
                    want = _expected(snap, name, field)
                assert series[name][i] == want, (measure, name, i)
            assert sum(v[i] for v in series.values()) == sum(m[field] for m in snap["mappings"])
            assert p["totals"][measure][i] == sum(m[field] for m in snap["mappings"])
    # the largest libraries are the ones with a series of their own
    peaks = {m["mapping"]: 0 for s in snaps for m in s["mappings"] if m["kind"] == "library"}
    for s in snaps:
        for lib in peaks:
            peaks[lib] = max(peaks[lib], _expected(s, lib))
    assert set(libs) == set(sorted(peaks, key=lambda k: -peaks[k])[:TOP_LIBRARIES])


def test_the_peak_is_exact_and_kept_by_downsampling(tmp_path):  # type: ignore[no-untyped-def]
    snaps = synthrec.ticks(700, libraries=3)
    rss = [sum(m["rss_bytes"] for m in s["mappings"]) for s in snaps]
    peak = max(rss)
    peak_ts = snaps[rss.index(peak)]["ts"]
    full, _ = _report(tmp_path, snaps, max_points=0)
    cut, _ = _report(tmp_path, snaps, max_points=100)
    for report in (full, cut):
        (p,) = report["processes"]
        assert p["peak"]["rss_bytes"] == peak and p["peak"]["ts"] == peak_ts
        assert max(v for v in p["totals"]["rss"] if v is not None) == peak
        assert peak_ts in p["ts"]
    (p,) = cut["processes"]
    assert p["downsampled"] and p["points"] <= 100 and p["snapshots"] == 700
    assert p["ts"] == sorted(p["ts"]) and p["ts"][0] == snaps[0]["ts"]
    assert p["ts"][-1] == snaps[-1]["ts"]
    # the points drawn are real ticks, their stacked values as in the full report
    f = full["processes"][0]
    where = {t: i for i, t in enumerate(f["ts"])}
    for s_cut, s_full in zip(p["series"]["rss"], f["series"]["rss"]):
        assert s_cut["values"] == [s_full["values"][where[t]] for t in p["ts"]]
    # calls between kept points are summed: the totals stay
    for call in ("brk", "mmap", "munmap"):
        assert sum(p["calls"][call]) == sum(f["calls"][call]) > 0


def test_pick_keeps_every_peak_and_the_ends():
    rng = random.Random(7)
    for n in (1, 5, 2001, 10_000):
        a = [rng.randrange(1000) for _ in range(n)]
        b = [rng.randrange(1000) if i % 5 else None for i in range(n)]
        idx = downsample.pick(n, [a, b], 400)
        assert len(idx) <= max(400, n if n <= 400 else 0) and idx == sorted(set(idx))
        assert idx[0] == 0 and idx[-1] == n - 1
        assert downsample.argmax(a) in idx
        if any(v is not None for v in b):
            assert downsample.argmax(b) in idx
        counts = [rng.randrange(3) for _ in range(n)]
        assert sum(downsample.summed(counts, idx)) == sum(counts)


def test_calls_are_per_interval_and_library_events_kept(tmp_path):  # type: ignore[no-untyped-def]
    snaps = synthrec.ticks(20)
    report, _ = _report(tmp_path, snaps)
    (p,) = report["processes"]
    assert p["calls"]["mmap"] == [0] + [1] * 19            # counters since attach, as deltas
    assert sum(p["calls"]["brk"]) == snaps[-1]["syscalls"]["brk"]
    (event,) = p["library_events"]
    assert event["event"] == "library_load" and event["mapping"] == "/usr/lib/libsynth0.so.1"
    lib0 = next(r for r in p["libraries"] if r["mapping"] == "/usr/lib/libsynth0.so.1")
    assert lib0["start_bytes"] == 0 and lib0["end_bytes"] == _expected(snaps[-1], lib0["mapping"])
    assert lib0["at_peak"]["segments"]["text"] == 2 * synthrec.PAGE


def test_growth_start_peak_end(tmp_path):  # type: ignore[no-untyped-def]
    snaps = synthrec.ticks(80)
    report, _ = _report(tmp_path, snaps)
    (p,) = report["processes"]
    top = p["growth"][0]
    anon = [_expected(s, "anon") for s in snaps]
    assert (top["mapping"], top["kind"]) == ("[anon]", "anon")
    assert (top["start_bytes"], top["peak_bytes"], top["end_bytes"]) == (
        anon[0], max(anon), anon[-1])
    assert top["growth_bytes"] == anon[-1] - anon[0]
    rows = {r["mapping"]: r for r in p["peak"]["top_mappings"]}
    peak_snap = snaps[anon.index(max(anon))]
    assert rows["[anon]"]["rss_bytes"] == _expected(peak_snap, "anon")


def test_the_heap_series_and_verdict_at_the_peak(tmp_path):  # type: ignore[no-untyped-def]
    snaps = synthrec.ticks(45)
    report, _ = _report(tmp_path, snaps)
    h = report["processes"][0]["heap"]
    walks = sorted({s["heap"]["ts"] for s in snaps})
    assert h["ts"] == walks and h["status"] == "ok"
    page = synthrec.PAGE
    assert h["trimmable"] == [2 * page] * len(walks) and h["free_kept"] == [4 * page] * len(walks)
    anon = [_expected(s, "anon") for s in snaps]
    peak_tick = anon.index(max(anon))
    assert h["verdict_at_peak"] == f"verdict of walk {peak_tick // 10 * 10}"


def test_several_processes_add_up_to_the_total(tmp_path):  # type: ignore[no-untyped-def]
    a = [synthrec.snapshot(1, t) for t in range(30)]
    b = [synthrec.snapshot(2, t, growth=3 * synthrec.PAGE) for t in range(10, 30)]
    snaps = sorted(a + b, key=lambda s: (s["ts"] // 1, s["pid"]))
    report, _ = _report(tmp_path, snaps)
    t = report["total"]
    assert [p["pid"] for p in report["processes"]] == [1, 2]
    assert t["ticks"] == 30 and t["processes_alive"] == [1] * 10 + [2] * 20
    for i in range(30):
        want = sum(m["rss_bytes"] for s in snaps if int(s["ts"] - synthrec.T0) == i
                   for m in s["mappings"])
        assert t["totals"]["rss"][i] == want
        assert sum(s["values"][i] for s in t["series"]["rss"]) == want
    assert t["peak"]["rss_bytes"] == max(t["totals"]["rss"])
    for call in ("brk", "mmap"):            # each process's calls, counted once
        assert sum(t["calls"][call]) == sum(
            sum(p["calls"][call]) for p in report["processes"]) > 0
    assert [e["pid"] for e in t["library_events"]] == [1]      # 2 starts after tick 5


def test_without_pss_the_pss_series_are_null(tmp_path):  # type: ignore[no-untyped-def]
    report, _ = _report(tmp_path, synthrec.ticks(5, pss=False))
    p = report["processes"][0]
    assert p["totals"]["pss"] == [None] * 5
    assert all(v is None for s in p["series"]["uss"] for v in s["values"])
    assert p["totals"]["rss"][0] > 0


def test_the_flame_graph_profile_of_snapshot_stacks(tmp_path):  # type: ignore[no-untyped-def]
    report, _ = _report(tmp_path, synthrec.ticks(70))
    p = report["processes"][0]
    stacks = p["stacks"]
    assert stacks["ts"] == p["peak"]["ts"] and stacks["held"][0]["mapping"] == "[anon]"
    prof = profile_of(p["pid"], p["comm"], stacks)
    assert prof.held_total() == stacks["held_bytes"] == p["peak"]["rss_bytes"]
    assert [f.function for f in prof.samples[0].stack.frames] == ["memset", "grow", "main"]
    assert parse_frame("memset (libc.so.6)").module == "libc.so.6"
    assert parse_frame("[truncated]").function == "[truncated]"
    none, _ = _report(tmp_path, synthrec.ticks(3, stacks=False))
    assert none["processes"][0]["stacks"] is None


@pytest.mark.parametrize("max_points", [0, 50])
def test_the_json_shape(tmp_path, max_points):  # type: ignore[no-untyped-def]
    report, _ = _report(tmp_path, synthrec.ticks(120, pids=(7, 8)), max_points=max_points)
    text = json.dumps(report, allow_nan=False)
    again = json.loads(text)
    assert again["memtrace_report"] == 1
    assert set(again) == {"memtrace_report", "generated_by", "generated_ts", "recording",
                          "total", "processes"}
    for p in [again["total"], *again["processes"]]:
        n = len(p["ts"])
        assert n == p["points"] and (n <= max_points or not max_points)
        for m in ("rss", "pss", "uss"):
            assert len(p["totals"][m]) == n
            assert all(len(s["values"]) == n for s in p["series"][m])
    for p in again["processes"]:
        assert {"heap", "growth", "libraries", "peak", "stacks", "calls",
                "library_events"} <= set(p)
        assert all(len(v) == len(p["ts"]) for v in p["calls"].values())
