"""The live table at 80, 120 and 200 columns (issue 11): numbers are never
cut, paths are shortened from the middle, `range` is off by default, columns
drop in DROP_ORDER; options (sort, top, kind/path filters, by-library, deltas,
exact bytes), the heap verdict and plain frames on a pipe."""

from __future__ import annotations

import io
import os
import re

import pytest
from rich.console import Console

from memtrace.util.units import fmt_bytes, fmt_delta
from memtrace.views.table import (
    COLUMNS,
    NUMERIC,
    TableOptions,
    TableReporter,
    shorten_path,
)

KIB = 1024
MIB = 1 << 20
PY = "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
DYNLOAD = ("/usr/lib/python3.11/lib-dynload/"
           "_contextvars.cpython-311-x86_64-linux-gnu.so")
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"


def _m(start, size, perms, kind, path, rss, *, mapping=None, segment=None, anon=None,
       pss=None, uss=None, faults=0):
    anon = rss if anon is None and kind in ("heap", "anon", "stack") else (anon or 0)
    return {"start": start, "end": start + size, "perms": perms, "offset": 0, "path": path,
            "kind": kind, "mapping": mapping or path or "[anon]", "segment": segment,
            "rss_bytes": rss, "anon_bytes": anon, "file_bytes": rss - anon,
            "shmem_bytes": 0, "virtual_bytes": size,
            "pss_bytes": rss if pss is None else pss, "uss_bytes": rss if uss is None else uss,
            "swap_bytes": 0, "faults": faults}


def python_snapshot(ts=100.0, grow=0, faults=0):
    """A python3 process holding a 50 MiB bytearray (as recorded from
    `memtrace watch` on python3 -c 'x=bytearray(50<<20)...')."""
    maps = [
        _m(0x5581_1c3a_0000, 4 * KIB, "r--p", "executable", "/usr/bin/python3.11", 4 * KIB,
           segment="rodata"),
        _m(0x5581_1c3a_1000, 4 * KIB, "r-xp", "executable", "/usr/bin/python3.11", 4 * KIB,
           segment="text"),
        _m(0x5581_1d00_0000, 1056 * KIB, "rw-p", "heap", "[heap]", 1008 * KIB,
           mapping="[heap]", faults=240),
        _m(0x7f3a_1000_0000, 50 * MIB + 4 * KIB, "rw-p", "anon", "", 50 * MIB + 4 * KIB + grow,
           faults=12_801 + faults),
        _m(0x7f3a_2000_0000, 640 * KIB, "r--p", "library", PY, 612 * KIB, segment="rodata",
           pss=203 * KIB, uss=0),
        _m(0x7f3a_200a_0000, 2 * MIB + 840 * KIB, "r-xp", "library", PY, 2 * MIB + 312 * KIB,
           segment="text", pss=MIB + 5 * KIB, uss=0),
        _m(0x7f3a_2040_0000, 1700 * KIB, "r--p", "library", PY, 980 * KIB,
           segment="rodata", pss=490 * KIB, uss=0),
        _m(0x7f3a_2060_0000, 12 * KIB, "r--p", "library", PY, 12 * KIB, segment="relro",
           anon=12 * KIB),
        _m(0x7f3a_2060_3000, 460 * KIB, "rw-p", "library", PY, 388 * KIB, segment="data",
           anon=300 * KIB),
        _m(0x7f3a_2070_0000, 136 * KIB, "rw-p", "library", "", 64 * KIB, mapping=PY,
           segment="bss"),
        _m(0x7f3a_3000_0000, 160 * KIB, "r--p", "library", LIBC, 160 * KIB, segment="rodata",
           pss=7 * KIB, uss=0),
        _m(0x7f3a_3002_8000, 1396 * KIB, "r-xp", "library", LIBC, 1000 * KIB,
           segment="text", pss=41 * KIB, uss=0),
        _m(0x7f3a_4000_0000, 8 * KIB, "r--p", "library", DYNLOAD, 8 * KIB, segment="rodata",
           pss=4 * KIB, uss=0),
        _m(0x7f3a_4000_2000, 4 * KIB, "r-xp", "library", DYNLOAD, 4 * KIB, segment="text",
           pss=2 * KIB, uss=0),
        _m(0x7ffc_1230_0000, 132 * KIB, "rw-p", "stack", "[stack]", 36 * KIB,
           mapping="[stack]", faults=9),
        _m(0x7ffc_1240_0000, 8 * KIB, "r-xp", "special", "[vdso]", 8 * KIB,
           mapping="[vdso]"),
    ]
    rss = sum(m["rss_bytes"] for m in maps)
    return {"ts": ts, "pid": 4242, "comm": "python3", "rss_bytes": rss,
            "anon_bytes": sum(m["anon_bytes"] for m in maps),
            "file_bytes": sum(m["file_bytes"] for m in maps), "shmem_bytes": 0,
            "virtual_bytes": sum(m["virtual_bytes"] for m in maps),
            "pss_bytes": sum(m["pss_bytes"] for m in maps),
            "uss_bytes": sum(m["uss_bytes"] for m in maps), "swap_bytes": 0,
            "statm_rss_bytes": rss, "drift_bytes": 0, "peak_rss_bytes": rss,
            "faults": sum(m["faults"] for m in maps), "syscalls": {"mmap": 3, "brk": 2},
            "full_rescans": {"attach": 1}, "events_lost": 0, "library_events": [],
            "mappings": maps}


