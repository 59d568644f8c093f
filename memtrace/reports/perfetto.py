"""A recording's time series as a Chrome trace-event JSON file, which Perfetto
(ui.perfetto.dev, `trace_processor`) and chrome://tracing open: per process, a
counter track of resident bytes by kind and library (RSS), one of the totals
(RSS, PSS, USS), one of the address-space calls per interval, and an instant
event at every library load and unload. Made from the report's object
(build.py), so its figures are the report's (docs/report.md)."""

from __future__ import annotations

from typing import Any

MICROS = 1_000_000


def _us(ts: float, t0: float) -> int:
    return int(round((ts - t0) * MICROS))


def _counters(pid: int, name: str, ts: list[float], columns: dict[str, list[int]],
              t0: float) -> list[dict[str, Any]]:
    """One "C" event per tick: args hold every column's value at that tick."""
    return [{"name": name, "ph": "C", "pid": pid, "tid": pid, "ts": _us(t, t0),
             "args": {k: v[i] for k, v in columns.items() if v[i] is not None}}
            for i, t in enumerate(ts)]


def _process_events(p: dict[str, Any], t0: float) -> list[dict[str, Any]]:
    pid = int(p["pid"])
    ts = p["ts"]
    by_kind = {s["name"]: s["values"] for s in p["series"]["rss"]}
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": pid,
         "args": {"name": f"{p['comm']} ({pid})"}},
    ]
    events += _counters(pid, "resident bytes by kind (RSS)", ts, by_kind, t0)
    events += _counters(pid, "resident bytes (RSS, PSS, USS)", ts, p["totals"], t0)
    events += _counters(pid, "address-space calls per interval", ts, p["calls"], t0)
    for e in p["library_events"]:
        what = str(e["event"]).removeprefix("library_")
        events.append({"name": f"{what} {e['mapping']}", "ph": "i", "s": "p", "pid": pid,
                       "tid": pid, "ts": _us(float(e["ts"]), t0),
                       "args": {"rss_bytes": e.get("rss_bytes"),
                                "mapped_bytes": e.get("mapped_bytes")}})
    return events


def trace_events(report: dict[str, Any]) -> dict[str, Any]:
    """The trace-event JSON object of a report made with every point
    (build_report(..., max_points=0)); times are microseconds from the
    recording's first snapshot (`metadata.start_ts`, seconds since the epoch)."""
    procs = report["processes"]
    t0 = min((p["ts"][0] for p in procs if p["ts"]), default=0.0)
    events: list[dict[str, Any]] = []
    for p in procs:
        events += _process_events(p, t0)
    rec = report.get("recording") or {}
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "metadata": {"source": "memtrace", "start_ts": t0,
                         "recording": rec.get("path"), "command": rec.get("command"),
                         "hostname": rec.get("hostname")}}
