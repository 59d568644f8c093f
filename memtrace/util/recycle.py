"""Versions of a long list that changes a few items at a time (a snapshot's
mappings), each a list of its own, without copying the whole list each time.

A new version used to be `list(current)`: at 60k mappings that copy, and the
free of the version it replaced two ticks later, touch the reference count of
60k objects: ~0.9 ms a tick (benchmarks/README.md). Here a retired version that
nothing but this pool references any more is brought up to date instead, by
rewriting only the items changed since it was current. A version somebody still
holds (a scrape, run's peak, the previous snapshot) is never written: then, or
when there is no retired version, the new one is a copy."""

from __future__ import annotations

import sys
from typing import Any


class RecycledLists:
    def __init__(self, keep: int = 3) -> None:
        self._keep = keep
        self._pool: list[tuple[list[Any], int]] = []    # (retired version, its number)
        self._changed: dict[int, list[int]] = {}        # number -> indices it changed
        self._number = 0                                # the current version's
        self.recycled = 0                               # versions made each way
        self.copied = 0
        # what getrefcount says of a pooled list that only the pool holds,
        # measured through the same expression as in _unshared
        self._pool.append(([], 0))
        self._only_pool = self._refs(0)
        self._pool.clear()

    def _refs(self, k: int) -> int:
        return sys.getrefcount(self._pool[k][0])

    def new_version(self, current: list[Any]) -> list[Any]:
        """A list equal to `current` that the caller may change (then, once the
        caller made it the current one, call retired(current, indices))."""
        for k in range(len(self._pool)):
            if self._refs(k) == self._only_pool:
                lst, number = self._pool.pop(k)
                if len(lst) == len(current):
                    for n in range(number + 1, self._number + 1):
                        for i in self._changed[n]:
                            lst[i] = current[i]
                    self.recycled += 1
                    return lst
        self.copied += 1
        return list(current)

    def retired(self, old: list[Any], changed: list[int]) -> None:
        """`old`, the current version until now, was replaced by a version that
        differs from it at `changed`; old joins the pool."""
        self._number += 1
        self._changed[self._number] = changed
        self._pool.append((old, self._number - 1))
        if len(self._pool) > self._keep:
            self._pool.pop(0)
        oldest = min((number for _, number in self._pool), default=self._number)
        for n in [n for n in self._changed if n <= oldest]:
            del self._changed[n]

    def reset(self) -> None:
        """A new list of another shape: no retired version fits it."""
        self._pool.clear()
        self._changed.clear()
