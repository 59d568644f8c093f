"""Prometheus metrics, built fresh from the latest snapshots on every scrape
(a custom collector: a process that exits is gone from the next scrape). Between
scrapes the text fast path keeps only escaped label values and, per live process,
its rendered text for one snapshot generation (see MemtraceCollector.render_text).
Metric names are a contract: see docs/metrics.md."""

from __future__ import annotations

import gc
import hashlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from memtrace import __version__
from memtrace.published import (
    CONTAINER_LABELS,
    FAULT_TYPES,
    NO_CONTAINER,
    StateBox,
    TickState,
    add_counters,
)
from memtrace.snapshot import identity_sums

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




def who_of(state: TickState) -> tuple[str, ...]:
    """The label names that say which process (or group) a series is about."""
    who = ("group", "comm") if state.groups is not None else ("pid", "comm")
    return who + CONTAINER_LABELS if state.containers is not None else who


def row_key(state: TickState, pid: int, snap: dict[str, Any]) -> tuple[str, ...]:
    """The raw values of who_of(state) for one process: its pid (or group), comm
    and, in agent mode, container_id and pod_uid. Processes with the same key
    are one row (a group)."""
    comm = snap["comm"]
    key: tuple[str, ...] = (
        state.groups.get(pid, comm) if state.groups is not None else str(pid), comm)
    if state.containers is not None:
        key += state.containers.get(pid, NO_CONTAINER)
    return key


def row_ids(state: TickState, pid: int, snap: dict[str, Any]) -> list[str]:
    """row_key() as label values (safe_label)."""
    return [safe_label(v) for v in row_key(state, pid, snap)]


# The resident types a mapping of each kind can hold: the others are always 0
# and get no series (a type that is not 0 is served whatever the kind). Private
# file mappings hold anonymous copy-on-write pages; a file on tmpfs holds shmem.
TYPES_BY_KIND = {
    "heap": ("anon",), "stack": ("anon",), "anon": ("anon",), "shmem": ("shmem",),
    "library": ("anon", "file"), "executable": ("anon", "file"), "file": ("anon", "file"),
}


def resident_types(kind: str, anon: Any, file: Any, shmem: Any) -> list[tuple[str, Any]]:
    """(type, bytes) of the series memtrace_mapping_resident_bytes serves for one
    mapping identity of `kind`."""
    allowed = TYPES_BY_KIND.get(kind, TYPES)
    return [(t, v) for t, v in (("anon", anon), ("file", file), ("shmem", shmem))
            if t in allowed or v]


def _zero_row() -> dict[str, Any]:
    return {"anon_bytes": 0, "file_bytes": 0, "shmem_bytes": 0, "virtual_bytes": 0,
            "drift_bytes": 0, "mappings": []}


def _group_members(state: TickState) -> dict[tuple[str, ...], tuple[
        dict[str, Any] | None, list[dict[str, Any]]]]:
    """row_key (group, comm[, container_id, pod_uid]) -> (the retired counters, the
    live snapshots), in merge order."""
    assert state.groups is not None
    members: dict[tuple[str, ...], tuple[dict[str, Any] | None, list[dict[str, Any]]]] = {}
    for key, counters in state.retired.items():
        members[key] = (counters, [])
    for pid, snap in state.snapshots.items():
        key = row_key(state, pid, snap)
        if key not in members:
            members[key] = (None, [])
        members[key][1].append(snap)
    return members


def _merge(retired: dict[str, Any] | None, snaps: list[dict[str, Any]]) -> dict[str, Any]:
    """One group's merged snapshot: the sums of its processes, plus the counters
    of its exited ones."""
    row = _zero_row()
    if retired is not None:
        add_counters(row, retired)
    for snap in snaps:
        for f in ("anon_bytes", "file_bytes", "shmem_bytes", "virtual_bytes", "drift_bytes"):
            row[f] += snap[f]
        swap = snap.get("swap_bytes")
        row["swap_bytes"] = None if swap is None or row.get("swap_bytes", 0) is None \
            else row.get("swap_bytes", 0) + swap
        row["mappings"] = row["mappings"] + snap["mappings"]
        add_counters(row, snap)
    return row


def grouped_rows(state: TickState) -> list[tuple[list[str], dict[str, Any]]]:
    """(label values for who_of(state), merged snapshot) per group and comm (and
    container, in agent mode)."""
    return [([safe_label(v) for v in key], _merge(*m))
            for key, m in sorted(_group_members(state).items())]


