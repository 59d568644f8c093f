"""What the one-shot commands (heap, libs, explain, doctor) share: printing
their whole output at once."""

from __future__ import annotations

import sys

import click


def echo(text: str) -> None:
    """Print a one-shot command's output (heap, libs, explain, doctor); a write
    error is an OutputError (exit 14; quiet for a closed pipe)."""
    from memtrace.views.output import output_error

    try:
        click.echo(text)
        sys.stdout.flush()
    except OSError as e:
        raise output_error(e, "stdout") from None
