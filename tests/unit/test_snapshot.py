"""memtrace.snapshot: the JSON snapshot of a tracked process."""

from __future__ import annotations

import dataclasses
import io
import json

from memtrace.snapshot import snapshot
from memtrace.trace.events import CHUNK_SHIFT, ChunkMark
from memtrace.trace.tracker import ProcessTracker
from memtrace.views.jsonl import JsonReporter

from .fakes import ANON, PAGE, standard_process

TOP_KEYS = {
    "ts",
    "peak_rss_bytes",
    "minor_faults",
    "major_faults",
    "pid",
    "comm",
    "rss_bytes",
    "anon_bytes",
    "file_bytes",
    "shmem_bytes",
    "virtual_bytes",
    "pss_bytes",
    "uss_bytes",
    "swap_bytes",
    "statm_rss_bytes",
    "drift_bytes",
    "faults",
    "faults_by_mapping",
    "syscalls",
    "syscall_bytes",
    "full_rescans",
    "events_lost",
    "events_sampled_out",
    "tick_seconds",
    "generation",
    "mappings",
}
MAPPING_KEYS = {
    "start",
    "end",
    "perms",
    "offset",
    "path",
    "kind",
    "mapping",
    "segment",
    "rss_bytes",
    "anon_bytes",
    "file_bytes",
    "shmem_bytes",
    "virtual_bytes",
    "pss_bytes",
    "uss_bytes",
    "swap_bytes",
    "faults",
}


def tracked(world):
    p, m = standard_process(world)
    tr = ProcessTracker(p.pid, world.procfs())
    tr.start()
    s = dataclasses.replace(
        tr.stats,
        layout_gen=1,
        events_lost=2,
        ranges_lost=0,
        events_sampled_out=9,
        calls=dict(tr.stats.calls, mmap=4),
        bytes=dict(tr.stats.bytes, mmap=1 << 20),
    )
    tr.update([ChunkMark(ANON >> CHUNK_SHIFT, 6, ANON + PAGE)], [], s)
    return p, m, tr


def by_start(snap):
    return {x["start"]: x for x in snap["mappings"]}


def test_snapshot_shape_and_totals(world):
    p, m, tr = tracked(world)
    snap = snapshot(tr, 1700000000.1234567)
    assert set(snap) == TOP_KEYS
    assert snap["ts"] == 1700000000.123457
    assert snap["pid"] == p.pid and snap["comm"] == "server"
    assert len(snap["mappings"]) == len(p.vmas)
    for x in snap["mappings"]:
        assert set(x) == MAPPING_KEYS
        assert x["rss_bytes"] == x["anon_bytes"] + x["file_bytes"] + x["shmem_bytes"]
        assert x["virtual_bytes"] == x["end"] - x["start"]
    for key in ("rss_bytes", "anon_bytes", "file_bytes", "shmem_bytes", "virtual_bytes"):
        assert snap[key] == sum(x[key] for x in snap["mappings"]), key
    anon, other = p.expected_total()
    assert snap["rss_bytes"] == anon + other
    assert snap["anon_bytes"] == anon
    assert snap["statm_rss_bytes"] == anon + other
    assert snap["drift_bytes"] == 0
    assert snap["faults"] == 6
    assert snap["syscalls"]["mmap"] == 4 and snap["syscall_bytes"]["mmap"] == 1 << 20
    assert snap["full_rescans"] == {"attach": 1}
    assert snap["events_lost"] == 2
    assert snap["events_sampled_out"] == 9
    assert snap["tick_seconds"] >= 0


