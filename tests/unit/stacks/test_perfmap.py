"""memtrace.stacks.perfmap: JIT code names from /tmp/perf-PID.map, read as the
process sees it (a fake /proc tree here), incrementally, a later line for the
same start winning, bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from memtrace.stacks.perfmap import PerfMaps, parse_line

PID = 4242


def _proc(tmp_path: Path, ns_pid: int | None = None) -> tuple[str, Path]:
    """A fake /proc with PID's root and status; returns (proc root, map file)."""
    proc = tmp_path / "proc"
    root = tmp_path / "rootfs"
    (root / "tmp").mkdir(parents=True)
    (proc / str(PID)).mkdir(parents=True)
    (proc / str(PID) / "root").symlink_to(root)
    nspid = f"NSpid:\t{PID}\t{ns_pid}\n" if ns_pid else f"NSpid:\t{PID}\n"
    (proc / str(PID) / "status").write_text(f"Name:\tnode\nPid:\t{PID}\n{nspid}")
    return str(proc), root / "tmp" / f"perf-{ns_pid or PID}.map"


def test_lines_parse_with_or_without_0x_and_junk_is_skipped():
    assert parse_line(b"7f0000001000 40 JS:*step /app/a.js:3:14\n") == (
        0x7F0000001000, 0x40, "JS:*step /app/a.js:3:14")
    jvm = b"0x00007fd2d8ec8d80 0x00000000000006d0 void Churn.main(java.lang.String[])"
    assert parse_line(jvm) == (0x7FD2D8EC8D80, 0x6D0, "void Churn.main(java.lang.String[])")
    for junk in (b"", b"7f00 40", b"zz 40 name", b"7f00 0 empty"):
        assert parse_line(junk) is None


def test_an_address_is_named_by_the_entry_holding_it(tmp_path):
    proc, path = _proc(tmp_path)
    path.write_bytes(b"1000 100 first\n2000 80 second\n")
    maps = PerfMaps(proc)
    assert maps.lookup(PID, 0x1000) == ("first", 0x1000)
    assert maps.lookup(PID, 0x10FF) == ("first", 0x1000)
    assert maps.lookup(PID, 0x1100) is None          # past its end: a gap
    assert maps.lookup(PID, 0x2050) == ("second", 0x2000)
    assert maps.lookup(PID, 0xFFF) is None
    assert maps.lookup(PID + 1, 0x1000) is None      # no such process


def test_the_file_is_read_again_only_in_a_new_batch_and_only_what_it_gained(tmp_path):
    proc, path = _proc(tmp_path)
    path.write_bytes(b"1000 100 old\n3000 10 par")     # the last line not ended yet
    maps = PerfMaps(proc)
    assert maps.lookup(PID, 0x3000) is None
    with path.open("ab") as f:
        f.write(b"tial\n1000 100 recompiled\n500 10 lower\n")
    assert maps.lookup(PID, 0x1000) == ("old", 0x1000)      # same batch: not re-read
    maps.new_batch()
    assert maps.lookup(PID, 0x1000) == ("recompiled", 0x1000)   # the later line wins
    assert maps.lookup(PID, 0x3005) == ("partial", 0x3000)
    assert maps.lookup(PID, 0x505) == ("lower", 0x500)      # out of order: re-sorted


def test_the_pid_in_the_process_namespace_names_the_file(tmp_path):
    proc, path = _proc(tmp_path, ns_pid=7)
    path.write_bytes(b"1000 100 in-a-container\n")
    assert PerfMaps(proc).lookup(PID, 0x1010) == ("in-a-container", 0x1000)


def test_a_new_file_replaces_the_old_names(tmp_path):
    proc, path = _proc(tmp_path)
    path.write_bytes(b"1000 100 before\n" * 4)
    maps = PerfMaps(proc)
    assert maps.lookup(PID, 0x1000) == ("before", 0x1000)
    path.unlink()
    path.write_bytes(b"2000 100 after\n")
    maps.new_batch()
    assert maps.lookup(PID, 0x1000) is None
    assert maps.lookup(PID, 0x2000) == ("after", 0x2000)


def test_reading_is_bounded_and_what_is_left_is_counted_and_said_once(tmp_path, capsys):
    proc, path = _proc(tmp_path)
    lines = b"".join(b"%x 10 f%d\n" % (0x1000 + 0x10 * i, i) for i in range(100))
    path.write_bytes(lines)
    maps = PerfMaps(proc, max_bytes=200)
    assert maps.lookup(PID, 0x1000) == ("f0", 0x1000)
    assert maps.lookup(PID, 0x1000 + 0x10 * 99) is None
    assert maps.skipped_bytes(PID) == len(lines) - 200
    maps.new_batch()
    maps.lookup(PID, 0x1000)
    assert maps.skipped_bytes(PID) == len(lines) - 200
    said = capsys.readouterr().err.splitlines()
    assert said == [f"memtrace: pid {PID}: JIT code names: only the first 200 bytes of "
                    f"{proc}/{PID}/root/tmp/perf-{PID}.map read ({len(lines) - 200:,} more "
                    "left unread; code named there shows as [unknown])"]


@pytest.mark.parametrize("content", [b"", b"not a map\n"])
def test_an_empty_or_foreign_file_names_nothing(tmp_path, content):
    proc, path = _proc(tmp_path)
    path.write_bytes(content)
    assert PerfMaps(proc).lookup(PID, 0x1000) is None


def test_the_maps_of_the_processes_used_last_are_kept(tmp_path):
    proc, path = _proc(tmp_path)
    path.write_bytes(b"1000 100 f\n")
    maps = PerfMaps(proc, max_processes=2)
    for pid in (PID, PID + 1, PID + 2, PID + 1):    # the last two have no map
        maps.lookup(pid, 0x1000)
        maps.new_batch()
    assert list(maps._maps) == [PID + 2, PID + 1]
    assert maps.lookup(PID, 0x1000) == ("f", 0x1000)    # read again when needed
