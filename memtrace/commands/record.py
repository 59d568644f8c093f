"""`memtrace record -o run.mtrace -- CMD`: `run` with a recording and no live
view by default. Its options are run's own (taken from the `run` command, so
that an option added to run is one of record's too), except that -o names the
recording (run's -o, the view's file, is left out: a view asked for with
--format goes to stdout) and --format defaults to none: stderr has what run
says (attach, exits, the summary), the recording has the rest."""

from __future__ import annotations

import copy
import os
import re
import time
from typing import Any

import click

from memtrace.commands.options import EXIT_CODES_HELP
from memtrace.commands.run import run
from memtrace.record.format import SUFFIX

# run's parameters record does not take: the view's -o (record's -o is the
# recording) and --record itself
_LEFT_OUT = ("output", "record")


def default_recording_name(command: tuple[str, ...], now: float | None = None) -> str:
    """memtrace-PROG-YYYYmmdd-HHMMSS.mtrace, in the current directory."""
    prog = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(command[0]))[:40] or "cmd"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"memtrace-{prog}-{stamp}{SUFFIX}"


def _params() -> list[click.Parameter]:
    out: list[click.Parameter] = [click.Option(
        ["-o", "--output", "recording"], type=click.Path(dir_okay=False), default=None,
        help="The recording (created or truncated). Default: "
        "memtrace-PROG-YYYYmmdd-HHMMSS.mtrace in the current directory, named on stderr.")]
    for p in run.params:
        if p.name in _LEFT_OUT:
            continue
        if p.name == "fmt":
            p = copy.copy(p)
            p.default = "none"
            assert isinstance(p, click.Option)
            p.help = ("Live view while recording: none (default: stderr lines and the "
                      "summary only), table, or JSON Lines on stdout.")
        out.append(p)
    return out


def _record(recording: str | None, **kwargs: Any) -> None:
    ctx = click.get_current_context()
    path = default_recording_name(kwargs["command"]) if recording is None else recording
    ctx.meta["record"] = path
    ctx.invoke(run.callback, output=None, **kwargs)       # type: ignore[arg-type]


record = click.Command(
    "record", callback=_record, params=_params(), epilog=EXIT_CODES_HELP,
    short_help="Run COMMAND and write a recording of it (.mtrace).",
    help="""Run COMMAND traced, as `memtrace run` does, and write a recording of
what memtrace saw to -o FILE (.mtrace, docs/recording.md): every snapshot of
every process of its tree (changed mappings only between whole ones), messages,
the summary, and with --stacks the stack profile. No live view unless --format
asks for one; the summary is on stderr. Exits with the command's status.

Put -- before the command: memtrace record -o run.mtrace -- ./server --port 8080

The recording (gzip-compressed JSON Lines, flushed every tick) is safe to kill
at any time: it reads up to its last whole tick (memtrace report, diff, check;
zcat). A full disk stops the recording with one error (exit 14, after the
command exits); the file reads up to it.""")
