"""CPython frames in sampled stacks (memtrace/stacks/python.py, pydetect.py):
strings from fixture bytes, the 3.11 line table, groups and merging on
synthetic frames; and, where the tests themselves run on CPython 3.11, the
offsets walked in this very process through /proc/self/mem as BPF walks them
in a target (runtime -> thread state -> frames -> code objects)."""

from __future__ import annotations

import inspect
import os
import struct
import sys
import threading
from pathlib import Path

import pytest

from memtrace.stacks.profile import PY_MODULE, TRUNCATED, Frame, Stack
from memtrace.stacks.pydetect import PyDetector, PyFile, read_pyfile
from memtrace.stacks.python import (
    OFFSET_UNKNOWN,
    PyResolver,
    code_fingerprint,
    decode_unicode,
    line_of,
    merge,
)
from memtrace.stacks.summary import frame_text
from memtrace.trace.procfs import parse_maps
from memtrace.trace.pyoffsets import PY311_X86_64 as OFF
from memtrace.views.stackframes import module_class

ON_311 = sys.version_info[:2] == (3, 11) and os.uname().machine == "x86_64" \
    and sys.implementation.name == "cpython"
needs_311 = pytest.mark.skipif(not ON_311, reason="the tests run on CPython 3.11 x86-64 only here")


# -- strings ---------------------------------------------------------------------

def unicode_object(text: str, kind: int, ascii_: bool, compact: bool = True) -> bytes:
    """A str object's bytes as CPython 3.11 lays it out (header, then data)."""
    state = (kind << 2) | (int(compact) << 5) | (int(ascii_) << 6) | (1 << 7)
    size = OFF.unicode_ascii_size if ascii_ else OFF.unicode_compact_size
    head = bytearray(size)
    struct.pack_into("<q", head, OFF.unicode_length, len(text))
    struct.pack_into("<I", head, OFF.unicode_state, state)
    codec = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind]
    return bytes(head) + text.encode(codec) + b"\0" * kind


def decode_fixture(obj: bytes, base: int = 0x7F0000001000) -> str | None:
    def read(addr: int, n: int) -> bytes:
        return obj[addr - base:addr - base + n]
    return decode_unicode(obj[:OFF.unicode_compact_size], read, base, OFF)


@pytest.mark.parametrize(("text", "kind", "ascii_"), [
    ("build_big_list", 1, True),          # compact ASCII: data after PyASCIIObject
    ("größe", 1, False),                  # latin-1, after PyCompactUnicodeObject
    ("заполнить", 2, False),              # UCS-2
    ("f😀", 4, False),                    # UCS-4
    ("", 1, True),
])
def test_compact_strings_decode(text, kind, ascii_):
    assert decode_fixture(unicode_object(text, kind, ascii_)) == text


def test_non_compact_or_broken_strings_are_not_guessed():
    assert decode_fixture(unicode_object("legacy", 1, True, compact=False)) is None
    bad_kind = bytearray(unicode_object("x", 1, True))
    struct.pack_into("<I", bad_kind, OFF.unicode_state, (3 << 2) | (1 << 5) | (1 << 6))
    assert decode_fixture(bytes(bad_kind)) is None
    short = unicode_object("abcdef", 1, True)[:OFF.unicode_ascii_size + 3]
    assert decode_fixture(short) is None          # data cut short: unreadable


@needs_311
def test_strings_of_this_process_decode():
    resolver = PyResolver(os.getpid(), OFF)
    try:
        for text in ("plain", "größe", "заполнить", "f😀" * 3):
            s = "".join(list(text))            # a fresh object, not a constant
            assert resolver._string(id(s)) == s
    finally:
        resolver.close()


# -- the line table -------------------------------------------------------------------

def sample_function(n):
    total = 0
    for i in range(n):
        if i % 3:
            total += i

        else:
            total -= 1
    return total


def fixture_code():
    return sample_function.__code__


