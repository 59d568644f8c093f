"""pprof: a stack profile as gzipped profile.proto, which `go tool pprof`,
Pyroscope, Parca and Grafana read. Written by hand (the wire format is small),
so memtrace needs no protobuf library.

One profile holds both measures, as Go's heap profiles hold inuse_space and
alloc_space: sample_type is [resident_space/bytes, brought_space/bytes] (held
now, brought in since attach), and default_sample_type names the measure asked
for, so `go tool pprof` shows it and `-sample_index=brought_space` the other.
Both measures share every stack, location, function and label, and one file is
one consistent moment; two files could drift apart.

- sample: one per (stack, mapping) of the StackProfile with bytes in either
  measure; location ids leaf first; labels "mapping" (the mapping's identity, as
  in the snapshot), "kind" (heap, anon, library, ...) and "samples" (the sampled
  faults behind the figures, unit "count").
- location: one per distinct frame (address, module, function); one line whose
  function is the frame's function, or what the other views show for a frame
  without one: `[libc.so.6]`, `[unknown]`, `[truncated]` (stackframes.py).
- mapping: one per module (path and build id), the program first; has_functions
  is set, so pprof never re-symbolizes. memtrace does not keep a module's load
  range: memory_start/limit span the sampled addresses in it. Frames of
  `[unknown]` modules and the `[truncated]` mark have no mapping.
- period_type space/bytes, period: the mean bytes between samples; time_nanos:
  the profile's time; comments: pid, comm and samples lost.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field

from memtrace.stacks.profile import PY_MODULE, TRUNCATED, Frame, StackProfile
from memtrace.views.stackframes import (
    NO_STACK,
    UNKNOWN,
    FrameNamer,
    check_measure,
    clean,
    module_class,
)

SAMPLE_TYPES = (("resident_space", "bytes"), ("brought_space", "bytes"))
DEFAULT_TYPE = {"held": "resident_space", "brought": "brought_space"}
# --malloc (docs/malloc.md): held is outstanding, brought is allocated since attach
MALLOC_SAMPLE_TYPES = (("outstanding_space", "bytes"), ("allocated_space", "bytes"))


# -- the wire format (https://protobuf.dev/programming-guides/encoding/) ------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1                 # int64 negatives are ten bytes, two's complement
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _int(num: int, n: int) -> bytes:
    """A varint field; proto3 leaves zero out."""
    return _varint(num << 3) + _varint(n) if n else b""


def _bytes(num: int, data: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _packed(num: int, values: list[int]) -> bytes:
    return _bytes(num, b"".join(map(_varint, values))) if values else b""


# -- the tables ------------------------------------------------------------------

@dataclass
class _Mapping:
    id: int
    path: str
    build_id: str
    start: int = 0
    limit: int = 0


@dataclass
class _Tables:
    """String, function, location and mapping tables, each entry made once."""

    strings: dict[str, int] = field(default_factory=lambda: {"": 0})
    functions: dict[str, int] = field(default_factory=dict)
    # (address, module, build id, function) -> (location id, function id)
    locations: dict[tuple[int, str, str, str], tuple[int, int]] = field(default_factory=dict)
    mappings: dict[tuple[str, str], _Mapping] = field(default_factory=dict)

    def string(self, text: str) -> int:
        return self.strings.setdefault(text, len(self.strings))

    def function(self, name: str) -> int:
        self.string(name)
        return self.functions.setdefault(name, len(self.functions) + 1)

    def mapping(self, frame: Frame) -> None:
        """Counts the frame's module in (its id is given once all are seen)."""
        if frame.module in (UNKNOWN, TRUNCATED.module, PY_MODULE) or not frame.module:
            return      # no ELF mapping (a CPython frame's address is its code object's)
        key = (frame.module, frame.build_id or "")
        m = self.mappings.get(key)
        if m is None:
            m = self.mappings[key] = _Mapping(0, clean(frame.module), frame.build_id or "",
                                              frame.address, frame.address + 1)
        m.start, m.limit = min(m.start, frame.address), max(m.limit, frame.address + 1)

    def location(self, frame: Frame, name: str) -> int:
        key = (frame.address, frame.module, frame.build_id or "", frame.function)
        loc = self.locations.get(key)
        if loc is None:
            self.mapping(frame)
            loc = self.locations[key] = (len(self.locations) + 1, self.function(name))
        return loc[0]


