"""What the watch loop publishes each tick for the exporter and other readers
in other threads: one consistent, immutable copy of the latest tick, and the
counters of exited processes kept per group (agent mode) so they never go back."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

CONTAINER_LABELS = ("container_id", "pod_uid")
NO_CONTAINER = ("", "")
FAULT_TYPES = ("minor", "major")


@dataclass
class TickState:
    """What the watch loop publishes for scrapes. Replaced whole, never mutated
    in place, so a scrape in another thread always sees one consistent tick."""

    snapshots: dict[int, dict[str, Any]] = field(default_factory=dict)
    full_rescans: dict[str, int] = field(default_factory=dict)
    events_lost: int = 0
    ranges_lost: int = 0
    tick_seconds: float = 0.0
    attach_seconds: dict[int, float] = field(default_factory=dict)
    targets_dropped: int = 0
    # agent mode: exec and fork notices that did not fit their BPF ring
    notices_lost: dict[str, int] = field(default_factory=dict)
    # Agent mode with grouping: pid -> group name, and the counters of exited
    # processes per row_key (group, comm[, container_id, pod_uid]), so group
    # counters never go backwards.
    groups: dict[int, str] | None = None
    retired: dict[tuple[str, ...], dict[str, Any]] = field(default_factory=dict)
    # heap walks (--heap-interval) by status; None when heap walks are off
    heap_walks: dict[str, int] | None = None
    # Agent mode: pid -> (container_id, pod_uid) read from its cgroup path ("" when
    # not in a container); the series then carry both labels. None: no such labels.
    containers: dict[int, tuple[str, str]] | None = None


def empty_counters() -> dict[str, Any]:
    return {"syscalls": {}, "syscall_bytes": {}, "faults_by_mapping": {}, "kernel_faults": {}}


def add_counters(into: dict[str, Any], snap: dict[str, Any]) -> None:
    for key in ("syscalls", "syscall_bytes", "faults_by_mapping", "kernel_faults"):
        bucket = into.setdefault(key, {})
        for name, n in snap.get(key, {}).items():
            bucket[name] = bucket.get(name, 0) + n
    if "kernel_faults" not in snap:     # a snapshot: its top-level counters
        bucket = into["kernel_faults"]
        for fault in FAULT_TYPES:
            bucket[fault] = bucket.get(fault, 0) + (snap.get(f"{fault}_faults") or 0)


class StateBox:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = TickState()

    def set(self, state: TickState) -> None:
        with self._lock:
            self._state = state

    def get(self) -> TickState:
        with self._lock:
            return self._state
