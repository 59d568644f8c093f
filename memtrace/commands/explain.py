"""`memtrace explain`: what /proc says about a process's memory, in plain words,
next to memtrace's exact figures (the report itself: memtrace/explain.py)."""

from __future__ import annotations

import time
from typing import Any

import click

from memtrace.commands.oneshot import echo
from memtrace.commands.options import EXIT_CODES_HELP
from memtrace.errors import ExitCode, MemtraceError
from memtrace.trace.procfs import ProcFS


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("pid", type=int, required=False)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Plain text, or one JSON object (docs/explain.md).")
def explain(pid: int | None, fmt: str) -> None:
    """What /proc/PID/statm and status, and /proc/meminfo, say, in plain words, next
    to memtrace's exact figures (a one-shot scan of PID's page tables, as root).
    Without PID: the machine view only."""
    from memtrace.explain import explain as build
    from memtrace.explain import render_json, render_text

    snap = None
    if pid is not None:
        procfs = ProcFS()
        procfs.check_target(pid)
        snap = _one_shot_snapshot(procfs, pid)
    try:
        report = build(pid, procfs.root if pid is not None else "/proc", snap)
    except FileNotFoundError:
        raise MemtraceError(f"no such process: {pid}", ExitCode.NO_SUCH_PROCESS) from None
    echo(render_json(report) if fmt == "json" else render_text(report))


def _one_shot_snapshot(procfs: ProcFS, pid: int) -> dict[str, Any] | None:
    """memtrace's figures without probes: one full scan of the page tables.
    None where that is not allowed (not root) or the process went away."""
    from memtrace.snapshot import snapshot
    from memtrace.trace.tracker import ProcessGone, ProcessTracker

    tracker = ProcessTracker(pid, procfs)
    try:
        tracker.start()
        return snapshot(tracker, time.time())
    except (ProcessGone, OSError):
        return None
    finally:
        tracker.close()
