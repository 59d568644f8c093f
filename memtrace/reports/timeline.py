"""One process's record over time, gathered snapshot by snapshot from a
recording (docs/report.md): resident bytes by category (each kind; each top
library on its own), RSS/PSS/USS totals, calls per interval, library events,
the glibc heap's figures, and what is needed for the tables (every mapping
identity's start, peak and end; the peak snapshot). Nothing but these sums is
kept per tick, so a long recording costs little memory."""

from __future__ import annotations

from array import array
from typing import Any

from memtrace.reports.downsample import argmax, pick, summed, take

MEASURES = ("rss", "pss", "uss")
KIND_ORDER = ("heap", "anon", "stack", "executable", "library", "file", "shmem", "special")
TOP_LIBRARIES = 8            # libraries with a series of their own; the rest are summed
OTHER_LIBRARIES = "other libraries"
EVENT_CALLS = ("brk", "mmap", "munmap", "mremap", "madvise")
LIB_PREFIX = "lib:"
MAX_LIBRARY_EVENTS = 500     # per process, in the report (the rest are counted)


class Track:
    """Everything the report shows of one process, fed one whole snapshot at
    a time (`add`), then turned into the report's object (`report`)."""

    def __init__(self, key: str, pid: int, comm: str) -> None:
        self.key, self.pid, self.comm = key, pid, comm
        self.ts: list[float] = []
        self.bucket: list[int] = []                  # tick index over all processes
        # category -> its rss, pss and uss per tick (arrays: hours of ticks of
        # many processes stay small)
        self.cols: dict[str, tuple[array[int], array[int], array[int]]] = {}
        self.totals: dict[str, list[int | None]] = {m: [] for m in MEASURES}
        self.calls: dict[str, list[int]] = {c: [] for c in EVENT_CALLS}
        self._prev_calls: dict[str, int] | None = None
        self.library_events: list[dict[str, Any]] = []
        self.library_events_total = 0
        self.first: dict[tuple[str, str], int] | None = None
        self.peak: dict[tuple[str, str], tuple[int, float]] = {}
        self.last: dict[tuple[str, str], int] = {}
        self.peak_snap: dict[str, Any] | None = None
        self.last_snap: dict[str, Any] | None = None
        self.heap: list[dict[str, Any]] = []
        self._heap_ts: Any = None

    def add(self, snap: dict[str, Any], bucket: int) -> None:
        ts = float(snap["ts"])
        self.comm = snap.get("comm", self.comm)
        cats: dict[str, list[int]] = {}
        idents: dict[tuple[str, str], int] = {}
        for m in snap["mappings"]:
            kind = m["kind"]
            key = LIB_PREFIX + m["mapping"] if kind == "library" else kind
            c = cats.get(key)
            if c is None:
                c = cats[key] = [0, 0, 0]
            c[0] += m["rss_bytes"]
            c[1] += m.get("pss_bytes") or 0
            c[2] += m.get("uss_bytes") or 0
            ident = (kind, m["mapping"])
            idents[ident] = idents.get(ident, 0) + m["rss_bytes"]
        n = len(self.ts)
        for key in cats.keys() - self.cols.keys():
            self.cols[key] = (array("q", bytes(8 * n)), array("q", bytes(8 * n)),
                              array("q", bytes(8 * n)))
        zero = [0, 0, 0]
        for key, col in self.cols.items():
            got = cats.get(key, zero)
            col[0].append(got[0])
            col[1].append(got[1])
            col[2].append(got[2])
        self.ts.append(ts)
        self.bucket.append(bucket)
        pss_known = snap.get("pss_bytes") is not None
        self.totals["rss"].append(sum(c[0] for c in cats.values()))
        self.totals["pss"].append(sum(c[1] for c in cats.values()) if pss_known else None)
        self.totals["uss"].append(sum(c[2] for c in cats.values()) if pss_known else None)
        if self.first is None:
            self.first = idents
        for ident, v in idents.items():
            p = self.peak.get(ident)
            if p is None or v > p[0]:
                self.peak[ident] = (v, ts)
        self.last = idents
        self._add_calls(snap.get("syscalls") or {})
        self._add_library_events(snap.get("library_events") or [])
        self._add_heap(snap.get("heap"))
        if self.peak_snap is None or self.totals["rss"][-1] > self.peak_snap["_rss"]:
            self.peak_snap = dict(snap, _rss=self.totals["rss"][-1])
        self.last_snap = snap

    def _add_calls(self, calls: dict[str, int]) -> None:
        prev = self._prev_calls
        for c in EVENT_CALLS:
            now = int(calls.get(c, 0))
            # counters are since attach; a restart (a new image) starts them again
            self.calls[c].append(max(0, now - prev.get(c, 0)) if prev is not None else 0)
        self._prev_calls = {c: int(calls.get(c, 0)) for c in EVENT_CALLS}

    def _add_library_events(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            self.library_events_total += 1
            if len(self.library_events) < MAX_LIBRARY_EVENTS:
                self.library_events.append({k: e.get(k) for k in (
                    "event", "ts", "mapping", "rss_bytes", "mapped_bytes")})

    def _add_heap(self, heap: dict[str, Any] | None) -> None:
        if not heap or "totals" not in heap or heap.get("ts") == self._heap_ts:
            return
        self._heap_ts = heap.get("ts")
        t = heap["totals"]
        trim = int(t.get("trimmable_bytes", 0))
        self.heap.append({
            "ts": heap.get("ts"), "in_use": int(t.get("in_use_bytes", 0)),
            "free_kept": max(0, int(t.get("free_resident_bytes", 0)) - trim),
            "trimmable": trim, "resident": int(t.get("resident_bytes", 0)),
            "mmapped_resident": int((heap.get("mmapped") or {}).get("resident_bytes", 0))})

    # -- the report's object ----------------------------------------------------

    def categories(self) -> list[str]:
        """Series names in stacking order: kinds, with the top libraries apart."""
        libs = {k: max(c[0]) for k, c in self.cols.items() if k.startswith(LIB_PREFIX)}
        kinds = {k for k in self.cols if not k.startswith(LIB_PREFIX)}
        top = sorted(libs, key=lambda k: (-libs[k], k))[:TOP_LIBRARIES]
        order: list[str] = []
        for kind in KIND_ORDER:
            if kind == "library":
                order += top
                if len(libs) > len(top):
                    order.append(OTHER_LIBRARIES)
            elif kind in kinds:
                order.append(kind)
        return order + sorted(kinds - set(KIND_ORDER))

    def series(self, idx: list[int]) -> dict[str, list[dict[str, Any]]]:
        """Per measure, one stacked series per category at the ticks `idx`."""
        names = self.categories()
        others = [c for k, c in self.cols.items() if k.startswith(LIB_PREFIX) and k not in names]
        out: dict[str, list[dict[str, Any]]] = {}
        for mi, measure in enumerate(MEASURES):
            known = self.totals[measure]
            columns = []
            for name in names:
                if name == OTHER_LIBRARIES:
                    values: list[int | None] = [
                        sum(c[mi][i] for c in others) if known[i] is not None else None
                        for i in idx]
                else:
                    col = self.cols[name][mi]
                    values = [col[i] if known[i] is not None else None for i in idx]
                columns.append({"name": _label(name), "kind": _kind(name), "values": values})
            out[measure] = columns
        return out

    def report(self, max_points: int, stacks: dict[str, Any] | None) -> dict[str, Any]:
        n = len(self.ts)
        idx = pick(n, [self.totals[m] for m in MEASURES], max_points)
        peak_i = argmax(self.totals["rss"])
        return {
            "key": self.key, "pid": self.pid, "comm": self.comm,
            "first_ts": self.ts[0], "last_ts": self.ts[-1], "snapshots": n,
            "points": len(idx), "downsampled": len(idx) < n,
            "ts": take(self.ts, idx),
            "totals": {m: take(self.totals[m], idx) for m in MEASURES},
            "series": self.series(idx),
            "calls": {c: summed(self.calls[c], idx) for c in EVENT_CALLS},
            "library_events": self.library_events,
            "library_events_total": self.library_events_total,
            "peak": self._peak(peak_i),
            "heap": self._heap_report(max_points),
            "growth": self._growth(),
            "libraries": self._libraries(),
            "stacks": stacks,
        }

    def _peak(self, i: int | None) -> dict[str, Any]:
        snap = self.peak_snap or {}
        out: dict[str, Any] = {"ts": self.ts[i] if i is not None else None}
        for m in MEASURES:
            values = [v for v in self.totals[m] if v is not None]
            out[f"{m}_bytes"] = max(values) if values else None
        out["at_peak"] = {k: snap.get(k) for k in (
            "rss_bytes", "pss_bytes", "uss_bytes", "anon_bytes", "file_bytes", "shmem_bytes",
            "swap_bytes", "virtual_bytes", "peak_rss_bytes")}
        out["top_mappings"] = top_mappings(snap.get("mappings") or [])
        return out

    def _heap_report(self, max_points: int) -> dict[str, Any]:
        last = (self.last_snap or {}).get("heap") or {}
        at_peak = (self.peak_snap or {}).get("heap") or {}
        pts = self.heap
        idx = pick(len(pts), [[p["in_use"] + p["free_kept"] + p["trimmable"] for p in pts]],
                   max_points)
        keys = ("ts", "in_use", "free_kept", "trimmable", "resident", "mmapped_resident")
        return {
            "status": last.get("status"), "allocator": last.get("allocator"),
            "reason": last.get("reason"),
            "verdict_at_peak": at_peak.get("verdict"), "verdict_ts": at_peak.get("ts"),
            "status_at_peak": at_peak.get("status"),
            **{k: [pts[i][k] for i in idx] for k in keys}}

    def _growth(self, top: int = 15) -> list[dict[str, Any]]:
        rows = self._identities()
        rows.sort(key=lambda r: (-(r["peak_bytes"] - r["start_bytes"]),
                                 -(r["end_bytes"] - r["start_bytes"]), r["mapping"]))
        return [r for r in rows if r["peak_bytes"] > r["start_bytes"]][:top]

    def _identities(self) -> list[dict[str, Any]]:
        first = self.first or {}
        return [{"mapping": ident[1], "kind": ident[0], "start_bytes": first.get(ident, 0),
                 "peak_bytes": p[0], "peak_ts": p[1], "end_bytes": self.last.get(ident, 0),
                 "growth_bytes": self.last.get(ident, 0) - first.get(ident, 0)}
                for ident, p in self.peak.items()]

    def _libraries(self) -> list[dict[str, Any]]:
        """Libraries and the executable: start, peak, end, and at the process's
        peak the RSS/PSS/USS and resident bytes per segment."""
        at: dict[str, dict[str, Any]] = {}
        for m in (self.peak_snap or {}).get("mappings") or []:
            if m["kind"] not in ("library", "executable"):
                continue
            a = at.setdefault(m["mapping"], {"rss_bytes": 0, "pss_bytes": 0, "uss_bytes": 0,
                                             "segments": {}})
            for k in ("rss_bytes", "pss_bytes", "uss_bytes"):
                a[k] += m.get(k) or 0
            seg = m.get("segment") or "other"
            a["segments"][seg] = a["segments"].get(seg, 0) + m["rss_bytes"]
        totals = (self.last_snap or {}).get("library_totals") or {}
        rows = []
        for r in self._identities():
            if r["kind"] not in ("library", "executable"):
                continue
            t = totals.get(r["mapping"]) or {}
            rows.append({**r, "at_peak": at.get(r["mapping"]),
                         "loads": t.get("loads", 0), "unloads": t.get("unloads", 0)})
        rows.sort(key=lambda r: (-r["peak_bytes"], r["mapping"]))
        return rows


def top_mappings(mappings: list[dict[str, Any]], top: int = 20) -> list[dict[str, Any]]:
    """The largest mapping identities of one snapshot (segments summed)."""
    by: dict[tuple[str, str], dict[str, Any]] = {}
    for m in mappings:
        r = by.setdefault((m["kind"], m["mapping"]), {
            "mapping": m["mapping"], "kind": m["kind"], "vmas": 0, "rss_bytes": 0,
            "pss_bytes": 0, "uss_bytes": 0, "anon_bytes": 0, "file_bytes": 0,
            "shmem_bytes": 0, "swap_bytes": 0})
        r["vmas"] += 1
        for k in ("rss_bytes", "pss_bytes", "uss_bytes", "anon_bytes", "file_bytes",
                  "shmem_bytes", "swap_bytes"):
            r[k] += m.get(k) or 0
    return sorted(by.values(), key=lambda r: (-r["rss_bytes"], r["mapping"]))[:top]


def _label(name: str) -> str:
    return name[len(LIB_PREFIX):] if name.startswith(LIB_PREFIX) else name


def _kind(name: str) -> str:
    return "library" if name.startswith(LIB_PREFIX) or name == OTHER_LIBRARIES else name