@needs_311
def test_line_table_matches_co_lines():
    for code in (fixture_code(), test_line_table_matches_co_lines.__code__, merge.__code__):
        for start, end, line in code.co_lines():
            for addr in range(start, end, 2):
                assert line_of(code.co_linetable, code.co_firstlineno, addr) == line, (
                    code.co_name, addr)


def test_a_cut_line_table_falls_back_to_the_first_line():
    from memtrace.stacks.python import PyCode
    units = OFF.code_adaptive
    code = PyCode("f", "a.py", 7, bytes([0x80 | (14 << 3), 0x41]), units, 0)   # varint cut
    assert code.line(units) == 7
    assert code.line(units - 2) == 7         # a new frame's prev_instr: before the code
    assert code.line(OFFSET_UNKNOWN) == 7    # BPF found prev_instr outside the object


def test_line_table_by_hand():
    # 3.11 location entries: 0xF8 | (units - 1), short/one-line/no-column/none forms
    table = bytes([0x80 | (10 << 3) | 1, 0, 4,      # one-line form, delta 0, 2 units
                   0x80 | (12 << 3) | 0, 0, 4,      # one-line form, delta +2, 1 unit
                   0x80 | (13 << 3) | 0, 3,         # no columns, signed varint 3 = -1
                   0x80 | (15 << 3) | 0])           # no location
    assert [line_of(table, 10, a) for a in (0, 2, 4, 6, 8, 10)] == [10, 10, 12, 11, None, None]


# -- groups and merging ----------------------------------------------------------------

def native(*names: str, truncated: bool = False) -> Stack:
    frames = [Frame(0x400000 + i, n, "/usr/bin/python3.11") for i, n in enumerate(names)]
    return Stack(tuple(frames) + ((TRUNCATED,) if truncated else ()))


def py(name: str) -> Frame:
    return Frame(0x7F00, name, PY_MODULE)


def test_groups_go_inside_their_eval_frames_innermost_first():
    stack = native("memset", "PyByteArray_Resize", "_PyEval_EvalFrameDefault",
                   "_PyObject_Call", "_PyEval_EvalFrameDefault", "PyEval_EvalCode", "main")
    out = merge(stack, [[py("inner (a.py:3)"), py("middle (a.py:9)")], [py("<module> (a.py:1)")]])
    assert [f.function for f in out.frames] == [
        "memset", "PyByteArray_Resize", "inner (a.py:3)", "middle (a.py:9)",
        "_PyEval_EvalFrameDefault", "_PyObject_Call", "<module> (a.py:1)",
        "_PyEval_EvalFrameDefault", "PyEval_EvalCode", "main"]


def test_extra_groups_of_a_cut_native_stack_are_left_out():
    stack = native("memset", "_PyEval_EvalFrameDefault", truncated=True)
    out = merge(stack, [[py("f (a.py:1)")], [py("<module> (a.py:1)")]])
    assert [f.function for f in out.frames] == [
        "memset", "f (a.py:1)", "_PyEval_EvalFrameDefault", "[truncated]"]
    assert out.truncated


def test_fewer_groups_than_eval_frames_and_none():
    stack = native("memset", "_PyEval_EvalFrameDefault", "x", "_PyEval_EvalFrameDefault")
    out = merge(stack, [[py("f (a.py:1)")]])
    assert [f.function for f in out.frames][:3] == ["memset", "f (a.py:1)",
                                                   "_PyEval_EvalFrameDefault"]
    assert len(out.frames) == 5
    assert merge(stack, []) is stack


class FakeResolver(PyResolver):
    def __init__(self) -> None:
        super().__init__(0, OFF, "/nonexistent")

    def frame(self, code_addr: int, instr: int) -> Frame:
        return Frame(code_addr, f"code{code_addr:x}@{instr}", PY_MODULE)


def test_groups_end_at_entry_frames():
    groups = FakeResolver().groups([(0x1000, 1), (0x2001, 2), (0x3000, 3), (0x4001, 4),
                                    (0x5000, 5)])
    assert [[f.function for f in g] for g in groups] == [
        ["code1000@1", "code2000@2"], ["code3000@3", "code4000@4"], ["code5000@5"]]
    assert FakeResolver().groups([(0x1001, 0)]) == [[Frame(0x1000, "code1000@0", PY_MODULE)]]


