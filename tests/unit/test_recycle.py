"""util/recycle.RecycledLists: a retired version that nothing else holds is
brought up to date instead of copied; one that somebody holds is never written."""

from __future__ import annotations

import random

from memtrace.util.recycle import RecycledLists


def step(pool: RecycledLists, current: list[int], rng: random.Random) -> list[int]:
    """One new version: a few items changed, the way SnapshotBuilder does it."""
    new = pool.new_version(current)
    assert new == current and new is not current
    changed = sorted(rng.sample(range(len(current)), 3))
    for i in changed:
        new[i] = rng.randrange(1 << 30)
    pool.retired(current, changed)
    return new


def test_unheld_versions_are_recycled_and_equal_what_a_copy_would_be() -> None:
    rng = random.Random(1)
    pool = RecycledLists()
    current = list(range(1000))
    expected = list(current)
    for _ in range(50):
        before = list(current)
        current = step(pool, current, rng)
        changed = [i for i in range(1000) if current[i] != before[i]]
        for i in changed:
            expected[i] = current[i]
        assert current == expected
    assert pool.copied <= 2 and pool.recycled >= 48


def test_a_version_somebody_holds_is_never_written() -> None:
    rng = random.Random(2)
    pool = RecycledLists()
    current = list(range(1000))
    held = []
    for n in range(40):
        current = step(pool, current, rng)
        if n % 7 == 0:
            held.append((current, list(current)))       # a holder, and what it saw
    for lst, seen in held:
        assert lst == seen
    assert pool.copied >= len(held)


def test_after_a_reset_the_next_version_is_a_copy() -> None:
    rng = random.Random(3)
    pool = RecycledLists()
    current = list(range(100))
    for _ in range(5):
        current = step(pool, current, rng)
    pool.reset()
    copied = pool.copied
    current = current + [1]             # another shape
    assert pool.new_version(current) == current
    assert pool.copied == copied + 1
