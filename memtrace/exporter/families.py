"""Metric families built from the rows of a scrape (memtrace.exporter.rows), each
from its definition in memtrace.exporter.metrics: as plain rows that render
straight to the text format, or as prometheus_client families for the collector
path. Also the text format's escaping and number formatting, shared with the text
fast path of memtrace.exporter.collector."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from memtrace import __version__
from memtrace.exporter import metrics as m
from memtrace.exporter.metrics import MetricDef
from memtrace.exporter.rows import Row, row_ids, safe_label, sum_mappings, who_of
from memtrace.published import FAULT_TYPES, TickState


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    return repr(float(value))


class Family:
    """One metric family as plain rows, rendered straight to the text format
    (prometheus_client's per-sample rendering costs ~15 µs a series; this ~1 µs)."""

    def __init__(self, metric: MetricDef, who: Sequence[str] = ()) -> None:
        self.metric = metric
        self.name = metric.name
        self.kind = metric.kind            # "gauge" or "counter" (name without _total)
        self.help = metric.help
        self.labels = metric.label_names(who)
        self.rows: list[tuple[Sequence[str], float]] = []

    @property
    def sample(self) -> str:
        return self.metric.sample

    def header(self) -> str:
        return self.metric.header

    def add_metric(self, values: Sequence[str], value: float) -> None:
        self.rows.append((values, value))

    def render(self, out: list[str], cache: dict[str, str]) -> None:
        sample = self.metric.sample
        out.append(self.metric.header)
        names = self.labels
        for values, value in self.rows:
            if names:
                parts = []
                for k, v in zip(names, values):
                    ev = cache.get(v)
                    if ev is None:
                        ev = cache[v] = escape_label(v)
                    parts.append(f'{k}="{ev}"')
                out.append(f"{sample}{{{','.join(parts)}}} {number(value)}\n")
            else:
                out.append(f"{sample} {number(value)}\n")

    def to_metric(self) -> Metric:
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        metric = cls(self.name, self.help, labels=self.labels)
        for values, value in self.rows:
            metric.add_metric(list(values), value)
        return metric


def row_families(who: Sequence[str]) -> list[Family]:
    """The families with one or more series per process (or group), empty, in
    scrape order (metrics.ROW_METRICS); the text renderer writes their samples
    itself, in the same order."""
    return [Family(metric, who) for metric in m.ROW_METRICS]


def library_families(rows: list[Row], who: list[str]) -> list[Family]:
    """Library loads and unloads (memtrace/libevents.py), from the cumulative
    `library_totals` of each snapshot. Per pid only: merged group rows carry no
    totals, so in agent mode with --group-by group these families stay empty."""
    loads, unloads, loaded, unloaded, given_back = fams = [
        Family(metric, who) for metric in (
            m.LIBRARY_LOADS, m.LIBRARY_UNLOADS, m.LIBRARY_LOADED_BYTES,
            m.LIBRARY_UNLOADED_BYTES, m.LIBRARY_UNLOADED_RESIDENT)]
    for ids, snap in rows:
        for identity, t in sorted((snap.get("library_totals") or {}).items()):
            values = [*ids, safe_label(identity)]
            loads.add_metric(values, t["loads"])
            unloads.add_metric(values, t["unloads"])
            loaded.add_metric(values, t["loaded_bytes"])
            unloaded.add_metric(values, t["unloaded_bytes"])
            given_back.add_metric(values, t["unloaded_rss_bytes"])
    return fams


# ------------------------------------------------------------------ the kernel's own figures

def process_families(rows: list[Row], who: list[str]) -> list[Family]:
    """Per process (or group): swap (with PSS figures: --pss-interval), the peak
    resident size (VmHWM; per pid only: the peaks of a group's processes do not
    add up to the group's peak) and the kernel's minor and major fault counters
    since the process started (a group adds those of its exited processes)."""
    swap = Family(m.PROCESS_SWAP, who)
    peak = Family(m.PROCESS_PEAK, who)
    faults = Family(m.PROCESS_FAULTS, who)
    for ids, snap in rows:
        if snap.get("swap_bytes") is not None:
            swap.add_metric(ids, snap["swap_bytes"])
        if who[0] == "pid" and snap.get("peak_rss_bytes") is not None:
            peak.add_metric(ids, snap["peak_rss_bytes"])
        counts = snap.get("kernel_faults")
        for fault in FAULT_TYPES:
            n = counts.get(fault) if counts is not None else snap.get(f"{fault}_faults")
            if n is not None:
                faults.add_metric([*ids, fault], n)
    return [swap, peak, faults]


# ------------------------------------------------------------------ heap (memtrace heap)

# The per-arena gauges and the key of a snapshot's heap["by_kind"][arena] each shows.
_HEAP_FIGURES = ((m.HEAP_IN_USE, "in_use_bytes"),
                 (m.HEAP_FREE_RESIDENT, "free_resident_bytes"),
                 (m.HEAP_TRIMMABLE, "trimmable_bytes"))
HEAP_FAMILIES = tuple((metric.name, key, metric.help) for metric, key in _HEAP_FIGURES)
"""(name, key of a snapshot's heap["by_kind"][arena], HELP) of the per-arena gauges."""


def heap_families(state: TickState) -> list[Family]:
    """The heap gauges from the `heap` key of the snapshots (latest background
    walk, --heap-interval): labels pid (or group), comm, arena (main|thread), and
    the walks counter. Processes without figures (not glibc malloc, no walk yet)
    have no series."""
    if state.heap_walks is None:
        return []
    who = list(who_of(state))
    fams = [Family(metric, who) for metric, _ in _HEAP_FIGURES]
    sums: dict[tuple[str, ...], dict[str, list[int]]] = {}
    for pid, snap in sorted(state.snapshots.items()):
        by_kind = (snap.get("heap") or {}).get("by_kind")
        if not by_kind:
            continue
        row = sums.setdefault(tuple(row_ids(state, pid, snap)), {})
        for kind, figures in by_kind.items():
            acc = row.setdefault(kind, [0] * len(_HEAP_FIGURES))
            for i, (_, key) in enumerate(_HEAP_FIGURES):
                acc[i] += figures[key]
    for ids, row in sorted(sums.items()):
        for kind, acc in sorted(row.items()):
            for fam, value in zip(fams, acc):
                fam.add_metric([*ids, kind], value)
    walks = Family(m.HEAP_WALKS)
    for result in sorted({"ok", "unsupported", "failed", "gone", *state.heap_walks}):
        walks.add_metric([result], state.heap_walks.get(result, 0))
    return [*fams, walks]


# ------------------------------------------------------------------ PSS / USS (livepss)

def pss_families(state: TickState, rows: list[Row], who: list[str],
                 max_series: int) -> list[Family]:
    """The process and mapping PSS/USS gauges (docs/metrics.md), labelled like
    the resident series. A process (or group) without PSS figures (--pss-interval
    0, not root) has no series. In group mode a process series is the sum of its
    processes' figures."""
    proc_pss, proc_uss, map_pss, map_uss = fams = [
        Family(metric, who) for metric in m.PSS_METRICS]
    totals: dict[tuple[str, ...], list[int] | None] = {}
    for pid, snap in state.snapshots.items():
        key = tuple(row_ids(state, pid, snap))
        pss, uss = snap.get("pss_bytes"), snap.get("uss_bytes")
        acc = totals.setdefault(key, [0, 0])
        if acc is None or pss is None or uss is None:
            totals[key] = None
            continue
        acc[0] += pss
        acc[1] += uss
    for ids, snap in rows:
        acc = totals.get(tuple(ids))
        if acc is None:
            continue
        proc_pss.add_metric(ids, acc[0])
        proc_uss.add_metric(ids, acc[1])
        for (identity, kind), g in sum_mappings(snap, max_series, pss=True)[0]:
            values = [*ids, safe_label(identity), kind]
            map_pss.add_metric(values, g[4])
            map_uss.add_metric(values, g[5])
    return fams


# ------------------------------------------------------------------ memtrace itself

def self_families(state: TickState, dropped_total: int, build_seconds: float) -> list[Family]:
    """memtrace's own figures: version, targets, losses, rescans, timings, caps."""
    info = Family(m.BUILD_INFO)
    info.add_metric([__version__], 1)
    targets = Family(m.TARGETS)
    targets.add_metric([], len(state.snapshots))
    lost = Family(m.EVENTS_LOST)
    lost.add_metric(["events"], state.events_lost)
    lost.add_metric(["ranges"], state.ranges_lost)
    for buffer, n in sorted(state.notices_lost.items()):
        lost.add_metric([buffer], n)
    rescans = Family(m.FULL_RESCANS)
    for reason, n in sorted(state.full_rescans.items()):
        rescans.add_metric([reason], n)
    tick = Family(m.TICK_DURATION)
    tick.add_metric([], state.tick_seconds)
    attach = Family(m.ATTACH_DURATION)
    for pid, secs in sorted(state.attach_seconds.items()):
        if pid in state.snapshots:
            attach.add_metric([str(pid)], secs)
    folded_total = Family(m.SERIES_FOLDED)
    folded_total.add_metric([], dropped_total)
    targets_dropped = Family(m.TARGETS_DROPPED)
    targets_dropped.add_metric([], state.targets_dropped)
    scrape = Family(m.SCRAPE_BUILD)
    scrape.add_metric([], build_seconds)
    return [info, targets, lost, rescans, tick, attach, folded_total, targets_dropped, scrape]
