"""views/output.py: writes to stdout or -o FILE never hold the loop or shutdown,
and nothing is lost silently (issue 16 items 10 and 12)."""

from __future__ import annotations

import io
import os
import threading
import time

import pytest

from memtrace.errors import ExitCode, OutputError
from memtrace.views.output import OutputStream, TextOutput, open_output


def test_dev_full_is_an_output_error_with_one_line():
    stream = open_output("/dev/full")
    stream.write_record([b"x" * 100, b"\n"])
    with pytest.raises(OutputError) as ei:
        stream.close()
    assert ei.value.code == ExitCode.OUTPUT_FAILED == 14
    assert ei.value.message == "cannot write /dev/full: No space left on device"
    assert not ei.value.quiet


def test_error_is_raised_by_the_next_write():
    stream = open_output("/dev/full")
    stream.write_record([b"a\n"])
    deadline = time.monotonic() + 10
    with pytest.raises(OutputError):
        while time.monotonic() < deadline:
            stream.write_record([b"b\n"])
            time.sleep(0.01)
    stream.close()              # raised once: close does not raise it again


def test_unopenable_file(tmp_path):
    with pytest.raises(OutputError) as ei:
        open_output(str(tmp_path / "no" / "such" / "dir"))
    assert ei.value.code == 14 and "No such file or directory" in ei.value.message


def test_closed_pipe_is_quiet():
    r, w = os.pipe()
    os.close(r)
    stream = OutputStream(w, "stdout", owns_fd=True)
    stream.write_record([b"{}\n"])
    with pytest.raises(OutputError) as ei:
        stream.close()
    assert ei.value.quiet and ei.value.code == 14


def test_stalled_reader_neither_blocks_writes_nor_close(capsys):
    r, w = os.pipe()          # nobody reads r
    try:
        stream = OutputStream(w, "stdout", stall_seconds=0.5)
        t0 = time.monotonic()
        for _ in range(5):
            assert stream.write_record([b"x" * (1 << 20), b"\n"])
        assert time.monotonic() - t0 < 0.5
        t0 = time.monotonic()
        stream.close()
        assert time.monotonic() - t0 < 2.0
        err = capsys.readouterr().err
        assert "stdout not read for 0.5s at exit: 5 record(s)" in err
        assert "the last line written may be incomplete" in err
    finally:
        os.close(r)
        os.close(w)


def test_records_beyond_the_bound_are_dropped_and_counted(capsys):
    r, w = os.pipe()
    try:
        stream = OutputStream(w, "out.json", max_queued=1 << 20, stall_seconds=0.2)
        kept = [stream.write_record([b"y" * (256 << 10)]) for _ in range(20)]
        assert not all(kept) and kept[0]
        dropped = kept.count(False)
        stream.close()
        err = capsys.readouterr().err
        assert "out.json is not being read fast enough: dropping output" in err
        assert f"out.json: {dropped} record(s) ({dropped * (256 << 10)} bytes) dropped" in err
    finally:
        os.close(r)
        os.close(w)


def test_a_slow_reader_gets_everything(capsys):
    r, w = os.pipe()
    got = bytearray()

    def read_slowly() -> None:
        while chunk := os.read(r, 65536):
            got.extend(chunk)
            time.sleep(0.02)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    stream = OutputStream(w, "stdout", stall_seconds=1.0, owns_fd=True)
    lines = [b"%d " % i + b"z" * 50000 + b"\n" for i in range(40)]
    for line in lines:
        stream.write_record([line])
    stream.close()             # waits while the reader keeps taking bytes
    reader.join(10)
    assert bytes(got) == b"".join(lines)
    assert capsys.readouterr().err == ""


def test_json_reporter_writes_whole_lines_through_the_stream(tmp_path):
    from memtrace.views.jsonl import JsonReporter

    path = tmp_path / "out.json"
    reporter = JsonReporter(open_output(str(path)))
    snap = {"pid": 1, "comm": "x", "mappings": []}
    for _ in range(3):
        reporter.snapshot(dict(snap))
        reporter.tick_done()
    reporter.close()
    lines = path.read_text().splitlines()
    assert lines == ['{"pid":1,"comm":"x","mappings":[]}'] * 3


def test_table_to_dev_full_is_an_output_error():
    from rich.console import Console

    from memtrace.views.table import TableReporter

    table = TableReporter(Console(file=TextOutput(open_output("/dev/full")).as_io(),
                                  width=100, force_terminal=True))
    with pytest.raises(OutputError) as ei:
        for _ in range(100):
            table.message("hello")   # a terminal gets a frame each time
            time.sleep(0.01)
        table.close()
    assert "No space left on device" in ei.value.message
    table.close()                    # said once


