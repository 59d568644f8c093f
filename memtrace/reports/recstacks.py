"""The flame graph at the peak from the stack profile the recording kept
(`{"stacks": ...}` lines, memtrace/record/stacks.py), rather than from the peak
snapshot's top 10: a StackSource (reports/stackview.py) for build_report.

The peak is known only once the recording has been read; the profile at that
moment is then read again from the stacks lines alone (profiles_at), up to
where the first reading stopped. A recording without stacks lines (or a
process without any) falls back to the snapshot's top stacks."""

from __future__ import annotations

from typing import Any

from memtrace.record.reader import Recording
from memtrace.record.stacks import profiles_at
from memtrace.reports.stackview import SnapshotStacks
from memtrace.stacks.profile import StackProfile
from memtrace.stacks.summary import FRAMES_MAX, frame_text

# stacks kept in the page: the rest of the held bytes are one "[other stacks]"
# box (profile_of): each stack drawn costs the page ~5-10 KB (20 frames)
TOP_STACKS = 100


class RecordedStacks:
    """StackSource: the whole recorded profile of a process at its peak."""

    def __init__(self, rec: Recording, top: int = TOP_STACKS) -> None:
        self.rec = rec
        self.top = top
        self.seen = False           # any stacks line at all
        self.fallback = SnapshotStacks()

    def record(self, kind: str, data: Any, ts: float | None) -> None:
        if kind == "stacks":
            self.seen = True

    def at_peak(self, pid: int, ts: float, snapshot: dict[str, Any]) -> dict[str, Any] | None:
        if not self.seen:
            return self.fallback.at_peak(pid, ts, snapshot)
        profile = profiles_at(self.rec.path, ts, upto_bytes=self.rec.bytes_read).get(pid)
        if profile is None or not profile.samples:
            return self.fallback.at_peak(pid, ts, snapshot)
        return stacks_object(profile, self.top)


def stacks_object(profile: StackProfile, top: int) -> dict[str, Any]:
    """The profile as a snapshot's `stacks` object (held only; its `top`
    largest stacks listed, held_bytes the whole profile's)."""
    held = sorted((s for s in profile.samples if s.held_bytes > 0),
                  key=lambda s: -s.held_bytes)
    entries = []
    for s in held[:top]:
        frames = [frame_text(f.function, f.module) for f in s.stack.frames]
        if len(frames) > FRAMES_MAX:
            frames = frames[:FRAMES_MAX - 1] + ["[...]"]
        entries.append({"bytes": s.held_bytes, "mapping": s.mapping, "kind": s.kind,
                        "samples": s.samples, "truncated": s.stack.truncated,
                        "frames": frames})
    listed = f"its {top} largest" if len(held) > top else "all"
    return {"period_bytes": profile.sample_period_bytes,
            "samples": sum(s.samples for s in profile.samples),
            "lost": profile.samples_lost, "held_bytes": profile.held_total(),
            "ts": profile.ts, "held": entries,
            "source": f"the stack profile recorded at the peak ({len(held)} stacks, "
                      f"{listed} drawn)"}