def test_snapshot_mappings(world):
    p, m, tr = tracked(world)
    rows = by_start(snapshot(tr, 0.0))
    shm = rows[m["shm"].start]
    assert (shm["kind"], shm["mapping"]) == ("shmem", "/memfd:buf (deleted)")
    assert (shm["shmem_bytes"], shm["file_bytes"], shm["anon_bytes"]) == (0x10000, 0, 0)
    libc = rows[m["libc"].start]
    assert libc["kind"] == "library" and libc["file_bytes"] == 0x8000
    assert libc["path"] == "/usr/lib/x86_64-linux-gnu/libc.so.6"
    assert libc["perms"] == "r-xp"
    assert libc["segment"] == "text"
    assert rows[m["exe_r"].start]["segment"] == "rodata"
    assert rows[m["heap"].start]["segment"] is None
    exe = rows[m["exe_x"].start]
    assert exe["kind"] == "executable" and exe["offset"] == 0x2000
    assert rows[m["heap"].start]["kind"] == "heap"
    assert rows[m["stack"].start]["mapping"] == "[stack]"
    assert rows[m["stack"].start]["anon_bytes"] == 3 * PAGE
    assert rows[m["arena"].start]["mapping"] == "[anon:arena]"
    assert rows[m["anon"].start]["mapping"] == "[anon]"
    assert rows[m["anon"].start]["faults"] == 6
    assert rows[m["vdso"].start]["kind"] == "special"
    odd = rows[m["odd"].start]
    assert odd["path"] == "/tmp/caf\\xe9 \\xff.dat"


def test_snapshot_is_json_and_utf8_clean(world):
    _, _, tr = tracked(world)
    snap = snapshot(tr, 12.5)
    text = json.dumps(snap, ensure_ascii=False)
    text.encode("utf-8")  # no lone surrogates anywhere
    assert json.loads(text) == snap


def test_snapshot_before_any_statm(world):
    p, _ = standard_process(world)
    tr = ProcessTracker(p.pid, world.procfs())
    snap = snapshot(tr, 0.0)
    assert snap["statm_rss_bytes"] is None
    assert snap["drift_bytes"] == 0
    assert snap["mappings"] == [] and snap["rss_bytes"] == 0


def test_events_lost_adds_ranges_lost(world):
    _, _, tr = tracked(world)
    tr.stats = dataclasses.replace(tr.stats, events_lost=3, ranges_lost=4)
    assert snapshot(tr, 0.0)["events_lost"] == 7


def test_json_reporter_writes_one_line_per_snapshot(world, tmp_path):
    import io

    _, _, tr = tracked(world)
    out = io.StringIO()
    r = JsonReporter(out)
    r.snapshot(snapshot(tr, 1.0))
    r.snapshot(snapshot(tr, 2.0))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert [json.loads(x)["ts"] for x in lines] == [1.0, 2.0]


# -- incremental builder --------------------------------------------------------

def _plain(snap):
    return {k: v for k, v in snap.items() if k not in ("ts", "tick_seconds", "generation")}


def test_builder_matches_a_fresh_snapshot_after_each_kind_of_change(world):
    from memtrace.snapshot import SnapshotBuilder, encode

    p, m, tr = tracked(world)
    builder = SnapshotBuilder()
    builder.stamp(builder.build(tr, 1.0))
    anon = m["anon"]
    steps = [
        # pages appear in one mapping (a fault mark), layout unchanged
        lambda: (p.touch(anon.start, anon.start + 2 * PAGE), p.sync(),
                 tr.update([ChunkMark(anon.start >> CHUNK_SHIFT, 2, anon.start)], [], None)),
        # pages go (a range mark), layout unchanged
        lambda: (p.drop(anon.start, anon.start + PAGE), p.sync(),
                 tr.update([], [(anon.start, anon.start + PAGE)], None)),
        # layout change: a new mapping with pages
        lambda: (p.map(0x100000000, 0x100004000), p.touch(0x100000000, 0x100002000),
                 p.sync(),
                 tr.update([], [], dataclasses.replace(tr.stats,
                                                       layout_gen=tr.stats.layout_gen + 1))),
    ]
    from memtrace.snapshot import identity_sums

    handed_out = []
    for step in steps:
        step()
        snap = builder.stamp(builder.build(tr, 2.0))
        assert snap.identity_sums == identity_sums(snap["mappings"])
        handed_out.append((snap, repr(snap.identity_sums)))
        # sums of snapshots handed out earlier are never changed afterwards
        assert all(repr(old.identity_sums) == text for old, text in handed_out)
        assert _plain(snap) == _plain(snapshot(tr, 2.0))
        assert json.loads(encode(snap)) == json.loads(json.dumps(snap))
        anon_total, other_total = p.expected_total()
        assert snap["rss_bytes"] == anon_total + other_total


