"""memtrace.libevents: library loads and unloads from successive snapshots, and
their metric families."""

from __future__ import annotations

from typing import Any

from memtrace.exporter.families import library_families
from memtrace.libevents import SETTLE_TICKS, LibraryEvents, describe, instances
from memtrace.trace.attribution import classify, mapping_identity, name_segments
from memtrace.trace.procfs import Vma

PAGE = 4096
LIB = b"/tmp/libdummy.so"
EXE = b"/usr/bin/prog"
BASE = 0x7F0000100000


def lib_vmas(base: int = BASE, relro: bool = True, path: bytes = LIB) -> list[Vma]:
    """libdummy as ld.so leaves it: headers, text, rodata, relro, data, bss."""
    v = [Vma(base, base + 0x1000, "r--p", 0, "fe:00", 8, path),
         Vma(base + 0x1000, base + 0x2000, "r-xp", 0x1000, "fe:00", 8, path),
         Vma(base + 0x2000, base + 0x23000, "r--p", 0x2000, "fe:00", 8, path)]
    if relro:
        v += [Vma(base + 0x23000, base + 0x24000, "r--p", 0x22000, "fe:00", 8, path),
              Vma(base + 0x24000, base + 0x55000, "rw-p", 0x23000, "fe:00", 8, path)]
    else:
        v += [Vma(base + 0x23000, base + 0x55000, "rw-p", 0x22000, "fe:00", 8, path)]
    return v + [Vma(base + 0x55000, base + 0xB5000, "rw-p", 0, "00:00", 0, b"")]


def process_vmas() -> list[Vma]:
    return [Vma(0x400000, 0x401000, "r--p", 0, "fe:00", 1, EXE),
            Vma(0x401000, 0x402000, "r-xp", 0x1000, "fe:00", 1, EXE),
            Vma(0x7F0000000000, 0x7F0000010000, "rw-p", 0, "00:00", 0, b""),
            Vma(0x7FFF00000000, 0x7FFF00021000, "rw-p", 0, "00:00", 0, b"[stack]")]


def snap_of(vmas: list[Vma], ts: float, rss: dict[int, int] | None = None) -> dict[str, Any]:
    """A snapshot shaped like memtrace.snapshot (the keys libevents reads)."""
    vmas = sorted(vmas, key=lambda v: v.start)
    segs = name_segments(vmas, EXE)
    maps = []
    for v in vmas:
        seg = segs.get(v.start)
        kind = seg.kind if seg else classify(v, EXE)
        maps.append({"start": v.start, "end": v.end, "perms": v.perms, "offset": v.offset,
                     "path": v.display_path, "kind": kind,
                     "mapping": seg.mapping if seg else mapping_identity(v, kind),
                     "segment": seg.name if seg else None,
                     "virtual_bytes": v.size, "rss_bytes": (rss or {}).get(v.start, 0)})
    return {"ts": ts, "pid": 42, "comm": "scenarios", "mappings": maps}


def test_instances_group_segments_and_bss():
    insts = instances(snap_of(process_vmas() + lib_vmas(), 1.0, {BASE: PAGE}))
    assert list(insts) == [("/tmp/libdummy.so", BASE)]
    inst = insts[("/tmp/libdummy.so", BASE)]
    assert inst.mapped_bytes == 0xB5000 and len(inst.layout) == 6
    assert inst.rss_bytes == PAGE and inst.segments["rodata"] == PAGE


def test_attach_is_a_baseline_then_load_then_unload():
    ev = LibraryEvents()
    base = process_vmas()
    assert ev.update(snap_of(base + lib_vmas(), 1.0)) == []      # loaded before attach
    assert ev.update(snap_of(base + lib_vmas(), 2.0)) == []
    gone = ev.update(snap_of(base, 3.0))
    assert [e["event"] for e in gone] == ["library_unload"]
    assert gone[0]["unmapped_bytes"] == 0xB5000


