"""Resident memory by call stack (issue 13): the data every stack view renders.

A `StackProfile` is what `--stacks` knows about one process at one moment: for
each distinct (user stack, mapping) pair, the bytes that stack holds resident
now ("held now": its sampled pages still resident, netted against releases) and
the bytes it brought in since attach ("brought in": every sampled fault, never
netted). Samples are taken by bytes with exponential gaps, each weighted by its
expected bytes; per mapping the held sums are scaled to the mapping's exact
resident bytes, so the stacks of a mapping add up to memtrace's figure.

Views (folded stacks, pprof, flame graph, JSON) read only these classes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Frame:
    """One frame of a user stack, leaf first in `Stack.frames`."""

    address: int                 # the instruction address in the process
    function: str                # demangled symbol, or "[unknown]"
    module: str                  # the ELF mapped there (path as shown), or "[unknown]"
    offset: int = 0              # address - symbol start (0 when unknown)
    build_id: str | None = None  # GNU build-id of the module, hex


PY_MODULE = "[py]"
"""The module of a CPython frame (stacks/python.py): its function reads
`qualname (file:line)`, its address is the code object's."""

JIT_MODULE = "[jit]"
"""The module of JIT-compiled code named from the process's perf map
(stacks/perfmap.py): its function is the name the runtime wrote there."""

TRUNCATED = Frame(0, "[truncated]", "[truncated]")
"""The last frame of a stack the unwinder had to cut (depth, stack copy size)."""


@dataclass(frozen=True)
class Stack:
    frames: tuple[Frame, ...]    # leaf first; ends with TRUNCATED when cut

    @property
    def truncated(self) -> bool:
        return bool(self.frames) and self.frames[-1] == TRUNCATED


class StackIds:
    """Small integer ids for distinct stacks, so that per-page and per-block
    state holds an int instead of a tuple of frames."""

    def __init__(self) -> None:
        self._ids: dict[Stack, int] = {}
        self._stacks: list[Stack] = []

    def intern(self, stack: Stack) -> int:
        sid = self._ids.get(stack)
        if sid is None:
            sid = self._ids[stack] = len(self._stacks)
            self._stacks.append(stack)
        return sid

    def __getitem__(self, sid: int) -> Stack:
        return self._stacks[sid]

    def __len__(self) -> int:
        return len(self._stacks)

    def clear(self) -> None:
        self._ids.clear()
        self._stacks.clear()


@dataclass
class StackSample:
    """What one stack holds in one mapping."""

    stack: Stack
    mapping: str                 # the mapping identity (snapshot "mapping" key)
    kind: str                    # heap, anon, stack, library, ... (snapshot "kind")
    held_bytes: int = 0          # resident now, scaled to the mapping's exact bytes
    brought_bytes: int = 0       # made resident since attach (estimated from samples)
    samples: int = 0             # sampled faults behind these figures


@dataclass
class StackProfile:
    pid: int
    comm: str
    ts: float
    samples: list[StackSample] = field(default_factory=list)
    sample_period_bytes: int = 0     # mean bytes between samples
    samples_lost: int = 0            # ring full, stack unreadable, ...
    sample_period_max_bytes: int = 0  # --malloc: the largest mean gap (the rate cap raises it)

    def held_total(self) -> int:
        return sum(s.held_bytes for s in self.samples)

    def brought_total(self) -> int:
        return sum(s.brought_bytes for s in self.samples)