def test_a_python_stack_cut_by_bpf_says_so():
    groups = FakeResolver().groups([(0x1000, 1), (0x2000, 2)], truncated=True)
    assert [f.function for f in groups[-1]] == ["code1000@1", "code2000@2", "[truncated]"]
    out = merge(native("memset", "_PyEval_EvalFrameDefault", "main"), groups)
    assert frame_text(out.frames[3].function, out.frames[3].module) == "[truncated] [py]"
    assert not out.truncated          # the native stack is whole
    assert FakeResolver().groups([], truncated=True) == []


def test_python_frames_in_the_views():
    assert frame_text("build (s.py:7)", PY_MODULE) == "build (s.py:7) [py]"
    assert module_class(PY_MODULE) == "python"


class MemoryResolver(PyResolver):
    """A PyResolver over fixture memory: {address: an object's bytes}."""

    def __init__(self, memory: dict[int, bytes]) -> None:
        super().__init__(0, OFF, "/nonexistent")
        self.memory = memory

    def read(self, addr: int, n: int) -> bytes | None:
        for base, data in self.memory.items():
            if base <= addr and addr + n <= base + len(data):
                return data[addr - base:addr - base + n]
        return None


def code_object(qualname_at: int, filename_at: int, firstlineno: int) -> bytes:
    """A 3.11 code object's bytes with the fields PyResolver reads (no line table)."""
    raw = bytearray(OFF.code_adaptive + 16)
    struct.pack_into("<i", raw, OFF.code_firstlineno, firstlineno)
    for at, ptr in ((OFF.code_qualname, qualname_at), (OFF.code_name, qualname_at),
                    (OFF.code_filename, filename_at), (OFF.code_linetable, 0)):
        struct.pack_into("<Q", raw, at, ptr)
    return bytes(raw)


def test_a_code_object_replaced_at_its_address_is_not_named_as_the_new_one():
    """A sample's code object freed before the drain and another allocated at
    its address: the sample's frame reads [unknown] (the fingerprint BPF read
    at the sample differs), not the newer function's name; the newer one's own
    samples are named. Before, names went by address alone."""
    code, old_name, new_name, path = 0x7F0000100000, 0x7F0000200000, 0x7F0000200100, 0x7F0000300000
    memory = {old_name: unicode_object("old_fn", 1, True).ljust(96, b"\0"),
              new_name: unicode_object("new_fn", 1, True).ljust(96, b"\0"),
              path: unicode_object("app.py", 1, True).ljust(96, b"\0"),
              code: code_object(old_name, path, 10)}
    def sample(first: int, name: int) -> int:
        return OFFSET_UNKNOWN | code_fingerprint(first, name, memory[name], OFF) << 32

    old_sample, new_sample = sample(10, old_name), sample(20, new_name)
    early = MemoryResolver(memory)
    assert early.frame(code, old_sample).function == "old_fn (app.py:10)"
    memory[code] = code_object(new_name, path, 20)
    late = MemoryResolver(memory)          # the old sample drained only now
    assert late.frame(code, old_sample).function == "[unknown]" and late.stale == 1
    assert late.frame(code, new_sample).function == "new_fn (app.py:20)"
    # the resolver that named the old one names the new one's samples too
    assert early.frame(code, new_sample).function == "new_fn (app.py:20)"
    assert early.frame(code, old_sample).function == "old_fn (app.py:10)"
    # a fingerprint BPF could not read (0): whatever is there
    assert late.frame(code, OFFSET_UNKNOWN).function == "new_fn (app.py:20)"
    # the newer code object's name string also where the old one's was (the
    # same allocations again, as in a loop of exec): its text tells them apart
    memory[code] = code_object(old_name, path, 10)
    first = sample(10, old_name)
    memory[old_name] = unicode_object("old_fx", 1, True).ljust(96, b"\0")
    again = MemoryResolver(memory)
    assert again.frame(code, first).function == "[unknown]" and again.stale == 1
    assert again.frame(code, sample(10, old_name)).function == "old_fx (app.py:10)"


