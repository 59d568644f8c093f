"""StackProfiles built by hand for the tests of the stack views (folded, pprof,
flame graph): tests/unit/test_stack_views.py and tests/root/stacks/.

`two_paths()` is issue 13's test program as the views would get it: two paths
under main (alloc_big brought in 64 MiB and gave it back, alloc_small holds
16 MiB), both through libc's memset; a C++ frame whose name holds '<', '>' and
'&'; a truncated stack with a ';' in a name; a function name found in two
modules (helper); a frame without a symbol; and a stack with no bytes."""

from __future__ import annotations

from memtrace.stacks.profile import TRUNCATED, Frame, Stack, StackProfile, StackSample

MIB = 1 << 20
PROG = "/opt/app/bin/twopaths"
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
LIBHELPER = "/usr/lib/libhelper.so.1"
PROG_ID, LIBC_ID, HELPER_ID = "aa11" * 5, "bb22" * 5, "cc33" * 5
CPP = ("std::vector<std::pair<int, char>, std::allocator<std::pair<int, char> > >"
       "::_M_realloc_insert<int&>(iterator, int&) & co")
SEMI = "parse;line"


def _prog(addr: int, name: str) -> Frame:
    return Frame(0x555555554000 + addr, name, PROG, 0x10, PROG_ID)


def _libc(addr: int, name: str) -> Frame:
    return Frame(0x7FFFF7C00000 + addr, name, LIBC, 0x20, LIBC_ID)


START, MAIN = _prog(0x1000, "_start"), _prog(0x1100, "main")
CALL_MAIN, MEMSET = _libc(0x29D90, "__libc_start_call_main"), _libc(0xA0000, "memset")
BIG, SMALL = _prog(0x1200, "alloc_big"), _prog(0x1300, "alloc_small")
OUTER = (MAIN, CALL_MAIN, START)          # leaf first, like Stack.frames


def two_paths() -> StackProfile:
    big = Stack((MEMSET, BIG, *OUTER))
    small = Stack((MEMSET, SMALL, *OUTER))
    cpp = Stack((_prog(0x2000, CPP), *OUTER))
    cut = Stack((MEMSET, _prog(0x1400, SEMI), TRUNCATED))
    nosym = Frame(0x7FFFF7C12345, "[unknown]", LIBC, 0, LIBC_ID)
    helpers = Stack((nosym, Frame(0x7FFFF7E01000, "helper", LIBHELPER, 0, HELPER_ID),
                     _prog(0x1500, "helper"), *OUTER))
    return StackProfile(4242, "twopaths", 1_750_000_000.0, [
        StackSample(big, "[heap]", "heap", held_bytes=0, brought_bytes=64 * MIB, samples=128),
        StackSample(small, "[heap]", "heap", 16 * MIB, 16 * MIB, 32),
        StackSample(cpp, "[anon]", "anon", 4 * MIB, 4 * MIB, 8),
        StackSample(cut, "[anon]", "anon", 2 * MIB, 3 * MIB, 6),
        StackSample(helpers, LIBC, "library", 1 * MIB, 1 * MIB, 2),
        StackSample(small, "[stack]", "stack", 0, 0, 0),
    ], sample_period_bytes=512 * 1024, samples_lost=3)
