"""One int object per repeated figure.

A Python int above 256 is a 28-32 byte object of its own. The figures kept per
mapping (sizes, resident, PSS and USS bytes) repeat across mappings: thread
stacks, arenas and allocator regions of one size. At 60k mappings, the ints
kept for them took ~13 MB; shared, the same figures take a few hundred kB.
The table is bounded: past SHARED_MAX distinct values it starts again (ints
already handed out stay valid: they are ordinary ints)."""

from __future__ import annotations

SHARED_MAX = 1 << 16
_shared: dict[int, int] = {}


def shared_int(value: int) -> int:
    """`value`, as the int object earlier calls with an equal value returned."""
    got = _shared.get(value)
    if got is not None:
        return got
    if len(_shared) >= SHARED_MAX:
        _shared.clear()
    _shared[value] = value
    return value