def test_an_unreadable_code_object_is_unknown():
    r = PyResolver(os.getpid(), OFF)
    try:
        f = r.frame(0x10, 0)                  # unmapped
        assert (f.function, f.module) == ("[unknown]", PY_MODULE) and r.unreadable == 1
    finally:
        r.close()


# -- detection -----------------------------------------------------------------------

PYFILE = PyFile(runtime=0xA5B740, version=0x030B02F0, debug=False, loads=())


def test_verdicts_for_other_builds():
    d = PyDetector(machine="x86_64")
    vma = parse_maps(b"00400000-0041f000 r--p 00000000 08:01 42 /usr/bin/python3.12\n")[0]
    newer = PyFile(0x1000, 0x030C01F0, False, ())
    assert "CPython 3.12.1" in (d._verdict(newer, [vma], vma).reason or "")
    assert "debug build" in (d._verdict(PyFile(0x1000, 0x030B02F0, True, ()), [vma], vma).reason
                             or "")
    assert "before 3.11" in (d._verdict(PyFile(0x1000, 0, False, ()), [vma], vma).reason or "")
    other = PyDetector(machine="aarch64")
    assert "x86-64 only" in (other._verdict(PYFILE, [vma], vma).reason or "")


def test_a_file_without_pyruntime_is_not_python():
    with open("/proc/self/exe", "rb") as f:
        head = f.read(4)
    assert head == b"\x7fELF"
    libc = next((p for p in ("/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6")
                 if Path(p).exists()), None)
    if libc is None:
        pytest.skip("no libc.so.6 at a known path")
    with open(libc, "rb") as f:
        assert read_pyfile(f) is None


def this_process() -> tuple[int, PyResolver]:
    with open("/proc/self/maps", "rb") as f:
        vmas = parse_maps(f.read())
    found = PyDetector().check(os.getpid(), vmas)
    assert found.offsets is not None, found.reason
    assert found.version.startswith("CPython 3.11")
    return found.runtime, PyResolver(os.getpid(), OFF)


def word(r: PyResolver, addr: int) -> int:
    data = r.read(addr, 8)
    assert data is not None and len(data) == 8
    return int.from_bytes(data, "little")


def walk_like_bpf(r: PyResolver, runtime: int, tid: int) -> list[tuple[int, int]]:
    """bpf/pyframes.h's walk, in Python: the thread state of `tid`, then its frames."""
    ts = word(r, runtime + OFF.runtime_tstate_current)
    if not ts or word(r, ts + OFF.tstate_native_thread_id) & 0xFFFFFFFF != tid:
        interp = word(r, runtime + OFF.runtime_interp_main)
        ts = word(r, interp + OFF.interp_threads_head)
        while ts and word(r, ts + OFF.tstate_native_thread_id) & 0xFFFFFFFF != tid:
            ts = word(r, ts + OFF.tstate_next)
    assert ts, "no thread state for the thread"
    f = word(r, word(r, ts + OFF.tstate_cframe) + OFF.cframe_current_frame)
    out = []
    while f and len(out) < 200:
        code = word(r, f + OFF.frame_code)
        entry = (r.read(f + OFF.frame_is_entry, 1) or b"\0")[0]
        prev_instr = word(r, f + OFF.frame_prev_instr)
        # py_instr_word: prev_instr's offset in the code object, its fingerprint
        first = int.from_bytes(r.read(code + OFF.code_firstlineno, 4) or b"", "little")
        qualname = word(r, code + OFF.code_qualname)
        fp = code_fingerprint(first, qualname, r.read(qualname, OFF.unicode_compact_size) or b"",
                              OFF)
        offset = prev_instr - code if 0 <= prev_instr - code < OFFSET_UNKNOWN else OFFSET_UNKNOWN
        out.append((code | (1 if entry else 0), offset | fp << 32))
        f = word(r, f + OFF.frame_previous)
    return out


