"""`memtrace report --format perfetto`: Chrome trace-event JSON whose counters
are the report's series, tick by tick, and sum to the process's RSS."""

from __future__ import annotations

import json

from memtrace.errors import ExitCode
from tests import synthrec
from tests.unit.test_cli import assert_one_line_error, memtrace


def test_counters_are_the_series_and_sum_to_rss(tmp_path):  # type: ignore[no-untyped-def]
    rec = tmp_path / "run.mtrace"
    synthrec.write(str(rec), synthrec.ticks(12, pids=(10, 11)))
    r = memtrace("report", str(rec), "--format", "perfetto")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    trace = json.loads(r.stdout)
    events = trace["traceEvents"]
    report = json.loads(memtrace("report", str(rec), "--format", "json").stdout)
    for p in report["processes"]:
        pid = p["pid"]
        names = [e["args"]["name"] for e in events if e["ph"] == "M" and e["pid"] == pid]
        assert names == [f"{p['comm']} ({pid})"]
        kinds = [e for e in events if e["pid"] == pid and e["ph"] == "C"
                 and e["name"] == "resident bytes by kind (RSS)"]
        totals = [e for e in events if e["pid"] == pid and e["ph"] == "C"
                  and e["name"] == "resident bytes (RSS, PSS, USS)"]
        assert len(kinds) == len(totals) == len(p["ts"]) == 12
        for i, (k, t) in enumerate(zip(kinds, totals)):
            assert sum(k["args"].values()) == t["args"]["rss"] == p["totals"]["rss"][i]
            assert t["args"]["pss"] == p["totals"]["pss"][i]
        ts = [e["ts"] for e in kinds]
        assert ts == sorted(ts) and all(isinstance(x, int) for x in ts)
        loads = [e for e in events if e["pid"] == pid and e["ph"] == "i"]
        assert len(loads) == len(p["library_events"]) >= 1
        assert loads[0]["name"].startswith("load ")
    assert min(e["ts"] for e in events if "ts" in e) == 0
    assert trace["metadata"]["source"] == "memtrace"


def test_perfetto_with_baseline_is_a_usage_error(tmp_path):  # type: ignore[no-untyped-def]
    rec = tmp_path / "run.mtrace"
    synthrec.write(str(rec), synthrec.ticks(3, pids=(10,)))
    r = memtrace("report", str(rec), "--format", "perfetto", "--baseline", str(rec))
    assert_one_line_error(r, ExitCode.USAGE, "--baseline")