@pytest.fixture(autouse=True)
def _machine_line(monkeypatch):
    monkeypatch.setattr("memtrace.views.table.meminfo_summary",
                        lambda: "machine: RAM 23.5 GiB, free 21.0 GiB (unused), available "
                        "22.8 GiB (free + what the kernel can reclaim)")


def render(snaps, width, options=None, terminal=False):
    buf = io.StringIO()
    console = Console(file=buf, width=width, height=60, force_terminal=terminal,
                      color_system=None, legacy_windows=False)
    table = TableReporter(console, options=options or TableOptions(top=50))
    for snap in snaps:
        table.snapshot(snap)
        table.tick_done()
    table.close()
    return ANSI.sub("", buf.getvalue())


def last_table(out):
    """The header line and rows of the last table drawn."""
    lines = out.splitlines()
    at = max(i for i, line in enumerate(lines) if re.match(r"\s*(\S+\s+)*rss\s", line)
             and "path" in line)
    header = lines[at]
    rows = []
    for line in lines[at + 1:]:
        if not line.strip() or line.startswith(("…", "recent", "dim ")):
            break
        rows.append(line)
    return header, rows


def columns_of(header):
    return header.split()


NUMBER = re.compile(r"(?:^|(?<= ))([+-]?\d+(?:\.\d)?(?: (?:B|KiB|MiB|GiB|TiB))?|-)$")


def parse_row(header, line):
    """Cells of a row. A numeric column is right-aligned under its header's
    end: its cell is the whole number (formatter output, preceded by a space
    or the line start) ending there; an empty cell is ''. Left-aligned
    columns start under their header; the path runs to the end of the line."""
    names = columns_of(header)
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", header)]
    cells = {}
    for i, name in enumerate(names):
        start, end = spans[i]
        if name in NUMERIC:
            if not line[:end].strip() or line[end - 1] == " ":
                cells[name] = ""
                continue
            m = NUMBER.search(line[:end])
            cells[name] = m.group(1) if m else "<not whole: " + line[:end] + ">"
        elif name == "path":
            cells[name] = line[start:].strip()
        else:
            cells[name] = line[start:].split(" ", 1)[0]
    return cells


def expected(m, col):
    values = {"virt": m["virtual_bytes"], "rss": m["rss_bytes"], "pss": m["pss_bytes"],
              "uss": m["uss_bytes"], "anon": m["anon_bytes"], "file": m["file_bytes"],
              "shmem": m["shmem_bytes"]}
    if col == "faults":
        return str(m["faults"])
    return fmt_bytes(values[col])


@pytest.mark.parametrize("width", [80, 120, 200])
def test_every_number_is_whole_and_every_line_fits(width):
    snap = python_snapshot()
    out = render([snap], width)
    for line in out.splitlines():
        assert len(line) <= width, line
    header, rows = last_table(out)
    cols = columns_of(header)
    assert "range" not in cols and "rss" in cols and "path" in cols
    assert len(rows) == len(snap["mappings"])
    by_rss = sorted(snap["mappings"], key=lambda m: -m["rss_bytes"])
    for line, m in zip(rows, by_rss):
        cells = parse_row(header, line)
        for col in cols:
            if col in ("virt", "rss", "pss", "uss", "anon", "file", "shmem", "faults"):
                assert cells[col] == expected(m, col), (col, line)
                assert "…" not in cells[col]
        path = m["path"] or (m["mapping"] if m["segment"] == "bss" else "")
        shown = cells["path"]
        name = path.rsplit("/", 1)[1] if "/" in path else path
        if "…/" in shown:          # cut from the middle, the file name kept
            assert shown.endswith("…/" + name) and path.startswith(shown.split("…")[0])
        elif "…" in shown:         # the file name itself is longer than the column
            head, tail = shown.split("…")
            assert name.startswith(head) and name.endswith(tail) and len(head) > 10
        else:
            assert shown == path


