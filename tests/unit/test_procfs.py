"""memtrace.trace.procfs: parsing of maps/statm/stat/status and check_target."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memtrace.errors import ExitCode, MemtraceError
from memtrace.trace.procfs import (
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


# -- names: one escaping for every view (issue 16, items 6 and 9) -------------------
import unicodedata  # noqa: E402

import memtrace.trace.procfs as procfs_mod  # noqa: E402
from tests import groundtruth as gt  # noqa: E402


def escape_name(raw: bytes) -> str:
    return procfs_mod.escape_name(raw)


def escape_text(text: str) -> str:
    return procfs_mod.escape_text(text)

# tests/unit/fixtures/maps_hostile as the kernel writes it; the VMA at
# 7f0000003000 is a file whose name holds a newline (maps: \012), the one at
# 7f0000004000 a file whose name holds the text \012.
NEWLINE_VMA, LITERAL_012_VMA = 0x7F0000003000, 0x7F0000004000
HOSTILE_REAL = {
    0x7F0000000000: b"/tmp/h/tag[/bold]name",
    0x7F0000001000: b"/tmp/h/[link=http://x]a[/link]",
    0x7F0000002000: b"/tmp/h/esc\x1b[31mred",
    NEWLINE_VMA: b"/tmp/h/nl\nline",
    LITERAL_012_VMA: b"/tmp/h/nl\\012line",
    0x7F0000005000: b"/tmp/h/ff\xff",
    0x7F0000006000: b"/tmp/h/ff\\xff",
    0x7F0000007000: b"/tmp/h/cr\r7f0000100000-7f0000200000 rw-p 00000000 00:00 0"
                    + b" " * 26 + b"[fake]",
    0x7F0000008000: b"/tmp/h/[blink]b[/blink]",
    0x7F0000009000: b"/tmp/h/bidi\xe2\x80\xaeevil\xc2\x9b2J",
}
HOSTILE_SHOWN = {
    0x7F0000000000: "/tmp/h/tag[/bold]name",
    0x7F0000001000: "/tmp/h/[link=http://x]a[/link]",
    0x7F0000002000: "/tmp/h/esc\\u001b[31mred",
    NEWLINE_VMA: "/tmp/h/nl\\nline",
    LITERAL_012_VMA: "/tmp/h/nl\\\\012line",
    0x7F0000005000: "/tmp/h/ff\\xff",
    0x7F0000006000: "/tmp/h/ff\\\\xff",
    0x7F0000007000: "/tmp/h/cr\\r7f0000100000-7f0000200000 rw-p 00000000 00:00 0"
                    + " " * 26 + "[fake]",
    0x7F0000008000: "/tmp/h/[blink]b[/blink]",
    0x7F0000009000: "/tmp/h/bidi\\u202eevil\\u009b2J",
}


def hostile_tree(root: Path, pid: int = 600, map_files: bool = True) -> ProcFS:
    make_proc(root, pid, comm=b"a\nb\x1b[1m")
    (root / str(pid) / "maps").write_bytes((FIXTURES / "maps_hostile").read_bytes())
    if map_files:
        d = root / str(pid) / "map_files"
        d.mkdir()
        for v in parse_maps((FIXTURES / "maps_hostile").read_bytes()):
            if v.inode:
                os.symlink(HOSTILE_REAL[v.start], os.fsencode(d / f"{v.start:x}-{v.end:x}"))
    return ProcFS(root)


@pytest.mark.parametrize("raw, shown", [
    (b"/usr/lib/libc.so.6", "/usr/lib/libc.so.6"),
    (b"[heap]", "[heap]"),
    (b"[anon:jemalloc arena]", "[anon:jemalloc arena]"),
    ("/srv/données/日本語.so".encode(), "/srv/données/日本語.so"),
    (b"a\xffb", "a\\xffb"),                  # a byte that is not UTF-8
    (b"a\\xffb", "a\\\\xffb"),               # the text \xff
    (b"a\nb", "a\\nb"),
    (b"a\\012b", "a\\\\012b"),
    (b"a\\nb", "a\\\\nb"),
    (b"\t\r\b\f", "\\t\\r\\b\\f"),
    (b"x\x1b[31mred\x07", "x\\u001b[31mred\\u0007"),
    (b"\x7f", "\\u007f"),
    ("\u0085".encode(), "\\u0085"),          # C1 control, valid UTF-8
    (b"\x85", "\\x85"),                      # the byte 0x85 alone: not UTF-8
    ("\u202e\u2028\u200b".encode(), "\\u202e\\u2028\\u200b"),
    ("\U000e0001".encode(), "\\U000e0001"),
    (b"\xed\xa0\x80", "\\xed\\xa0\\x80"),     # an encoded surrogate is not UTF-8
    (b"\xe2\x82", "\\xe2\\x82"),             # a cut sequence
    (b"[/bold]", "[/bold]"),                 # markup is text
    (b"", ""),
])
def test_escape_name(raw, shown):
    assert escape_name(raw) == shown
    assert gt.decode_path(raw) == shown      # the test oracle, written separately
    shown.encode("utf-8")                    # strict: no lone surrogates
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs") for c in shown)


def _unescape(text: str) -> bytes:
    """The inverse of escape_name: every backslash starts an escape."""
    out = bytearray()
    i = 0
    short = {"\\": b"\\", "b": b"\b", "f": b"\f", "n": b"\n", "r": b"\r", "t": b"\t"}
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out += ch.encode()
            i += 1
            continue
        kind = text[i + 1]
        if kind in short:
            out += short[kind]
            i += 2
        elif kind == "x":
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        elif kind == "u":
            out += chr(int(text[i + 2:i + 6], 16)).encode()
            i += 6
        elif kind == "U":
            out += chr(int(text[i + 2:i + 10], 16)).encode()
            i += 10
        else:
            raise AssertionError(f"bare backslash in {text!r}")
    return bytes(out)


def test_escape_name_is_injective_on_random_bytes():
    """Two different names never give the same text: the text decodes back."""
    import random

    rng = random.Random(16)
    alphabet = [b"\\", b"x", b"f", b"0", b"1", b"2", b"n", b"\n", b"\xff", b"\xc3", b"\xa9",
                b"\x1b", b"[", b"u", "\u0085".encode(), b"\x85", "\u202e".encode(), b"\xe2"]
    seen: dict[str, bytes] = {}
    for _ in range(20000):
        raw = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 7)))
        shown = escape_name(raw)
        assert _unescape(shown) == raw, (raw, shown)
        assert seen.setdefault(shown, raw) == raw, (raw, seen[shown], shown)
        assert gt.decode_path(raw) == shown
        assert not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs")
                       for c in shown), shown


def test_escape_text_escapes_control_characters_only():
    assert escape_text("pid 4 (a\\nb) exited") == "pid 4 (a\\nb) exited"
    assert escape_text("x\x1b]8;;http://x\x07y\nz") == "x\\u001b]8;;http://x\\u0007y\\nz"
    assert escape_text("[heap] [/bold]") == "[heap] [/bold]"


def test_maps_only_newline_ends_a_line():
    """A file name holding \\r and a whole maps line after it is one VMA's
    name, not a second (fake) VMA."""
    vmas = parse_maps((FIXTURES / "maps_hostile").read_bytes())
    assert len(vmas) == 13
    assert not any(v.path == b"[fake]" or v.start == 0x7F0000100000 for v in vmas)
    assert vmas[7].path == HOSTILE_REAL[0x7F0000007000]


def test_hostile_names_come_from_map_files_and_never_collide(tmp_path):
    fs = hostile_tree(tmp_path)
    vmas = fs.maps(600)
    files = {v.start: v for v in vmas if v.inode}
    assert {s: v.path for s, v in files.items()} == HOSTILE_REAL
    assert {s: v.display_path for s, v in files.items()} == HOSTILE_SHOWN
    # a newline and the text \012; the byte 0xff and the text \xff
    assert files[NEWLINE_VMA].display_path != files[LITERAL_012_VMA].display_path
    assert files[0x7F0000005000].display_path != files[0x7F0000006000].display_path
    assert len({v.display_path for v in vmas}) == len(vmas)
    assert [v.display_path for v in vmas if not v.inode] == ["[heap]", "[vdso]", "[stack]"]
    assert fs.names_exact
    assert fs.stat(600).comm == "a\\nb\\u001b[1m"


def test_without_map_files_names_fall_back_to_maps(tmp_path, monkeypatch):
    """Not permitted to read map_files: the maps text, where a newline and the
    text \\012 look alike (documented), and names_exact says so."""
    fs = hostile_tree(tmp_path)

    def refuse(*_: object) -> bytes:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(fs, "map_file_name", refuse)
    files = {v.start: v for v in fs.maps(600) if v.inode}
    assert files[NEWLINE_VMA].path == files[LITERAL_012_VMA].path == b"/tmp/h/nl\\012line"
    assert not fs.names_exact
    # the other names stay exact: maps escapes nothing but the newline
    assert files[0x7F0000005000].display_path != files[0x7F0000006000].display_path


def test_a_map_files_link_that_disagrees_with_maps_is_not_taken(tmp_path):
    """The VMA was replaced between the maps read and the readlink: the maps
    name stays (the next layout change reads maps again)."""
    fs = hostile_tree(tmp_path)
    link = os.fsencode(tmp_path / "600" / "map_files" / f"{NEWLINE_VMA:x}-{NEWLINE_VMA + 0x1000:x}")
    os.unlink(link)
    os.symlink(b"/tmp/other", link)
    files = {v.start: v for v in fs.maps(600) if v.inode}
    assert files[NEWLINE_VMA].path == b"/tmp/h/nl\\012line"
    assert fs.names_exact


def test_heap_end_is_the_heap_line_of_maps(tmp_path):
    """heap_end finds [heap] without parsing every line: the same end as maps,
    not fooled by a file whose name ends in [heap], 0 without a heap."""
    lines = [
        b"555555554000-555555556000 r--p 00000000 fe:00 1234   /usr/bin/x [heap]",
        b"555555556000-55555557b000 rw-p 00000000 00:00 0                          [heap]",
        b"7ffff7dd3000-7ffff7dd5000 rw-p 00000000 00:00 0 ",
    ]
    for pid, text in ((1, lines), (2, [lines[0], lines[2]]), (3, [])):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "maps").write_bytes(b"".join(x + b"\n" for x in text))
    procfs = ProcFS(tmp_path)
    assert procfs.heap_end(1) == next(v.end for v in procfs.maps(1) if v.path == b"[heap]")
    assert procfs.heap_end(1) == 0x55555557B000
    assert procfs.heap_end(2) == procfs.heap_end(3) == 0


def test_maps_text_fields_are_shared_between_lines(tricky):
    """Perms and device text: one str per distinct value (memory at 60k mappings)."""
    again = parse_maps((FIXTURES / "maps_tricky").read_bytes())
    assert all(a.perms is b.perms and a.dev is b.dev for a, b in zip(tricky, again))


@pytest.mark.parametrize("answers, exact", [
    ([True, True, True], True),
    ([None, True, None, None, True, True], True),      # statm moved: not a verdict
    ([True, False, True, True], False),                 # one real mismatch: inexact
    ([None] * 25, False),                               # never quiet: not trusted
])
def test_statm_verdict_counts_only_quiet_comparisons(monkeypatch, answers, exact):
    from memtrace.trace import procfs

    it = iter(answers)
    monkeypatch.setattr(procfs, "_statm_matches_rollup", lambda: next(it))
    assert procfs._statm_verdict(3) is exact