def _function_name(namer: FrameNamer, frame: Frame) -> str:
    node = namer.frame(frame)
    return node.function if frame.function not in (UNKNOWN, "") and frame != TRUNCATED \
        else node.text


# -- the profile -------------------------------------------------------------------

def encode_profile(profile: StackProfile, measure: str = "held",
                   sample_types: tuple[tuple[str, str], ...] = SAMPLE_TYPES,
                   source: str = "--stacks") -> bytes:
    """The profile.proto message of a StackProfile (not gzipped); sample_types
    name its two measures (held, brought)."""
    check_measure(measure)
    t = _Tables()
    types = [(t.string(a), t.string(b)) for a, b in sample_types]
    namer = FrameNamer(profile)
    samples = []
    for s in profile.samples:
        if s.held_bytes <= 0 and s.brought_bytes <= 0:
            continue
        frames = s.stack.frames or (NO_STACK,)
        ids = [t.location(f, _function_name(namer, f)) for f in frames]
        labels = (_bytes(3, _int(1, t.string("mapping")) + _int(2, t.string(clean(s.mapping))))
                  + _bytes(3, _int(1, t.string("kind")) + _int(2, t.string(clean(s.kind))))
                  + _bytes(3, _int(1, t.string("samples")) + _int(3, s.samples)
                           + _int(4, t.string("count"))))
        samples.append(_bytes(2, _packed(1, ids)
                              + _packed(2, [max(s.held_bytes, 0), max(s.brought_bytes, 0)])
                              + labels))
    mapping_ids = _number_mappings(t)
    body = [_bytes(1, _int(1, a) + _int(2, b)) for a, b in types]
    body += samples
    body += [_encode_mapping(m, t) for m in sorted(t.mappings.values(), key=lambda m: m.id)]
    for (addr, module, build_id, _fn), (loc_id, fn_id) in t.locations.items():
        mapping_id = mapping_ids.get((module, build_id), 0)
        body.append(_bytes(4, _int(1, loc_id) + _int(2, mapping_id) + _int(3, addr)
                           + _bytes(4, _int(1, fn_id))))
    for name, fn_id in t.functions.items():
        idx = t.string(name)
        body.append(_bytes(5, _int(1, fn_id) + _int(2, idx) + _int(3, idx)))
    comments = [t.string(f"memtrace {source}: pid {profile.pid} ({clean(profile.comm)})"),
                t.string(f"samples lost: {profile.samples_lost}")]
    period = (t.string("space"), t.string("bytes"))
    default = t.string(sample_types[0 if measure == "held" else 1][0])
    body += [_bytes(6, s.encode()) for s in t.strings]
    body += [_int(9, int(profile.ts * 1e9)),
             _bytes(11, _int(1, period[0]) + _int(2, period[1])),
             _int(12, profile.sample_period_bytes)]
    body += [_int(13, c) for c in comments]
    body.append(_int(14, default))
    return b"".join(body)


def _number_mappings(t: _Tables) -> dict[tuple[str, str], int]:
    """Mapping ids: the program first (pprof's convention), then by path."""
    order = sorted(t.mappings.items(),
                   key=lambda kv: (module_class(kv[0][0]) != "program", kv[0]))
    for i, (_key, m) in enumerate(order, 1):
        m.id = i
    return {key: m.id for key, m in order}


def _encode_mapping(m: _Mapping, t: _Tables) -> bytes:
    return _bytes(3, _int(1, m.id) + _int(2, m.start) + _int(3, m.limit)
                  + _int(5, t.string(m.path)) + _int(6, t.string(m.build_id))
                  + _int(7, 1))


def render_pprof(profile: StackProfile, measure: str = "held",
                 sample_types: tuple[tuple[str, str], ...] = SAMPLE_TYPES,
                 source: str = "--stacks") -> bytes:
    """The gzipped profile.proto (what pprof files are on disk); reproducible
    (no time in the gzip header)."""
    return gzip.compress(encode_profile(profile, measure, sample_types, source), mtime=0)