def pid_rows(state: TickState) -> list[tuple[list[str], dict[str, Any]]]:
    return [(row_ids(state, pid, snap), snap)
            for pid, snap in sorted(state.snapshots.items())]


def freeze_startup_objects() -> None:
    """For the long-running process that serves /metrics, once it is set up
    (modules imported, probes loaded) and before it watches anything: collect,
    then move every object the cyclic GC tracks into its permanent generation
    (gc.freeze). Later full collections, which a scrape can have to wait for,
    then no longer walk the ~25,000 objects of the imported modules (~6 ms per
    collection on a 2-core VM). Objects made later (trackers, snapshots) are
    collected as usual."""
    gc.collect()
    gc.freeze()


GroupRow = tuple[tuple[str, str], list[Any]]
"""(identity, kind), [anon, file, shmem, virtual] (and pss, uss when asked for)."""

def _sum_mappings(snap: dict[str, Any], max_series: int,
                  pss: bool = False) -> tuple[list[GroupRow], int]:
    """group_mappings as rows ((identity, kind), [anon, file, shmem, virtual]), in
    the same order; lists instead of dicts (this runs for every mapping of every
    scrape). With `pss`, each row also carries the PSS and USS sums ([anon, file,
    shmem, virtual, pss, uss]), from the same pass: the PSS/USS series have exactly
    the identities, order and [other] of the resident series."""
    kept_sums: dict[tuple[str, str], list[Any]] | None = getattr(snap, "identity_sums", None)
    if kept_sums is None:
        groups = identity_sums(snap["mappings"], pss)
    else:
        # kept by the snapshot builder, tick by tick: fresh lists, never the builder's
        width = 6 if pss else 4
        groups = {key: g[:width] for key, g in kept_sums.items()}
    if len(groups) <= max_series:
        return list(groups.items()), 0
    items = list(groups.items())
    resident = [g[0] + g[1] + g[2] for _, g in items]
    # by resident bytes, largest first, ties in order of appearance (as a stable
    # sort with reverse=True of the items by the same key); one sort of the
    # identities (~60) per process, shared by the resident and PSS families
    ranked = [items[i] for i in sorted(range(len(items)), key=resident.__getitem__,
                                       reverse=True)]
    kept = dict(ranked[: max_series - 1])
    other = [0] * len(ranked[0][1])
    for _, g in ranked[max_series - 1:]:
        for j, x in enumerate(g):
            other[j] += x
    kept[(OTHER, "other")] = other
    return list(kept.items()), len(ranked) - (max_series - 1)


def group_mappings(snap: dict[str, Any], max_series: int) -> tuple[
        dict[tuple[str, str], dict[str, int]], int]:
    """Sum mappings by (identity, kind); keep the `max_series` largest by resident
    bytes and fold the rest into [other]. Returns the groups and how many were folded."""
    rows, folded = _sum_mappings(snap, max_series)
    return ({key: {"anon": a, "file": f, "shmem": s, "virtual": v, "faults": 0}
             for key, (a, f, s, v) in rows}, folded)


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

    @property
    def sample(self) -> str:
        return self.name + "_total" if self.kind == "counter" else self.name

    def header(self) -> str:
        return f"# HELP {self.sample} {_escape_help(self.help)}\n# TYPE {self.sample} {self.kind}\n"

    def add_metric(self, values: Sequence[str], value: float) -> None:
        self.rows.append((values, value))

    def render(self, out: list[str], cache: dict[str, str]) -> None:
        sample = self.sample
        out.append(self.header())
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


def _row_families(who: Sequence[str]) -> list[Family]:
    """The families with one or more series per process (or group), empty, in
    scrape order; the text renderer writes their samples itself, in the same order."""
    return [
        _gauge("memtrace_process_resident_bytes",
               "Resident memory of the process by type, exact per page table (equals statm "
               "at quiescent points).", labels=[*who, "type"]),
        _gauge("memtrace_process_virtual_bytes",
               "Virtual size of the process (sum of its mappings).", labels=who),
        _gauge("memtrace_mapping_resident_bytes",
               "Resident memory per mapping identity (all segments of one library together) "
               "by type.", labels=[*who, "mapping", "kind", "type"]),
        _gauge("memtrace_mapping_virtual_bytes", "Virtual size per mapping identity.",
               labels=[*who, "mapping", "kind"]),
        _counter("memtrace_page_faults",
                 "Page faults (user and kernel mode) per mapping identity since attach.",
                 labels=[*who, "mapping"]),
        _counter("memtrace_syscalls", "Address-space system calls since attach.",
                 labels=[*who, "syscall"]),
        _counter("memtrace_syscall_bytes",
                 "Bytes named by address-space system calls since attach.",
                 labels=[*who, "syscall"]),
        _gauge("memtrace_drift_bytes",
               "memtrace's resident total minus /proc/PID/statm at the last tick (0 when "
               "quiescent).", labels=who),
    ]


