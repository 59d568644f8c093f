"""--malloc netting and the leak rule (memtrace/malloc/), on hand-made records
with a stand-in unwinder (the real one is tested in tests/unit/stacks)."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest

from memtrace.malloc.leaks import LeakDetector
from memtrace.malloc.outstanding import MallocTracker, malloc_summary, trim_sampler
from memtrace.malloc.state import MallocState, leak_report
from memtrace.stacks.profile import Frame, Stack
from memtrace.trace.mallocevents import (
    MallocRecord,
    RawMallocFree,
    RawMallocHeader,
    decode_malloc_free,
    decode_malloc_sample,
)

SHIM = "/var/cache/memtrace/libmemtrace-malloc-0123456789abcdef.so"


def _stack(*names: str) -> Stack:
    frames = [Frame(0x1000 + i, n, SHIM if n.startswith(("memtrace_", "malloc", "sampled"))
                    else "/usr/bin/prog") for i, n in enumerate(names)]
    return Stack(tuple(frames))


class FakeUnwinder:
    """Unwinds a record to the stack named by its ip (the test's table)."""

    def __init__(self, stacks: dict[int, Stack]) -> None:
        self.stacks = stacks
        self.proc_root = "/proc"

    def unwind_many(self, pid: int, vmas: Any, regs: list[tuple[int, int, int, bytes]]
                    ) -> list[Stack]:
        return [self.stacks[ip] for ip, _sp, _bp, _stack in regs]


A = _stack("memtrace_malloc_sampled", "sampled", "malloc", "churn", "main")
B = _stack("memtrace_malloc_sampled", "malloc", "leak", "main")


def _alloc(ts: int, ptr: int, weight: int, ip: int) -> MallocRecord:
    return MallocRecord(tgid=1, ts=ts, ptr=ptr, size=weight, weight=weight, ip=ip)


def _free(ts: int, ptr: int) -> MallocRecord:
    return MallocRecord(tgid=1, ts=ts, ptr=ptr, freed=True)


def _tracker() -> MallocTracker:
    return MallocTracker(1, FakeUnwinder({1: A, 2: B}))   # type: ignore[arg-type]


def _by_leaf_caller(t: MallocTracker) -> dict[str, int]:
    return {t.stack(sid).frames[1].function: b for sid, b in t.outstanding().items()}


def test_the_sampler_frames_are_cut_to_the_function_the_program_called():
    assert [f.function for f in trim_sampler(A).frames] == ["malloc", "churn", "main"]
    assert [f.function for f in trim_sampler(B).frames] == ["malloc", "leak", "main"]
    plain = _stack("leak", "main")
    assert trim_sampler(plain) == plain


def test_frees_net_their_own_allocations_in_timestamp_order():
    t = _tracker()
    # out of order as two rings deliver them: the free of 0x10 comes first
    t.add([_free(30, 0x10), _alloc(10, 0x10, 500, 1), _alloc(20, 0x20, 700, 2),
           _alloc(40, 0x10, 300, 1)], [])
    assert _by_leaf_caller(t) == {"churn": 300, "leak": 700}
    t.add([_free(50, 0x20), _free(60, 0x999)], [])   # a pointer never sampled: ignored
    assert _by_leaf_caller(t) == {"churn": 300}
    assert (t.samples, t.frees) == (3, 2)
    p = t.profile("prog", 1.0, 512)
    assert p.held_total() == 300 and p.brought_total() == 1500


def test_a_free_whose_allocation_comes_a_drain_later_still_nets_it():
    t = _tracker()
    t.add([_free(20, 0x10)], [])
    t.add([_alloc(10, 0x10, 500, 1), _alloc(30, 0x30, 100, 2)], [])
    assert _by_leaf_caller(t) == {"leak": 100}
    t.add([_free(50, 0x40)], [])
    t.add([], [])
    t.add([_alloc(40, 0x40, 100, 1)], [])          # kept one drain only
    assert _by_leaf_caller(t) == {"leak": 100, "churn": 100}


def test_one_address_allocated_and_freed_again_across_a_drain_boundary():
    """The frees ring was read after the samples ring: two later cycles of the
    same address have their frees in this drain and allocations in the next."""
    t = _tracker()
    t.add([_alloc(1, 0x10, 500, 1), _free(2, 0x10), _free(4, 0x10), _free(6, 0x10)], [])
    t.add([_alloc(3, 0x10, 500, 1), _alloc(5, 0x10, 500, 1), _alloc(7, 0x10, 500, 1)], [])
    assert _by_leaf_caller(t) == {"churn": 500}
    t.add([_free(8, 0x10)], [])
    assert _by_leaf_caller(t) == {}


def test_an_address_sampled_again_replaces_its_lost_free():
    t = _tracker()
    t.add([_alloc(10, 0x10, 500, 1), _alloc(20, 0x10, 100, 2)], [])
    assert _by_leaf_caller(t) == {"leak": 100}


def test_an_exec_starts_again_and_drops_that_drains_records():
    state = MallocState(512, FakeUnwinder({1: A, 2: B}))   # type: ignore[arg-type]
    s = state.update(1, 0, [_alloc(10, 0x10, 500, 1)], [], "prog", 1.0, 0)
    assert s["outstanding_bytes"] == 500
    s = state.update(1, 1, [_alloc(20, 0x20, 700, 2)], [], "prog", 2.0, 0)
    assert s["outstanding_bytes"] == 0 and s["samples"] == 0
    s = state.update(1, 1, [_alloc(30, 0x30, 900, 2)], [], "prog", 3.0, 0)
    assert s["outstanding_bytes"] == 900


def test_the_leak_rule_names_a_stack_that_only_grows():
    d = LeakDetector(intervals=3)
    for i, (a, b, c) in enumerate([(0, 0, 5), (10, 100, 5), (0, 200, 5), (10, 300, 5),
                                   (0, 300, 5)]):
        d.observe(float(i), {"churn": a, "leak": b, "flat": c})
    leaks = d.leaks()
    assert [lk.key for lk in leaks] == ["leak"]
    assert (leaks[0].bytes, leaks[0].growth, leaks[0].seconds) == (300, 200, 3.0)
    assert leaks[0].bytes_per_second == pytest.approx(200 / 3)
    d.observe(5.0, {"leak": 250})                    # one decrease: out of the report
    assert d.leaks() == []


def test_the_leak_rule_needs_a_whole_window():
    d = LeakDetector(intervals=5)
    for i in range(5):
        d.observe(float(i), {"leak": 100 * i})
    assert d.leaks() == []                           # 5 readings: 4 intervals
    d.observe(5.0, {"leak": 500})
    assert [lk.key for lk in d.leaks()] == ["leak"]


def test_a_stack_that_holds_nothing_for_a_window_is_forgotten():
    d = LeakDetector(intervals=2)
    d.observe(0.0, {"gone": 10})
    for i in range(1, 5):
        d.observe(float(i), {})
    assert "gone" not in d._history


def test_summary_and_leak_report():
    state = MallocState(512, FakeUnwinder({1: A, 2: B}))   # type: ignore[arg-type]
    ptr = 0x1000
    for tick in range(7):
        recs = [_alloc(tick * 10, ptr + tick, 1000, 2), _alloc(tick * 10 + 1, 0x9000 + tick, 50, 1),
                _free(tick * 10 + 2, 0x9000 + tick)]
        s = state.update(1, 0, recs, [], "prog", float(tick), 0)
    assert s["outstanding_bytes"] == 7000 and s["allocated_bytes"] == 7350
    assert s["outstanding"][0]["frames"][:2] == ["malloc (libmemtrace-malloc-0123456789abcdef.so)",
                                                 "leak (prog)"]
    assert [lk["frames"][1] for lk in s["leaks"]] == ["leak (prog)"]
    assert s["leaks"][0]["growth_bytes"] == 5000 and s["leak_intervals"] == 5
    lines = leak_report(state.summaries)
    assert "growing" in lines[0] and "leak (prog)" in lines[1] and "churn" not in "".join(lines)


def test_frees_at_exit_count_in_the_figures_but_do_not_unmake_a_leak():
    """The records taken after the process exited (its teardown freeing what
    it held) update outstanding bytes, and the leak seen while it ran stays."""
    state = MallocState(512, FakeUnwinder({1: A, 2: B}))   # type: ignore[arg-type]
    for tick in range(7):
        state.update(1, 0, [_alloc(tick * 10, 0x1000 + tick, 1000, 2)], [], "prog",
                     float(tick), 0)
    teardown = [_free(100 + tick, 0x1000 + tick) for tick in range(7)]
    s = state.update(1, 0, teardown, [], "prog", 7.5, 0, exited=True)
    assert s["outstanding_bytes"] == 0 and s["allocated_bytes"] == 7000
    assert [lk["frames"][1] for lk in s["leaks"]] == ["leak (prog)"]
    assert "leak (prog)" in "".join(leak_report(state.summaries))


def test_malloc_summary_is_bounded():
    t = MallocTracker(1, FakeUnwinder({i: _stack("malloc", f"f{i}", "main")
                                       for i in range(30)}))   # type: ignore[arg-type]
    t.add([_alloc(i, 0x100 + i, 10 + i, i) for i in range(30)], [])
    s = malloc_summary(t, t.profile("p", 0.0, 512), [], top=10)
    assert len(s["outstanding"]) == 10 and s["outstanding"][0]["bytes"] == 39


def test_records_decode_from_their_bytes():
    head = RawMallocHeader(tgid=7, len=16, ts=5, ptr=0x1234, size=100, weight=600,
                           ip=0x400000, sp=0x7ff0, bp=0)
    rec = decode_malloc_sample(bytes(head) + b"A" * 16 + b"B" * 32)
    assert (rec.tgid, rec.ts, rec.ptr, rec.size, rec.weight, rec.ip, rec.sp) == (
        7, 5, 0x1234, 100, 600, 0x400000, 0x7ff0)
    assert rec.stack == b"A" * 16 and not rec.freed
    # from a ring record's address: the header and the len bytes only
    buf = ctypes.create_string_buffer(bytes(head) + b"A" * 16 + b"B" * 32)
    assert decode_malloc_sample(ctypes.addressof(buf), len(buf.raw)) == rec
    f = decode_malloc_free(bytes(RawMallocFree(tgid=7, pad=0, ts=9, ptr=0x1234)))
    assert f.freed and (f.tgid, f.ts, f.ptr) == (7, 9, 0x1234)
    fbuf = ctypes.create_string_buffer(bytes(RawMallocFree(tgid=7, pad=0, ts=9, ptr=0x1234)))
    assert decode_malloc_free(ctypes.addressof(fbuf), 24) == f


def test_an_untracked_sample_counts_allocated_not_outstanding_and_is_said():
    """The sampler's table was full (shim.c MT_UNTRACKED): the sample's bytes
    are allocated, its free will never come, and the count is reported."""
    head = RawMallocHeader(tgid=1, len=0, ts=5, ptr=0x50, size=100, weight=(1 << 63) | 600,
                           ip=2, sp=0, bp=0)
    rec = decode_malloc_sample(bytes(head))
    assert rec.untracked and rec.weight == 600
    state = MallocState(512, FakeUnwinder({1: A, 2: B}))   # type: ignore[arg-type]
    s = state.update(1, 0, [rec, _alloc(6, 0x60, 400, 1)], [], "prog", 1.0, 0)
    assert (s["samples"], s["untracked"]) == (2, 1)
    assert s["outstanding_bytes"] == 400 and s["allocated_bytes"] == 1000
    assert "1 samples not tracked" in leak_report(state.summaries)[0]
    tracked = MallocState(512, FakeUnwinder({1: A}))   # type: ignore[arg-type]
    tracked.update(1, 0, [_alloc(6, 0x60, 400, 1)], [], "prog", 1.0, 0)
    assert "not tracked" not in leak_report(tracked.summaries)[0]


def test_sample_header_mirrors_malloc_h():
    """RawMallocHeader is struct mt_malloc_sample up to its stack bytes."""
    import re
    from pathlib import Path

    from memtrace.trace.events import PY_FRAMES

    text = (Path(__file__).parents[3] / "bpf" / "malloc.h").read_text()
    body = re.search(r"struct mt_malloc_sample \{(.*?)\};", text, re.S)
    assert body
    fields = [(m.group(2), m.group(1), m.group(3)) for m in
              re.finditer(r"^\s*(u64|u32)\s+(\w+)(?:\[(\w+)\])?;", body.group(1), re.M)]
    ctype = {"u64": ctypes.c_uint64, "u32": ctypes.c_uint32}
    lengths = {"MT_PY_FRAMES": PY_FRAMES}
    expected = [(n, ctype[t] if k is None else ctype[t] * lengths[k]) for n, t, k in fields]
    assert [(n, t) for n, t in RawMallocHeader._fields_] == expected


def test_python_frames_decode_and_merge_into_the_allocating_stack():
    from memtrace.stacks.python import EVAL_FRAME

    head = RawMallocHeader(tgid=7, len=0, ts=5, ptr=0x1234, size=100, weight=600, ip=3)
    head.py_count, head.py_flags = 2, 4
    head.py_code[0], head.py_instr[0] = 0xC0DE | 1, 0x10
    head.py_code[1], head.py_instr[1] = 0xC0DF, 0x20
    rec = decode_malloc_sample(bytes(head))
    assert rec.py_frames == ((0xC0DE | 1, 0x10), (0xC0DF, 0x20)) and rec.py_flags == 4

    class Resolver:
        def groups(self, frames, truncated=False):
            assert frames == rec.py_frames and not truncated
            return [[Frame(0, "leak_py (app.py:3) [py]", "app.py")]]

        def close(self) -> None:
            pass

    native = _stack("memtrace_malloc_sampled", "malloc", "PyBytes_New", EVAL_FRAME, "main")
    t = MallocTracker(1, FakeUnwinder({3: native}))   # type: ignore[arg-type]
    t.python = Resolver()                              # type: ignore[assignment]
    t.add([rec], [])
    (sid,) = t.outstanding()
    assert [f.function for f in t.stack(sid).frames] == [
        "malloc", "PyBytes_New", "leak_py (app.py:3) [py]", EVAL_FRAME, "main"]


def test_the_leak_report_says_what_the_rings_lost():
    summary = {"outstanding_bytes": 10, "samples": 3, "frees": 1, "leaks": [],
               "leak_intervals": 5, "lost": 7}
    line, = leak_report({42: summary})
    assert "(3 samples, 1 freed); 7 samples or frees lost" in line
    line, = leak_report({42: {**summary, "lost": 0}})
    assert "lost" not in line


def test_the_first_loss_is_said_once_on_stderr(capsys):
    state = MallocState(4096, FakeUnwinder({1: A}))   # type: ignore[arg-type]
    state.update(1, 0, [_alloc(1, 0x1000, 100, 1)], [], "prog", 1.0, 0)
    assert capsys.readouterr().err == ""
    state.update(1, 0, [], [], "prog", 2.0, 5)
    state.update(1, 0, [], [], "prog", 3.0, 9)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "5 sampled allocations or frees lost" in err[0]
    assert "--malloc-period (now 4096)" in err[0]


def test_a_period_raised_by_the_rate_cap_is_said_everywhere():
    """Samples carry the mean gap they ended; the largest reaches the summary
    (period_max_bytes), run's --malloc line and the flame graph's subtitle.
    Below the asked period (no sample raised) the summary says the asked one."""
    from memtrace.views.flamegraph import render_svg

    state = MallocState(512, FakeUnwinder({1: A, 2: B}))   # type: ignore[arg-type]
    quiet = state.update(1, 0, [_alloc(1, 0x10, 600, 2)], [], "prog", 1.0, 0)
    assert quiet["period_max_bytes"] == 512
    assert "rate cap" not in leak_report(state.summaries)[0]
    raised = MallocRecord(tgid=1, ts=2, ptr=0x20, size=100, weight=8192, period=8192, ip=2)
    s = state.update(1, 0, [raised], [], "prog", 2.0, 0)
    assert s["period_bytes"] == 512 and s["period_max_bytes"] == 8192
    assert "raised the period up to 8192 bytes" in leak_report(state.summaries)[0]
    svg = render_svg(state.profiles[1], "held", kind="malloc")
    assert "up to 8.0 KiB while the rate cap held the samples down" in svg