def test_load_reported_once_settled_with_resident_bytes():
    ev = LibraryEvents()
    base = process_vmas()
    ev.update(snap_of(base, 1.0))
    # mid-dlopen: ld.so's reservation of the whole span, one VMA
    reserve = [Vma(BASE, BASE + 0xB5000, "r--p", 0, "fe:00", 8, LIB)]
    assert ev.update(snap_of(base + reserve, 2.0)) == []
    # segments mapped, relocation not yet mprotect'ed: layout changed, wait
    assert ev.update(snap_of(base + lib_vmas(relro=False), 3.0)) == []
    assert ev.update(snap_of(base + lib_vmas(), 4.0)) == []
    rss = {BASE: PAGE, BASE + 0x1000: PAGE, BASE + 0x23000: PAGE, BASE + 0x24000: 2 * PAGE}
    out = ev.update(snap_of(base + lib_vmas(), 5.0, rss))
    assert len(out) == 1
    e = out[0]
    assert e["event"] == "library_load" and e["settled"] is True
    assert (e["ts"], e["pid"], e["comm"], e["mapping"], e["base"]) == (
        5.0, 42, "scenarios", "/tmp/libdummy.so", BASE)
    assert e["mapped_bytes"] == 0xB5000 and e["vmas"] == 6
    assert e["rss_bytes"] == 5 * PAGE
    assert e["segments_rss_bytes"] == {"rodata": PAGE, "text": PAGE, "relro": PAGE,
                                       "data": 2 * PAGE, "bss": 0}
    assert ev.update(snap_of(base + lib_vmas(), 6.0, rss)) == []
    touched = {**rss, BASE + 0x55000: 96 * PAGE}
    assert ev.update(snap_of(base + lib_vmas(), 7.0, touched)) == []
    out = ev.update(snap_of(base, 8.0))
    assert [(e["event"], e["unmapped_bytes"], e["rss_bytes"]) for e in out] == [
        ("library_unload", 0xB5000, 101 * PAGE)]
    assert ev.totals_dict() == {"/tmp/libdummy.so": {
        "loads": 1, "unloads": 1, "loaded_bytes": 0xB5000, "unloaded_bytes": 0xB5000,
        "unloaded_rss_bytes": 101 * PAGE}}


def test_layout_that_never_settles_is_reported_after_settle_ticks():
    ev = LibraryEvents()
    base = process_vmas()
    ev.update(snap_of(base, 0.0))
    out: list[dict[str, Any]] = []
    for i in range(SETTLE_TICKS + 1):
        extra = [Vma(0x7E0000000000, 0x7E0000000000 + (i + 1) * PAGE, "rw-p", 0, "00:00", 0,
                     b"")]
        # the bss grows every tick (an odd loader): the layout keeps changing
        vm = lib_vmas()
        vm[-1] = Vma(vm[-1].start, vm[-1].end + i * PAGE, "rw-p", 0, "00:00", 0, b"")
        out += ev.update(snap_of(base + extra + vm, float(i + 1)))
    assert [(e["event"], e["settled"]) for e in out] == [("library_load", False)]


def test_nodelete_dlclose_is_no_unload():
    """dlclose of an RTLD_NODELETE object leaves every mapping: no event."""
    ev = LibraryEvents()
    base = process_vmas()
    ev.update(snap_of(base, 1.0))
    ev.update(snap_of(base + lib_vmas(), 2.0))
    assert [e["event"] for e in ev.update(snap_of(base + lib_vmas(), 3.0))] == ["library_load"]
    for t in (4.0, 5.0, 6.0):      # dlclose happened; nothing changed in the layout
        assert ev.update(snap_of(base + lib_vmas(), t)) == []
    assert ev.totals_dict()["/tmp/libdummy.so"]["unloads"] == 0


def test_library_mapped_twice_and_gone_before_settling():
    ev = LibraryEvents()
    base = process_vmas()
    ev.update(snap_of(base, 1.0))
    two = lib_vmas() + lib_vmas(BASE + 0x200000)
    assert ev.update(snap_of(base + two, 2.0)) == []
    out = ev.update(snap_of(base + two, 3.0))
    assert sorted(e["base"] for e in out) == [BASE, BASE + 0x200000]
    # a third copy seen once, gone at the next tick: reported as it was seen
    third = lib_vmas(BASE + 0x400000)
    ev.update(snap_of(base + two + third, 4.0))
    out = ev.update(snap_of(base + two, 5.0))
    assert [(e["event"], e["base"]) for e in out] == [
        ("library_load", BASE + 0x400000), ("library_unload", BASE + 0x400000)]
    assert out[0]["settled"] is False
    assert ev.totals_dict()["/tmp/libdummy.so"]["loads"] == 3


def test_deleted_library_and_identity_cap(monkeypatch):
    import memtrace.libevents as le

    monkeypatch.setattr(le, "MAX_NAMED", 1)
    ev = LibraryEvents()
    base = process_vmas()
    ev.update(snap_of(base, 1.0))
    a = lib_vmas(path=b"/tmp/a.so (deleted)")
    b = lib_vmas(BASE + 0x200000, path=b"/tmp/b.so")
    ev.update(snap_of(base + a + b, 2.0))
    out = ev.update(snap_of(base + a + b, 3.0))
    assert {e["mapping"] for e in out} == {"/tmp/a.so (deleted)", "/tmp/b.so"}
    totals = ev.totals_dict()
    assert set(totals) == {"/tmp/a.so (deleted)", "[other]"}
    assert all(t["loads"] == 1 for t in totals.values())