_HEADERS: dict[tuple[str, ...], list[bytes]] = {
    who: [f.header().encode() for f in _row_families(who)]
            for first in ("pid", "group")
            for who in ((first, "comm"), (first, "comm", *CONTAINER_LABELS))}

# Bounds of the caches kept between scrapes (see MemtraceCollector.render_text).
# The label caches are cleared when either holds this many entries, or their keys
# and values this many characters in all (identities can be paths of 4 kB).
LABEL_CACHE_MAX = 50_000
LABEL_CACHE_MAX_CHARS = 8_000_000


def _stamp(snap: dict[str, Any]) -> tuple[Any, ...] | None:
    """What a cached rendering of `snap` is valid for: its generation (bumped by
    the watch loop whenever anything but ts/tick_seconds changes) and, as a guard
    against a generation that repeats (a reused PID), its totals. None (never
    cached) without a generation."""
    gen = snap.get("generation")
    if gen is None:
        return None
    return (gen, snap.get("pid"), snap["comm"], snap["anon_bytes"], snap["file_bytes"],
            snap["shmem_bytes"], snap["virtual_bytes"], snap["drift_bytes"],
            snap.get("faults"), len(snap["mappings"]))


@dataclass
class _Rendered:
    """One process's (or group's) samples of each per-row family, as text."""

    stamp: Any
    parts: tuple[bytes, ...]  # UTF-8
    folded: int


