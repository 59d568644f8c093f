"""The cyclic garbage collector paused while a process's first snapshot is built.

Attaching to a process makes its whole model at once: at 60k mappings the
scan, the first PSS pass and the first build allocate a few million objects,
all kept. Each allocation burst triggers collections that walk the objects made
so far, none of them garbage: measured at 60k mappings, the first PSS pass took
0.43 s with the collector on and 0.23-0.24 s with it paused, the scan 0.24 and
0.21 s (benchmarks/README.md). Reference counting still frees everything that
is not in a cycle; cycles made meanwhile are collected once it runs again."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No automatic cyclic collection inside the block; enabled again after it
    if it was enabled before (blocks nest)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
