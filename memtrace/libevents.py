"""Library load and unload events, read off the layout memtrace already follows.

dlopen is an mmap of a shared object (ld.so reserves the whole span, then maps
each segment over it); dlclose is a munmap of every segment, unless glibc keeps
the object (RTLD_NODELETE, DF_1_NODELETE, objects other objects depend on,
unique symbols). So loads and unloads are found by comparing the loaded objects
of two snapshots, not by decoding syscall records: it works whatever the drop
rate of those records, and it reports what really happened (no unload event
when dlclose left the mappings in place).

An object instance is the run of VMAs that `memtrace.trace.attribution` names as the
segments of one library (the first at file offset 0, its bss included), keyed
by (identity, base address). A new instance is reported once its layout has
stayed the same for one tick (ld.so maps a library in several calls, and its
first pages become resident as it relocates), at most SETTLE_TICKS ticks after
it appeared, with the bytes mapped and resident then. A vanished instance is
reported with the bytes it held at the last tick it was seen. Pure: works on
snapshot dicts (docs/output.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from memtrace.util.units import fmt_bytes

SETTLE_TICKS = 3          # report a load at the latest this many ticks after it appeared
MAX_NAMED = 100           # library identities with their own totals per process
OTHER = "[other]"


@dataclass
class Instance:
    mapping: str
    base: int
    layout: tuple[tuple[int, int, str], ...]     # (start, end, perms) of each VMA
    mapped_bytes: int
    rss_bytes: int
    segments: dict[str, int]                     # resident bytes per segment name


def instances(snap: dict[str, Any]) -> dict[tuple[str, int], Instance]:
    """The loaded libraries of a snapshot, by (identity, base address)."""
    out: dict[tuple[str, int], Instance] = {}
    cur: Instance | None = None
    for m in snap["mappings"]:
        if m.get("kind") != "library" or m.get("segment") is None:
            cur = None
            continue
        if m["path"] and m["offset"] == 0:
            cur = Instance(m["mapping"], m["start"], (), 0, 0, {})
            out[(cur.mapping, cur.base)] = cur
        elif cur is None or cur.mapping != m["mapping"]:
            continue
        cur.layout += ((m["start"], m["end"], m["perms"]),)
        cur.mapped_bytes += m["virtual_bytes"]
        cur.rss_bytes += m["rss_bytes"]
        seg = m["segment"]
        cur.segments[seg] = cur.segments.get(seg, 0) + m["rss_bytes"]
    return out


@dataclass
class Totals:
    loads: int = 0
    unloads: int = 0
    loaded_bytes: int = 0             # bytes mapped by loads
    unloaded_bytes: int = 0           # bytes unmapped by unloads
    unloaded_rss_bytes: int = 0       # resident bytes given back by unloads

    def as_dict(self) -> dict[str, int]:
        return {"loads": self.loads, "unloads": self.unloads,
                "loaded_bytes": self.loaded_bytes, "unloaded_bytes": self.unloaded_bytes,
                "unloaded_rss_bytes": self.unloaded_rss_bytes}


@dataclass
class _Pending:
    inst: Instance
    ticks: int = 0


@dataclass
class LibraryEvents:
    """One process's loaded libraries across snapshots. The first snapshot is the
    baseline: what is loaded at attach is not an event."""

    known: dict[tuple[str, int], Instance] | None = None
    pending: dict[tuple[str, int], _Pending] = field(default_factory=dict)
    totals: dict[str, Totals] = field(default_factory=dict)
    _token: object = None                  # the layout the known instances were read from
    _last: dict[str, Any] | None = None    # the previous snapshot

    def _totals(self, mapping: str) -> Totals:
        t = self.totals.get(mapping)
        if t is None:
            if len(self.totals) >= MAX_NAMED:
                mapping = OTHER
            t = self.totals.setdefault(mapping, Totals())
        return t

    def update(self, snap: dict[str, Any], layout: object = None) -> list[dict[str, Any]]:
        """Events of this snapshot (possibly none), in the order they happened.
        `layout`: an object that is the same (`is`) as long as the VMA list is
        (the model's list); then, with no load pending, nothing is recomputed."""
        if (layout is not None and layout is self._token and not self.pending
                and self.known is not None):
            self._last = snap
            return []
        now = instances(snap)
        last, self._last, self._token = self._last, snap, layout
        if self.known is None:
            self.known = now
            return []
        events: list[dict[str, Any]] = []
        before: dict[tuple[str, int], Instance] | None = None
        for key, inst in self.known.items():
            if key in now:
                continue
            if before is None:   # resident bytes as of the last tick, not the last change
                before = instances(last) if last is not None else {}
            inst = before.get(key, inst)
            if key in self.pending:    # loaded and gone before it settled
                del self.pending[key]
                events.append(self._load(inst, snap, settled=False))
            events.append(self._unload(inst, snap))
        for key, inst in now.items():
            if key not in self.known:
                self.pending[key] = _Pending(inst)
                continue
            p = self.pending.get(key)
            if p is None:
                continue
            p.ticks += 1
            settled = inst.layout == p.inst.layout
            p.inst = inst
            if settled or p.ticks >= SETTLE_TICKS:
                del self.pending[key]
                events.append(self._load(inst, snap, settled))
        self.known = now
        return events

    def _event(self, what: str, inst: Instance, snap: dict[str, Any]) -> dict[str, Any]:
        return {"event": what, "ts": snap["ts"], "pid": snap["pid"], "comm": snap["comm"],
                "mapping": inst.mapping, "base": inst.base, "vmas": len(inst.layout)}

    def _load(self, inst: Instance, snap: dict[str, Any], settled: bool) -> dict[str, Any]:
        t = self._totals(inst.mapping)
        t.loads += 1
        t.loaded_bytes += inst.mapped_bytes
        ev = self._event("library_load", inst, snap)
        ev.update(mapped_bytes=inst.mapped_bytes, rss_bytes=inst.rss_bytes,
                  segments_rss_bytes=dict(inst.segments), settled=settled)
        return ev

    def _unload(self, inst: Instance, snap: dict[str, Any]) -> dict[str, Any]:
        t = self._totals(inst.mapping)
        t.unloads += 1
        t.unloaded_bytes += inst.mapped_bytes
        t.unloaded_rss_bytes += inst.rss_bytes
        ev = self._event("library_unload", inst, snap)
        ev.update(unmapped_bytes=inst.mapped_bytes, rss_bytes=inst.rss_bytes)
        return ev

    def totals_dict(self) -> dict[str, dict[str, int]]:
        return {m: t.as_dict() for m, t in self.totals.items()}


def describe(ev: dict[str, Any]) -> str:
    """One line for the live table."""
    mib = fmt_bytes
    who = f"[{ev['pid']}] {ev['comm']}"
    if ev["event"] == "library_load":
        return (f"{who} loaded {ev['mapping']} at {ev['base']:#x}: {mib(ev['mapped_bytes'])} "
                f"mapped, {mib(ev['rss_bytes'])} resident")
    return (f"{who} unloaded {ev['mapping']} from {ev['base']:#x}: "
            f"{mib(ev['unmapped_bytes'])} unmapped, {mib(ev['rss_bytes'])} resident given back")
