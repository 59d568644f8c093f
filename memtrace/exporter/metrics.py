"""Every metric family memtrace serves, defined once: name, type, HELP text and label
names. The collector path (prometheus_client) and the text fast path both build
their families from these definitions, and tests/unit/exporter/test_metrics_table.py
checks them against what is served and against docs/metrics.md.

Names, HELP texts and labels are a contract (dashboards and alerts use them): a
change here changes what /metrics shows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def escape_help(text: str) -> str:
    """A HELP text as the text exposition format writes it."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


@dataclass(frozen=True)
class MetricDef:
    """One metric family. `labels` are the label names after the process labels
    when `per_process` (pid or group, comm and, in agent mode, container_id and
    pod_uid: memtrace.exporter.rows.who_of), else all of them."""

    name: str            # a counter's name without "_total" (prometheus_client adds it)
    kind: str            # "gauge" or "counter"
    help: str
    labels: tuple[str, ...] = ()
    per_process: bool = False
    sample: str = field(init=False)   # the name its samples carry
    header: str = field(init=False)   # its "# HELP" and "# TYPE" lines

    def __post_init__(self) -> None:
        sample = self.name + "_total" if self.kind == "counter" else self.name
        object.__setattr__(self, "sample", sample)
        object.__setattr__(self, "header", f"# HELP {sample} {escape_help(self.help)}\n"
                                           f"# TYPE {sample} {self.kind}\n")

    def label_names(self, who: Sequence[str]) -> list[str]:
        """All label names of the family's samples, given the process labels `who`."""
        return [*who, *self.labels] if self.per_process else list(self.labels)


def _gauge(name: str, help_text: str, labels: tuple[str, ...] = (),
           per_process: bool = True) -> MetricDef:
    return MetricDef(name, "gauge", help_text, labels, per_process)


def _counter(name: str, help_text: str, labels: tuple[str, ...] = (),
             per_process: bool = True) -> MetricDef:
    return MetricDef(name, "counter", help_text, labels, per_process)


# ------------------------------------------------ per process (or group): one or more rows each

PROCESS_RESIDENT = _gauge(
    "memtrace_process_resident_bytes",
    "Resident memory of the process by type, exact per page table (equals statm at "
    "quiescent points).", ("type",))
PROCESS_VIRTUAL = _gauge(
    "memtrace_process_virtual_bytes", "Virtual size of the process (sum of its mappings).")
MAPPING_RESIDENT = _gauge(
    "memtrace_mapping_resident_bytes",
    "Resident memory per mapping identity (all segments of one library together) by type.",
    ("mapping", "kind", "type"))
MAPPING_VIRTUAL = _gauge(
    "memtrace_mapping_virtual_bytes", "Virtual size per mapping identity.",
    ("mapping", "kind"))
PAGE_FAULTS = _counter(
    "memtrace_page_faults",
    "Page faults (user and kernel mode) per mapping identity since attach.", ("mapping",))
SYSCALL_COUNT = _counter(
    "memtrace_syscalls", "Address-space system calls since attach.", ("syscall",))
SYSCALL_BYTES = _counter(
    "memtrace_syscall_bytes", "Bytes named by address-space system calls since attach.",
    ("syscall",))
DRIFT = _gauge(
    "memtrace_drift_bytes",
    "memtrace's resident total minus /proc/PID/statm at the last tick (0 when quiescent).")

# The families the text path renders per process and caches (in this order).
ROW_METRICS = (PROCESS_RESIDENT, PROCESS_VIRTUAL, MAPPING_RESIDENT, MAPPING_VIRTUAL,
               PAGE_FAULTS, SYSCALL_COUNT, SYSCALL_BYTES, DRIFT)

# ------------------------------------------------ the kernel's own figures

PROCESS_SWAP = _gauge(
    "memtrace_process_swap_bytes",
    "Swapped-out bytes of the process (smaps Swap summed; needs --pss-interval > 0).")
PROCESS_PEAK = _gauge(
    "memtrace_process_peak_resident_bytes",
    "The kernel's high-water mark of the process's resident size since it started "
    "(VmHWM of /proc/PID/status). Per pid only.")
PROCESS_FAULTS = _counter(
    "memtrace_process_page_faults",
    "The kernel's page fault counters of the process since it started (/proc/PID/stat "
    "minflt, majflt): minor (no I/O) and major (read from disk or swap).", ("fault",))

# ------------------------------------------------ heap (memtrace heap, --heap-interval)

HEAP_IN_USE = _gauge(
    "memtrace_heap_in_use_bytes",
    "Bytes of glibc malloc chunks allocated to the program (headers included; chunks "
    "cached in a tcache or fastbin count as free), per arena kind.", ("arena",))
HEAP_FREE_RESIDENT = _gauge(
    "memtrace_heap_free_resident_bytes",
    "Resident bytes of free glibc malloc chunks (bins, tcaches, fastbins, top chunk): "
    "freed by the program but not given back, per arena kind.", ("arena",))
HEAP_TRIMMABLE = _gauge(
    "memtrace_heap_trimmable_bytes",
    "Resident bytes malloc_trim(0) would give back to the system, per arena kind.",
    ("arena",))