def line_with(function, text: str) -> int:
    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, s in enumerate(lines) if text in s)


@needs_311
def test_this_interpreter_walked_with_the_offsets():
    runtime, r = this_process()
    try:
        frames = walk_like_bpf(r, runtime, threading.get_native_id())
        here = sys._getframe()
        line = here.f_lineno - 2
        # read at the pread: PyResolver.read <- word <- walk_like_bpf <- this test;
        # the walk reads its own frame while at the line reading prev_instr
        assert [c & ~1 for c, _ in frames[:4]] == [
            id(PyResolver.read.__code__), id(word.__code__), id(walk_like_bpf.__code__),
            id(here.f_code)]
        names = [f.function for g in r.groups(frames) for f in g]
        walk_line = line_with(walk_like_bpf, "OFF.frame_prev_instr")
        assert names[2:4] == [
            f"walk_like_bpf (test_python_frames.py:{walk_line})",
            f"test_this_interpreter_walked_with_the_offsets (test_python_frames.py:{line})"]
        assert any(n.startswith("pytest_runtest_call (") for n in names)
        # as many entry frames as native calls of the interpreter on the way
        assert sum(c & 1 for c, _ in frames) >= 2
    finally:
        r.close()


@needs_311
def test_another_thread_is_found_by_its_native_id():
    runtime, r = this_process()
    ready, done = threading.Event(), threading.Event()
    tid: list[int] = []

    def parked_in_worker():
        tid.append(threading.get_native_id())
        ready.set()
        done.wait(10)

    t = threading.Thread(target=parked_in_worker)
    t.start()
    try:
        ready.wait(10)
        frames = walk_like_bpf(r, runtime, tid[0])
        names = [f.function for g in r.groups(frames) for f in g]
        assert names[0].startswith("Condition.wait (threading.py:")    # done.wait()
        assert any(n.startswith("test_another_thread_is_found_by_its_native_id.<locals>."
                                "parked_in_worker (test_python_frames.py:") for n in names)
        assert not any(n.startswith("test_this_interpreter") for n in names)
    finally:
        done.set()
        t.join()
        r.close()


PYENV = Path("/root/.pyenv/versions")


@pytest.mark.parametrize(("lib", "version", "supported"), [
    ("3.11.7/lib/libpython3.11.so.1.0", "CPython 3.11.7", True),
    ("3.12.1/lib/libpython3.12.so.1.0", "CPython 3.12.1", False),
    ("3.10.13/lib/libpython3.10.so.1.0", "before 3.11", False),
])
def test_pyenv_builds_are_told_apart(lib, version, supported):
    path = PYENV / lib
    if not path.exists():
        pytest.skip(f"{path} absent (pyenv's builds on the development VM)")
    with open(path, "rb") as f:
        info = read_pyfile(f)
    assert info is not None and version in info.version_text() and not info.debug
    # mapped as the dynamic loader maps a library: its first PT_LOAD at a base
    base = 0x7F1234500000
    first, text = info.loads[0], info.loads[1]
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    maps = (f"{base:x}-{base + 0x1000:x} r--p 00000000 {dev} {st.st_ino} {path}\n"
            f"{base + text.vaddr:x}-{base + text.vaddr + 0x1000:x} r-xp {text.offset:08x} "
            f"{dev} {st.st_ino} {path}\n").encode()
    assert first.vaddr == 0
    found = PyDetector(proc_root="/proc").check(os.getpid(), parse_maps(maps))
    assert found.version.startswith(version) or version in found.version
    if supported:
        assert found.offsets is OFF and found.runtime == base + info.runtime, found
    else:
        assert found.offsets is None and found.reason, found


def test_the_system_python_is_found_at_its_fixed_address():
    path = Path("/usr/bin/python3.11")
    if not path.exists():
        pytest.skip("no /usr/bin/python3.11")
    with open(path, "rb") as f:
        info = read_pyfile(f)
    assert info is not None and info.major_minor == (3, 11)
    assert info.loads[0].vaddr in (0, 0x400000)      # PIE or not: either is handled
