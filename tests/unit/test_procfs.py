"""memtrace.procfs: parsing of maps/statm/stat/status and check_target."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memtrace.errors import ExitCode, MemtraceError
from memtrace.procfs import (
    PAGE_SIZE,
    PF_KTHREAD,
    ProcFS,
    decode_path,
    parse_maps,
    parse_stat,
    parse_statm,
    parse_status,
)

from .fakes import stat_line, status_text

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tricky():
    return parse_maps((FIXTURES / "maps_tricky").read_bytes())


# -- maps ---------------------------------------------------------------------
def test_maps_fields(tricky):
    assert len(tricky) == 14
    v = tricky[1]
    assert (v.start, v.end) == (0x555555556000, 0x55555555B000)
    assert v.perms == "r-xp"
    assert v.offset == 0x2000
    assert v.dev == "fe:00"
    assert v.inode == 1234
    assert v.size == 0x5000


def test_maps_path_with_spaces(tricky):
    assert tricky[0].path == b"/usr/bin/my prog"
    assert tricky[1].path == b"/usr/bin/my prog"


def test_maps_path_keeps_trailing_space(tricky):
    assert tricky[8].path == b"/tmp/trailing space "


def test_maps_anonymous_without_path(tricky):
    # the line ends "0 " (a trailing blank): still no path
    assert tricky[3].path == b""
    assert tricky[3].inode == 0


def test_maps_named_anon_memfd_deleted_and_pseudo(tricky):
    assert tricky[2].path == b"[heap]"
    assert tricky[4].path == b"[anon:jemalloc arena]"
    assert tricky[5].path == b"/memfd:ring buffer (deleted)"
    assert tricky[5].perms == "rw-s"
    assert tricky[7].path == b"/tmp/gone.so.1 (deleted)"
    assert [v.path for v in tricky[9:11]] == [b"[vvar]", b"[vdso]"]
    assert tricky[12].path == b"[stack]"
    assert tricky[13].start == 0xFFFFFFFFFF600000


def test_maps_non_utf8_path_stays_bytes_and_displays_without_surrogates(tricky):
    v = tricky[6]
    assert v.path == b"/tmp/caf\xe9 \xff\xfe.dat"
    shown = v.display_path
    assert shown == "/tmp/caf\\xe9 \\xff\\xfe.dat"
    shown.encode("utf-8")  # strict: would raise on a lone surrogate
    assert not any(0xD800 <= ord(ch) <= 0xDFFF for ch in shown)


def test_maps_identity_ignores_dev_but_not_the_rest(tricky):
    v = tricky[1]
    assert v.identity == (v.start, v.end, "r-xp", 0x2000, 1234, b"/usr/bin/my prog")


def test_maps_skips_blank_and_short_lines():
    data = b"\n7f00-7f01 rw-p 00000000 00:00\n1000-2000 r--p 00000000 00:00 0 \n\n"
    vmas = parse_maps(data)
    assert [(v.start, v.end) for v in vmas] == [(0x1000, 0x2000)]


def test_maps_empty():
    assert parse_maps(b"") == []


def test_decode_path_valid_utf8_untouched():
    assert decode_path("/tmp/héllo wörld".encode()) == "/tmp/héllo wörld"
    assert decode_path(b"\x80") == "\\x80"


# -- statm, stat, status ----------------------------------------------------------
def test_statm():
    s = parse_statm(b"4000 300 120 5 0 250 0\n")
    assert (s.size_pages, s.resident_pages, s.shared_pages, s.text_pages, s.data_pages) == (
        4000,
        300,
        120,
        5,
        250,
    )
    assert s.resident_bytes == 300 * PAGE_SIZE
    assert s.shared_bytes == 120 * PAGE_SIZE
    assert s.anon_bytes == 180 * PAGE_SIZE


def test_stat_simple():
    st = parse_stat(stat_line(1234, b"bash", "R", ppid=77, flags=0x400100, start_time=98765))
    assert (st.pid, st.comm, st.state, st.ppid, st.flags, st.start_time) == (
        1234,
        "bash",
        "R",
        77,
        0x400100,
        98765,
    )


@pytest.mark.parametrize(
    "comm", [b"a) (b", b") (", b"x) S 1 2 (y", b"((", b"))", b"two words", b""]
)
def test_stat_comm_with_parentheses_and_spaces(comm):
    st = parse_stat(stat_line(42, comm, "S", ppid=9, flags=0x40, start_time=555))
    assert st.comm == comm.decode()
    assert (st.pid, st.state, st.ppid, st.flags, st.start_time) == (42, "S", 9, 0x40, 555)


def test_stat_comm_non_utf8():
    st = parse_stat(stat_line(42, b"w\xffrker", "S"))
    assert st.comm == "w\\xffrker"


def test_stat_real_self():
    st = ProcFS().stat(os.getpid())
    assert st.pid == os.getpid()
    assert st.ppid == os.getppid()
    assert st.state in ("R", "S")
    assert not st.flags & PF_KTHREAD
    assert st.start_time > 0


def test_status():
    d = parse_status(status_text(10, 7) + b"Weird line without colon\n")
    assert d["Tgid"] == "7"
    assert d["Pid"] == "10"
    assert d["Name"] == "fake"
    assert d["VmRSS"] == "123 kB"
    assert "Weird line without colon" not in d


# -- ProcFS on a fixture tree and check_target ---------------------------------------
def make_proc(
    root: Path,
    pid: int,
    *,
    comm: bytes = b"sleepy",
    state: str = "S",
    flags: int = 0x400000,
    tgid: int | None = None,
    status: bool = True,
) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_bytes(stat_line(pid, comm, state, flags=flags))
    if status:
        (d / "status").write_bytes(status_text(pid, pid if tgid is None else tgid))
    (d / "maps").write_bytes((FIXTURES / "maps_tricky").read_bytes())
    (d / "statm").write_bytes(b"10 5 2 1 0 3 0\n")


def check(root: Path, pid: int, own: int = 1) -> MemtraceError:
    with pytest.raises(MemtraceError) as ei:
        ProcFS(root).check_target(pid, own_pid=own)
    return ei.value


def test_procfs_reads_fixture_tree(tmp_path):
    make_proc(tmp_path, 500)
    fs = ProcFS(tmp_path)
    assert len(fs.maps(500)) == 14
    assert fs.statm(500).resident_pages == 5
    assert fs.stat(500).comm == "sleepy"
    assert fs.status(500)["Tgid"] == "500"
    assert fs.alive(500)
    assert not fs.alive(501)
    assert fs.exe(500) == b""  # no exe link: empty, not an error


def test_procfs_exe_symlink(tmp_path):
    make_proc(tmp_path, 500)
    os.symlink(b"/opt/x y/bin\xff (deleted)", os.fsencode(tmp_path / "500" / "exe"))
    assert ProcFS(tmp_path).exe(500) == b"/opt/x y/bin\xff (deleted)"


def test_check_target_ok(tmp_path):
    make_proc(tmp_path, 500)
    st = ProcFS(tmp_path).check_target(500, own_pid=1)
    assert st.pid == 500 and st.comm == "sleepy"


@pytest.mark.parametrize("pid", [0, -1])
def test_check_target_invalid_pid(tmp_path, pid):
    e = check(tmp_path, pid)
    assert e.code == ExitCode.NO_SUCH_PROCESS == 6
    assert str(pid) in e.message


def test_check_target_missing(tmp_path):
    e = check(tmp_path, 999999)
    assert e.code == ExitCode.NO_SUCH_PROCESS
    assert e.message == "no such process: 999999"


def test_check_target_unreadable_status(tmp_path):
    make_proc(tmp_path, 500, status=False)
    e = check(tmp_path, 500)
    assert e.code == ExitCode.NO_SUCH_PROCESS


def test_check_target_garbage_stat(tmp_path):
    make_proc(tmp_path, 500)
    (tmp_path / "500" / "stat").write_bytes(b"garbage\n")
    e = check(tmp_path, 500)
    assert e.code == ExitCode.NO_SUCH_PROCESS
    assert "cannot read /proc/500" in e.message


def test_check_target_kernel_thread(tmp_path):
    make_proc(tmp_path, 2, comm=b"kthreadd", flags=0x208040)
    assert 0x208040 & PF_KTHREAD
    e = check(tmp_path, 2)
    assert e.code == ExitCode.KERNEL_THREAD == 7
    assert "kthreadd" in e.message and "kernel thread" in e.message


@pytest.mark.parametrize("state", ["Z", "X"])
def test_check_target_zombie(tmp_path, state):
    make_proc(tmp_path, 600, state=state, comm=b"dead) (beef")
    e = check(tmp_path, 600)
    assert e.code == ExitCode.ZOMBIE == 8
    assert "dead) (beef" in e.message
    assert not ProcFS(tmp_path).alive(600)


def test_check_target_own_process(tmp_path):
    make_proc(tmp_path, 700)
    e = check(tmp_path, 700, own=700)
    assert e.code == ExitCode.OWN_PROCESS == 9


def test_check_target_own_process_defaults_to_getpid():
    with pytest.raises(MemtraceError) as ei:
        ProcFS().check_target(os.getpid())
    assert ei.value.code == ExitCode.OWN_PROCESS


def test_check_target_thread_of_other_process(tmp_path):
    make_proc(tmp_path, 801, tgid=800)
    e = check(tmp_path, 801)
    assert e.code == ExitCode.NO_SUCH_PROCESS
    assert "801" in e.message and "800" in e.message
    assert "\n" not in e.message


def test_check_target_messages_are_one_line(tmp_path):
    make_proc(tmp_path, 2, comm=b"kworker/0:1", flags=PF_KTHREAD)
    make_proc(tmp_path, 600, state="Z")
    for pid in (2, 600, 0, 12345):
        assert "\n" not in check(tmp_path, pid).message