def test_describe_lines():
    load = {"event": "library_load", "pid": 42, "comm": "x", "mapping": "/tmp/l.so",
            "base": 0x1000, "mapped_bytes": 3 << 20, "rss_bytes": 20 << 10}
    assert describe(load) == "[42] x loaded /tmp/l.so at 0x1000: 3.0 MiB mapped, 20.0 KiB resident"
    unload = {"event": "library_unload", "pid": 42, "comm": "x", "mapping": "/tmp/l.so",
              "base": 0x1000, "unmapped_bytes": 3 << 20, "rss_bytes": 0}
    assert "unloaded /tmp/l.so" in describe(unload) and "0 B resident given back" in \
        describe(unload)
    assert "pid 42 " not in describe(load)   # the table drops a process on "pid N " notes


def test_library_families():
    snap = {"library_totals": {"/tmp/l.so": {"loads": 2, "unloads": 1, "loaded_bytes": 10,
                                             "unloaded_bytes": 5, "unloaded_rss_bytes": 3}}}
    fams = {f.name: f for f in library_families([(["42", "x"], snap), (["43", "y"], {})],
                                                ["pid", "comm"])}
    assert set(fams) == {"memtrace_library_loads", "memtrace_library_unloads",
                         "memtrace_library_loaded_bytes", "memtrace_library_unloaded_bytes",
                         "memtrace_library_unloaded_resident_bytes"}
    assert all(f.kind == "counter" and f.labels == ["pid", "comm", "mapping"]
               for f in fams.values())
    assert fams["memtrace_library_loads"].rows == [(["42", "x", "/tmp/l.so"], 2)]
    assert fams["memtrace_library_unloaded_resident_bytes"].rows == [
        (["42", "x", "/tmp/l.so"], 3)]
    out: list[str] = []
    fams["memtrace_library_unloads"].render(out, {})
    assert 'memtrace_library_unloads_total{pid="42",comm="x",mapping="/tmp/l.so"} 1' in \
        "".join(out)


def test_table_shows_segments_and_library_events():
    import io

    from rich.console import Console

    from memtrace.views.table import TableReporter

    out = io.StringIO()
    table = TableReporter(Console(file=out, width=200, force_terminal=False), max_rows=50)
    snap = snap_of(process_vmas() + lib_vmas(), 1.0, {BASE + 0x55000: 8 * PAGE})
    for m in snap["mappings"]:
        m.update(anon_bytes=0, file_bytes=0, shmem_bytes=0, faults=0)
    snap.update(rss_bytes=0, anon_bytes=0, file_bytes=0, shmem_bytes=0, virtual_bytes=0,
                statm_rss_bytes=0, drift_bytes=0, faults=0, syscalls={}, full_rescans={},
                events_lost=0, library_events=[
                    {"event": "library_load", "pid": 42, "comm": "scenarios",
                     "mapping": "/tmp/libdummy.so", "base": BASE, "mapped_bytes": 0xB5000,
                     "rss_bytes": 5 * PAGE}])
    table.snapshot(snap)
    table.close()
    text = out.getvalue()
    assert "loaded /tmp/libdummy.so" in text
    bss_row = next(line for line in text.splitlines() if " bss " in line)
    assert "/tmp/libdummy.so" in bss_row and "library" in bss_row
    assert 42 in table.snaps      # the message did not drop the process


def test_same_layout_token_skips_work_but_unload_has_last_tick_rss():
    """With the model's VMA list as the layout token, ticks without a layout
    change compute nothing; an unload still reports the last tick's resident bytes."""
    ev = LibraryEvents()
    base = process_vmas()
    t0, t1, t2 = object(), object(), object()
    ev.update(snap_of(base, 1.0), t0)
    ev.update(snap_of(base + lib_vmas(), 2.0), t1)
    assert [e["event"] for e in ev.update(snap_of(base + lib_vmas(), 3.0), t1)] == [
        "library_load"]
    for i in range(5):        # resident grows, the layout does not change
        rss = {BASE + 0x55000: (i + 1) * 10 * PAGE}
        assert ev.update(snap_of(base + lib_vmas(), 4.0 + i, rss), t1) == []
    out = ev.update(snap_of(base, 10.0), t2)
    assert [(e["event"], e["rss_bytes"]) for e in out] == [("library_unload", 50 * PAGE)]
