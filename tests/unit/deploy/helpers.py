"""Shared by the deploy/ tests: paths, the metric-name contract, a PromQL metric-name
extractor, a unit-file parser and tool lookup."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"

# The metric names that dashboards and alerts may use (docs/metrics.md).
CONTRACT_METRICS = frozenset({
    "memtrace_process_resident_bytes",
    "memtrace_process_virtual_bytes",
    "memtrace_mapping_resident_bytes",
    "memtrace_mapping_virtual_bytes",
    "memtrace_page_faults_total",
    "memtrace_syscalls_total",
    "memtrace_syscall_bytes_total",
    "memtrace_drift_bytes",
    "memtrace_targets",
    "memtrace_events_lost_total",
    "memtrace_full_rescans_total",
    "memtrace_tick_duration_seconds",
    "memtrace_attach_duration_seconds",
    "memtrace_mapping_series_folded_total",
    "memtrace_targets_dropped_total",
    "memtrace_scrape_build_seconds",
    "memtrace_build_info",
    "memtrace_process_pss_bytes",
    "memtrace_process_uss_bytes",
    "memtrace_mapping_pss_bytes",
    "memtrace_mapping_uss_bytes",
    "memtrace_heap_in_use_bytes",
    "memtrace_heap_free_resident_bytes",
    "memtrace_heap_trimmable_bytes",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
})
KINDS = frozenset({"library", "executable", "heap", "stack", "anon", "file", "shmem",
                   "special", "other"})
DEFAULT_PORT = 9877

_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan", "atan2",
})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions,
    keywords, label names or values, durations or numbers."""
    s = _STRING.sub('""', expr)
    s = _BRACES.sub("{}", s)
    s = _BRACKETS.sub("[]", s)
    s = _GROUPING.sub(" ", s)
    names = set()
    for m in _IDENT.finditer(s):
        name = m.group(1)
        rest = s[m.end():].lstrip()
        if rest.startswith("(") or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def parse_unit(path: Path) -> list[tuple[str, str, str]]:
    """A systemd unit file as (section, key, value) in order; repeated keys stay
    repeated (configparser cannot keep them), continuation lines are joined."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not a key=value line: {line!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(entries: list[tuple[str, str, str]], section: str, key: str) -> list[str]:
    return [v for s, k, v in entries if s == section and k == key]


def unit_capabilities(path: Path) -> set[str]:
    caps = unit_values(parse_unit(path), "Service", "CapabilityBoundingSet")
    assert len(caps) == 1, "one CapabilityBoundingSet= line expected"
    return set(caps[0].split())


def tool(name: str, why: str) -> str:
    """The path of a command-line tool, or skip the test saying how to get it."""
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} not installed ({why}; scripts/setup.sh installs it)")
    return path
