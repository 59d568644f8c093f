"""The stacks behind the flame graph at a process's peak.

`StackSource` is the boundary: given a process and its peak, it returns a
stacks object of the snapshot's shape (docs/output.md, `stacks`: `held` is a
list of `{bytes, mapping, kind, samples, truncated, frames}`, frames leaf first
as "function (module)"). `SnapshotStacks`, the default, takes the top stacks
the peak snapshot carries; a source reading a fuller profile from the
recording (it sees every non-snapshot line through `record`) can replace it
without touching the rest of the report.
`profile_of` turns such an object back into a StackProfile for the flame graph
(memtrace.views.flamegraph)."""

from __future__ import annotations

from typing import Any, Protocol

from memtrace.stacks.profile import TRUNCATED, Frame, Stack, StackProfile, StackSample

UNSAMPLED = "[unsampled]"


class StackSource(Protocol):
    def record(self, kind: str, data: Any, ts: float | None) -> None:
        """Every line of the recording that is not a snapshot, as it is read
        (a source of fuller profiles keeps what it needs here)."""

    def at_peak(self, pid: int, ts: float, snapshot: dict[str, Any]) -> dict[str, Any] | None:
        """The stacks object at the peak of process `pid` (None: none recorded)."""


class SnapshotStacks:
    """The top stacks held at the peak, as the peak snapshot has them."""

    def record(self, kind: str, data: Any, ts: float | None) -> None:
        pass

    def at_peak(self, pid: int, ts: float, snapshot: dict[str, Any]) -> dict[str, Any] | None:
        stacks = snapshot.get("stacks")
        if not isinstance(stacks, dict) or not stacks.get("held"):
            return None
        out = {k: stacks.get(k) for k in ("period_bytes", "samples", "lost", "held_bytes")}
        out.update(ts=ts, source="the peak snapshot's top stacks held",
                   held=stacks["held"])
        return out


def parse_frame(text: str) -> Frame:
    """A "function (module)" string back into a Frame (a marker frame alone)."""
    if text == TRUNCATED.function:
        return TRUNCATED
    if text.endswith(")") and " (" in text:
        function, module = text[:-1].rsplit(" (", 1)
        return Frame(0, function, module)
    return Frame(0, text, text)


def profile_of(pid: int, comm: str, stacks: dict[str, Any]) -> StackProfile:
    """A StackProfile (held bytes only) of a stacks object; the bytes the top
    stacks leave out are one `[other stacks]` frame, so widths stay shares of
    the process's resident bytes."""
    samples = []
    for s in stacks.get("held") or []:
        frames = tuple(parse_frame(f) for f in s.get("frames") or [])
        samples.append(StackSample(Stack(frames), str(s.get("mapping", "")),
                                   str(s.get("kind", "")), held_bytes=int(s.get("bytes", 0)),
                                   samples=int(s.get("samples", 0))))
    shown = sum(s.held_bytes for s in samples)
    rest = int(stacks.get("held_bytes") or 0) - shown
    if rest > 0:
        other = Frame(0, "[other stacks]", "[other stacks]")
        samples.append(StackSample(Stack((other,)), "[other stacks]", "", held_bytes=rest))
    return StackProfile(pid, comm, float(stacks.get("ts") or 0.0), samples,
                        sample_period_bytes=int(stacks.get("period_bytes") or 0),
                        samples_lost=int(stacks.get("lost") or 0))