def test_builder_reuses_unchanged_mappings_and_keeps_old_snapshots_intact(world):
    from memtrace.snapshot import SnapshotBuilder

    p, m, tr = tracked(world)
    builder = SnapshotBuilder()
    first = builder.stamp(builder.build(tr, 1.0))
    quiet = builder.stamp(builder.build(tr, 2.0))
    assert quiet["generation"] == first["generation"]
    assert all(a is b for a, b in zip(first["mappings"], quiet["mappings"], strict=True))

    anon = m["anon"]
    before = [dict(x) for x in quiet["mappings"]]
    p.touch(anon.start + 4 * PAGE, anon.start + 5 * PAGE)
    p.sync()
    tr.update([ChunkMark(anon.start >> CHUNK_SHIFT, 1, anon.start + 4 * PAGE)], [], None)
    busy = builder.stamp(builder.build(tr, 3.0))
    assert busy["generation"] > quiet["generation"]
    assert [dict(x) for x in quiet["mappings"]] == before      # not mutated in place
    changed = [b for a, b in zip(quiet["mappings"], busy["mappings"], strict=True) if a is not b]
    assert [x["start"] for x in changed] == [anon.start]
    grown = by_start(busy)[anon.start]["rss_bytes"] - by_start(quiet)[anon.start]["rss_bytes"]
    assert grown == PAGE


def test_builder_recycles_released_mapping_lists_and_never_a_held_one(world):
    """After a few ticks that each change a mapping, the builder writes into a
    list no snapshot holds any more (util/recycle.py) rather than copy; every
    snapshot still equals a fresh one, and one kept aside never changes."""
    from memtrace.snapshot import SnapshotBuilder

    p, m, tr = tracked(world)
    builder = SnapshotBuilder()
    builder.stamp(builder.build(tr, 1.0))
    anon = m["anon"]
    kept = None
    for n in range(8):
        at = anon.start + (n + 4) * PAGE
        p.touch(at, at + PAGE)
        p.sync()
        tr.update([ChunkMark(anon.start >> CHUNK_SHIFT, 1, at)], [], None)
        snap = builder.stamp(builder.build(tr, 2.0 + n))
        assert _plain(snap) == _plain(snapshot(tr, 2.0 + n))
        if n == 2:
            kept, kept_seen = snap, [dict(x) for x in snap["mappings"]]
    assert builder._versions.recycled >= 4
    assert [dict(x) for x in kept["mappings"]] == kept_seen


def test_builder_generation_follows_counters_too(world):
    from memtrace.snapshot import SnapshotBuilder

    _, _, tr = tracked(world)
    builder = SnapshotBuilder()
    g0 = builder.stamp(builder.build(tr, 1.0))["generation"]
    tr.stats = dataclasses.replace(tr.stats, events_sampled_out=tr.stats.events_sampled_out + 1)
    g1 = builder.stamp(builder.build(tr, 2.0))["generation"]
    assert g1 > g0
    assert builder.stamp(builder.build(tr, 3.0))["generation"] == g1
    # Another process's builder (e.g. a reused PID) never hands out g1 again.
    other = SnapshotBuilder()
    assert other.stamp(other.build(tr, 4.0))["generation"] not in (g0, g1)
