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
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_str  # type: ignore[attr-defined]
from operator import itemgetter
from typing import Any, TypedDict, cast

from memtrace.pss.accounting import PSS_SHIFT, Usage
from memtrace.trace.attribution import Segment, classify, mapping_identity, segments_for, split
from memtrace.trace.model import AddressSpace
from memtrace.trace.procfs import Vma
from memtrace.trace.tracker import ProcessTracker
from memtrace.util import ints
from memtrace.util.ints import shared
from memtrace.util.recycle import RecycledLists

_encode = json.JSONEncoder(separators=(",", ":")).encode
# Keys left out of the generation's fingerprint (the mappings are followed by
# the builder itself).
# Mappings per cached piece of the JSON array: a tick re-joins only the pieces
# holding a changed mapping.
_BLOCK = 64
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
    # With the JSON text: what changed since the builder's previous snapshot of
    # this process, for --changed-only (views/jsonl.py), or None (the first
    # one, or no text kept). `delta_base` is that previous snapshot's mappings
    # list; `delta_texts` the JSON of every mapping of snap["mappings"] that is
    # new or differs from the one at its start there, in address order;
    # `delta_removed` the starts there that are gone.
    delta_base: list[Any] | None = None
    delta_texts: list[bytes] = []
    delta_removed: list[int] = []
    # (mapping identity, kind) -> [anon, file, shmem, virtual, pss, uss] bytes
    # summed over the mappings, in order of first appearance (pss/uss 0 where
    # null); read-only. The exporter uses it instead of summing every mapping.
    identity_sums: dict[tuple[str, str], list[int]] | None = None


@dataclass(frozen=True, slots=True)
class _Entry:
    vma: Vma                    # what the mapping's dict was built from (its identity)
    seg: Segment | None         # and its library segment
    mapping: MappingRecord
    anon: int
    file: int
    shmem: int
    virtual: int
    pss_fixed: int = 0      # PSS in the kernel's fixed point (bytes << PSS_SHIFT)
    uss: int = 0
    swap: int = 0
    pss_missing: int = 0    # 1: no PSS figures for this mapping (off, unavailable)


class _Record:
    """Only its instances' __dict__ is kept, as a mapping's dict: CPython shares
    the keys of such dicts between instances (the values alone per mapping,
    about half the memory of a dict display at 60k mappings)."""

    def __init__(self, start: int, end: int, perms: str, offset: int, path: str, kind: str,
                 mapping: str, segment: str | None, rss: int, anon: int, file: int,
                 shmem: int, virtual: int, faults: int, pss: int | None, uss: int | None,
                 swap: int | None) -> None:
        self.start = start          # the order of MappingRecord (docs/output.md)
        self.end = end
        self.perms = perms
        self.offset = offset
        self.path = path
        self.kind = kind
        self.mapping = mapping
        self.segment = segment
        self.rss_bytes = rss
        self.anon_bytes = anon
        self.file_bytes = file
        self.shmem_bytes = shmem
        self.virtual_bytes = virtual
        self.faults = faults
        self.pss_bytes = pss
        self.uss_bytes = uss
        self.swap_bytes = swap


def _num(x: int | None) -> str:
    return "null" if x is None else str(x)


def mapping_json(m: Mapping[str, Any]) -> bytes:
    """The JSON text of one MappingRecord, as json.dumps(m, separators=(",", ":"))
    writes it (ASCII; tests/unit/test_snapshot_text.py compares them), about 3x
    faster: a snapshot's first text is every mapping's."""
    seg = m["segment"]
    return (f'{{"start":{m["start"]},"end":{m["end"]},"perms":{_json_str(m["perms"])},'
            f'"offset":{m["offset"]},"path":{_json_str(m["path"])},'
            f'"kind":{_json_str(m["kind"])},"mapping":{_json_str(m["mapping"])},'
            f'"segment":{"null" if seg is None else _json_str(seg)},'
            f'"rss_bytes":{m["rss_bytes"]},"anon_bytes":{m["anon_bytes"]},'
            f'"file_bytes":{m["file_bytes"]},"shmem_bytes":{m["shmem_bytes"]},'
            f'"virtual_bytes":{m["virtual_bytes"]},"faults":{m["faults"]},'
            f'"pss_bytes":{_num(m["pss_bytes"])},"uss_bytes":{_num(m["uss_bytes"])},'
            f'"swap_bytes":{_num(m["swap_bytes"])}}}').encode("ascii")