def test_columns_drop_in_order_and_wide_shows_more():
    snap = python_snapshot()
    narrow = columns_of(last_table(render([snap], 80))[0])
    mid = columns_of(last_table(render([snap], 120))[0])
    wide = columns_of(last_table(render([snap], 200))[0])
    assert set(narrow) <= set(mid) <= set(wide)
    assert {"kind", "rss", "pss", "uss", "path"} <= set(narrow)
    assert set(wide) == set(COLUMNS) - {"range"}
    every = render([snap], 200, TableOptions(top=50, columns=COLUMNS))
    assert columns_of(last_table(every)[0])[0] == "range"


def test_the_libpython_path_is_cut_from_the_middle():
    out = render([python_snapshot()], 80)
    assert "/usr/lib/…/libpython3.11.so.1.0" in out or PY in out
    assert re.search(r" _contextvars\.c\w*…[-\w]*-linux-gnu\.so$", out, re.M)
    wide = render([python_snapshot()], 200)
    assert "/usr/lib/python3.11/lib-dynload/_contextvars.cpython-311-x86_64-linux-gnu.so" \
        in wide


def test_shorten_path():
    assert shorten_path(PY, 100) == PY
    assert shorten_path(PY, 31) == "/usr/lib/…/libpython3.11.so.1.0"
    assert shorten_path(PY, 30) == "/usr/…/libpython3.11.so.1.0"
    assert shorten_path(PY, 24) == "…/libpython3.11.so.1.0"
    assert shorten_path(DYNLOAD, 31) == "_contextvars.c…6_64-linux-gnu.so"[:15] + \
        "_contextvars.c…6_64-linux-gnu.so"[15:] or len(shorten_path(DYNLOAD, 31)) == 31
    for w in range(1, 60):
        s = shorten_path(DYNLOAD, w)
        assert len(s) <= w and (s == DYNLOAD or "…" in s)
        if w >= 46:
            assert s.endswith("…/_contextvars.cpython-311-x86_64-linux-gnu.so")


def test_deltas_and_fault_rate_and_sort():
    a = python_snapshot(ts=100.0)
    b = python_snapshot(ts=102.0, grow=2 * MIB, faults=1000)
    out = render([a, b], 200, TableOptions(top=50, sort="delta"))
    header, rows = last_table(out)
    first = parse_row(header, rows[0])
    assert first["Δrss"] == fmt_delta(2 * MIB) == "+2.0 MiB"
    assert first["faults/s"] == "500"
    assert "faults/s 500" in out and f"(Δ {fmt_delta(2 * MIB)})" in out


def test_delta_of_an_anonymous_mapping_that_grew_downwards():
    a = python_snapshot(ts=100.0)
    b = python_snapshot(ts=101.0)
    m = next(m for m in b["mappings"] if m["kind"] == "anon")
    m["start"] -= MIB                   # a new 1 MiB mmap merged below it
    m["rss_bytes"] += MIB
    m["anon_bytes"] += MIB
    out = render([a, b], 120)
    header, rows = last_table(out)
    assert parse_row(header, rows[0])["Δrss"] == "+1.0 MiB"


def test_filters_top_and_by_library():
    snap = python_snapshot()
    out = render([snap], 200, TableOptions(top=50, kinds=frozenset({"library"}),
                                           path=re.compile("python")))
    header, rows = last_table(out)
    # libpython's 6 segments and lib-dynload's cpython module (2), not the executable
    assert len(rows) == 8 and all(" library " in r for r in rows)
    out = render([snap], 200, TableOptions(top=2))
    header, rows = last_table(out)
    assert len(rows) == 2 and f"… {len(snap['mappings']) - 2} more mappings" in out
    out = render([snap], 200, TableOptions(top=50, by_library=True))
    header, rows = last_table(out)
    py = [r for r in rows if r.rstrip().endswith(PY)]
    assert len(py) == 1 and "6 seg" in py[0]
    total = sum(m["rss_bytes"] for m in snap["mappings"] if m["mapping"] == PY)
    assert parse_row(header, py[0])["rss"] == fmt_bytes(total)


def test_exact_bytes():
    snap = python_snapshot()
    out = render([snap], 200, TableOptions(top=50, exact=True))
    header, rows = last_table(out)
    assert parse_row(header, rows[0])["rss"] == str(50 * MIB + 4 * KIB)
    assert f"rss {snap['rss_bytes']}" in out


def test_pss_above_rss_is_clamped_and_dim():
    snap = python_snapshot()
    m = snap["mappings"][0]
    m["pss_bytes"] = 3 * m["rss_bytes"]
    out = render([snap], 200, TableOptions(top=50, sort="name"))
    header, rows = last_table(out)
    row = next(r for r in rows if "/usr/bin/python3.11" in r)
    assert parse_row(header, row)["pss"] == fmt_bytes(m["rss_bytes"])
    assert "dim pss: refreshed before the latest rss change" in out


