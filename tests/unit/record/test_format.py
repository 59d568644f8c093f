"""The .mtrace recording (memtrace.record): what the writer appends reads back
as the same whole snapshots; a file cut anywhere reads up to its last whole
line; a corrupt line stops the reading with a sentence naming it."""

from __future__ import annotations

import json
import os

import pytest

from memtrace.errors import ExitCode
from memtrace.record.reader import RecordingError, open_recording
from memtrace.record.writer import RecordingWriter, make_header, open_recording_output

from ..test_changed_only import _snapshots


def _record(path: str, snaps: list[dict], full_every: int = 600) -> None:
    writer = RecordingWriter(open_recording_output(path),
                             make_header("watch", 1.0, pids=[1], full_every=full_every))
    for snap in snaps:
        writer.snapshot(snap)
        writer.tick_done()
    writer.message("pid 1 exited")
    writer.close()


def _expected(snaps: list[dict]) -> list[dict]:
    return [json.loads(json.dumps(s)) for s in snaps]


@pytest.mark.parametrize("full_every", [0, 2, 600])
def test_round_trip_gives_the_whole_snapshots(world, tmp_path, full_every):  # type: ignore[no-untyped-def]
    snaps = _snapshots(world)
    path = str(tmp_path / "a.mtrace")
    _record(path, snaps, full_every)
    rec = open_recording(path)
    assert rec.header["memtrace_recording"] == 1 and rec.header["mode"] == "watch"
    kinds = [r.kind for r in rec.records()]
    assert kinds == ["snapshot"] * len(snaps) + ["message", "end"]
    assert rec.ended and rec.problem is None
    assert list(open_recording(path).snapshots()) == _expected(snaps)


def test_changes_only_are_smaller_than_whole(world, tmp_path):  # type: ignore[no-untyped-def]
    snaps = _snapshots(world)
    a, b = str(tmp_path / "a.mtrace"), str(tmp_path / "b.mtrace")
    _record(a, snaps, full_every=0)
    _record(b, snaps, full_every=1)
    assert os.path.getsize(a) < os.path.getsize(b)


def test_a_file_cut_anywhere_reads_its_whole_lines(world, tmp_path):  # type: ignore[no-untyped-def]
    snaps = _snapshots(world)
    path = str(tmp_path / "a.mtrace")
    _record(path, snaps)
    data = (tmp_path / "a.mtrace").read_bytes()
    ends = [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    header_end = ends[0]
    expected = _expected(snaps)
    for cut in range(header_end, len(data), 97):
        with open(tmp_path / "cut.mtrace", "wb") as f:
            f.write(data[:cut])
        rec = open_recording(str(tmp_path / "cut.mtrace"))
        got = list(rec.snapshots())
        whole_lines = sum(1 for e in ends if e <= cut) - 1
        assert got == expected[:min(whole_lines, len(snaps))]
        assert not rec.ended and not rec.corrupt and rec.problem
        assert ("cut short" in rec.problem) == (cut not in ends)


def test_a_corrupt_line_stops_there_and_is_named(world, tmp_path):  # type: ignore[no-untyped-def]
    snaps = _snapshots(world)
    path = str(tmp_path / "a.mtrace")
    _record(path, snaps)
    lines = (tmp_path / "a.mtrace").read_bytes().split(b"\n")
    lines[3] = b'{"pid": 1, "mappings": [' + b"\x00garbage\n"[:-1]
    (tmp_path / "a.mtrace").write_bytes(b"\n".join(lines))
    rec = open_recording(path)
    got = list(rec.snapshots())
    assert got == _expected(snaps)[:2]
    assert rec.corrupt and rec.problem and "corrupt line 4" in rec.problem


def test_a_dropped_snapshot_skips_its_changes_until_the_next_whole(world, tmp_path):  # type: ignore[no-untyped-def]
    snaps = _snapshots(world)
    path = str(tmp_path / "a.mtrace")
    stream = open_recording_output(path)
    writer = RecordingWriter(stream, make_header("watch", 1.0, full_every=0))
    accept = iter([True, False, True, True, True, True])
    real = stream.write_record
    stream.write_record = lambda parts: real(parts) if next(accept) else False  # type: ignore[method-assign]
    for snap in snaps[:3]:
        writer.snapshot(snap)
    stream.write_record = real  # type: ignore[method-assign]
    for snap in snaps[3:]:
        writer.snapshot(snap)
    writer.close()
    rec = open_recording(path)
    kinds = [r.kind for r in rec.records()]
    assert "dropped" in kinds and rec.problem is None
    got = list(open_recording(path).snapshots())
    # the one after the drop is whole again: nothing after it is lost
    assert got == _expected([snaps[0]] + snaps[2:])


@pytest.mark.parametrize("content, says", [
    (b"", "empty"),
    (b'{"pid": 1}\n', "not a memtrace recording"),
    (b"\x89PNG\r\n", "not a memtrace recording"),
    (b'{"memtrace_recording": 99}\n', "format 99"),
])
def test_not_a_recording_is_one_clear_error(tmp_path, content, says):  # type: ignore[no-untyped-def]
    path = tmp_path / "x.mtrace"
    path.write_bytes(content)
    with pytest.raises(RecordingError) as e:
        open_recording(str(path))
    assert says in e.value.message and e.value.code == ExitCode.RECORDING_UNREADABLE == 16


def test_a_missing_file_is_one_clear_error(tmp_path):  # type: ignore[no-untyped-def]
    with pytest.raises(RecordingError) as e:
        open_recording(str(tmp_path / "nope.mtrace"))
    assert "cannot read" in e.value.message
