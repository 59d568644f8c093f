"""The .mtrace recording (memtrace.record): what the writer appends reads back
as the same whole snapshots; a file cut anywhere reads up to its last whole
line; a corrupt line stops the reading with a sentence naming it."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from memtrace.errors import ExitCode
from memtrace.record.reader import RecordingError, open_recording
from memtrace.record.writer import RecordingWriter, make_header, open_recording_output

from ..test_changed_only import _snapshots


def _record(path: str, snaps: list[dict], full_every: int = 600,
            compress: bool = True) -> None:
    writer = RecordingWriter(open_recording_output(path),
                             make_header("watch", 1.0, pids=[1], full_every=full_every),
                             compress=compress)
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
    _record(path, snaps, compress=False)
    data = (tmp_path / "a.mtrace").read_bytes()
    ends = [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    header_end = ends[0]
    expected = _expected(snaps)
    for cut in range(header_end, len(data)):     # every byte: numbers, literals, escapes
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
    _record(path, snaps, compress=False)
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
    writer = RecordingWriter(stream, make_header("watch", 1.0, full_every=0), compress=False)
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


def test_recordings_are_gzip_and_zcat_reads_them(world, tmp_path):  # type: ignore[no-untyped-def]
    snaps = _snapshots(world)
    gz, plain = str(tmp_path / "gz.mtrace"), str(tmp_path / "plain.mtrace")
    _record(gz, snaps)
    _record(plain, snaps, compress=False)
    data = (tmp_path / "gz.mtrace").read_bytes()
    assert data[:2] == b"\x1f\x8b" and len(data) < os.path.getsize(plain)
    text = gzip.decompress(data)        # one whole gzip stream, as zcat reads it
    assert [json.loads(ln) for ln in text.splitlines()][1:-2] == [
        json.loads(ln) for ln in (tmp_path / "plain.mtrace").read_bytes().splitlines()][1:-2]
    assert list(open_recording(gz).snapshots()) == _expected(snaps)


def test_a_gzip_recording_cut_anywhere_reads_a_prefix(world, tmp_path):  # type: ignore[no-untyped-def]
    """Killed between two ticks or in the middle of one: every snapshot of the
    ticks flushed before the cut, nothing made up, no traceback."""
    snaps = _snapshots(world)
    path = tmp_path / "a.mtrace"
    writer = RecordingWriter(open_recording_output(str(path)), make_header("watch", 1.0))
    for snap in snaps:
        writer.snapshot(snap)
        writer.tick_done()
    writer.close()
    data = path.read_bytes()
    expected = _expected(snaps)
    got_before = -1
    for cut in range(0, len(data)):
        (tmp_path / "cut.mtrace").write_bytes(data[:cut])
        try:
            rec = open_recording(str(tmp_path / "cut.mtrace"))
        except RecordingError as e:
            assert e.code == ExitCode.RECORDING_UNREADABLE      # the header not there yet
            continue
        got = list(rec.snapshots())
        # all there but the gzip trailer: read whole, end line included
        assert got == expected[:len(got)] and (rec.problem is None) == rec.ended
        assert not rec.corrupt, (cut, rec.problem)     # cut, never taken for garbage
        assert len(got) >= got_before
        got_before = len(got)
    assert got_before == len(snaps)


def test_corrupt_gzip_data_is_named_and_the_prefix_read(world, tmp_path):  # type: ignore[no-untyped-def]
    snaps = _snapshots(world)
    path = tmp_path / "a.mtrace"
    _record(str(path), snaps)
    data = bytearray(path.read_bytes())
    for i in range(len(data) * 2 // 3, len(data) * 2 // 3 + 40):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    rec = open_recording(str(path))
    got = list(rec.snapshots())
    assert got == _expected(snaps)[:len(got)]
    assert rec.corrupt and rec.problem and ("corrupt" in rec.problem), rec.problem


def test_compressed_data_corrupt_anywhere_after_the_header_is_said_corrupt(world, tmp_path):  # type: ignore[no-untyped-def]
    """40 bytes garbled at every offset of a compressed recording: never taken
    for a recording cut short. A garbled length or code can leave zlib waiting
    for input to the end of the file, its output text copied from earlier
    (printable, not JSON): CI once saw "cut short in line 2" for such a file."""
    snaps = _snapshots(world)
    path = tmp_path / "a.mtrace"
    _record(str(path), snaps)
    data = path.read_bytes()
    expected = _expected(snaps)
    opened = 0
    for start in range(0, len(data) - 40):
        garbled = bytearray(data)
        for i in range(start, start + 40):
            garbled[i] ^= 0x5A
        path.write_bytes(bytes(garbled))
        try:
            rec = open_recording(str(path))
        except RecordingError:
            continue            # the header itself garbled: said at open
        opened += 1
        got = list(rec.snapshots())
        assert got == expected[:len(got)], start
        assert rec.corrupt and "corrupt" in (rec.problem or ""), (start, rec.problem)
    assert opened > len(data) // 2


@pytest.mark.parametrize("line, cut", [
    (b'{"a": "x\\u00e9', True), (b'{"a": 12', True), (b'{"a": tr', True),
    (b'{"a": [1, 2], "b": {"c": nu', True), ("{\"\u00e9".encode()[:-1], True),
    (b'{"a": 1}', True),
    (b'32"ihmnsr1,dftm8be1tar2ee0840724.2ses"/"err2m},{2s0tm0"', False),
    (b'{"a": 1\x00', False), (b'{"a": "\xff\xfe"', False), (b'{"a": 1}}, "b"', False),
])
def test_a_line_cut_short_is_told_from_garbage(line: bytes, cut: bool):
    from memtrace.record.reader import _could_be_cut_json
    assert _could_be_cut_json(line) is cut


def test_a_corrupt_byte_loses_at_most_a_small_piece_before_it():
    """zlib gives nothing of the piece it is handed when that piece holds a
    corrupt byte: a small recording corrupted at 2/3 lost even its header when
    the pieces were 1 KiB (CI saw it); they are 64 bytes now."""
    import io
    import random
    import zlib

    from memtrace.record.gzipped import FEED, GzipLines

    rng = random.Random(1)
    lines = [b'{"header": 1}\n'] + [
        " ".join(str(rng.randint(0, 10**6)) for _ in range(40)).encode() + b"\n"
        for _ in range(8)]
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    data = bytearray()
    for line in lines:
        data += z.compress(line) + z.flush(zlib.Z_SYNC_FLUSH)
    data += z.flush()
    assert len(data) < 1536          # 2/3 of it inside the first KiB
    at = len(data) * 2 // 3
    for i in range(at, at + 40):
        data[i] ^= 0x5A
    reader = GzipLines(io.BytesIO(bytes(data)))
    got = list(reader)
    # the lines wholly before the corrupt piece come out as written (what zlib
    # decodes of the corrupt bytes before it notices may follow: the recording
    # reader stops at the first line that is not a record)
    assert got[0] == lines[0] and len(got) >= 2
    assert reader.error is not None and "corrupt" in reader.error
    assert FEED <= 64
