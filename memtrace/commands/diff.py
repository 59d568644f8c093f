"""`memtrace diff A B`: which mappings, libraries, stacks and processes changed
between two recorded runs, at their peaks and at their ends (docs/gate.md)."""

from __future__ import annotations

import json

import click

from memtrace.commands.options import EXIT_CODES_HELP
from memtrace.errors import ExitCode
from memtrace.reports.diff import diff_profiles, render_table
from memtrace.reports.profile import RunProfile, build_profile
from memtrace.util.log import log


def _read(path: str, problems: list[str]) -> RunProfile:
    profile = build_profile(path)
    if profile.cut:
        assert profile.problem is not None
        problems.append(profile.problem)
    elif profile.problem:
        log(f"warning: {profile.problem}")
    return profile


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="A table of at most 80 columns, or one JSON object.")
def diff(a: str, b: str, fmt: str) -> None:
    """What changed from recording A to recording B (B - A).

    Each run at its peak (the tick of its largest tree RSS) and at its end (its
    last tick): mappings by identity and kind, libraries, stacks held (with
    --stacks), and process names by their own peak. A recording cut short or
    corrupt is compared up to there, then exit 16."""
    problems: list[str] = []
    d = diff_profiles(_read(a, problems), _read(b, problems))
    if fmt == "json":
        click.echo(json.dumps(d.as_dict(), indent=1))
    else:
        click.echo(render_table(d))
    for problem in problems:
        log(f"error: {problem}")
    if problems:
        raise SystemExit(int(ExitCode.RECORDING_UNREADABLE))