def test_snapshot_bss_counts_toward_its_library(world):
    """libc's data and bss after its text: the bss row keeps an empty path but
    carries libc's kind and identity, so per-identity sums include it."""
    p, m = standard_process(world)
    lib = b"/usr/lib/x86_64-linux-gnu/libc.so.6"
    data = p.map(m["libc"].end, m["libc"].end + 2 * PAGE, lib, "rw-p", offset=0x20000,
                 inode=22, dev="fe:00")
    bss = p.map(data.end, data.end + 4 * PAGE)
    p.touch(bss.start, bss.start + 3 * PAGE)
    p.sync()
    tr = ProcessTracker(p.pid, world.procfs())
    tr.start()
    snap = snapshot(tr, 0.0)
    rows = by_start(snap)
    assert (rows[m["libc"].start]["segment"], rows[data.start]["segment"]) == ("text", "data")
    b = rows[bss.start]
    assert (b["segment"], b["kind"], b["mapping"], b["path"]) == (
        "bss", "library", "/usr/lib/x86_64-linux-gnu/libc.so.6", "")
    assert (b["anon_bytes"], b["file_bytes"]) == (3 * PAGE, 0)
    # a fault in the bss counts toward libc too, not [anon]
    p.touch(bss.start + 3 * PAGE, bss.start + 4 * PAGE)
    p.sync()
    tr.update([ChunkMark(bss.start >> CHUNK_SHIFT, 1, bss.start + 3 * PAGE)], [], None)
    assert tr.faults_by_mapping == {"/usr/lib/x86_64-linux-gnu/libc.so.6": 1}
    assert snap["anon_bytes"] == sum(x["anon_bytes"] for x in snap["mappings"])
    assert rows[m["anon"].start]["segment"] is None


def test_builder_json_text_stays_exact_across_cached_blocks(world):
    """More mappings than one cached JSON block holds; a change in one block."""
    from memtrace.snapshot import _BLOCK, SnapshotBuilder, encode

    p, _ = standard_process(world)
    base = 0x200000000
    regions = [(base + i * 4 * PAGE, base + i * 4 * PAGE + 2 * PAGE) for i in range(3 * _BLOCK)]
    for start, end in regions:
        p.map(start, end, perms="rw-p" if (start // PAGE) % 8 else "r--p")
    p.sync()
    tr = ProcessTracker(p.pid, world.procfs())
    tr.start()
    builder = SnapshotBuilder()
    builder.stamp(builder.build(tr, 1.0))
    for start, end in (regions[_BLOCK + 7], regions[2 * _BLOCK + 1]):
        p.touch(start, end)
        p.sync()
        tr.update([ChunkMark(start >> CHUNK_SHIFT, 2, start)], [], None)
        snap = builder.stamp(builder.build(tr, 2.0))
        assert json.loads(encode(snap))["mappings"] == snapshot(tr, 2.0)["mappings"]
        assert by_start(snap)[start]["rss_bytes"] == end - start


def test_builder_without_json_text_gives_the_same_snapshot(world):
    from memtrace.snapshot import SnapshotBuilder, encode

    p, m, tr = tracked(world)
    with_text, without = SnapshotBuilder(), SnapshotBuilder(json_text=False)
    for ts in (1.0, 2.0):
        changed = set(tr.space.changed)        # each builder takes the changed set
        a = with_text.build(tr, ts)
        tr.space.changed |= changed
        b = without.build(tr, ts)
        assert a.mappings_json_blocks is not None and b.mappings_json_blocks is None
        assert json.loads(encode(a)) == json.loads(encode(b)) == json.loads(json.dumps(a))
        p.touch(m["anon"].start, m["anon"].start + PAGE)
        p.sync()
        tr.update([ChunkMark(m["anon"].start >> CHUNK_SHIFT, 1, m["anon"].start)], [], None)


def test_json_reporter_writes_bytes_under_a_text_stream(world):
    import io

    _, _, tr = tracked(world)
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8")
    r = JsonReporter(out)
    out.write("")                       # text written before must not be reordered
    snap = snapshot(tr, 1.0)
    r.snapshot(snap)
    r.snapshot(snapshot(tr, 2.0))
    lines = raw.getvalue().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0]) == json.loads(json.dumps(snap))


