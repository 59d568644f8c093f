"""`memtrace heap PID`: the glibc malloc anatomy of one process (memtrace/heap/),
printed as a table or as the JSON report, and the exit code when it cannot be read;
the command and its options."""

from __future__ import annotations

import errno
import functools
import json
from typing import Any

import click

from memtrace.commands.oneshot import echo
from memtrace.commands.options import EXIT_CODES_HELP
from memtrace.errors import ExitCode, MemtraceError
from memtrace.trace.procfs import ProcFS
from memtrace.util.units import fmt_bytes


def render_table(report: dict[str, Any], exact: bool = False) -> str:
    """The table of `memtrace heap`; exact: byte counts (--bytes) instead of
    IEC units (the verdict keeps its units)."""

    human = functools.partial(fmt_bytes, exact=exact)   # sizes in the table

    head = f"{report.get('comm') or ''} (pid {report['pid']})".strip()
    if not report.get("supported"):
        return f"{head}: allocator {report.get('allocator')}: {report.get('reason')}"
    lines = [f"{head}: glibc {report['glibc_version']} malloc, {len(report['arenas'])} "
             f"arena heap(s)"
             + (f"; paused {report['pause_seconds'] * 1000:.1f} ms" if report["stopped"]
                and report["pause_seconds"] is not None else "")]
    cols = ["arena", "start", "size", "resident", "in use", "free", "free res", "cached",
            "top", "top res", "pinned", "trimmable"]
    rows = []
    for a in report["arenas"]:
        rows.append([a["kind"], f"{a['start']:#x}", human(a["size_bytes"]),
                     human(a["resident_bytes"]), human(a["in_use_bytes"]),
                     human(a["free_bytes"]), human(a["free_resident_bytes"]),
                     human(a["cached_bytes"]), human(a["top_chunk_bytes"]),
                     human(a["top_resident_bytes"]),
                     (f"yes ({a['pin_bytes']} B)" if a["top_pinned"] else "no"),
                     human(a["trimmable_bytes"])])
    if len(rows) > 1:
        t = report["totals"]
        rows.append(["total", "", human(t["size_bytes"]), human(t["resident_bytes"]),
                     human(t["in_use_bytes"]), human(t["free_bytes"]),
                     human(t["free_resident_bytes"]), human(t["cached_bytes"]),
                     human(t["top_chunk_bytes"]), human(t["top_resident_bytes"]), "",
                     human(t["trimmable_bytes"])])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(cols)]
    fmt = "  ".join(("{:<" if i < 2 else "{:>") + f"{w}}}" for i, w in enumerate(widths))
    lines.append(fmt.format(*cols))
    lines += [fmt.format(*r) for r in rows]
    t = report["totals"]
    mm = report["mmapped"]
    thr = mm["threshold_bytes"]
    lines.append(
        f"chunks: {t['in_use_chunks']} in use (header overhead {human(t['header_overhead_bytes'])}"
        f"), {t['free_chunks']} free ({human(t['cached_bytes'])} cached in tcache/fastbins)")
    lines.append(
        f"malloc's own in-use count (mallinfo2().uordblks): "
        f"{human(t['malloc_in_use_bytes'])}, more than 'in use' by the "
        f"{human(t['tcache_bytes'])} cached in tcaches (free to the program, allocated "
        f"to the arena) and {human(t['arena_overhead_bytes'])} of thread-heap headers")
    lines.append(
        f"own mmap: {mm['count']} allocation(s), {human(mm['bytes'])} "
        f"({human(mm['resident_bytes'])} resident); threshold "
        + (f"{human(thr)}{' (dynamic)' if mm['threshold_dynamic'] else ' (fixed)'}"
           if thr is not None else "unknown"))
    hist: dict[int, list[int]] = {}
    for a in report["arenas"]:
        for b in a["free_histogram"]:
            h = hist.setdefault(b["min_bytes"], [0, 0])
            h[0] += b["chunks"]
            h[1] += b["bytes"]
    if hist:
        lines.append("free chunks by size: " + ", ".join(
            f"{human(k)}+: {v[0]} ({human(v[1])})" for k, v in sorted(hist.items())))
    lines.append(f"verdict: {report['verdict']}")
    return "\n".join(lines)


def heap_command(pid: int, fmt: str, stop: bool, retries: int, exact: bool = False) -> str:
    """What `memtrace heap` prints; MemtraceError (with its exit code) otherwise."""
    # imported here: the walker's modules are not needed by the other commands
    from memtrace.heap.layout import HeapError
    from memtrace.heap.process import analyse_process

    st = ProcFS().check_target(pid)
    try:
        report = analyse_process(pid, stop=stop, retries=retries, comm=st.comm)
    except HeapError as e:
        if e.kind == "gone":
            raise MemtraceError(f"no such process: {pid} (it exited)",
                                ExitCode.NO_SUCH_PROCESS) from None
        raise MemtraceError(e.message, ExitCode.HEAP_UNREADABLE) from None
    except PermissionError as e:
        raise MemtraceError(f"cannot read the memory of {pid}: {e.strerror} (memtrace heap "
                            "needs root, or CAP_SYS_PTRACE)", ExitCode.NOT_ROOT) from None
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            raise MemtraceError(f"cannot read the memory of {pid}: {e.strerror} (memtrace "
                                "heap needs root, or CAP_SYS_PTRACE)", ExitCode.NOT_ROOT) from None
        raise
    if fmt == "json":
        return json.dumps(report)
    return render_table(report, exact)


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("pid", type=int)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Table, or one JSON object (see docs/heap.md).")
@click.option("--stop", is_flag=True, help="SIGSTOP the process for an exact snapshot "
              "(SIGCONT always follows; the pause is reported).")
@click.option("--retries", type=click.IntRange(min=0, max=1000), default=5, show_default=True,
              help="Walks to retry when the heap changes under the walk (with --stop: "
              "snapshots to take again when a thread was stopped inside malloc).")
@click.option("--bytes", "exact", is_flag=True,
              help="Exact byte counts in the table instead of KiB/MiB/GiB.")
def heap(pid: int, fmt: str, stop: bool, retries: int, exact: bool) -> None:
    """Why memory is not given back: anatomy of a process's glibc malloc heap
    (in use, free, resident holes, what malloc_trim(0) would return)."""
    echo(heap_command(pid, fmt, stop, retries, exact))
