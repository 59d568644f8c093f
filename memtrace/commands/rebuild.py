"""`memtrace rebuild`: whole snapshots from JSON Lines written with --changed-only
(memtrace.views.jsonl.full_snapshots; docs/output.md)."""

from __future__ import annotations

import json
import sys
from typing import IO

import click

from memtrace.commands.options import EXIT_CODES_HELP
from memtrace.errors import ExitCode, MemtraceError


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("file", type=click.File("rb"), default="-", required=False)
def rebuild(file: IO[bytes]) -> None:
    """Whole snapshots from JSON Lines written by `watch` or `run` with --changed-only
    (FILE, or stdin): each line as the same command would have written it without
    --changed-only. Whole lines pass through. The input must start at a whole
    snapshot of each process (its first line, or one written by --full-every)."""
    from memtrace.views.jsonl import full_snapshots

    out = sys.stdout
    try:
        for snap in full_snapshots(line for line in file if line.strip()):
            out.write(json.dumps(snap, separators=(",", ":")))
            out.write("\n")
    except KeyError as e:
        raise MemtraceError(f"a changes-only line of pid {e.args[0]} comes before any "
                            "whole snapshot of it", ExitCode.USAGE) from None
    except (ValueError, TypeError) as e:
        raise MemtraceError(f"not memtrace JSON Lines: {e}", ExitCode.USAGE) from None