VERDICT = ("1.3 MiB of 1.5 MiB resident heap bytes are in use: the memory is held by live "
           "allocations; malloc_trim(0) would return 76.0 KiB; 4 allocation(s) of 50.6 MiB "
           "have their own mmap (returned to the system by free)")


@pytest.mark.parametrize("width", [80, 120, 200])
def test_heap_verdict_in_the_header(width):
    snap = python_snapshot()
    snap["heap"] = {"status": "ok", "verdict": VERDICT}
    out = render([snap], width)
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("heap: "))
    text = " ".join(lines[at:at + 4])
    assert ("heap: " + VERDICT) in text
    for size in re.findall(r"\d+\.\d (?:KiB|MiB)", VERDICT):   # never split from its unit
        assert any(size in line for line in lines), size
    assert all(len(line) <= width for line in lines)


def test_a_pipe_gets_one_plain_frame_per_tick():
    """Not a terminal: every tick writes one plain frame (one record of the
    bounded writer, flushed), without cursor movement; nothing waits for exit."""
    from memtrace.views.output import OutputStream, TextOutput

    records = []

    class Stream(OutputStream):        # the writer's side, recorded
        def __init__(self):
            self.fd = os.open(os.devnull, os.O_WRONLY)

        def write_record(self, parts):
            records.append(b"".join(parts).decode())
            return True

        def check(self):
            pass

        def close(self):
            os.close(self.fd)

    console = Console(file=TextOutput(Stream()).as_io(), width=120, color_system=None)
    assert not console.is_terminal
    table = TableReporter(console, options=TableOptions(top=3))
    for i in range(3):
        table.snapshot(python_snapshot(ts=100.0 + i))
        table.tick_done()
        assert len(records) == i + 1       # written at the tick, not at exit
        frame = records[-1]
        assert frame.startswith("-- ") and "4242 python3" in frame and "\x1b" not in frame
        assert frame.count("4242 python3") == 1
    table.detached(4242, "exited")
    table.close()
    assert records[-1].rstrip().endswith("pid 4242 exited")


def test_a_message_naming_a_pid_does_not_drop_its_rows():
    """Only detached() ends a process's rows: a message that merely names a
    watched pid (agent's "attached to pid N (...)") leaves them."""
    import io

    from rich.console import Console

    from memtrace.views.table import TableReporter

    table = TableReporter(console=Console(file=io.StringIO(), width=80, height=40))
    table.snapshot({"pid": 77, "comm": "srv", "ts": 1.0, "rss_bytes": 0, "anon_bytes": 0,
                    "file_bytes": 0, "shmem_bytes": 0, "virtual_bytes": 0, "faults": 0,
                    "mappings": []})
    table.message("attached to pid 77 (srv, rule web)")
    assert 77 in table.snaps
    table.detached(77, "exited")
    assert 77 not in table.snaps and 77 in table.ended
    table.close()


def test_stacks_line_names_the_top_holder_and_bringer_and_fits_80_columns():
    """--stacks: one dim line under the process head, the [unsampled] remainder
    skipped, wrapped to the terminal's width."""
    import io

    from rich.console import Console

    from memtrace.views.table import TableReporter, stacks_line

    frames = ["__memset_avx2_unaligned_erms (libc.so.6)", "fill_small (heldstacks)",
              "main (heldstacks)", "__libc_start_call_main (libc.so.6)"]
    stacks = {"held": [{"bytes": 900 << 20, "mapping": "[stack]", "frames": ["[unsampled]"]},
                       {"bytes": 16 << 20, "mapping": "[anon]", "frames": frames}],
              "brought": [{"bytes": 64 << 20, "mapping": "[anon]",
                           "frames": ["fill_big (heldstacks)", "main (heldstacks)"]}]}
    line = stacks_line(stacks)
    assert line == ("held most: __memset_avx2_unaligned_erms < fill_small < main < ... "
                    "16.0 MiB [anon]   brought most: fill_big < main 64.0 MiB [anon]")
    assert stacks_line({"held": [], "brought": []}) == "held most: -   brought most: -"
    console = Console(file=io.StringIO(), width=80, height=40)
    table = TableReporter(console=console)
    table.snapshot({"pid": 7, "comm": "heldstacks", "ts": 1.0, "rss_bytes": 0,
                    "anon_bytes": 0, "file_bytes": 0, "shmem_bytes": 0, "virtual_bytes": 0,
                    "statm_rss_bytes": 0, "drift_bytes": 0, "faults": 0, "syscalls": {},
                    "full_rescans": {}, "events_lost": 0, "mappings": [], "stacks": stacks})
    table.close()
    text = console.file.getvalue()     # type: ignore[attr-defined]
    assert "fill_small" in text and "brought most: fill_big < main" in text
    assert max(len(line) for line in text.splitlines()) <= 80
