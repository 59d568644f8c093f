"""The report's flame graph at the peak from the stack profile the recording
kept (reports/recstacks.py): the profile of the peak's tick (not the end's, not
only the snapshot's top 10), the largest stacks listed, the rest one box; a
recording without stacks lines falls back to the snapshot's top stacks."""

from __future__ import annotations

from memtrace.record.reader import open_recording
from memtrace.record.stacks import profiles_at
from memtrace.record.writer import RecordingWriter, make_header, open_recording_output
from memtrace.reports.build import build_report
from memtrace.reports.recstacks import RecordedStacks
from memtrace.reports.stackview import profile_of
from memtrace.stacks.profile import Frame, Stack, StackProfile, StackSample
from tests import synthrec

MiB = 1 << 20


def _profile(snap: dict, tick: int, n: int) -> StackProfile:
    """n stacks of 1 MiB, and one of this tick holding 64 MiB."""
    mine = Stack((Frame(0x1000 + tick, f"grow_at_tick_{tick}", "/bin/prog"),
                  Frame(0x2000, "main", "/bin/prog")))
    samples = [StackSample(mine, "[anon]", "anon", 64 * MiB, 64 * MiB, 3)]
    samples += [StackSample(Stack((Frame(0x3000 + i, f"quiet_{i}", "/bin/prog"),)),
                            "[heap]", "heap", MiB, MiB, 1) for i in range(n)]
    return StackProfile(snap["pid"], snap["comm"], snap["ts"], samples, 524288, 0)


def _write(path: str, snaps: list[dict], n: int, with_profiles: bool = True) -> None:
    writer = RecordingWriter(open_recording_output(path), make_header(
        "run", 1.0, command=["prog"], options={"stacks": True}))
    for tick, snap in enumerate(snaps):
        if with_profiles:
            writer.stack_profile(_profile(snap, tick, n))
        writer.snapshot(snap)
        writer.tick_done()
    writer.close()


def test_the_flame_graph_is_the_recorded_profile_at_the_peak(tmp_path):  # type: ignore[no-untyped-def]
    snaps = synthrec.ticks(90)
    peak = max(range(len(snaps)), key=lambda i: snaps[i]["rss_bytes"])
    assert 0 < peak < len(snaps) - 1
    path = str(tmp_path / "r.mtrace")
    _write(path, snaps, n=500)
    rec = open_recording(path)
    data = build_report(rec, stacks=RecordedStacks(rec, top=100))
    [proc] = data["processes"]
    stacks = proc["stacks"]
    assert "recorded at the peak (501 stacks, its 100 largest drawn)" in stacks["source"]
    assert stacks["ts"] == snaps[peak]["ts"]
    assert stacks["held"][0]["frames"] == [f"grow_at_tick_{peak} (prog)", "main (prog)"]
    assert len(stacks["held"]) == 100
    want = profiles_at(path, snaps[peak]["ts"])[snaps[peak]["pid"]]
    assert stacks["held_bytes"] == want.held_total() == 564 * MiB
    # the flame graph's profile: the 100 drawn, the rest of the bytes one box
    drawn = profile_of(proc["pid"], proc["comm"], stacks)
    assert drawn.held_total() == 564 * MiB and len(drawn.samples) == 101
    assert drawn.samples[-1].stack.frames[0].function == "[other stacks]"


def test_without_stacks_lines_the_snapshot_top_stacks_are_drawn(tmp_path):  # type: ignore[no-untyped-def]
    snaps = synthrec.ticks(30)
    path = str(tmp_path / "r.mtrace")
    _write(path, snaps, n=0, with_profiles=False)
    rec = open_recording(path)
    [proc] = build_report(rec, stacks=RecordedStacks(rec))["processes"]
    assert "snapshot" in proc["stacks"]["source"]
