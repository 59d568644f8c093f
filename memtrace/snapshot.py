"""The per-process snapshot: one dict that every view renders (JSON contract
in docs/output.md).

Snapshots are built incrementally: a SnapshotBuilder keeps one entry per
mapping (its dict and its JSON text) and rebuilds only the mappings whose
figures changed since the previous tick, plus every mapping when the VMA list
was replaced (entries whose VMA is unchanged are still reused). A quiet
process with 60k mappings costs a list copy per tick, not 60k dicts and a
13 MB json.dumps."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, TypedDict, cast

from memtrace.pss.accounting import PSS_SHIFT, Usage
from memtrace.trace.attribution import Segment, classify, mapping_identity, segments_for, split
from memtrace.trace.model import AddressSpace
from memtrace.trace.procfs import Vma
from memtrace.trace.tracker import ProcessTracker

_encode = json.JSONEncoder(separators=(",", ":")).encode
# Keys left out of the generation's fingerprint (the mappings are followed by
# the builder itself).
# Mappings per cached piece of the JSON array: a tick re-joins only the pieces
# holding a changed mapping.
_BLOCK = 256
# Generations are drawn from one counter for all processes, so a generation
# never repeats, even for a new process that reuses a PID (the exporter caches
# a process's rendered metrics by pid and generation).
_generations = itertools.count(1)
_UNSTAMPED = frozenset({"ts", "tick_seconds", "generation", "mappings"})


class MappingRecord(TypedDict):
    """One mapping of a snapshot (docs/output.md, "mappings"). PSS, USS and swap
    are null when PSS is off or unavailable."""

    start: int
    end: int
    perms: str
    offset: int
    path: str
    kind: str
    mapping: str              # the identity mappings are summed by (library, file, ...)
    segment: str | None       # text, rodata, relro, data, bss of a library; else null
    rss_bytes: int
    anon_bytes: int
    file_bytes: int
    shmem_bytes: int
    virtual_bytes: int
    faults: int
    pss_bytes: int | None
    uss_bytes: int | None
    swap_bytes: int | None


class _BuiltRecord(TypedDict):
    """What SnapshotBuilder builds."""

    ts: float
    pid: int
    comm: str
    rss_bytes: int
    anon_bytes: int
    file_bytes: int
    shmem_bytes: int
    virtual_bytes: int
    pss_bytes: int | None
    uss_bytes: int | None
    swap_bytes: int | None
    statm_rss_bytes: int | None
    peak_rss_bytes: int | None
    minor_faults: int | None
    major_faults: int | None
    drift_bytes: int
    faults: int
    faults_by_mapping: dict[str, int]
    syscalls: dict[str, int]
    syscall_bytes: dict[str, int]
    full_rescans: dict[str, int]
    events_lost: int
    events_sampled_out: int
    tick_seconds: float
    generation: int
    mappings: list[MappingRecord]


class SnapshotRecord(_BuiltRecord, total=False):
    """The declared shape of a snapshot (docs/output.md): what SnapshotBuilder
    builds, then the keys the session adds (each only when its feature is on).
    tests/unit/test_snapshot_shape.py checks snapshots against it; at run time
    a snapshot is a plain dict (a Snapshot)."""

    library_events: list[dict[str, Any]]
    library_totals: dict[str, Any]
    pss_refreshed_ts: float | None          # with PSS on
    heap: dict[str, Any]                    # with --heap-interval
    stacks: dict[str, Any]                  # with --stacks (memtrace/stacks/summary.py)
    malloc: dict[str, Any]                  # with run --malloc (memtrace/malloc/outstanding.py)


class Snapshot(dict[str, Any]):
    """A snapshot dict that may also carry its mappings' JSON text (the JSON
    array of snap["mappings"], as ASCII bytes in pieces to be joined by
    commas), so the JSON view need not encode every mapping again. Snapshots
    are never modified once handed out, except for keys the session adds
    before publishing (e.g. "heap"), so consecutive snapshots of a quiet
    process share their mappings list and that text."""

    mappings_json_blocks: list[bytes] | None = None
    # (mapping identity, kind) -> [anon, file, shmem, virtual, pss, uss] bytes
    # summed over the mappings, in order of first appearance (pss/uss 0 where
    # null); read-only. The exporter uses it instead of summing every mapping.
    identity_sums: dict[tuple[str, str], list[int]] | None = None


@dataclass(frozen=True)
class _Entry:
    key: tuple[Any, ...]        # what the mapping's dict was built from
    mapping: MappingRecord
    text: bytes                 # its JSON (ASCII); empty when the builder makes no text
    anon: int
    file: int
    shmem: int
    virtual: int
    pss_fixed: int = 0      # PSS in the kernel's fixed point (bytes << PSS_SHIFT)
    uss: int = 0
    swap: int = 0
    pss_missing: int = 0    # 1: no PSS figures for this mapping (off, unavailable)


class SnapshotBuilder:
    """Builds the snapshots of one tracked process, tick after tick.
    `json_text`: also keep every mapping's JSON text for the JSON view (off
    when nothing writes JSON: the exporter and the table need the dicts only)."""

    def __init__(self, json_text: bool = True) -> None:
        self.json_text = json_text
        self._space: AddressSpace | None = None
        self._layout = -1
        self._exe = b""
        self._entries: list[_Entry] = []
        self._index: dict[int, int] = {}        # VMA start -> position in _entries
        self._totals = [0, 0, 0, 0]             # anon, file, shmem, virtual
        self._pss_totals = [0, 0, 0, 0]         # pss_fixed, uss, swap, missing
        self._generation = 0
        self._fingerprint = ""
        self._content_changed = False
        self._mappings: list[MappingRecord] = []             # e.mapping of _entries
        self._segments: dict[int, Segment] = {}              # by VMA start
        self._blocks: list[bytes | None] = []  # JSON of _entries[k*_BLOCK:(k+1)*_BLOCK]
        self._sums: dict[tuple[str, str], list[int]] = {}    # Snapshot.identity_sums
        self._pss_usage: dict[int, Usage] | None = None     # of the build in progress

    def build(self, tracker: ProcessTracker, ts: float,
              pss_usage: dict[int, Usage] | None = None) -> Snapshot:
        """The snapshot of this tick; call stamp() on it once the caller has
        added its own keys (heap, library events). `pss_usage`: PSS/USS/swap
        per VMA start (memtrace.pss.live), None when PSS is off or unavailable."""
        self._pss_usage = pss_usage
        space = tracker.space
        changed = space.take_changed()
        if (space is not self._space or space.layout_version != self._layout
                or tracker.exe != self._exe):
            self._rebuild_all(tracker, changed)
        else:
            self._rebuild_changed(tracker, changed)
        self._content_changed = bool(changed)
        return self._snapshot(tracker, ts)

    def stamp(self, snap: Snapshot) -> Snapshot:
        """Set snap["generation"]: the previous one if nothing but the time
        fields changed since the previous snapshot, else the next."""
        fingerprint = _encode({k: v for k, v in snap.items() if k not in _UNSTAMPED})
        if self._content_changed or fingerprint != self._fingerprint:
            self._generation = next(_generations)
            self._fingerprint = fingerprint
        self._content_changed = False
        snap["generation"] = self._generation
        return snap

    def _entry(self, tracker: ProcessTracker, vma: Vma, prev: _Entry | None = None) -> _Entry:
        """The entry of vma; `prev`, an entry of the same VMA and segment, lends
        everything but the figures."""
        seg = self._segments.get(vma.start)
        if prev is not None:
            kind = prev.mapping["kind"]
            identity, segment = prev.mapping["mapping"], prev.mapping["segment"]
        else:
            kind = classify(vma, tracker.exe)
            if seg is not None:
                kind = seg.kind           # the bss: anonymous, counted with its library
            identity = seg.mapping if seg is not None else mapping_identity(vma, kind)
            segment = seg.name if seg is not None else None
        parts = split(tracker.space.resident_of(vma), kind)
        faults = tracker.faults_by_vma.get(vma.start, 0)
        usage = self._pss_usage.get(vma.start) if self._pss_usage is not None else None
        if usage is None:
            pss_fixed = uss = swap = 0
        else:
            pss_fixed, uss, swap = usage.pss_fixed, usage.uss, usage.swap
        mapping: MappingRecord = {
            "start": vma.start,
            "end": vma.end,
            "perms": vma.perms,
            "offset": vma.offset,
            "path": prev.mapping["path"] if prev is not None else vma.display_path,
            "kind": kind,
            "mapping": identity,
            "segment": segment,
            "rss_bytes": parts.total,
            "anon_bytes": parts.anon,
            "file_bytes": parts.file,
            "shmem_bytes": parts.shmem,
            "virtual_bytes": vma.size,
            "faults": faults,
            "pss_bytes": usage.pss if usage is not None else None,
            "uss_bytes": uss if usage is not None else None,
            "swap_bytes": swap if usage is not None else None,
        }
        text = _encode(mapping).encode("ascii") if self.json_text else b""
        return _Entry(key=(vma.identity, parts, faults, seg, usage), mapping=mapping,
                      text=text, anon=parts.anon, file=parts.file,
                      shmem=parts.shmem, virtual=vma.size, pss_fixed=pss_fixed, uss=uss,
                      swap=swap, pss_missing=int(usage is None))

    def _rebuild_all(self, tracker: ProcessTracker, changed: set[int]) -> None:
        # Segment names depend on neighbours (a bss follows its data segment):
        # named again for every new VMA list.
        self._segments = segments_for(tracker.space, tracker.space.vmas, tracker.exe,
                                      tracker.pid, tracker.procfs.root)
        old = {e.mapping["start"]: e for e in self._entries}
        entries: list[_Entry] = []
        for vma in tracker.space.vmas:
            prev = old.get(vma.start)
            if (prev is None or prev.key[0] != vma.identity or tracker.exe != self._exe
                    or prev.key[3] != self._segments.get(vma.start)):
                entries.append(self._entry(tracker, vma))
            elif vma.start in changed:
                entries.append(self._entry(tracker, vma, prev=prev))
            else:
                entries.append(prev)
        self._entries = entries
        self._mappings = [e.mapping for e in entries]
        self._sums = identity_sums(self._mappings)
        self._blocks = [None] * ((len(entries) + _BLOCK - 1) // _BLOCK)
        self._index = {e.mapping["start"]: i for i, e in enumerate(entries)}
        self._totals = [sum(e.anon for e in entries), sum(e.file for e in entries),
                        sum(e.shmem for e in entries), sum(e.virtual for e in entries)]
        self._pss_totals = [sum(e.pss_fixed for e in entries), sum(e.uss for e in entries),
                            sum(e.swap for e in entries), sum(e.pss_missing for e in entries)]
        self._space = tracker.space
        self._layout = tracker.space.layout_version
        self._exe = tracker.exe

    def _rebuild_changed(self, tracker: ProcessTracker, changed: set[int]) -> None:
        if not changed:
            return
        entries = list(self._entries)   # a snapshot already handed out keeps its list
        mappings = list(self._mappings)
        sums = {key: list(g) for key, g in self._sums.items()}   # and its sums
        vmas = tracker.space.vmas
        for start in changed:
            i = self._index.get(start)
            if i is None:
                continue
            old = entries[i]
            new = self._entry(tracker, vmas[i], prev=old)
            self._blocks[i // _BLOCK] = None
            entries[i] = new
            mappings[i] = new.mapping
            g = sums[(new.mapping["mapping"], new.mapping["kind"])]
            for j, (after, before) in enumerate(zip(_summed(new.mapping), _summed(old.mapping))):
                g[j] += after - before
            self._totals[0] += new.anon - old.anon
            self._totals[1] += new.file - old.file
            self._totals[2] += new.shmem - old.shmem
            p = self._pss_totals
            p[0] += new.pss_fixed - old.pss_fixed
            p[1] += new.uss - old.uss
            p[2] += new.swap - old.swap
            p[3] += new.pss_missing - old.pss_missing
        self._entries = entries
        self._mappings = mappings
        self._sums = sums

    def _snapshot(self, tracker: ProcessTracker, ts: float) -> Snapshot:
        anon, file, shmem, virtual = self._totals
        pss_fixed, uss, swap, missing = self._pss_totals
        pss_on = self._pss_usage is not None and not missing
        c = tracker.counters
        statm = tracker.statm
        snap = Snapshot({
            "ts": round(ts, 6),
            "pid": tracker.pid,
            "comm": tracker.comm,
            "rss_bytes": anon + file + shmem,
            "anon_bytes": anon,
            "file_bytes": file,
            "shmem_bytes": shmem,
            "virtual_bytes": virtual,
            # like smaps_rollup: the fixed-point sum of all mappings, then rounded
            "pss_bytes": pss_fixed >> PSS_SHIFT if pss_on else None,
            "uss_bytes": uss if pss_on else None,
            "swap_bytes": swap if pss_on else None,
            "statm_rss_bytes": statm.resident_bytes if statm else None,
            # the kernel's high-water mark (VmHWM) and fault counters since the
            # process started (null until the first tick reads them)
            "peak_rss_bytes": tracker.peak_rss_bytes,
            "minor_faults": tracker.minor_faults,
            "major_faults": tracker.major_faults,
            "drift_bytes": tracker.drift_bytes(),
            "faults": tracker.faults_total,
            "faults_by_mapping": dict(tracker.faults_by_mapping),
            "syscalls": dict(tracker.stats.calls),
            "syscall_bytes": dict(tracker.stats.bytes),
            "full_rescans": dict(c.full_rescans),
            "events_lost": tracker.stats.events_lost + tracker.stats.ranges_lost,
            "events_sampled_out": tracker.stats.events_sampled_out,
            "tick_seconds": round(c.last_tick_seconds, 6),
            "generation": 0,
            "mappings": self._mappings,
        })
        if self.json_text:
            snap.mappings_json_blocks = self._json_blocks()
        snap.identity_sums = self._sums
        return snap

    def _json_blocks(self) -> list[bytes]:
        entries = self._entries
        for k, block in enumerate(self._blocks):
            if block is None:
                self._blocks[k] = b",".join(e.text for e in entries[k * _BLOCK:(k + 1) * _BLOCK])
        return list(cast(list[bytes], self._blocks))


_SUMMED = itemgetter("anon_bytes", "file_bytes", "shmem_bytes", "virtual_bytes", "pss_bytes",
                     "uss_bytes")
_KEYED = itemgetter("mapping", "kind", "anon_bytes", "file_bytes", "shmem_bytes",
                    "virtual_bytes")
_KEYED_PSS = itemgetter("mapping", "kind", "anon_bytes", "file_bytes", "shmem_bytes",
                        "virtual_bytes", "pss_bytes", "uss_bytes")


def _summed(mapping: Mapping[str, Any]) -> list[int]:
    return [x or 0 for x in _SUMMED(mapping)]


def identity_sums(mappings: Sequence[Mapping[str, Any]],
                  pss: bool = True) -> dict[tuple[str, str], list[Any]]:
    """The sums of `mappings` by (identity, kind) ("mapping" and "kind" keys), in
    order of first appearance: [anon, file, shmem, virtual] bytes and, with
    `pss`, [pss, uss] (null counted as 0). Snapshot.identity_sums, and what the
    exporter sums for snapshots without them; this runs for every mapping there,
    hence the unrolled loops (keying by the identity alone measured no faster)."""
    sums: dict[tuple[str, str], list[Any]] = {}
    get = sums.get
    if pss:
        for identity, kind, a, f, s, v, p, u in map(_KEYED_PSS, mappings):
            g = get((identity, kind))
            if g is None:
                sums[(identity, kind)] = [0 + a, 0 + f, 0 + s, 0 + v, p or 0, u or 0]
            else:
                g[0] += a
                g[1] += f
                g[2] += s
                g[3] += v
                g[4] += p or 0
                g[5] += u or 0
    else:
        for identity, kind, a, f, s, v in map(_KEYED, mappings):
            g = get((identity, kind))
            if g is None:
                sums[(identity, kind)] = [0 + a, 0 + f, 0 + s, 0 + v]
            else:
                g[0] += a
                g[1] += f
                g[2] += s
                g[3] += v
    return sums


def snapshot(tracker: ProcessTracker, ts: float,
             pss_usage: dict[int, Usage] | None = None) -> Snapshot:
    """A one-off snapshot (tests, single reports); the watch loop keeps a
    SnapshotBuilder per process instead."""
    builder = SnapshotBuilder()
    return builder.stamp(builder.build(tracker, ts, pss_usage))


def encode_parts(snap: dict[str, Any]) -> list[bytes]:
    """The snapshot as JSON (ASCII bytes) in pieces, to write without
    concatenating megabytes, reusing the mappings' cached JSON text."""
    blocks = getattr(snap, "mappings_json_blocks", None)
    if blocks is None:
        return [_encode(snap).encode("ascii")]
    head = _encode({k: v for k, v in snap.items() if k != "mappings"}).encode("ascii")
    parts = [head[:-1], b',"mappings":[']
    for block in blocks:
        if len(parts) > 2:
            parts.append(b",")
        parts.append(block)
    parts.append(b"]}")
    return parts


def encode(snap: dict[str, Any]) -> str:
    """The snapshot as one JSON object."""
    return b"".join(encode_parts(snap)).decode("ascii")
