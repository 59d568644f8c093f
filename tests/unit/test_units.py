"""memtrace.util.units: one byte formatter for every output (issue 11)."""

from __future__ import annotations

import pytest

from memtrace.util.units import fmt_bytes, fmt_delta


@pytest.mark.parametrize("n,text", [
    (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (980 << 10, "980.0 KiB"),
    (int(67.5 * (1 << 20)), "67.5 MiB"), ((1 << 20) - 1, "1.0 MiB"),
    ((1 << 30) - 1, "1.0 GiB"), (int(23.5 * (1 << 30)), "23.5 GiB"), (3 << 40, "3.0 TiB"),
    (-4096, "-4.0 KiB"), (None, "-"), (1023.7, "1.0 KiB"),
])
def test_iec(n, text):
    assert fmt_bytes(n) == text


def test_exact():
    assert fmt_bytes(70778880, exact=True) == "70778880"
    assert fmt_bytes(0, exact=True) == "0"
    assert fmt_bytes(None, exact=True) == "-"


def test_delta():
    assert fmt_delta(2 << 20) == "+2.0 MiB"
    assert fmt_delta(-4096) == "-4.0 KiB"
    assert fmt_delta(0) == "0 B"
    assert fmt_delta(5, exact=True) == "+5"


def test_no_other_byte_formatter_is_left():
    """The commands print sizes through memtrace.util.units (no K/M/G suffix of
    their own, no second formatter, no wrapper around this one)."""
    import re
    from pathlib import Path

    from memtrace import explain, libevents
    from memtrace.commands import heap as heap_command
    from memtrace.heap import figures as heap_figures
    from memtrace.trace import events
    from memtrace.views import summary, table

    assert not hasattr(explain, "_h") and not hasattr(events, "_size")
    assert not hasattr(heap_command, "human") and not hasattr(heap_figures, "human")
    assert not hasattr(table, "human")
    assert not hasattr(summary, "iec")
    root = Path(__file__).resolve().parents[2] / "memtrace"
    for path in root.rglob("*.py"):
        if path.name == "units.py":
            continue
        text = path.read_text()
        assert not re.search(r"def (human|iec|fmt_bytes|_size)\b", text), path
        assert not re.search(r"\(\"(KiB|MiB|GiB)\", *\d+\)", text), path   # a unit table
    assert libevents.describe({"event": "library_load", "pid": 1, "comm": "x", "mapping": "/l",
                               "base": 0x1000, "mapped_bytes": 512,
                               "rss_bytes": 0}).endswith("512 B mapped, 0 B resident")
    assert events.SyscallEvent(0, 1, 1, "mmap", "munmap", 0, (0, 1 << 20, 0, 0, 0)).describe() \
        == "munmap(0x0, 1.0 MiB) = 0"