class MemtraceCollector(Collector):
    def __init__(self, box: StateBox, max_mapping_series: int = 50) -> None:
        self.box = box
        self.max_mapping_series = max_mapping_series
        self.series_dropped_total = 0
        self._lock = threading.Lock()
        self._render_lock = threading.Lock()
        # Per process (or group): the mapping identities that have their own fault
        # series. Admitted when first seen while there is room, never evicted, so
        # the [other] sum only ever holds identities that never had a series and
        # the counter never goes backwards.
        self._fault_names: dict[tuple[str, ...], set[str]] = {}
        # Text fast path caches. Label values: raw mapping identity (and kind) -> escaped
        # safe_label() (a pure function), both cleared at LABEL_CACHE_MAX(_CHARS).
        # Rows: (pid, comm) or (group, comm) -> the row's text for the snapshot
        # whose _stamp() it holds; one entry per live row, pruned every scrape.
        self._labels: dict[str, str] = {}
        self._fragments: dict[tuple[str, str], str] = {}  # the same for (identity, kind)
        self._label_chars = 0
        self._rendered: dict[tuple[str, ...], _Rendered] = {}

    def _fault_series(self, key: tuple[str, ...], snap: dict[str, Any]) -> list[tuple[str, int]]:
        counts: dict[str, int] = snap.get("faults_by_mapping", {})
        with self._lock:
            named = self._fault_names.setdefault(key, set())
            if len(named) < self.max_mapping_series - 1 and not named.issuperset(counts):
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
            for key in [k for k in self._rendered if k not in live_keys]:
                del self._rendered[key]

    def collect(self) -> Iterator[Metric]:
        for family in self.build():
            yield family.to_metric()

    def _room_for_labels(self, chars: int) -> None:
        """Clear both label caches before they pass their bounds."""
        self._label_chars += chars
        if (len(self._labels) + len(self._fragments) >= LABEL_CACHE_MAX
                or self._label_chars > LABEL_CACHE_MAX_CHARS):
            self._labels.clear()
            self._fragments.clear()
            self._label_chars = chars

    def _fragment(self, key: tuple[str, str]) -> str:
        """`mapping="…",kind="…"` for an (identity, kind); memoised."""
        value = self._fragments.get(key)
        if value is None:
            value = \
                f'mapping="{_escape_label(safe_label(key[0]))}",kind="{_escape_label(key[1])}"'
            self._room_for_labels(len(key[0]) + len(value))
            self._fragments[key] = value
        return value

    def _label(self, identity: str) -> str:
        """safe_label(identity), escaped for the text format; memoised."""
        value = self._labels.get(identity)
        if value is None:
            value = _escape_label(safe_label(identity))
            self._room_for_labels(len(identity) + len(value))
            self._labels[identity] = value
        return value

    def _render_row(self, who: Sequence[str], ids: Sequence[str],
                    snap: dict[str, Any]) -> _Rendered:
        """The samples of one process (or group) for each of _row_families() and,
        for a process with PSS figures, of the four PSS/USS families, as UTF-8
        text (one piece per family, samples in the order build() adds them; the
        PSS pieces are empty for a group or a process without figures)."""
        p = ",".join([f'{k}="{_escape_label(v)}"' for k, v in zip(who, ids)])
        num = _number
        res = (f'memtrace_process_resident_bytes{{{p},type="anon"}} '
               f'{num(snap["anon_bytes"])}\n'
               f'memtrace_process_resident_bytes{{{p},type="file"}} '
               f'{num(snap["file_bytes"])}\n'
               f'memtrace_process_resident_bytes{{{p},type="shmem"}} '
               f'{num(snap["shmem_bytes"])}\n')
        virt = f'memtrace_process_virtual_bytes{{{p}}} {num(snap["virtual_bytes"])}\n'
        # PSS series for a process with figures (pid mode; a group's merged row
        # has none: group mode renders them from pss_families(), see
        # _render_parts). The same pass sums PSS/USS with the resident bytes.
        proc_pss: Any = snap.get("pss_bytes")
        proc_uss: Any = snap.get("uss_bytes")
        with_pss = who[0] == "pid" and proc_pss is not None and proc_uss is not None
        groups, folded = _sum_mappings(snap, self.max_mapping_series, with_pss)
        fragments = self._fragments
        fragment = self._fragment
        res_prefix = f"memtrace_mapping_resident_bytes{{{p},"
        virt_prefix = f"memtrace_mapping_virtual_bytes{{{p},"
        mr: list[str] = []
        mv: list[str] = []
        mp: list[str] = []
        mu: list[str] = []
        if with_pss:
            pss_prefix = f"memtrace_mapping_pss_bytes{{{p},"
            uss_prefix = f"memtrace_mapping_uss_bytes{{{p},"
            for key, (a, f, s, v, ps, us) in groups:
                lab = fragments.get(key)
                if lab is None:
                    lab = fragment(key)
                if not (type(a) is int and type(f) is int and type(s) is int
                        and type(v) is int and type(ps) is int and type(us) is int):
                    a, f, s, v, ps, us = num(a), num(f), num(s), num(v), num(ps), num(us)
                mr.extend([f'{res_prefix}{lab},type="{t}"}} {x}\n'
                           for t, x in resident_types(key[1], a, f, s)])
                mv.append(f"{virt_prefix}{lab}}} {v}\n")
                mp.append(f"{pss_prefix}{lab}}} {ps}\n")
                mu.append(f"{uss_prefix}{lab}}} {us}\n")
        else:
            for key, (a, f, s, v) in groups:
                lab = fragments.get(key)
                if lab is None:
                    lab = fragment(key)
                if not (type(a) is int and type(f) is int and type(s) is int
                        and type(v) is int):
                    a, f, s, v = num(a), num(f), num(s), num(v)
                mr.extend([f'{res_prefix}{lab},type="{t}"}} {x}\n'
                           for t, x in resident_types(key[1], a, f, s)])
                mv.append(f"{virt_prefix}{lab}}} {v}\n")
        labels = self._labels
        label = self._label
        faults = []
        for identity, n in self._fault_series(tuple(ids), snap):
            name = labels.get(identity)
            if name is None:
                name = label(identity)
            faults.append(f'memtrace_page_faults_total{{{p},mapping="{name}"}} {num(n)}\n')
        calls = snap["syscalls"]
        call_bytes = snap["syscall_bytes"]
        return _Rendered(None, tuple([part.encode("utf-8") for part in (
            res, virt, "".join(mr), "".join(mv), "".join(faults),
            "".join([f'memtrace_syscalls_total{{{p},syscall="{sc}"}} '
                     f'{num(calls.get(sc, 0))}\n' for sc in SYSCALLS]),
            "".join([f'memtrace_syscall_bytes_total{{{p},syscall="{sc}"}} '
                     f'{num(call_bytes.get(sc, 0))}\n' for sc in SYSCALLS]),
            f'memtrace_drift_bytes{{{p}}} {num(snap["drift_bytes"])}\n',
            f"memtrace_process_pss_bytes{{{p}}} {num(proc_pss)}\n" if with_pss else "",
            f"memtrace_process_uss_bytes{{{p}}} {num(proc_uss)}\n" if with_pss else "",
            "".join(mp), "".join(mu),
        )]), folded)

    def _text_rows(self, state: TickState) -> list[tuple[list[str], Any, Any]]:
        """(label values, stamp or None, a function returning the row's snapshot)
        per row, in scrape order; for a group the stamp covers every member and the
        exited processes' counters, and the merge only runs when it is needed."""
        if state.groups is None:
            return [(row_ids(state, pid, snap), _stamp(snap), lambda s=snap: s)
                    for pid, snap in sorted(state.snapshots.items())]
        rows: list[tuple[list[str], Any, Any]] = []
        for key, (retired, snaps) in sorted(_group_members(state).items()):
            stamps = [_stamp(s) for s in snaps]
            stamp = None if None in stamps else (
                tuple(stamps),
                None if retired is None else {k: dict(v) for k, v in retired.items()})
            rows.append(([safe_label(v) for v in key], stamp,
                         lambda r=retired, s=snaps: _merge(r, s)))
        return rows

    def render_text(self) -> str:
        """The whole memtrace part of a scrape in the Prometheus text format 0.0.4:
        the same samples as collect(), in the same order. Built from the current
        state on every scrape; a process's (or group's) text is reused from the
        previous scrape only when its snapshot carries the same generation (see
        _stamp), so a cached text is never served for a changed snapshot."""
        return b"".join(self._render_parts()).decode("utf-8")

    def render_chunks(self) -> list[bytes]:
        """render_text() as UTF-8 pieces (one process's samples of one family
        each, kB to tens of kB), never one buffer of several MB: what /metrics
        serves (memtrace.exporter.web joins them a few at a time as it writes)."""
        return self._render_parts()

    def _render_parts(self) -> list[bytes]:
        t0 = time.perf_counter()
        state = self.box.get()
        who = who_of(state)
        rows = self._text_rows(state)
        rendered: list[_Rendered] = []
        dropped_now = 0
        cache = self._rendered
        # One scrape renders at a time: a concurrent scrape of the same tick
        # then finds every process in the cache instead of rendering it again
        # while both share the interpreter lock.
        with self._render_lock:
            for ids, stamp, get_snap in rows:
                key = tuple(ids)
                entry = cache.get(key) if stamp is not None else None
                if entry is None or entry.stamp != stamp:
                    entry = self._render_row(who, ids, get_snap())
                    entry.stamp = stamp
                    if stamp is not None:
                        with self._lock:
                            cache[key] = entry
                rendered.append(entry)
                dropped_now += entry.folded
        out: list[bytes] = []
        parts = [r.parts for r in rendered]
        for i, header in enumerate(_HEADERS[who]):
            out.append(header)
            out.extend(map(itemgetter(i), parts))
        with self._lock:
            self.series_dropped_total += dropped_now
            dropped_total = self.series_dropped_total
        self.forget({tuple(ids) for ids, _, _ in rows})
        escaped: dict[str, str] = {}
        text: list[str] = []
        lib_rows = ([(ids, get_snap()) for ids, _, get_snap in rows]
                    if state.groups is None else [])
        proc_rows = ([(ids, get_snap()) for ids, _, get_snap in rows]
                     if state.groups is None else grouped_rows(state))
        for family in [*process_families(proc_rows, list(who)), *heap_families(state),
                       *library_families(lib_rows, list(who))]:
            family.render(text, escaped)
        if state.groups is None:
            # the PSS/USS samples were rendered (and cached) with each process's
            # other samples; a process without PSS figures has empty pieces
            out.append("".join(text).encode("utf-8"))
            text = []
            first = len(_HEADERS[who])
            for i, header in enumerate(_PSS_HEADERS[who]):
                out.append(header)
                out.extend(map(itemgetter(first + i), parts))
        else:
            pss_rows = ([(ids, get_snap()) for ids, _, get_snap in rows]
                        if any(s.get("pss_bytes") is not None
                               for s in state.snapshots.values()) else [])
            for family in pss_families(state, pss_rows, list(who), self.max_mapping_series):
                family.render(text, escaped)
        for family in self._self_metrics(state, dropped_total, time.perf_counter() - t0):
            family.render(text, escaped)
        out.append("".join(text).encode("utf-8"))
        return out

    def build(self) -> list[Family]:
        t0 = time.perf_counter()
        state = self.box.get()
        who = list(who_of(state))
        rows = grouped_rows(state) if state.groups is not None else pid_rows(state)
        families = _row_families(who)
        proc_res, proc_virt, map_res, map_virt, faults, calls, call_bytes, drift = families
        dropped_now = 0
        for ids, snap in rows:
            for t in TYPES:
                proc_res.add_metric([*ids, t], snap[f"{t}_bytes"])
            proc_virt.add_metric(ids, snap["virtual_bytes"])
            drift.add_metric(ids, snap["drift_bytes"])
            groups, folded = _sum_mappings(snap, self.max_mapping_series)
            dropped_now += folded
            for (identity, kind), (a, f, s, v) in groups:
                name = safe_label(identity)
                for t, x in resident_types(kind, a, f, s):
                    map_res.add_metric([*ids, name, kind, t], x)
                map_virt.add_metric([*ids, name, kind], v)
            for identity, n in self._fault_series(tuple(ids), snap):
                faults.add_metric([*ids, safe_label(identity)], n)
            for sc in SYSCALLS:
                calls.add_metric([*ids, sc], snap["syscalls"].get(sc, 0))
                call_bytes.add_metric([*ids, sc], snap["syscall_bytes"].get(sc, 0))
        with self._lock:
            self.series_dropped_total += dropped_now
            dropped_total = self.series_dropped_total
        self.forget({tuple(ids) for ids, _ in rows})
        return [*families,
                *process_families(rows, who),
                *heap_families(state),
                *library_families(rows, who),
                *pss_families(state, rows, who, self.max_mapping_series),
                *self._self_metrics(state, dropped_total, time.perf_counter() - t0)]

    def _self_metrics(self, state: TickState, dropped_total: int,
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
        for buffer, n in sorted(state.notices_lost.items()):
            lost.add_metric([buffer], n)
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


# ------------------------------------------------------------------ the kernel's own figures

def process_families(rows: list[tuple[list[str], dict[str, Any]]],
                     who: list[str]) -> list[Family]:
    """Per process (or group): swap (with PSS figures: --pss-interval), the peak
    resident size (VmHWM; per pid only: the peaks of a group's processes do not
    add up to the group's peak) and the kernel's minor and major fault counters
    since the process started (a group adds those of its exited processes)."""
    swap = _gauge("memtrace_process_swap_bytes",
                  "Swapped-out bytes of the process (smaps Swap summed; needs "
                  "--pss-interval > 0).", labels=who)
    peak = _gauge("memtrace_process_peak_resident_bytes",
                  "The kernel's high-water mark of the process's resident size since it "
                  "started (VmHWM of /proc/PID/status). Per pid only.", labels=who)
    faults = _counter("memtrace_process_page_faults",
                      "The kernel's page fault counters of the process since it started "
                      "(/proc/PID/stat minflt, majflt): minor (no I/O) and major (read "
                      "from disk or swap).", labels=[*who, "fault"])
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


def heap_families(state: TickState) -> list[Family]:
    """memtrace_heap_* gauges from the `heap` key of the snapshots (latest background
    walk, --heap-interval): labels pid (or group), comm, arena (main|thread).
    Processes without figures (not glibc malloc, no walk yet) have no series."""
    if state.heap_walks is None:
        return []
    who = list(who_of(state))
    fams = [_gauge(name, text, labels=[*who, "arena"]) for name, _, text in HEAP_FAMILIES]
    sums: dict[tuple[str, ...], dict[str, list[int]]] = {}
    for pid, snap in sorted(state.snapshots.items()):
        by_kind = (snap.get("heap") or {}).get("by_kind")
        if not by_kind:
            continue
        row = sums.setdefault(tuple(row_ids(state, pid, snap)), {})
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

def pss_families(state: TickState, rows: list[tuple[list[str], dict[str, Any]]],
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
        for (identity, kind), g in _sum_mappings(snap, max_series, pss=True)[0]:
            values = [*ids, safe_label(identity), kind]
            map_pss.add_metric(values, g[4])
            map_uss.add_metric(values, g[5])
    return [proc_pss, proc_uss, map_pss, map_uss]


_PSS_HEADERS: dict[tuple[str, ...], list[bytes]] = {
    who: [f.header().encode() for f in pss_families(TickState(), [], list(who), 2)]
    for who in _HEADERS}
