"""What the cyclic garbage collector walks while memtrace watches big processes.

Attaching to a process makes its whole model at once: at 60k mappings the
scan, the first PSS pass and the first build allocate a few million objects,
all kept. With the collector on, each allocation burst triggers collections
that walk the objects made so far, none of them garbage: at 60k mappings the
first PSS pass took 0.43 s with it and 0.23-0.24 s without, the scan 0.24 and
0.21 s (`gc_paused`).

Those objects then stay for the life of the process, and every full collection
walked them again: at 60k mappings with 1 % of them changing each second, one
full collection in ~38 s took 38-67 ms, as much as all the younger collections
of those seconds together; frozen, it takes ~1 ms (`Freezer`: they are moved to
the permanent generation once built).

Reference counting still frees every object that is not in a cycle, frozen or
not; cycles are what only the collector frees: those made while it is paused
are collected once it runs again, those among frozen objects at the next
refreeze (benchmarks/README.md)."""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator

# Seconds between two refreezes: the longest a cycle of frozen objects that
# became garbage (a model replaced by a full rescan, a process gone) is kept.
REFREEZE_SECONDS = 300.0


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


class Freezer:
    """Keeps what a process's first snapshot built out of full collections."""

    def __init__(self, period: float = REFREEZE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.period = period
        self.clock = clock
        self.refreezes = 0
        self._since: float | None = None      # first freeze not yet refrozen

    def freeze(self) -> None:
        """After a process's first snapshot: every object the collector tracks
        now (that process's model among them) joins the permanent generation."""
        gc.freeze()
        if self._since is None:
            self._since = self.clock()

    def tick(self) -> None:
        """Once a tick: every `period` seconds after a freeze, everything is
        unfrozen, collected once and frozen again."""
        if self._since is None or self.clock() - self._since < self.period:
            return
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.refreezes += 1
        self._since = self.clock()