class _TextBlocks:
    """The JSON text of every mapping, in blocks of _BLOCK mappings joined by
    commas (the pieces a snapshot's text is written from), with each text's
    offset in its block: one copy of the text, never one per mapping and one
    per block. A changed mapping replaces its slice of one block."""

    def __init__(self, texts: Iterable[bytes] = ()) -> None:
        self.blocks: list[bytes] = []
        self._offsets: list[array[int]] = []    # per block: start of each text, and the end
        batch: list[bytes] = []
        for text in texts:
            batch.append(text)
            if len(batch) == _BLOCK:
                self._add(batch)
                batch = []
        if batch:
            self._add(batch)

    def _add(self, batch: list[bytes]) -> None:
        offsets = array("q", [0])
        at = 0
        for text in batch:
            at += len(text) + 1
            offsets.append(at)
        self.blocks.append(b",".join(batch))
        self._offsets.append(offsets)

    def text(self, i: int) -> bytes:
        k, j = divmod(i, _BLOCK)
        offsets = self._offsets[k]
        return self.blocks[k][offsets[j]:offsets[j + 1] - 1]

    def replace(self, i: int, text: bytes) -> None:
        k, j = divmod(i, _BLOCK)
        block, offsets = self.blocks[k], self._offsets[k]
        start, end = offsets[j], offsets[j + 1] - 1
        self.blocks[k] = b"".join((block[:start], text, block[end:]))
        shift = len(text) - (end - start)
        if shift:
            for n in range(j + 1, len(offsets)):
                offsets[n] += shift


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
        self._starts = array("Q")               # VMA start of each of _entries, in order
        self._totals = [0, 0, 0, 0]             # anon, file, shmem, virtual
        self._pss_totals = [0, 0, 0, 0]         # pss_fixed, uss, swap, missing
        self._generation = 0
        self._fingerprint = ""
        self._content_changed = False
        self._mappings: list[MappingRecord] = []             # e.mapping of _entries
        self._versions = RecycledLists()        # the lists _mappings was, to reuse
        self._segments: dict[int, Segment] = {}              # by VMA start
        # (path, shared without inode) -> kind, identity, display path: per VMA list
        self._names: dict[tuple[bytes, bool], tuple[str, str, str]] = {}
        self._texts = _TextBlocks()             # JSON of _entries (with json_text)
        self._sums: dict[tuple[str, str], list[int]] = {}    # Snapshot.identity_sums
        self._pss_usage: dict[int, Usage] | None = None     # of the build in progress
        # what changed since the previous snapshot (Snapshot.delta_*), with json_text
        self._delta: tuple[list[Any] | None, list[int], list[int]] = (None, [], [])

    def build(self, tracker: ProcessTracker, ts: float,
              pss_usage: dict[int, Usage] | None = None) -> Snapshot:
        """The snapshot of this tick; call stamp() on it once the caller has
        added its own keys (heap, library events). `pss_usage`: PSS/USS/swap
        per VMA start (memtrace.pss.live), None when PSS is off or unavailable."""
        self._pss_usage = pss_usage
        ints.trim()
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
            path = prev.mapping["path"]
        elif seg is not None:
            kind = seg.kind               # the bss: anonymous, counted with its library
            identity, segment, path = seg.mapping, seg.name, vma.display_path
        else:
            # what classify and mapping_identity read of a VMA: many share it
            # (60k anonymous mappings: one computation)
            key = (vma.path, vma.perms[3:4] == "s" and vma.inode == 0)
            names = self._names.get(key)
            if names is None:
                kind = classify(vma, tracker.exe)
                names = self._names[key] = (kind, mapping_identity(vma, kind),
                                            vma.display_path)
            kind, identity, path = names
            segment = None
        parts = split(tracker.space.resident_of(vma), kind)
        faults = tracker.faults_by_vma.get(vma.start, 0)
        usage = self._pss_usage.get(vma.start) if self._pss_usage is not None else None
        # the figures of many mappings are equal: one int object each (util/ints.py;
        # the model's and PSS's figures are shared already)
        anon, file, shmem = parts.anon, parts.file, parts.shmem
        rss, size = parts.total, vma.end - vma.start
        rss, size = shared(rss, rss), shared(size, size)
        if usage is None:
            mapping = _Record(vma.start, vma.end, vma.perms, vma.offset, path, kind, identity,
                              segment, rss, anon, file, shmem, size, faults, None, None,
                              None).__dict__
            return _Entry(vma, seg, cast(MappingRecord, mapping), anon, file, shmem, size,
                          pss_missing=1)
        pss = usage.pss
        mapping = _Record(vma.start, vma.end, vma.perms, vma.offset, path, kind, identity,
                          segment, rss, anon, file, shmem, size, faults, shared(pss, pss),
                          usage.uss, usage.swap).__dict__
        return _Entry(vma, seg, cast(MappingRecord, mapping), anon, file, shmem, size,
                      usage.pss_fixed, usage.uss, usage.swap)

    def _rebuild_all(self, tracker: ProcessTracker, changed: set[int]) -> None:
        # Segment names depend on neighbours (a bss follows its data segment):
        # named again for every new VMA list.
        self._segments = segments_for(tracker.space, tracker.space.vmas, tracker.exe,
                                      tracker.pid, tracker.procfs.root)
        self._names = {}
        old_starts, old_entries, old_texts = self._starts, self._entries, self._texts
        first = self._space is None
        entries: list[_Entry] = []
        new_at: list[int] = []          # positions of entries new or changed in content
        old_at: list[int] = []          # position of each entry's VMA start in the old list, or -1
        removed: list[int] = []         # starts of old entries with no VMA now
        j, n_old = 0, len(old_starts)
        for vma in tracker.space.vmas:  # both lists are in address order: one walk
            while j < n_old and old_starts[j] < vma.start:
                removed.append(old_starts[j])
                j += 1
            i = j if j < n_old and old_starts[j] == vma.start else -1
            old_at.append(i)
            prev = old_entries[i] if i >= 0 else None
            if (prev is None or not prev.vma.same_identity(vma) or tracker.exe != self._exe
                    or prev.seg != self._segments.get(vma.start)):
                entry = self._entry(tracker, vma)
            elif vma.start in changed:
                entry = self._entry(tracker, vma, prev=prev)
            else:
                entry = prev
            if prev is None or (entry is not prev and entry.mapping != prev.mapping):
                new_at.append(len(entries))
            entries.append(entry)
        removed += old_starts[j:]
        self._entries = entries
        self._mappings = [e.mapping for e in entries]
        self._versions.reset()
        self._sums = identity_sums(self._mappings)
        self._starts = array("Q", (e.mapping["start"] for e in entries))
        if self.json_text:
            fresh = set(new_at)
            self._texts = _TextBlocks(
                mapping_json(e.mapping) if n in fresh else old_texts.text(old_at[n])
                for n, e in enumerate(entries))
            if first:
                removed = []
            self._delta = (None if first else [e.mapping for e in old_entries],
                           new_at, removed)
        self._totals = [sum(e.anon for e in entries), sum(e.file for e in entries),
                        sum(e.shmem for e in entries), sum(e.virtual for e in entries)]
        self._pss_totals = [sum(e.pss_fixed for e in entries), sum(e.uss for e in entries),
                            sum(e.swap for e in entries), sum(e.pss_missing for e in entries)]
        self._space = tracker.space
        self._layout = tracker.space.layout_version
        self._exe = tracker.exe

    def _rebuild_changed(self, tracker: ProcessTracker, changed: set[int]) -> None:
        base = self._mappings
        if not changed:
            self._delta = (base, [], [])
            return
        vmas = tracker.space.vmas
        differ: list[int] = []
        entries = self._entries
        starts = self._starts
        for start in changed:
            i = bisect_left(starts, start)
            if i == len(starts) or starts[i] != start:
                continue
            old = entries[i]
            new = self._entry(tracker, vmas[i], prev=old)
            if new.mapping == old.mapping and new.pss_fixed == old.pss_fixed:
                continue        # rescanned, same figures: the old entry stays
            if not differ:      # a snapshot already handed out keeps its list and sums
                mappings = self._versions.new_version(self._mappings)
                sums = {key: list(g) for key, g in self._sums.items()}
            differ.append(i)
            if self.json_text:
                self._texts.replace(i, mapping_json(new.mapping))
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
        if differ:
            self._versions.retired(self._mappings, differ)
            self._mappings = mappings
            self._sums = sums
        self._delta = (base, sorted(differ), [])

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
            snap.mappings_json_blocks = list(self._texts.blocks)
            base, at, removed = self._delta
            if base is not None:
                snap.delta_base = base
                snap.delta_texts = [self._texts.text(i) for i in at]
                snap.delta_removed = removed
        snap.identity_sums = self._sums
        return snap


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