def test_only_the_table_gets_syscall_records_and_only_json_gets_text(monkeypatch):
    """Views that show no syscall records load the BPF program without
    streaming them; only the JSON view makes snapshots carry JSON text."""
    from rich.console import Console

    import memtrace.session as session_mod
    from memtrace.commands.live import NullReporter
    from memtrace.views.table import TableReporter

    seen: list[bool] = []

    class FakeProbes:
        rss_stat_mechanism = "fake"
        stack_mechanism = ""

        def __init__(self, **kw: bool) -> None:
            seen.append(kw["stream_events"])

    monkeypatch.setattr(session_mod, "Probes", FakeProbes)
    for reporter in (TableReporter(Console(file=io.StringIO())), JsonReporter(io.StringIO()),
                     NullReporter()):
        session_mod.Session(reporter, 1.0, 0.0).load()
    assert seen == [True, False, False]
    assert JsonReporter.wants_json_text and not TableReporter.wants_json_text
    assert not NullReporter.wants_json_text


def test_exporter_text_is_the_same_with_the_builders_sums(world):
    """The exporter takes per-identity sums from the snapshot when it has them
    (no pass over every mapping); the text is what summing the mappings gives,
    with and without PSS figures, with and without folding into [other]."""
    from memtrace.exporter.collector import MemtraceCollector
    from memtrace.published import StateBox, TickState
    from memtrace.snapshot import Snapshot, SnapshotBuilder, identity_sums

    _, _, tr = tracked(world)
    builder = SnapshotBuilder()
    built = builder.stamp(builder.build(tr, 1.0))
    with_pss = Snapshot(built, pss_bytes=12345, uss_bytes=678, mappings=[
        {**m, "pss_bytes": m["rss_bytes"] // 2, "uss_bytes": m["anon_bytes"]}
        for m in built["mappings"]])
    with_pss.identity_sums = identity_sums(with_pss["mappings"])
    for snap in (built, with_pss):
        assert snap.identity_sums is not None
        for cap in (50, 3):
            texts = []
            for s in (snap, dict(snap)):          # dict(): no identity_sums attribute
                box = StateBox()
                box.set(TickState(snapshots={s["pid"]: s}))
                text = MemtraceCollector(box, max_mapping_series=cap).render_text()
                texts.append([x for x in text.splitlines()    # not the self-monitoring
                              if x.startswith(("memtrace_mapping", "memtrace_process"))])
            assert texts[0] == texts[1]
            assert any(x.startswith("memtrace_mapping_resident_bytes") for x in texts[0])
        assert any(x.startswith("memtrace_mapping_pss_bytes") for x in texts[0]) == (
            snap is with_pss)


def test_mapping_json_is_what_json_writes():
    """The builder's own encoder of a mapping gives json.dumps's exact text:
    names with quotes, backslashes, control and non-ASCII characters, nulls,
    big numbers."""
    from memtrace.snapshot import mapping_json

    base = {"start": 0x7F0000000000, "end": 0x7F0000012000, "perms": "rw-p", "offset": 0,
            "path": "", "kind": "anon", "mapping": "[anon]", "segment": None,
            "rss_bytes": 73728, "anon_bytes": 73728, "file_bytes": 0, "shmem_bytes": 0,
            "virtual_bytes": 73728, "faults": 18, "pss_bytes": None, "uss_bytes": None,
            "swap_bytes": None}
    odd = {**base, "path": 'a "b" \\x01\\\\ é ☃ \U0001F600 \u2028', "kind": "library",
           "mapping": "lib\"x\".so", "segment": "text", "pss_bytes": 1 << 62,
           "uss_bytes": 0, "swap_bytes": 4096, "offset": 0xFFFFF000}
    for m in (base, odd):
        assert mapping_json(m) == json.dumps(m, separators=(",", ":")).encode("ascii")
