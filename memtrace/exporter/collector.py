"""The Prometheus collector of memtrace's metrics, built from the latest tick (a
process that exits is gone from the next scrape), in two ways that give the same
samples: collect() for prometheus_client, and the text fast path /metrics serves
(MemtraceCollector.render_scrape; render_text, render_chunks). Between scrapes the
text path keeps escaped label values, per live process its rendered text for one
snapshot generation, and the text of the latest tick, which every scrape of that
tick serves with a fresh tail of self-monitoring families. What each family is called, its HELP
text and labels come from memtrace.exporter.metrics (a contract: docs/metrics.md)."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from memtrace.exporter import metrics as m
from memtrace.exporter.body import TickText
from memtrace.exporter.families import (
    Family,
    escape_label,
    heap_families,
    library_families,
    number,
    process_families,
    pss_families,
    row_families,
    self_families,
)
from memtrace.exporter.rows import (
    OTHER,
    SYSCALLS,
    TYPES,
    group_members,
    grouped_rows,
    merge,
    pid_rows,
    resident_types,
    row_ids,
    safe_label,
    sum_mappings,
    who_of,
)
from memtrace.exporter.stackseries import stack_families
from memtrace.published import StateBox, TickState


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


# What the text path writes for the per-process families, from their definitions:
# the HELP/TYPE lines (the same for every label set), sample names and the label
# names after the process labels. Unpacking checks the shapes the renderer assumes.
_ROW_HEADERS = [metric.header.encode() for metric in m.ROW_METRICS]
_PSS_HEADERS = [metric.header.encode() for metric in m.PSS_METRICS]
_PROC_RES, (_PROC_TYPE_LABEL,) = m.PROCESS_RESIDENT.sample, m.PROCESS_RESIDENT.labels
_PROC_VIRT = m.PROCESS_VIRTUAL.sample
_MAP_RES, (_, _, _MAP_TYPE_LABEL) = m.MAPPING_RESIDENT.sample, m.MAPPING_RESIDENT.labels
_MAP_VIRT, (_MAPPING_LABEL, _KIND_LABEL) = m.MAPPING_VIRTUAL.sample, m.MAPPING_VIRTUAL.labels
_FAULTS, (_FAULT_LABEL,) = m.PAGE_FAULTS.sample, m.PAGE_FAULTS.labels
_CALLS, (_CALL_LABEL,) = m.SYSCALL_COUNT.sample, m.SYSCALL_COUNT.labels
_CALL_BYTES, (_CALL_BYTES_LABEL,) = m.SYSCALL_BYTES.sample, m.SYSCALL_BYTES.labels
_DRIFT = m.DRIFT.sample
_PROC_PSS, _PROC_USS, _MAP_PSS, _MAP_USS = (metric.sample for metric in m.PSS_METRICS)

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
    """memtrace's families for the latest tick in `box`: collect() (prometheus_client)
    and render_text()/render_chunks() (the text fast path) serve the same samples."""

    def __init__(self, box: StateBox, max_mapping_series: int = 50,
                 stack_series: int = 0) -> None:
        self.box = box
        self.max_mapping_series = max_mapping_series
        self.stack_series = stack_series     # --stacks-series (0: no stack families)
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
        # The latest tick's text (render_scrape): its state (weakly: a state
        # replaced by the next tick is freed), text and folded identities.
        self._tick: tuple[weakref.ref[TickState], TickText, int] | None = None

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
            value = (f'{_MAPPING_LABEL}="{escape_label(safe_label(key[0]))}",'
                     f'{_KIND_LABEL}="{escape_label(key[1])}"')
            self._room_for_labels(len(key[0]) + len(value))
            self._fragments[key] = value
        return value

    def _label(self, identity: str) -> str:
        """safe_label(identity), escaped for the text format; memoised."""
        value = self._labels.get(identity)
        if value is None:
            value = escape_label(safe_label(identity))
            self._room_for_labels(len(identity) + len(value))
            self._labels[identity] = value
        return value

    def _render_row(self, who: Sequence[str], ids: Sequence[str],
                    snap: dict[str, Any]) -> _Rendered:
        """The samples of one process (or group) for each of metrics.ROW_METRICS and,
        for a process with PSS figures, of the four PSS/USS families, as UTF-8
        text (one piece per family, samples in the order build() adds them; the
        PSS pieces are empty for a group or a process without figures)."""
        p = ",".join([f'{k}="{escape_label(v)}"' for k, v in zip(who, ids)])
        num = number
        res = (f'{_PROC_RES}{{{p},{_PROC_TYPE_LABEL}="anon"}} {num(snap["anon_bytes"])}\n'
               f'{_PROC_RES}{{{p},{_PROC_TYPE_LABEL}="file"}} {num(snap["file_bytes"])}\n'
               f'{_PROC_RES}{{{p},{_PROC_TYPE_LABEL}="shmem"}} {num(snap["shmem_bytes"])}\n')
        virt = f'{_PROC_VIRT}{{{p}}} {num(snap["virtual_bytes"])}\n'
        # PSS series for a process with figures (pid mode; a group's merged row
        # has none: group mode renders them from pss_families(), see
        # _render_parts). The same pass sums PSS/USS with the resident bytes.
        proc_pss: Any = snap.get("pss_bytes")
        proc_uss: Any = snap.get("uss_bytes")
        with_pss = who[0] == "pid" and proc_pss is not None and proc_uss is not None
        groups, folded = sum_mappings(snap, self.max_mapping_series, with_pss)
        fragments = self._fragments
        fragment = self._fragment
        res_prefix = f"{_MAP_RES}{{{p},"
        virt_prefix = f"{_MAP_VIRT}{{{p},"
        type_label = _MAP_TYPE_LABEL
        mr: list[str] = []
        mv: list[str] = []
        mp: list[str] = []
        mu: list[str] = []
        if with_pss:
            pss_prefix = f"{_MAP_PSS}{{{p},"
            uss_prefix = f"{_MAP_USS}{{{p},"
            for key, (a, f, s, v, ps, us) in groups:
                lab = fragments.get(key)
                if lab is None:
                    lab = fragment(key)
                if not (type(a) is int and type(f) is int and type(s) is int
                        and type(v) is int and type(ps) is int and type(us) is int):
                    a, f, s, v, ps, us = num(a), num(f), num(s), num(v), num(ps), num(us)
                mr.extend([f'{res_prefix}{lab},{type_label}="{t}"}} {x}\n'
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
                mr.extend([f'{res_prefix}{lab},{type_label}="{t}"}} {x}\n'
                           for t, x in resident_types(key[1], a, f, s)])
                mv.append(f"{virt_prefix}{lab}}} {v}\n")
        labels = self._labels
        label = self._label
        faults = []
        for identity, n in self._fault_series(tuple(ids), snap):
            name = labels.get(identity)
            if name is None:
                name = label(identity)
            faults.append(f'{_FAULTS}{{{p},{_FAULT_LABEL}="{name}"}} {num(n)}\n')
        calls = snap["syscalls"]
        call_bytes = snap["syscall_bytes"]
        return _Rendered(None, tuple([part.encode("utf-8") for part in (
            res, virt, "".join(mr), "".join(mv), "".join(faults),
            "".join([f'{_CALLS}{{{p},{_CALL_LABEL}="{sc}"}} '
                     f'{num(calls.get(sc, 0))}\n' for sc in SYSCALLS]),
            "".join([f'{_CALL_BYTES}{{{p},{_CALL_BYTES_LABEL}="{sc}"}} '
                     f'{num(call_bytes.get(sc, 0))}\n' for sc in SYSCALLS]),
            f'{_DRIFT}{{{p}}} {num(snap["drift_bytes"])}\n',
            f"{_PROC_PSS}{{{p}}} {num(proc_pss)}\n" if with_pss else "",
            f"{_PROC_USS}{{{p}}} {num(proc_uss)}\n" if with_pss else "",
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
        for key, (retired, snaps) in sorted(group_members(state).items()):
            stamps = [_stamp(s) for s in snaps]
            stamp = None if None in stamps else (
                tuple(stamps),
                None if retired is None else {k: dict(v) for k, v in retired.items()})
            rows.append(([safe_label(v) for v in key], stamp,
                         lambda r=retired, s=snaps: merge(r, s)))
        return rows

    def render_text(self) -> str:
        """The whole memtrace part of a scrape in the Prometheus text format 0.0.4:
        the same samples as collect(), in the same order. Built from the current
        state on every scrape; a process's (or group's) text is reused from the
        previous scrape only when its snapshot carries the same generation (see
        _stamp), so a cached text is never served for a changed snapshot."""
        return b"".join(self.render_chunks()).decode("utf-8")

    def render_chunks(self) -> list[bytes]:
        """render_text() as UTF-8 pieces (one process's samples of one family
        each, kB to tens of kB), never one buffer of several MB."""
        head, tail = self.render_scrape()
        return [*head.chunks, *tail]

    def render_scrape(self) -> tuple[TickText, list[bytes]]:
        """What /metrics serves (memtrace.exporter.web): the text of the latest
        tick, built by the first scrape that sees that tick and shared by every
        later scrape of it (with its gzip form, see TickText), and this scrape's
        own tail: the self-monitoring families (memtrace_scrape_build_seconds is
        this scrape's time, the folded-series counter adds this scrape's folds)."""
        t0 = time.perf_counter()
        state = self.box.get()
        # One scrape renders at a time: a concurrent scrape of the same tick
        # waits for it (off the interpreter lock) and serves its text.
        with self._render_lock:
            tick = self._tick
            if tick is None or tick[0]() is not state:
                chunks, dropped = self._render_parts(state)
                tick = self._tick = (weakref.ref(state), TickText(chunks), dropped)
        with self._lock:
            self.series_dropped_total += tick[2]
            dropped_total = self.series_dropped_total
        text: list[str] = []
        for family in self_families(state, dropped_total, time.perf_counter() - t0):
            family.render(text, {})
        return tick[1], ["".join(text).encode("utf-8")]

    def _render_parts(self, state: TickState) -> tuple[list[bytes], int]:
        """The text of every family but the self-monitoring ones, for `state`,
        and how many mapping identities the series cap folded in it."""
        who = who_of(state)
        rows = self._text_rows(state)
        rendered: list[_Rendered] = []
        dropped_now = 0
        cache = self._rendered
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
        for i, header in enumerate(_ROW_HEADERS):
            out.append(header)
            out.extend(map(itemgetter(i), parts))
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
            first = len(_ROW_HEADERS)
            for i, header in enumerate(_PSS_HEADERS):
                out.append(header)
                out.extend(map(itemgetter(first + i), parts))
        else:
            pss_rows = ([(ids, get_snap()) for ids, _, get_snap in rows]
                        if any(s.get("pss_bytes") is not None
                               for s in state.snapshots.values()) else [])
            for family in pss_families(state, pss_rows, list(who), self.max_mapping_series):
                family.render(text, escaped)
            out.append("".join(text).encode("utf-8"))
            text = []
        for family in stack_families(state, self.stack_series):
            family.render(text, escaped)
        if text:
            out.append("".join(text).encode("utf-8"))
        return out, dropped_now

    def build(self) -> list[Family]:
        t0 = time.perf_counter()
        with self._render_lock:
            self._tick = None  # its fault series and row cache may change below
        state = self.box.get()
        who = list(who_of(state))
        rows = grouped_rows(state) if state.groups is not None else pid_rows(state)
        families = row_families(who)
        proc_res, proc_virt, map_res, map_virt, faults, calls, call_bytes, drift = families
        dropped_now = 0
        for ids, snap in rows:
            for t in TYPES:
                proc_res.add_metric([*ids, t], snap[f"{t}_bytes"])
            proc_virt.add_metric(ids, snap["virtual_bytes"])
            drift.add_metric(ids, snap["drift_bytes"])
            groups, folded = sum_mappings(snap, self.max_mapping_series)
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
                *stack_families(state, self.stack_series),
                *self_families(state, dropped_total, time.perf_counter() - t0)]
