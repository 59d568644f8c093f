"""`memtrace report RECORDING`: the HTML page (or JSON) of a recording
(memtrace/reports/; docs/report.md)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import TYPE_CHECKING

import click

from memtrace.commands.options import EXIT_CODES_HELP
from memtrace.errors import ExitCode, MemtraceError, OutputError
from memtrace.util.log import log

if TYPE_CHECKING:
    from memtrace.reports.diff import RunDiff


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("recording", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), default="-",
              show_default=True, help="Write the report to this file (- : stdout). The "
              "file is written whole, then renamed into place.")
@click.option("--format", "fmt", type=click.Choice(["html", "json", "perfetto"]),
              default="html", show_default=True, help="html: one self-contained page "
              "(charts, tables, the flame graph at the peak; no network); json: the same "
              "content for scripts, time series included; perfetto: the time series as "
              "Chrome trace-event JSON (counters by kind, totals, calls; library loads), "
              "which ui.perfetto.dev and chrome://tracing open.")
@click.option("--max-points", type=click.IntRange(0, 10_000_000), default=None,
              help="Points per time series: longer series keep, per stretch of time, "
              "their lowest and highest ticks (the peak is always exact). 0 = every "
              "snapshot. [default: 2000 for html, 0 for json]")
@click.option("--baseline", type=click.Path(dir_okay=False), default=None,
              help="A recording of an earlier run: the report gains a section comparing "
              "both runs side by side (as `memtrace diff BASELINE RECORDING`: mappings, "
              "libraries, stacks and processes at their peaks and ends); JSON: `diff`.")
def report(recording: str, output: str, fmt: str, max_points: int | None,
           baseline: str | None) -> None:
    """A report of a recording (.mtrace): resident memory over time by kind and
    library (RSS, PSS, USS), the glibc heap, what grew most, the libraries, the
    peak snapshot and the flame graph at the peak when stacks were recorded;
    one section per process and their total.

    A recording cut short (a recorder killed) is reported up to its last whole
    line, with a warning (exit 0); a corrupt one up to the corrupt line, then
    exit 16. A file that is not a recording: exit 16."""
    from memtrace.record.reader import open_recording
    from memtrace.reports.build import DEFAULT_MAX_POINTS, build_report

    if max_points is None:
        max_points = DEFAULT_MAX_POINTS if fmt == "html" else 0
    if baseline and fmt == "perfetto":
        raise MemtraceError("--baseline needs --format html or json", ExitCode.USAGE)
    from memtrace.reports.recstacks import RecordedStacks

    rec = open_recording(recording)
    data = build_report(rec, max_points=max_points, stacks=RecordedStacks(rec))
    compared = _diff(baseline, recording) if baseline else None
    if fmt == "perfetto":
        from memtrace.reports.perfetto import trace_events
        text = json.dumps(trace_events(data), separators=(",", ":"), allow_nan=False) + "\n"
    elif fmt == "json":
        if compared is not None:
            data["diff"] = compared.as_dict()
        text = json.dumps(data, separators=(",", ":"), allow_nan=False) + "\n"
    else:
        from memtrace.reports.html import render_html
        extra = []
        if compared is not None:
            from memtrace.reports.diffhtml import render_diff_section
            section = render_diff_section(compared)
            extra.append(lambda _report: section)
        text = render_html(data, extra=extra)
    write_whole(output, text)
    if rec.problem and rec.corrupt:
        raise MemtraceError(f"{rec.problem} (report written from the part before it)",
                            ExitCode.RECORDING_UNREADABLE)
    if rec.problem:
        log(f"warning: {rec.problem}")


def _diff(baseline: str, recording: str) -> RunDiff:
    """`memtrace diff BASELINE RECORDING`'s comparison; a baseline cut short or
    corrupt is compared up to there, with a warning."""
    from memtrace.reports.diff import diff_profiles
    from memtrace.reports.profile import build_profile

    base = build_profile(baseline)
    if base.problem:
        log(f"warning: baseline: {base.problem}")
    return diff_profiles(base, build_profile(recording))


def write_whole(path: str, text: str) -> None:
    """`text` to stdout, or to `path` through a temporary file renamed into
    place (a failed write leaves no half report); OutputError when it fails."""
    if path == "-":
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except OSError as e:
            raise OutputError(f"cannot write stdout: {e.strerror or e}") from None
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
