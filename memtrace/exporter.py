"""Prometheus metrics, built fresh from the latest snapshots on every scrape
(a custom collector: nothing is cached between scrapes, so a process that exits
is gone from the next one). Metric names are a contract: see docs/metrics.md."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from memtrace import __version__

OTHER = "[other]"
MAX_LABEL_CHARS = 512
TYPES = ("anon", "file", "shmem")
SYSCALLS = ("brk", "mmap", "munmap", "mremap", "madvise")


def safe_label(value: str) -> str:
    """Label values that can never break a scrape: no lone surrogates, bounded length.
    (Quotes, backslashes and newlines are escaped by the exposition format.)"""
    value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(value) > MAX_LABEL_CHARS:
        # Keep cut values distinct: two long paths with a common prefix must not
        # become one series.
        digest = hashlib.sha256(value.encode()).hexdigest()[:12]
        value = f"{value[: MAX_LABEL_CHARS - 14]}…~{digest}"
    return value


@dataclass
class ExporterState:
    """What the watch loop publishes for scrapes. Replaced whole, never mutated
    in place, so a scrape in another thread always sees one consistent tick."""

    snapshots: dict[int, dict[str, Any]] = field(default_factory=dict)
    full_rescans: dict[str, int] = field(default_factory=dict)
    events_lost: int = 0
    ranges_lost: int = 0
    tick_seconds: float = 0.0
    attach_seconds: dict[int, float] = field(default_factory=dict)
    targets_dropped: int = 0
    # Agent mode with grouping: pid -> group name, and the counters of exited
    # processes per (group, comm), so group counters never go backwards.
    groups: dict[int, str] | None = None
    retired: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # heap walks (--heap-interval) by status; None when heap walks are off
    heap_walks: dict[str, int] | None = None


def empty_counters() -> dict[str, Any]:
    return {"syscalls": {}, "syscall_bytes": {}, "faults_by_mapping": {}}


def add_counters(into: dict[str, Any], snap: dict[str, Any]) -> None:
    for key in ("syscalls", "syscall_bytes", "faults_by_mapping"):
        bucket = into.setdefault(key, {})
        for name, n in snap.get(key, {}).items():
            bucket[name] = bucket.get(name, 0) + n


def grouped_rows(state: ExporterState) -> list[tuple[list[str], dict[str, Any]]]:
    """(label values for `group, comm`, merged snapshot) per group and comm."""
    assert state.groups is not None
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for key, counters in state.retired.items():
        row = merged[key] = {"anon_bytes": 0, "file_bytes": 0, "shmem_bytes": 0,
                             "virtual_bytes": 0, "drift_bytes": 0, "mappings": []}
        add_counters(row, counters)
    for pid, snap in state.snapshots.items():
        key = (state.groups.get(pid, snap["comm"]), snap["comm"])
        row = merged.setdefault(key, {"anon_bytes": 0, "file_bytes": 0, "shmem_bytes": 0,
                                      "virtual_bytes": 0, "drift_bytes": 0, "mappings": []})
        for f in ("anon_bytes", "file_bytes", "shmem_bytes", "virtual_bytes", "drift_bytes"):
            row[f] += snap[f]
        row["mappings"] = row["mappings"] + snap["mappings"]
        add_counters(row, snap)
    return [([safe_label(g), safe_label(c)], row) for (g, c), row in sorted(merged.items())]


def pid_rows(state: ExporterState) -> list[tuple[list[str], dict[str, Any]]]:
    return [([str(pid), safe_label(snap["comm"])], snap)
            for pid, snap in sorted(state.snapshots.items())]


class StateBox:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = ExporterState()

    def set(self, state: ExporterState) -> None:
        with self._lock:
            self._state = state

    def get(self) -> ExporterState:
        with self._lock:
            return self._state


def group_mappings(snap: dict[str, Any], max_series: int) -> tuple[
        dict[tuple[str, str], dict[str, int]], int]:
    """Sum mappings by (identity, kind); keep the `max_series` largest by resident
    bytes and fold the rest into [other]. Returns the groups and how many were folded."""
    groups: dict[tuple[str, str], dict[str, int]] = defaultdict(
        lambda: {"anon": 0, "file": 0, "shmem": 0, "virtual": 0, "faults": 0})
    for m in snap["mappings"]:
        g = groups[(m["mapping"], m["kind"])]
        g["anon"] += m["anon_bytes"]
        g["file"] += m["file_bytes"]
        g["shmem"] += m["shmem_bytes"]
        g["virtual"] += m["virtual_bytes"]
    if len(groups) <= max_series:
        return dict(groups), 0
    ranked = sorted(groups.items(), key=lambda kv: kv[1]["anon"] + kv[1]["file"]
                    + kv[1]["shmem"], reverse=True)
    kept = dict(ranked[: max_series - 1])
    other = {"anon": 0, "file": 0, "shmem": 0, "virtual": 0, "faults": 0}
    for _, g in ranked[max_series - 1:]:
        for k in other:
            other[k] += g[k]
    kept[(OTHER, "other")] = other
    return kept, len(ranked) - (max_series - 1)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    return repr(float(value))


class Family:
    """One metric family as plain rows, rendered straight to the text format
    (prometheus_client's per-sample rendering costs ~15 µs a series; this ~1 µs)."""

    def __init__(self, name: str, kind: str, help_text: str,
                 labels: Sequence[str] = ()) -> None:
        self.name = name
        self.kind = kind            # "gauge" or "counter" (name without _total)
        self.help = help_text
        self.labels = list(labels)
        self.rows: list[tuple[Sequence[str], float]] = []

    def add_metric(self, values: Sequence[str], value: float) -> None:
        self.rows.append((values, value))

    def render(self, out: list[str], cache: dict[str, str]) -> None:
        sample = self.name + "_total" if self.kind == "counter" else self.name
        out.append(f"# HELP {sample} {_escape_help(self.help)}\n# TYPE {sample} {self.kind}\n")
        names = self.labels
        for values, value in self.rows:
            if names:
                parts = []
                for k, v in zip(names, values):
                    ev = cache.get(v)
                    if ev is None:
                        ev = cache[v] = _escape_label(v)
                    parts.append(f'{k}="{ev}"')
                out.append(f"{sample}{{{','.join(parts)}}} {_number(value)}\n")
            else:
                out.append(f"{sample} {_number(value)}\n")

    def to_metric(self) -> Metric:
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        metric = cls(self.name, self.help, labels=self.labels)
        for values, value in self.rows:
            metric.add_metric(list(values), value)
        return metric


def _gauge(name: str, help_text: str, labels: Sequence[str] = ()) -> Family:
    return Family(name, "gauge", help_text, labels)


def _counter(name: str, help_text: str, labels: Sequence[str] = ()) -> Family:
    return Family(name, "counter", help_text, labels)


def library_families(rows: list[tuple[list[str], dict[str, Any]]],
                     who: list[str]) -> list[Family]:
    """Library loads and unloads (memtrace/libevents.py), from the cumulative
    `library_totals` of each snapshot. Per pid only: merged group rows carry no
    totals, so in agent mode with --group-by group these families stay empty."""
    labels = [*who, "mapping"]
    loads = _counter("memtrace_library_loads",
                     "Libraries loaded (dlopen: new mappings of a shared object) since "
                     "attach.", labels)
    unloads = _counter("memtrace_library_unloads",
                       "Libraries unloaded (every mapping of the object gone) since attach; "
                       "a dlclose that leaves the object mapped is not counted.", labels)
    loaded = _counter("memtrace_library_loaded_bytes",
                      "Bytes mapped by library loads (all segments, bss included).", labels)
    unloaded = _counter("memtrace_library_unloaded_bytes",
                        "Bytes unmapped by library unloads.", labels)
    given_back = _counter("memtrace_library_unloaded_resident_bytes",
                          "Resident bytes of libraries at their last tick before unload.",
                          labels)
    for ids, snap in rows:
        for identity, t in sorted((snap.get("library_totals") or {}).items()):
            values = [*ids, safe_label(identity)]
            loads.add_metric(values, t["loads"])
            unloads.add_metric(values, t["unloads"])
            loaded.add_metric(values, t["loaded_bytes"])
            unloaded.add_metric(values, t["unloaded_bytes"])
            given_back.add_metric(values, t["unloaded_rss_bytes"])
    return [loads, unloads, loaded, unloaded, given_back]


class MemtraceCollector(Collector):
    def __init__(self, box: StateBox, max_mapping_series: int = 50) -> None:
        self.box = box
        self.max_mapping_series = max_mapping_series
        self.series_dropped_total = 0
        self._lock = threading.Lock()
        # Per process (or group): the mapping identities that have their own fault
        # series. Admitted when first seen while there is room, never evicted, so
        # the [other] sum only ever holds identities that never had a series and
        # the counter never goes backwards.
        self._fault_names: dict[tuple[str, ...], set[str]] = {}

    def _fault_series(self, key: tuple[str, ...], snap: dict[str, Any]) -> list[tuple[str, int]]:
        counts: dict[str, int] = snap.get("faults_by_mapping", {})
        with self._lock:
            named = self._fault_names.setdefault(key, set())
            for identity in sorted(counts, key=lambda i: -counts[i]):
                if identity not in named and len(named) < self.max_mapping_series - 1:
                    named.add(identity)
            out = [(i, counts[i]) for i in sorted(named) if i in counts]
        other = sum(n for i, n in counts.items() if i not in named)
        if other:
            out.append((OTHER, other))
        return out

    def forget(self, live_keys: set[tuple[str, ...]]) -> None:
        with self._lock:
            for key in [k for k in self._fault_names if k not in live_keys]:
                del self._fault_names[key]

    def collect(self) -> Iterator[Metric]:
        for family in self.build():
            yield family.to_metric()

    def render_text(self) -> str:
        """The whole memtrace part of a scrape in the Prometheus text format 0.0.4."""
        out: list[str] = []
        cache: dict[str, str] = {}
        for family in self.build():
            family.render(out, cache)
        return "".join(out)

    def build(self) -> list[Family]:
        t0 = time.perf_counter()
        state = self.box.get()
        who = ["group", "comm"] if state.groups is not None else ["pid", "comm"]
        rows = grouped_rows(state) if state.groups is not None else pid_rows(state)
        proc_res = _gauge(
            "memtrace_process_resident_bytes",
            "Resident memory of the process by type, exact per page table (equals statm "
            "at quiescent points).", labels=[*who, "type"])
        proc_virt = _gauge("memtrace_process_virtual_bytes",
                                      "Virtual size of the process (sum of its mappings).",
                                      labels=who)
        map_res = _gauge(
            "memtrace_mapping_resident_bytes",
            "Resident memory per mapping identity (all segments of one library together) "
            "by type.", labels=[*who, "mapping", "kind", "type"])
        map_virt = _gauge("memtrace_mapping_virtual_bytes",
                                     "Virtual size per mapping identity.",
                                     labels=[*who, "mapping", "kind"])
        faults = _counter("memtrace_page_faults",
                                     "Page faults (user and kernel mode) per mapping identity "
                                     "since attach.", labels=[*who, "mapping"])
        calls = _counter("memtrace_syscalls",
                                    "Address-space system calls since attach.",
                                    labels=[*who, "syscall"])
        call_bytes = _counter("memtrace_syscall_bytes",
                                         "Bytes named by address-space system calls since "
                                         "attach.", labels=[*who, "syscall"])
        drift = _gauge("memtrace_drift_bytes",
                                  "memtrace's resident total minus /proc/PID/statm at the "
                                  "last tick (0 when quiescent).", labels=who)
        dropped_now = 0
        for ids, snap in rows:
            for t in TYPES:
                proc_res.add_metric([*ids, t], snap[f"{t}_bytes"])
            proc_virt.add_metric(ids, snap["virtual_bytes"])
            drift.add_metric(ids, snap["drift_bytes"])
            groups, folded = group_mappings(snap, self.max_mapping_series)
            dropped_now += folded
            for (identity, kind), g in groups.items():
                name = safe_label(identity)
                for t in TYPES:
                    map_res.add_metric([*ids, name, kind, t], g[t])
                map_virt.add_metric([*ids, name, kind], g["virtual"])
            for identity, n in self._fault_series(tuple(ids), snap):
                faults.add_metric([*ids, safe_label(identity)], n)
            for sc in SYSCALLS:
                calls.add_metric([*ids, sc], snap["syscalls"].get(sc, 0))
                call_bytes.add_metric([*ids, sc], snap["syscall_bytes"].get(sc, 0))
        with self._lock:
            self.series_dropped_total += dropped_now
            dropped_total = self.series_dropped_total
        self.forget({tuple(ids) for ids, _ in rows})
        return [proc_res, proc_virt, map_res, map_virt, faults, calls, call_bytes, drift,
                *heap_families(state),
                *pss_families(state, rows, who, self.max_mapping_series),
                *library_families(rows, who),
                *self._self_metrics(state, dropped_total, time.perf_counter() - t0)]

    def _self_metrics(self, state: ExporterState, dropped_total: int,
                      build_seconds: float) -> list[Family]:
        info = _gauge("memtrace_build_info", "memtrace version.",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        targets = _gauge("memtrace_targets", "Processes being watched.")
        targets.add_metric([], len(state.snapshots))
        lost = _counter("memtrace_events_lost",
                                   "Records that did not fit the BPF ring buffers, counted "
                                   "in the kernel (lost ranges are repaired by a full rescan).",
                                   labels=["buffer"])
        lost.add_metric(["events"], state.events_lost)
        lost.add_metric(["ranges"], state.ranges_lost)
        rescans = _counter("memtrace_full_rescans",
                                      "Full rescans of an address space, by reason.",
                                      labels=["reason"])
        for reason, n in sorted(state.full_rescans.items()):
            rescans.add_metric([reason], n)
        tick = _gauge("memtrace_tick_duration_seconds",
                                 "Time the last tick took (drain, scans, checks).")
        tick.add_metric([], state.tick_seconds)
        attach = _gauge("memtrace_attach_duration_seconds",
                                   "Time from attaching a process to its first snapshot.",
                                   labels=["pid"])
        for pid, secs in sorted(state.attach_seconds.items()):
            if pid in state.snapshots:
                attach.add_metric([str(pid)], secs)
        folded_total = _counter("memtrace_mapping_series_folded",
                                           "Mapping identities folded into [other] by the "
                                           "per-process series cap, summed over scrapes.")
        folded_total.add_metric([], dropped_total)
        targets_dropped = _counter("memtrace_targets_dropped",
                                              "Processes not watched because of the cap on "
                                              "watched processes.")
        targets_dropped.add_metric([], state.targets_dropped)
        scrape = _gauge("memtrace_scrape_build_seconds",
                                   "Time to build the metrics of this scrape.")
        scrape.add_metric([], build_seconds)
        return [info, targets, lost, rescans, tick, attach, folded_total, targets_dropped, scrape]


# ------------------------------------------------------------------ heap (memtrace heap)

HEAP_FAMILIES = (
    ("memtrace_heap_in_use_bytes", "in_use_bytes",
     "Bytes of glibc malloc chunks allocated to the program (headers included; chunks "
     "cached in a tcache or fastbin count as free), per arena kind."),
    ("memtrace_heap_free_resident_bytes", "free_resident_bytes",
     "Resident bytes of free glibc malloc chunks (bins, tcaches, fastbins, top chunk): "
     "freed by the program but not given back, per arena kind."),
    ("memtrace_heap_trimmable_bytes", "trimmable_bytes",
     "Resident bytes malloc_trim(0) would give back to the system, per arena kind."),
)


def heap_families(state: ExporterState) -> list[Family]:
    """memtrace_heap_* gauges from the `heap` key of the snapshots (latest background
    walk, --heap-interval): labels pid (or group), comm, arena (main|thread).
    Processes without figures (not glibc malloc, no walk yet) have no series."""
    if state.heap_walks is None:
        return []
    who = ["group", "comm"] if state.groups is not None else ["pid", "comm"]
    fams = [_gauge(name, text, labels=[*who, "arena"]) for name, _, text in HEAP_FAMILIES]
    sums: dict[tuple[str, str], dict[str, list[int]]] = {}
    for pid, snap in sorted(state.snapshots.items()):
        by_kind = (snap.get("heap") or {}).get("by_kind")
        if not by_kind:
            continue
        if state.groups is not None:
            ids = (safe_label(state.groups.get(pid, snap["comm"])), safe_label(snap["comm"]))
        else:
            ids = (str(pid), safe_label(snap["comm"]))
        row = sums.setdefault(ids, {})
        for kind, figures in by_kind.items():
            acc = row.setdefault(kind, [0] * len(HEAP_FAMILIES))
            for i, (_, key, _) in enumerate(HEAP_FAMILIES):
                acc[i] += figures[key]
    for ids, row in sorted(sums.items()):
        for kind, acc in sorted(row.items()):
            for fam, value in zip(fams, acc):
                fam.add_metric([*ids, kind], value)
    walks = _counter("memtrace_heap_walks",
                     "Background heap walks (--heap-interval) by result: ok, unsupported "
                     "(not glibc malloc), failed (unreadable or kept changing), gone.",
                     labels=["result"])
    for result in sorted({"ok", "unsupported", "failed", "gone", *state.heap_walks}):
        walks.add_metric([result], state.heap_walks.get(result, 0))
    return [*fams, walks]


# ------------------------------------------------------------------ PSS / USS (livepss)

def _pss_by_mapping(snap: dict[str, Any], max_series: int) -> dict[tuple[str, str], list[int]]:
    """Per-mapping PSS and USS summed by (identity, kind), with exactly the
    identities group_mappings() gives the resident series: the `max_series - 1`
    largest by resident bytes (same order, same ties), the rest in [other]."""
    groups: dict[tuple[str, str], list[int]] = {}     # rss, pss, uss
    for m in snap["mappings"]:
        g = groups.get((m["mapping"], m["kind"]))
        if g is None:
            g = groups[(m["mapping"], m["kind"])] = [0, 0, 0]
        g[0] += m["anon_bytes"] + m["file_bytes"] + m["shmem_bytes"]
        g[1] += m["pss_bytes"]
        g[2] += m["uss_bytes"]
    if len(groups) <= max_series:
        return groups
    ranked = sorted(groups.items(), key=lambda kv: kv[1][0], reverse=True)
    kept = dict(ranked[: max_series - 1])
    other = [0, 0, 0]
    for _, g in ranked[max_series - 1:]:
        for i in range(3):
            other[i] += g[i]
    kept[(OTHER, "other")] = other
    return kept


def pss_families(state: ExporterState, rows: list[tuple[list[str], dict[str, Any]]],
                 who: list[str], max_series: int) -> list[Family]:
    """memtrace_{process,mapping}_{pss,uss}_bytes (docs/metrics.md), labelled like
    the resident series. A process (or group) without PSS figures (--pss-interval
    0, not root) has no series. In group mode a process series is the sum of its
    processes' figures."""
    proc_pss = _gauge("memtrace_process_pss_bytes",
                      "Proportional set size: each resident page divided by the number of "
                      "mappings of it (smaps Pss, in bytes, rounded down).", labels=who)
    proc_uss = _gauge("memtrace_process_uss_bytes",
                      "Unique set size: resident pages mapped only once (smaps "
                      "Private_Clean + Private_Dirty).", labels=who)
    map_pss = _gauge("memtrace_mapping_pss_bytes",
                     "Proportional set size per mapping identity (all segments of one "
                     "library together).", labels=[*who, "mapping", "kind"])
    map_uss = _gauge("memtrace_mapping_uss_bytes",
                     "Unique set size per mapping identity.", labels=[*who, "mapping", "kind"])
    totals: dict[tuple[str, ...], list[int] | None] = {}
    for pid, snap in state.snapshots.items():
        if state.groups is not None:
            key: tuple[str, ...] = (safe_label(state.groups.get(pid, snap["comm"])),
                                    safe_label(snap["comm"]))
        else:
            key = (str(pid), safe_label(snap["comm"]))
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
        for (identity, kind), g in _pss_by_mapping(snap, max_series).items():
            values = [*ids, safe_label(identity), kind]
            map_pss.add_metric(values, g[1])
            map_uss.add_metric(values, g[2])
    return [proc_pss, proc_uss, map_pss, map_uss]
