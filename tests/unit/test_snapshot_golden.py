"""The JSON snapshot contract (docs/output.md), pinned by a golden file: fixed
tracker states on a fixture /proc tree (tests/unit/fakes.py), built by
memtrace.snapshot and encoded with encode(), compared with
tests/unit/golden/snapshot.json.

Two snapshots: "plain" (right after attach and one fault mark, PSS off) and
"full" (a library loaded since, PSS/USS/swap figures, the kernel's fault
counters and peak, what the session adds: library_events, library_totals,
pss_refreshed_ts, heap). Normalised: ts (fixed), tick_seconds (measured: 0.0),
generation (a process-wide counter: 1). The golden file holds the snapshots
indented for reading; the test also checks encode()'s exact bytes (compact,
ASCII, key order) against it, and that docs/output.md documents every
top-level, mapping and library event key that appears.

After an intended change to the snapshots, regenerate with

    .venv/bin/python -m pytest -q tests/unit/test_snapshot_golden.py --update-golden

(or MEMTRACE_UPDATE_GOLDEN=1) and review `git diff tests/unit/golden/`."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from memtrace.libevents import LibraryEvents
from memtrace.pss.accounting import Usage
from memtrace.snapshot import Snapshot, encode, snapshot
from memtrace.stacks.netting import UNSAMPLED
from memtrace.stacks.profile import TRUNCATED, Frame, Stack, StackProfile, StackSample
from memtrace.stacks.summary import stacks_summary
from memtrace.trace.events import CHUNK_SHIFT, ChunkMark
from memtrace.trace.tracker import ProcessTracker

from ..golden import check_golden
from .fakes import ANON, PAGE, standard_process

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden" / "snapshot.json"
PLUGIN = 0x7F0002000000


def normalised(snap: Snapshot) -> Snapshot:
    """The snapshot with its measured and counter-drawn fields fixed (the JSON
    text of its mappings, kept by the builder, is reused as it is)."""
    snap["tick_seconds"] = 0.0
    snap["generation"] = 1
    return snap


def _stack_profile(snap: Snapshot) -> StackProfile:
    """--stacks: one path holding the anonymous mapping, a cut one, the rest unsampled."""
    main = Frame(0x555555555100, "main", "/usr/bin/server", 0x10)
    fill = Frame(0x555555555200, "fill", "/usr/bin/server", 0x8)
    memset = Frame(0x7F0000012345, "__memset_avx2_unaligned_erms",
                   "/usr/lib/x86_64-linux-gnu/libc.so.6", 0x45)
    cut = Stack((memset, TRUNCATED))
    rest = snap["rss_bytes"] - 6 * PAGE
    return StackProfile(snap["pid"], snap["comm"], snap["ts"], [
        StackSample(Stack((memset, fill, main)), "[anon]", "anon", held_bytes=5 * PAGE,
                    brought_bytes=7 * PAGE, samples=7),
        StackSample(cut, "[heap]", "heap", held_bytes=PAGE, brought_bytes=PAGE, samples=1),
        StackSample(UNSAMPLED, "/usr/bin/server", "executable", held_bytes=rest),
    ], sample_period_bytes=PAGE, samples_lost=2)


def _malloc_object() -> dict[str, Any]:
    """run --malloc: one stack leaking across six ticks, one freeing what it takes."""
    from memtrace.malloc.state import MallocState
    from memtrace.trace.mallocevents import MallocRecord

    shim = "/var/cache/memtrace/libmemtrace-malloc-0123456789abcdef.so"
    stacks = {ip: Stack((Frame(0x7F0000001000, "malloc", shim, 0x20),
                         Frame(0x555555555000 + ip, fn, "/usr/bin/server", 0x18),
                         Frame(0x555555555100, "main", "/usr/bin/server", 0x10)))
              for ip, fn in ((1, "leak"), (2, "churn"))}

    class Unwinder:
        proc_root = "/proc"

        def unwind_many(self, _pid: int, _vmas: Any, regs: list[Any]) -> list[Stack]:
            return [stacks[r[0]] for r in regs]

    state = MallocState(512 * 1024, Unwinder())  # type: ignore[arg-type]
    out: dict[str, Any] = {}
    for tick in range(6):
        t = tick * 100
        out = state.update(42, 0, [
            MallocRecord(42, t, 0x10000 + tick, size=4096, weight=526336, ip=1),
            MallocRecord(42, t + 1, 0x20000 + tick, size=65536, weight=557056, ip=2),
            MallocRecord(42, t + 2, 0x20000 + tick, freed=True)], [], "server",
            1_700_000_000.0 + tick, 0)
    return out


def snapshots(world) -> dict[str, Snapshot]:
    p, m = standard_process(world)
    tr = ProcessTracker(p.pid, world.procfs())
    tr.start()
    tr.stats = dataclasses.replace(
        tr.stats, layout_gen=1, events_lost=2, ranges_lost=1, events_sampled_out=9,
        calls=dict(tr.stats.calls, mmap=4, brk=2, munmap=1),
        bytes=dict(tr.stats.bytes, mmap=1 << 20, brk=2 * 135168, munmap=PAGE))
    tr.update([ChunkMark(ANON >> CHUNK_SHIFT, 6, ANON + PAGE)], [], tr.stats)
    lib = LibraryEvents()
    plain = snapshot(tr, 1_700_000_000.25)
    lib.update(plain)
    out = {"plain": normalised(plain)}

    # a plugin loaded (three segments, two pages resident), the kernel's counters
    for start, end, perms, offset in ((PLUGIN, PLUGIN + PAGE, "r--p", 0),
                                      (PLUGIN + PAGE, PLUGIN + 3 * PAGE, "r-xp", PAGE),
                                      (PLUGIN + 3 * PAGE, PLUGIN + 4 * PAGE, "rw-p", 3 * PAGE)):
        p.map(start, end, b"/opt/plugins/libx.so", perms, offset=offset, inode=55, dev="fe:00")
    p.touch(PLUGIN, PLUGIN + 2 * PAGE, anon=False)
    p.sync()
    tr.update([], [], dataclasses.replace(tr.stats, layout_gen=2))
    tr.peak_rss_bytes = 8 << 20
    tr.minor_faults, tr.major_faults = 4321, 5
    # PSS: anonymous pages private, file pages shared by three; one page swapped
    pss_usage: dict[int, Usage] = {}
    for v in tr.space.vmas:
        anon, other = p.expected(v)
        pss_usage[v.start] = Usage(rss=anon + other, pss_fixed=(anon << 12)
                                   + (other << 12) // 3, uss=anon,
                                   swap=PAGE if v.start == m["anon"].start else 0)
    full = snapshot(tr, 1_700_000_002.5, pss_usage)
    full["library_events"] = lib.update(full)
    while not full["library_events"]:          # the load is reported once it settles
        full = snapshot(tr, full["ts"] + 1.0, pss_usage)
        full["library_events"] = lib.update(full)
    full["library_totals"] = lib.totals_dict()
    full["pss_refreshed_ts"] = 1_700_000_001.0
    full["heap"] = {"status": "pending"}
    full["stacks"] = stacks_summary(_stack_profile(full))
    full["malloc"] = _malloc_object()
    out["full"] = normalised(full)
    return out


def test_snapshots_match_the_golden_file(world):
    snaps = snapshots(world)
    text = json.dumps({k: json.loads(encode(s)) for k, s in snaps.items()}, indent=1,
                      ensure_ascii=False) + "\n"
    check_golden(GOLDEN, text)


def test_encode_gives_the_golden_bytes(world):
    """encode() is the golden snapshot as compact ASCII JSON, keys in the golden
    order (the builder's cached mapping text puts "mappings" after the keys the
    session adds: library_events, heap, ...). Without that text the same object
    (there, "mappings" keeps its place in the dict)."""
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    for name, snap in snapshots(world).items():
        want = json.dumps(golden[name], separators=(",", ":"))
        assert snap.mappings_json_blocks is not None
        assert encode(snap) == want, name
        assert json.loads(encode(dict(snap))) == golden[name], name


def _documented_keys() -> tuple[set[str], set[str], set[str]]:
    """Top-level keys (the first field table of docs/output.md), mapping keys (its
    "Per mapping:" paragraph) and library event keys (the table after "Library
    load and unload events")."""
    text = (REPO / "docs" / "output.md").read_text(encoding="utf-8")
    lines = text.splitlines()

    def table_after(i: int) -> set[str]:
        while not lines[i].startswith("| field |"):
            i += 1
        keys: set[str] = set()
        for line in lines[i + 2:]:
            if not line.startswith("|"):
                break
            first = line.split("|")[1]
            keys |= set(re.findall(r"`([a-z_]+)`", first))
        return keys

    top = table_after(0)
    start = next(i for i, x in enumerate(lines) if x.startswith("Per mapping:"))
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    mapping = set(re.findall(r"`([a-z_]+)`", " ".join(lines[start:end])))
    events = table_after(next(i for i, x in enumerate(lines)
                              if x.startswith("## Library load and unload events")))
    return top, mapping, events


def test_docs_document_every_key(world):
    top, mapping, events = _documented_keys()
    golden: dict[str, Any] = json.loads(GOLDEN.read_text(encoding="utf-8"))
    for name, snap in golden.items():
        assert set(snap) - top == set(), f"{name}: top-level keys not in docs/output.md"
        for m in snap["mappings"]:
            assert set(m) - mapping == set(), f"{name}: mapping keys not in docs/output.md"
    assert golden["full"]["library_events"]
    for ev in golden["full"]["library_events"]:
        assert set(ev) - events - {"pid", "comm"} == set(), "library event keys"
    # every documented top-level key appears in one of the snapshots
    assert top - set(golden["plain"]) - set(golden["full"]) == set()
