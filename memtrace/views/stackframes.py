"""What every stack view (folded, pprof, flame graph) shows of a frame, one way.

- The measure: "held" (`held_bytes`, resident now) or "brought" (`brought_bytes`,
  made resident since attach).
- A frame's text is its function name. Where two modules of the profile have a
  function of the same name, both get ` [module basename]` appended, so that a
  flame graph does not merge them; elsewhere the name stands alone (short, and
  the same text as `perf`-based flame graphs show). A frame whose function is
  unknown shows its module instead, as `[libc.so.6]` (the stackcollapse-perf
  convention); `[unknown]` when the module is unknown too; the cut of a
  truncated stack is `[truncated]`.
- A mapping shown as a root frame is its identity (`[heap]`, `[anon]`, a path),
  shortened to the basename where that tells it apart from the profile's other
  mappings.
- Names are text as escape_text leaves it (control characters escaped, so one
  frame is one line); the folded format also escapes `;` (its separator).
- The kind of module colours a flame graph: "program" (an ELF that is not a
  shared object), "library" (`*.so*`, `ld-linux*`), "python" (a CPython
  frame, module `[py]`), "jit" (JIT code named from a perf map, module
  `[jit]`), "kernel" (`[unknown]`, `[vdso]`, any other bracketed
  pseudo-module), "truncated".
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from memtrace.stacks.profile import (
    JIT_MODULE,
    PY_MODULE,
    TRUNCATED,
    Frame,
    StackProfile,
    StackSample,
)
from memtrace.trace.procfs import escape_text

MEASURES = ("held", "brought")
UNKNOWN = "[unknown]"
NO_STACK = Frame(0, UNKNOWN, UNKNOWN)   # stands for a sample whose stack is empty
_SHARED_OBJECT = re.compile(r"(\.so(\.[0-9][^/]*)?|^ld-linux[^/]*)( \(deleted\))?$")


def check_measure(measure: str) -> str:
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}, not {measure!r}")
    return measure


def value(sample: StackSample, measure: str) -> int:
    """The bytes of one sample for the measure ("held" or "brought")."""
    return sample.held_bytes if measure == "held" else sample.brought_bytes


def total(profile: StackProfile, measure: str) -> int:
    return profile.held_total() if measure == "held" else profile.brought_total()


def clean(text: str) -> str:
    """Text safe on one line of any output: control characters escaped."""
    return escape_text(text)


def basename(module: str) -> str:
    if module.startswith("["):
        return module
    return module.rstrip("/").rsplit("/", 1)[-1] or module


def module_class(module: str) -> str:
    """program, library, python, jit, kernel (kernel, vdso, unknown) or truncated."""
    if module == TRUNCATED.module:
        return "truncated"
    if module == PY_MODULE:
        return "python"
    if module == JIT_MODULE:
        return "jit"
    if not module or module.startswith("["):
        return "kernel"
    if _SHARED_OBJECT.search(basename(module)):
        return "library"
    return "program"


def root_first(frames: tuple[Frame, ...]) -> Iterator[Frame]:
    """A stack's frames from the outermost caller to the leaf."""
    return reversed(frames)


@dataclass(frozen=True)
class Node:
    """One frame as the views show it."""

    text: str      # the frame's text (see the module docstring)
    function: str  # the function name, cleaned
    module: str    # the module path, cleaned
    cls: str       # program, library, kernel, truncated, mapping, root


class FrameNamer:
    """The text of each frame and mapping of one profile (module docstring)."""

    def __init__(self, profile: StackProfile, modules: str = "ambiguous") -> None:
        if modules not in ("ambiguous", "always", "never"):
            raise ValueError(f"modules must be ambiguous, always or never, not {modules!r}")
        self.modules = modules
        seen: dict[str, set[str]] = defaultdict(set)
        for sample in profile.samples:
            for frame in sample.stack.frames:
                if frame.function != UNKNOWN and frame != TRUNCATED:
                    seen[frame.function].add(frame.module)
        self._ambiguous = {f for f, mods in seen.items() if len(mods) > 1}
        self._mapping_text = _short_names({s.mapping for s in profile.samples})

    def frame(self, frame: Frame) -> Node:
        function, module = clean(frame.function), clean(frame.module)
        if frame == TRUNCATED:
            return Node(function, function, module, "truncated")
        if frame.function == UNKNOWN or not frame.function:
            text = UNKNOWN if module == UNKNOWN else f"[{basename(module)}]"
        elif self.modules == "always" or (
                self.modules == "ambiguous" and frame.function in self._ambiguous):
            text = f"{function} [{basename(module)}]"
        else:
            text = function
        return Node(text, function or UNKNOWN, module, module_class(frame.module))

    def mapping(self, mapping: str) -> Node:
        text = self._mapping_text.get(mapping) or clean(mapping)
        return Node(text, text, clean(mapping), "mapping")


def _short_names(mappings: Iterable[str]) -> dict[str, str]:
    """Each mapping identity by its basename where no other mapping shares it."""
    by_base: dict[str, list[str]] = defaultdict(list)
    for m in mappings:
        by_base[basename(m)].append(m)
    out = {}
    for base, group in by_base.items():
        for m in group:
            out[m] = clean(base if len(group) == 1 else m)
    return out


def paths(profile: StackProfile, measure: str, by_mapping: bool = True,
          modules: str = "ambiguous") -> Iterator[tuple[list[Node], StackSample, int]]:
    """Each sample with bytes for the measure: its nodes root first (the mapping
    first when by_mapping), the sample and its bytes. Zero-byte samples are left out."""
    check_measure(measure)
    namer = FrameNamer(profile, modules)
    for sample in profile.samples:
        n = value(sample, measure)
        if n <= 0:
            continue
        nodes = [namer.mapping(sample.mapping)] if by_mapping else []
        frames = sample.stack.frames or (NO_STACK,)
        nodes.extend(namer.frame(f) for f in root_first(frames))
        yield nodes, sample, n
