"""util/gcpause.py: the collector paused while a first snapshot is built, and
what it built kept out of later full collections until the next refreeze."""

from __future__ import annotations

import gc
import weakref

import pytest

from memtrace.util.gcpause import Freezer, gc_paused


@pytest.fixture(autouse=True)
def _restore_gc():
    was_enabled = gc.isenabled()
    yield
    gc.unfreeze()
    if was_enabled:
        gc.enable()


def test_paused_inside_and_enabled_after():
    gc.enable()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()       # the inner block leaves the outer one paused
    assert gc.isenabled()


def test_a_collector_off_before_stays_off():
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()


def test_enabled_again_when_the_block_raises():
    gc.enable()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("attach failed")
    assert gc.isenabled()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_freeze_moves_tracked_objects_to_the_permanent_generation():
    gc.unfreeze()
    model = [[i] for i in range(1000)]          # what an attach builds
    freezer = Freezer(period=300.0, clock=Clock())
    freezer.freeze()
    assert gc.get_freeze_count() >= len(model)


def test_refreeze_only_after_the_period_and_frees_frozen_cycles():
    clock = Clock()
    freezer = Freezer(period=300.0, clock=clock)
    freezer.tick()
    assert freezer.refreezes == 0           # nothing frozen yet: nothing to do

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a                 # a cycle: only the collector frees it
    freezer.freeze()
    ref = weakref.ref(a)
    del a, b
    gc.collect()
    assert ref() is not None                # frozen: a full collection does not free it

    clock.now += 299.0
    freezer.tick()
    assert freezer.refreezes == 0
    clock.now += 1.0
    freezer.tick()
    assert freezer.refreezes == 1
    assert ref() is None                    # unfrozen, collected
    assert gc.get_freeze_count() > 0        # frozen again after the collection
