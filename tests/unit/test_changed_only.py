"""--changed-only JSON (memtrace.views.jsonl): after a process's first snapshot,
only the mappings that changed and the starts of those that are gone; the reader
full_snapshots() rebuilds exactly the snapshots the full output has."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest

from memtrace.commands.live import make_reporter
from memtrace.commands.run import run
from memtrace.commands.watch import watch
from memtrace.errors import ExitCode, MemtraceError
from memtrace.snapshot import SnapshotBuilder
from memtrace.trace.events import CHUNK_SHIFT, ChunkMark
from memtrace.views.jsonl import JsonReporter, full_snapshots

from .fakes import PAGE
from .test_snapshot import tracked


def _layout_changed(tr):  # type: ignore[no-untyped-def]
    tr.update([], [], dataclasses.replace(tr.stats, layout_gen=tr.stats.layout_gen + 1))


def _snapshots(world) -> list[dict]:  # type: ignore[no-untyped-def]
    """Snapshots of one process through quiet ticks, faults, pages given back, a
    new mapping and an unmapped one, as the watch loop's builder makes them (a
    quiet tick shares the previous snapshot's mapping dicts)."""
    p, m, tr = tracked(world)
    builder = SnapshotBuilder()
    anon = m["anon"]
    steps = [
        lambda: None,                                                   # quiet
        lambda: (p.touch(anon.start, anon.start + 2 * PAGE), p.sync(),
                 tr.update([ChunkMark(anon.start >> CHUNK_SHIFT, 2, anon.start)], [], None)),
        lambda: None,                                                   # quiet
        lambda: (p.drop(anon.start, anon.start + PAGE), p.sync(),
                 tr.update([], [(anon.start, anon.start + PAGE)], None)),
        lambda: (p.map(0x100000000, 0x100004000), p.touch(0x100000000, 0x100002000),
                 p.sync(), _layout_changed(tr)),
        lambda: (p.unmap(anon.start, anon.end), p.sync(), _layout_changed(tr)),
    ]
    snaps = []
    for i, step in enumerate(steps):
        step()
        snaps.append(builder.stamp(builder.build(tr, float(i))))
    return snaps


def _write(snaps: list[dict], changed_only: bool) -> list[str]:
    out = io.StringIO()
    reporter = JsonReporter(out, changed_only=changed_only)
    for snap in snaps:
        reporter.snapshot(snap)
    return out.getvalue().splitlines()


def test_changed_only_lists_only_changes_and_rebuilds_the_full_snapshots(world):
    snaps = _snapshots(world)
    full = _write(snaps, changed_only=False)
    delta = _write(snaps, changed_only=True)
    assert len(full) == len(delta) == len(snaps)
    assert delta[0] == full[0]                          # the first snapshot is whole
    d = [json.loads(line) for line in delta]
    assert "changed_only" not in d[0]
    assert all(x["changed_only"] is True for x in d[1:])
    assert [len(x["mappings"]) for x in d[1:4]] == [1, 0, 1]   # fault, quiet, given back
    assert [x["removed_starts"] for x in d[1:5]] == [[], [], [], []]
    assert [m["start"] for m in d[4]["mappings"]] == [0x100000000]   # a new mapping
    unmapped = {m["start"] for m in json.loads(full[4])["mappings"]} \
        - {m["start"] for m in json.loads(full[5])["mappings"]}
    assert unmapped and set(d[5]["removed_starts"]) == unmapped
    # every other field is there, unchanged
    for whole, part in zip(full, d, strict=True):
        w = json.loads(whole)
        assert {k: v for k, v in part.items()
                if k not in ("mappings", "removed_starts", "changed_only")} \
            == {k: v for k, v in w.items() if k != "mappings"}
    assert list(full_snapshots(delta)) == [json.loads(line) for line in full]
    assert list(full_snapshots(full)) == [json.loads(line) for line in full]
    assert sum(map(len, delta[1:])) < sum(map(len, full[1:])) / 3


def test_changed_only_keeps_processes_apart(world):
    from tests.unit.exporter.helpers import realistic_process

    a1, b1 = realistic_process(1, "a"), realistic_process(2, "b")
    a2 = json.loads(json.dumps(a1))
    a2["mappings"][3]["rss_bytes"] += PAGE
    b2 = json.loads(json.dumps(b1))
    del b2["mappings"][0]
    snaps = [a1, b1, a2, b2]
    delta = _write(snaps, changed_only=True)
    assert [len(json.loads(x)["mappings"]) for x in delta[2:]] == [1, 0]
    assert json.loads(delta[3])["removed_starts"] == [b1["mappings"][0]["start"]]
    assert list(full_snapshots(delta)) == [json.loads(x) for x in _write(snaps, False)]


