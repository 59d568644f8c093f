"""The stack series (`--stacks --stacks-series N`): per process (or group), the N
stacks that hold the most resident bytes now and the N that brought the most in,
from the `stacks` key of the latest snapshots (memtrace.stacks.summary: the top
stacks of each measure, frames as "function (module)" strings, leaf first).

A series is labelled by the mapping identity and a bounded `stack` text: the
innermost frames, function names only, outermost of them first (folded order),
joined by ";". Stacks whose labels come out the same (they differ only beyond the
kept frames, or in modules) are summed into one series, so no label set repeats."""

from __future__ import annotations

from typing import Any

from memtrace.exporter import metrics as m
from memtrace.exporter.families import Family
from memtrace.exporter.rows import row_ids, safe_label, who_of
from memtrace.published import TickState

STACK_LABEL_FRAMES = 8      # innermost frames kept in a stack label
STACK_LABEL_CHARS = 200     # and at most this many characters
CUT = "[...]"               # stands for the outer frames left out (the JSON's mark too)
UNKNOWN = "[unknown]"
SEPARATOR_ESCAPE = "\\x3b"  # a ";" inside a name (as in folded stacks)


def frame_name(text: str) -> str:
    """A snapshot frame ("function (module)", or a marker alone) as its function
    name; a function without a symbol as its module, `[libc.so.6]` (the folded
    stacks' convention)."""
    if text.endswith(")") and " (" in text:
        function, module = text[:-1].rsplit(" (", 1)
        text = f"[{module}]" if function == UNKNOWN else function
    return text.replace(";", SEPARATOR_ESCAPE)


def stack_label(frames: list[str]) -> str:
    """The `stack` label of a stack whose frames (leaf first) are `frames`: at
    most STACK_LABEL_FRAMES innermost function names and STACK_LABEL_CHARS
    characters, outermost first, `[...];` in front when outer frames were left
    out (a leaf name longer than the bound is cut and ends in `…`)."""
    names = [frame_name(f) for f in frames] or [UNKNOWN]
    kept: list[str] = []
    room = STACK_LABEL_CHARS - len(CUT) - 1
    for name in names[:STACK_LABEL_FRAMES]:
        if len(name) + (1 if kept else 0) > room:
            break
        kept.append(name)
        room -= len(name) + (1 if len(kept) > 1 else 0)
    if not kept:
        kept = [names[0][: STACK_LABEL_CHARS - len(CUT) - 2] + "…"]
    label = ";".join(reversed(kept))
    return safe_label(label if len(kept) == len(names) else f"{CUT};{label}")


def _top(summed: dict[tuple[str, str], int], n: int) -> list[tuple[tuple[str, str], int]]:
    """The n largest, ties by their labels (the same order every scrape)."""
    return sorted(summed.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def stack_families(state: TickState, n: int) -> list[Family]:
    """memtrace_stack_held_bytes and memtrace_stack_brought_bytes: per row (a
    process, or a group summing its processes' stacks), the n largest (mapping,
    stack) series of each measure, after the stacks a snapshot carries are summed
    by their labels. None when n is 0 (--stacks-series off: the scrape has no
    such families at all)."""
    if n <= 0:
        return []
    who = list(who_of(state))
    fams = [Family(m.STACK_HELD, who), Family(m.STACK_BROUGHT, who)]
    rows: dict[tuple[str, ...], list[dict[tuple[str, str], int]]] = {}
    for pid, snap in sorted(state.snapshots.items()):
        stacks: dict[str, Any] | None = snap.get("stacks")
        if not stacks:
            continue
        row = rows.setdefault(tuple(row_ids(state, pid, snap)), [{}, {}])
        for summed, measure in zip(row, ("held", "brought")):
            for entry in stacks.get(measure, []):
                if entry["bytes"] <= 0:
                    continue
                key = (safe_label(entry["mapping"]), stack_label(entry["frames"]))
                summed[key] = summed.get(key, 0) + entry["bytes"]
    for ids, row in sorted(rows.items()):
        for fam, summed in zip(fams, row):
            for (mapping, stack), nbytes in _top(summed, n):
                fam.add_metric([*ids, mapping, stack], nbytes)
    return fams