HEAP_WALKS = _counter(
    "memtrace_heap_walks",
    "Background heap walks (--heap-interval) by result: ok, unsupported (not glibc "
    "malloc), failed (unreadable or kept changing), gone.", ("result",), per_process=False)

# ------------------------------------------------ library loads and unloads (libevents)

LIBRARY_LOADS = _counter(
    "memtrace_library_loads",
    "Libraries loaded (dlopen: new mappings of a shared object) since attach.", ("mapping",))
LIBRARY_UNLOADS = _counter(
    "memtrace_library_unloads",
    "Libraries unloaded (every mapping of the object gone) since attach; a dlclose that "
    "leaves the object mapped is not counted.", ("mapping",))
LIBRARY_LOADED_BYTES = _counter(
    "memtrace_library_loaded_bytes",
    "Bytes mapped by library loads (all segments, bss included).", ("mapping",))
LIBRARY_UNLOADED_BYTES = _counter(
    "memtrace_library_unloaded_bytes", "Bytes unmapped by library unloads.", ("mapping",))
LIBRARY_UNLOADED_RESIDENT = _counter(
    "memtrace_library_unloaded_resident_bytes",
    "Resident bytes of libraries at their last tick before unload.", ("mapping",))

# ------------------------------------------------ PSS / USS (livepss, --pss-interval)

PROCESS_PSS = _gauge(
    "memtrace_process_pss_bytes",
    "Proportional set size: each resident page divided by the number of mappings of it "
    "(smaps Pss, in bytes, rounded down).")
PROCESS_USS = _gauge(
    "memtrace_process_uss_bytes",
    "Unique set size: resident pages mapped only once (smaps Private_Clean + "
    "Private_Dirty).")
MAPPING_PSS = _gauge(
    "memtrace_mapping_pss_bytes",
    "Proportional set size per mapping identity (all segments of one library together).",
    ("mapping", "kind"))
MAPPING_USS = _gauge(
    "memtrace_mapping_uss_bytes", "Unique set size per mapping identity.",
    ("mapping", "kind"))

# The PSS/USS families, in this order (the text path caches them per process too).
PSS_METRICS = (PROCESS_PSS, PROCESS_USS, MAPPING_PSS, MAPPING_USS)

# ------------------------------------------------ stacks (--stacks --stacks-series N)

STACK_HELD = _gauge(
    "memtrace_stack_held_bytes",
    "Resident bytes a user call stack holds now in a mapping identity (sampled page "
    "faults net of releases, scaled to the mapping's exact resident bytes); the top "
    "--stacks-series stacks per process. stack: its innermost frames, outermost first.",
    ("mapping", "stack"))
STACK_BROUGHT = _gauge(
    "memtrace_stack_brought_bytes",
    "Estimated bytes a user call stack made resident in a mapping identity since "
    "attach (never netted); the top --stacks-series stacks per process. stack: its "
    "innermost frames, outermost first.", ("mapping", "stack"))

# ------------------------------------------------ memtrace itself

BUILD_INFO = _gauge("memtrace_build_info", "memtrace version.", ("version",),
                    per_process=False)
TARGETS = _gauge("memtrace_targets", "Processes being watched.", per_process=False)
EVENTS_LOST = _counter(
    "memtrace_events_lost",
    "Records that did not fit the BPF ring buffers, counted in the kernel (lost ranges "
    "are repaired by a full rescan).", ("buffer",), per_process=False)
FULL_RESCANS = _counter(
    "memtrace_full_rescans", "Full rescans of an address space, by reason.", ("reason",),
    per_process=False)
TICK_DURATION = _gauge(
    "memtrace_tick_duration_seconds", "Time the last tick took (drain, scans, checks).",
    per_process=False)
ATTACH_DURATION = _gauge(
    "memtrace_attach_duration_seconds",
    "Time from attaching a process to its first snapshot.", ("pid",), per_process=False)
SERIES_FOLDED = _counter(
    "memtrace_mapping_series_folded",
    "Mapping identities folded into [other] by the per-process series cap, summed over "
    "scrapes.", per_process=False)
TARGETS_DROPPED = _counter(
    "memtrace_targets_dropped",
    "Processes not watched because of the cap on watched processes.", per_process=False)
SCRAPE_BUILD = _gauge(
    "memtrace_scrape_build_seconds", "Time to build the metrics of this scrape.",
    per_process=False)

# Every family, in the order a scrape serves them.
METRICS: tuple[MetricDef, ...] = (
    *ROW_METRICS,
    PROCESS_SWAP, PROCESS_PEAK, PROCESS_FAULTS,
    HEAP_IN_USE, HEAP_FREE_RESIDENT, HEAP_TRIMMABLE, HEAP_WALKS,
    LIBRARY_LOADS, LIBRARY_UNLOADS, LIBRARY_LOADED_BYTES, LIBRARY_UNLOADED_BYTES,
    LIBRARY_UNLOADED_RESIDENT,
    *PSS_METRICS,
    STACK_HELD, STACK_BROUGHT,
    BUILD_INFO, TARGETS, EVENTS_LOST, FULL_RESCANS, TICK_DURATION, ATTACH_DURATION,
    SERIES_FOLDED, TARGETS_DROPPED, SCRAPE_BUILD,
)
