"""One int object per repeated figure.

A Python int above 256 is a 28-32 byte object of its own. The figures kept per
mapping (sizes, resident, PSS and USS bytes) repeat across mappings: thread
stacks, arenas and allocator regions of one size. At 60k mappings, the ints
kept for them took ~13 MB; shared, the same figures take a few hundred kB.

`shared(v, v)` is the call (dict.setdefault: one C call, no Python frame, for
loops over every mapping); `trim()` bounds the table, once per pass: past
SHARED_MAX distinct values it starts again (ints already handed out stay
valid: they are ordinary ints)."""

from __future__ import annotations

SHARED_MAX = 1 << 16
_table: dict[int, int] = {}
shared = _table.setdefault


def trim() -> None:
    """Start the table again if it holds more than SHARED_MAX values."""
    if len(_table) > SHARED_MAX:
        _table.clear()