def test_text_output_is_a_file_for_rich():
    r, w = os.pipe()
    try:
        text = TextOutput(OutputStream(w, "stdout"))
        assert text.fileno() == w and text.isatty() is False
        text.write("héllo ")
        text.write("wörld\n")
        text.flush()
        text.stream.close()
        assert os.read(r, 100) == "héllo wörld\n".encode()
    finally:
        os.close(r)
        os.close(w)


def test_json_reporter_keeps_writing_to_a_text_file():
    from memtrace.views.jsonl import JsonReporter

    out = io.StringIO()
    JsonReporter(out).snapshot({"pid": 2, "mappings": []})
    assert out.getvalue().endswith("\n") and '"pid":2' in out.getvalue()


def test_a_record_of_many_pieces_is_written_as_it_is(capsys):
    """Pieces big and small (a snapshot: its head, ~56 KB blocks, commas),
    more than one writev can take, through a pipe that takes part of a call:
    the bytes arrive whole and in order."""
    r, w = os.pipe()
    got = bytearray()

    def read_all() -> None:
        while chunk := os.read(r, 4096 + 17):
            got.extend(chunk)

    reader = threading.Thread(target=read_all)
    reader.start()
    stream = OutputStream(w, "stdout", stall_seconds=5.0, owns_fd=True)
    pieces = [b"{head"]
    for i in range(1500):
        pieces += [b"," if i else b"[", bytes([65 + i % 26]) * (i * 37 % 70000)]
    pieces += [b"", b"]}\n"]
    stream.write_record(list(pieces))
    stream.close()
    reader.join(10)
    assert bytes(got) == b"".join(pieces)
    assert stream.written_bytes == len(got)
    assert capsys.readouterr().err == ""


def test_a_pipe_is_written_where_it_has_room(monkeypatch):
    """A large record to a reader taking 8 KiB a read (as Python's readline
    does) is written in a few writes of at least half the pipe, each into
    room the pipe has (not ~one blocked write per read), and arrives whole."""
    from memtrace.views import output

    r, w = os.pipe()
    writes: list[int] = []
    real_writev = os.writev

    def counting_writev(fd: int, buffers: list[memoryview]) -> int:
        size = sum(map(len, buffers))
        writes.append(size)
        assert size <= output.PIPE_SIZE - output._unread(fd)   # never blocks
        return real_writev(fd, buffers)

    monkeypatch.setattr(output.os, "writev", counting_writev)
    got = bytearray()

    def read_small() -> None:
        while chunk := os.read(r, 8192):
            got.extend(chunk)

    reader = threading.Thread(target=read_small)
    reader.start()
    stream = OutputStream(w, "stdout", stall_seconds=5.0, owns_fd=True)
    assert stream._pipe_size == output.PIPE_SIZE          # grown from 64 KiB
    record = [bytes([65 + i % 26]) * 70000 for i in range(60)] + [b"\n"]   # ~4 MB
    stream.write_record(record)
    stream.close()
    reader.join(10)
    assert bytes(got) == b"".join(record)
    assert len(writes) <= 2 * len(got) // (output.PIPE_SIZE // 2) + 2, writes
    assert min(writes[:-1]) >= output.PIPE_SIZE // 2 - 70000, writes


def test_pipe_capacity_of_other_files(tmp_path):
    from memtrace.views.output import pipe_capacity

    with open(tmp_path / "f", "wb") as f:
        assert pipe_capacity(f.fileno()) is None
    assert pipe_capacity(-1) is None


@pytest.mark.parametrize("kind", ["pipe", "file"])
def test_the_writer_thread_ends_at_close(kind, tmp_path):
    """A closed stream leaves no thread behind (it used to wait for records
    forever: one idle thread per stream ever opened)."""
    if kind == "pipe":
        r, w = os.pipe()
        stream = OutputStream(w, "pipe", owns_fd=True)
    else:
        r = -1
        stream = open_output(str(tmp_path / "out"))
    writer = stream._thread
    stream.write_record([b"x" * 1000, b"\n"])
    if r >= 0:
        assert os.read(r, 2000) == b"x" * 1000 + b"\n"
    stream.close()
    writer.join(5)
    assert not writer.is_alive()
    if r >= 0:
        os.close(r)
