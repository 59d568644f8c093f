"""The leak report of --malloc (docs/malloc.md): stacks whose outstanding
bytes keep growing across intervals. Pure.

The rule: a stack is reported when its outstanding bytes, read at the end of
each of the last K intervals (K = LEAK_INTERVALS, the snapshots' ticks),
never went down from one reading to the next over the K intervals (K + 1
readings), and ended higher than they began. A stack whose sampled
allocations are freed loses bytes at some point and drops out; one that only
allocates (or frees less than it allocates, with no sampled free falling in
the window) stays. Sampled bytes move in steps of about one sampling period,
so a stack growing by much less than a period per interval is seen only over
several windows; one whose growth stops is dropped when the window no longer
shows any growth."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LEAK_INTERVALS = 5


@dataclass(frozen=True)
class Leak:
    key: Any            # what observe() was given (MallocTracker: a stack id)
    bytes: int          # outstanding now
    growth: int         # over the window
    seconds: float      # the window's length

    @property
    def bytes_per_second(self) -> float:
        return self.growth / self.seconds if self.seconds > 0 else 0.0


class LeakDetector:
    """Readings of outstanding bytes per key, the last K + 1 of each."""

    def __init__(self, intervals: int = LEAK_INTERVALS) -> None:
        if intervals < 1:
            raise ValueError("the leak rule needs at least one interval")
        self.intervals = intervals
        self._history: dict[Any, deque[tuple[float, int]]] = {}

    def observe(self, ts: float, outstanding: Mapping[Any, int]) -> None:
        """One reading at the end of an interval: every key seen so far gets a
        value (0 when it holds nothing now)."""
        for key in set(self._history) | set(outstanding):
            h = self._history.get(key)
            if h is None:
                h = self._history[key] = deque(maxlen=self.intervals + 1)
            h.append((ts, outstanding.get(key, 0)))
            if len(h) == h.maxlen and not any(b for _, b in h):
                del self._history[key]      # nothing held for a whole window

    def leaks(self) -> list[Leak]:
        """Keys that grew across the whole window, most growth first."""
        out = []
        for key, h in self._history.items():
            if len(h) < self.intervals + 1:
                continue
            values = [b for _, b in h]
            if all(b >= a for a, b in zip(values, values[1:])) and values[-1] > values[0]:
                out.append(Leak(key, values[-1], values[-1] - values[0], h[-1][0] - h[0][0]))
        out.sort(key=lambda lk: -lk.growth)
        return out

    def clear(self) -> None:
        self._history.clear()
