"""What the families are built from: the rows of a scrape (one per process, or per
group in agent mode with --group-by), their label values made safe, and the sums of
a row's mappings by identity with the per-process series cap applied."""

from __future__ import annotations

import hashlib
from typing import Any

from memtrace.published import CONTAINER_LABELS, NO_CONTAINER, TickState, add_counters
from memtrace.snapshot import identity_sums

OTHER = "[other]"
MAX_LABEL_CHARS = 512
TYPES = ("anon", "file", "shmem")
SYSCALLS = ("brk", "mmap", "munmap", "mremap", "madvise")

Row = tuple[list[str], dict[str, Any]]
"""(label values of who_of(state), the row's snapshot: a process's or a group's merge)."""


def safe_label(value: str) -> str:
    """Label values that can never break a scrape: no lone surrogates, bounded length.
    (Quotes, backslashes and newlines are escaped by the exposition format.)"""
    value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(value) > MAX_LABEL_CHARS:
        # Keep cut values distinct: two long paths with a common prefix must not
        # become one series.
        digest = hashlib.sha256(value.encode()).hexdigest()[:12]
        value = f"{value[: MAX_LABEL_CHARS - 14]}…~{digest}"
    return value


def who_of(state: TickState) -> tuple[str, ...]:
    """The label names that say which process (or group) a series is about."""
    who = ("group", "comm") if state.groups is not None else ("pid", "comm")
    return who + CONTAINER_LABELS if state.containers is not None else who


def row_key(state: TickState, pid: int, snap: dict[str, Any]) -> tuple[str, ...]:
    """The raw values of who_of(state) for one process: its pid (or group), comm
    and, in agent mode, container_id and pod_uid. Processes with the same key
    are one row (a group)."""
    comm = snap["comm"]
    key: tuple[str, ...] = (
        state.groups.get(pid, comm) if state.groups is not None else str(pid), comm)
    if state.containers is not None:
        key += state.containers.get(pid, NO_CONTAINER)
    return key


def row_ids(state: TickState, pid: int, snap: dict[str, Any]) -> list[str]:
    """row_key() as label values (safe_label)."""
    return [safe_label(v) for v in row_key(state, pid, snap)]


# The resident types a mapping of each kind can hold: the others are always 0
# and get no series (a type that is not 0 is served whatever the kind). Private
# file mappings hold anonymous copy-on-write pages; a file on tmpfs holds shmem.
TYPES_BY_KIND = {
    "heap": ("anon",), "stack": ("anon",), "anon": ("anon",), "shmem": ("shmem",),
    "library": ("anon", "file"), "executable": ("anon", "file"), "file": ("anon", "file"),
}


def resident_types(kind: str, anon: Any, file: Any, shmem: Any) -> list[tuple[str, Any]]:
    """(type, bytes) of the per-mapping resident series served for one mapping
    identity of `kind`."""
    allowed = TYPES_BY_KIND.get(kind, TYPES)
    return [(t, v) for t, v in (("anon", anon), ("file", file), ("shmem", shmem))
            if t in allowed or v]


def _zero_row() -> dict[str, Any]:
    return {"anon_bytes": 0, "file_bytes": 0, "shmem_bytes": 0, "virtual_bytes": 0,
            "drift_bytes": 0, "mappings": []}


def group_members(state: TickState) -> dict[tuple[str, ...], tuple[
        dict[str, Any] | None, list[dict[str, Any]]]]:
    """row_key (group, comm[, container_id, pod_uid]) -> (the retired counters, the
    live snapshots), in merge order."""
    assert state.groups is not None
    members: dict[tuple[str, ...], tuple[dict[str, Any] | None, list[dict[str, Any]]]] = {}
    for key, counters in state.retired.items():
        members[key] = (counters, [])
    for pid, snap in state.snapshots.items():
        key = row_key(state, pid, snap)
        if key not in members:
            members[key] = (None, [])
        members[key][1].append(snap)
    return members


def merge(retired: dict[str, Any] | None, snaps: list[dict[str, Any]]) -> dict[str, Any]:
    """One group's merged snapshot: the sums of its processes, plus the counters
    of its exited ones."""
    row = _zero_row()
    if retired is not None:
        add_counters(row, retired)
    for snap in snaps:
        for f in ("anon_bytes", "file_bytes", "shmem_bytes", "virtual_bytes", "drift_bytes"):
            row[f] += snap[f]
        swap = snap.get("swap_bytes")
        row["swap_bytes"] = None if swap is None or row.get("swap_bytes", 0) is None \
            else row.get("swap_bytes", 0) + swap
        row["mappings"] = row["mappings"] + snap["mappings"]
        add_counters(row, snap)
    return row


def grouped_rows(state: TickState) -> list[Row]:
    """(label values for who_of(state), merged snapshot) per group and comm (and
    container, in agent mode)."""
    return [([safe_label(v) for v in key], merge(*m))
            for key, m in sorted(group_members(state).items())]


def pid_rows(state: TickState) -> list[Row]:
    return [(row_ids(state, pid, snap), snap)
            for pid, snap in sorted(state.snapshots.items())]


GroupRow = tuple[tuple[str, str], list[Any]]
"""(identity, kind), [anon, file, shmem, virtual] (and pss, uss when asked for)."""


def sum_mappings(snap: dict[str, Any], max_series: int,
                 pss: bool = False) -> tuple[list[GroupRow], int]:
    """group_mappings as rows ((identity, kind), [anon, file, shmem, virtual]), in
    the same order; lists instead of dicts (this runs for every mapping of every
    scrape). With `pss`, each row also carries the PSS and USS sums ([anon, file,
    shmem, virtual, pss, uss]), from the same pass: the PSS/USS series have exactly
    the identities, order and [other] of the resident series."""
    kept_sums: dict[tuple[str, str], list[Any]] | None = getattr(snap, "identity_sums", None)
    if kept_sums is None:
        groups = identity_sums(snap["mappings"], pss)
    else:
        # kept by the snapshot builder, tick by tick: fresh lists, never the builder's
        width = 6 if pss else 4
        groups = {key: g[:width] for key, g in kept_sums.items()}
    if len(groups) <= max_series:
        return list(groups.items()), 0
    items = list(groups.items())
    resident = [g[0] + g[1] + g[2] for _, g in items]
    # by resident bytes, largest first, ties in order of appearance (as a stable
    # sort with reverse=True of the items by the same key); one sort of the
    # identities (~60) per process, shared by the resident and PSS families
    ranked = [items[i] for i in sorted(range(len(items)), key=resident.__getitem__,
                                       reverse=True)]
    kept = dict(ranked[: max_series - 1])
    other = [0] * len(ranked[0][1])
    for _, g in ranked[max_series - 1:]:
        for j, x in enumerate(g):
            other[j] += x
    kept[(OTHER, "other")] = other
    return list(kept.items()), len(ranked) - (max_series - 1)


def group_mappings(snap: dict[str, Any], max_series: int) -> tuple[
        dict[tuple[str, str], dict[str, int]], int]:
    """Sum mappings by (identity, kind); keep the `max_series` largest by resident
    bytes and fold the rest into [other]. Returns the groups and how many were folded."""
    rows, folded = sum_mappings(snap, max_series)
    return ({key: {"anon": a, "file": f, "shmem": s, "virtual": v, "faults": 0}
             for key, (a, f, s, v) in rows}, folded)
