"""The `stacks` object of a snapshot (docs/output.md): a process's top stacks
by bytes held now and by bytes brought in since attach, bounded in size."""

from __future__ import annotations

import os
from typing import Any

from memtrace.stacks.profile import PY_MODULE, StackProfile, StackSample

STACKS_TOP = 10          # stacks per measure in a snapshot
FRAMES_MAX = 32          # frames per stack in a snapshot (the rest: "[...]")


def frame_text(function: str, module: str) -> str:
    """`function (module file name)`, the form the JSON uses; a marker frame
    (`[unsampled]`, `[truncated]`) alone; a CPython frame `qualname (file:line) [py]`."""
    if not module or function == module:
        return function
    if module == PY_MODULE:
        return f"{function} {PY_MODULE}"
    return f"{function} ({os.path.basename(module)})"


def _entry(sample: StackSample, measure: str) -> dict[str, Any]:
    frames = [frame_text(f.function, f.module) for f in sample.stack.frames]
    if len(frames) > FRAMES_MAX:
        frames = frames[:FRAMES_MAX - 1] + ["[...]"]
    return {"bytes": getattr(sample, f"{measure}_bytes"), "mapping": sample.mapping,
            "kind": sample.kind, "samples": sample.samples,
            "truncated": sample.stack.truncated, "frames": frames}


def stacks_summary(profile: StackProfile, top: int = STACKS_TOP) -> dict[str, Any]:
    """Top stacks of `profile` for both measures, largest first (ties: by
    their frames, so the order is stable from one snapshot to the next)."""
    out: dict[str, Any] = {
        "period_bytes": profile.sample_period_bytes,
        "samples": sum(s.samples for s in profile.samples),
        "lost": profile.samples_lost,
        "held_bytes": profile.held_total(),
        "brought_bytes": profile.brought_total(),
    }
    for measure in ("held", "brought"):
        ranked = sorted((s for s in profile.samples if getattr(s, f"{measure}_bytes") > 0),
                        key=lambda s: (-getattr(s, f"{measure}_bytes"), s.mapping,
                                       [f.function for f in s.stack.frames]))
        out[measure] = [_entry(s, measure) for s in ranked[:top]]
    return out