def test_changed_only_is_an_option_of_watch_and_run_for_json():
    for cmd, argv in ((watch, ["1"]), (run, ["--", "true"])):
        ctx = cmd.make_context(cmd.name, ["--changed-only", "--format", "json", *argv])
        assert ctx.meta["changed_only"] is True
        with ctx:
            assert make_reporter("json", None).changed_only is True  # type: ignore[union-attr]
            with pytest.raises(MemtraceError) as ei:
                make_reporter("table", None)
            assert ei.value.code == ExitCode.USAGE
            assert ei.value.message == "--changed-only needs --format json"
        ctx = cmd.make_context(cmd.name, ["--format", "json", *argv])
        with ctx:
            assert make_reporter("json", None).changed_only is False  # type: ignore[union-attr]


def test_changed_only_from_the_builder_is_byte_for_byte_the_compared_output(world):
    """The builder's own record of what changed (no pass over every mapping)
    writes exactly what comparing each mapping with the previous snapshot
    writes (a plain dict has no such record: compared)."""
    snaps = _snapshots(world)
    assert all(s.delta_base is not None for s in snaps[1:])
    fast = _write(snaps, changed_only=True)
    compared = _write([dict(s) for s in snaps], changed_only=True)
    assert fast == compared
    assert [len(json.loads(x)["mappings"]) for x in fast[1:4]] == [1, 0, 1]


def test_full_every_writes_a_whole_snapshot_every_n(world):
    snaps = _snapshots(world)
    out = io.StringIO()
    reporter = JsonReporter(out, changed_only=True, full_every=2)
    for snap in snaps:
        reporter.snapshot(snap)
    lines = out.getvalue().splitlines()
    whole = [i for i, x in enumerate(lines) if "changed_only" not in json.loads(x)]
    assert whole == [0, 2, 4]
    full = _write(snaps, changed_only=False)
    assert [lines[i] for i in whole] == [full[i] for i in whole]
    assert list(full_snapshots(lines)) == [json.loads(x) for x in full]
    # a reader that starts at a whole line rebuilds every snapshot from there
    assert list(full_snapshots(lines[2:])) == [json.loads(x) for x in full[2:]]


def test_full_every_is_an_option_with_changed_only():
    ctx = watch.make_context("watch", ["--changed-only", "--full-every", "60", "--format",
                                       "json", "1"])
    with ctx:
        assert make_reporter("json", None).full_every == 60  # type: ignore[union-attr]
    ctx = watch.make_context("watch", ["--full-every", "60", "--format", "json", "1"])
    with ctx, pytest.raises(MemtraceError) as ei:
        make_reporter("json", None)
    assert ei.value.code == ExitCode.USAGE
    assert ei.value.message == "--full-every needs --changed-only"


def test_memtrace_rebuild_writes_the_whole_output_byte_for_byte(world, tmp_path):
    """`memtrace rebuild FILE` (or stdin) turns --changed-only output back into
    exactly the lines the whole output has; a changes-only line without a whole
    snapshot before it is a usage error."""
    from click.testing import CliRunner

    from memtrace.commands.main import cli

    snaps = _snapshots(world)
    delta = _write(snaps, changed_only=True)
    path = tmp_path / "changes.jsonl"
    path.write_text("\n".join(delta) + "\n")
    runner = CliRunner()
    got = runner.invoke(cli, ["rebuild", str(path)])
    assert got.exit_code == 0, got.output
    assert got.output.splitlines() == _write(snaps, changed_only=False)
    assert runner.invoke(cli, ["rebuild"], input=path.read_bytes()).output == got.output
    bad = runner.invoke(cli, ["rebuild"], input="\n".join(delta[1:]) + "\n")
    assert isinstance(bad.exception, MemtraceError)      # main() makes it exit 2
    assert bad.exception.code == ExitCode.USAGE


@pytest.mark.parametrize("changed_only", [False, True])
def test_big_whole_snapshots_get_one_hint_of_changed_only(capsys, changed_only):
    mapping = {"start": 0, "end": 4096, "path": "x" * 300}
    snap = {"pid": 7, "mappings": [dict(mapping, start=n) for n in range(4000)]}
    rep = JsonReporter(io.StringIO(), changed_only=changed_only)
    small = {"pid": 8, "mappings": [mapping]}
    rep.snapshot(small)
    assert capsys.readouterr().err == ""            # small: nothing said
    for _ in range(2):
        rep.snapshot(dict(snap))
    err = capsys.readouterr().err
    if changed_only:
        assert err == ""
    else:
        assert err.count("--changed-only") == 1
        assert "pid 7: a JSON snapshot of 4000 mappings is 1.3 MB" in err
