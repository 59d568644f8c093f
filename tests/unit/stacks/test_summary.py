"""The `stacks` object of a snapshot: bounded, ordered, marker frames alone."""

from __future__ import annotations

from memtrace.stacks.netting import UNSAMPLED
from memtrace.stacks.profile import TRUNCATED, Frame, Stack, StackProfile, StackSample
from memtrace.stacks.summary import FRAMES_MAX, frame_text, stacks_summary


def _frame(name: str) -> Frame:
    return Frame(0x1000, name, "/usr/lib/libx.so.1")


def test_top_stacks_per_measure_largest_first_and_bounded():
    samples = [StackSample(Stack((_frame(f"f{i}"),)), "[anon]", "anon",
                           held_bytes=i * 4096, brought_bytes=(30 - i) * 4096, samples=1)
               for i in range(30)]
    s = stacks_summary(StackProfile(1, "x", 0.0, samples), top=5)
    assert [e["bytes"] for e in s["held"]] == [29 * 4096, 28 * 4096, 27 * 4096,
                                               26 * 4096, 25 * 4096]
    assert s["brought"][0]["frames"] == ["f0 (libx.so.1)"]
    assert s["held_bytes"] == sum(i * 4096 for i in range(30))
    assert s["samples"] == 30


def test_deep_stacks_are_cut_and_markers_stand_alone():
    deep = Stack(tuple(_frame(f"g{i}") for i in range(100)) + (TRUNCATED,))
    s = stacks_summary(StackProfile(1, "x", 0.0, [
        StackSample(deep, "[heap]", "heap", held_bytes=4096),
        StackSample(UNSAMPLED, "[stack]", "stack", held_bytes=8192)]))
    frames = s["held"][1]["frames"]
    assert len(frames) == FRAMES_MAX and frames[-1] == "[...]"
    assert s["held"][1]["truncated"] is True
    assert s["held"][0]["frames"] == ["[unsampled]"]
    assert frame_text("[truncated]", "[truncated]") == "[truncated]"
    assert frame_text("main", "/usr/bin/prog") == "main (prog)"
