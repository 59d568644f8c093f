"""The `memtrace: ...` lines on stderr: notes (attach, detach, PSS off, output
dropped), warnings (`log("warning: ...")`) and, with MEMTRACE_DEBUG set in the
environment (any non-empty value), debug lines. One line each, flushed at once;
stderr is looked up at every call, so a redirected or captured stderr is used."""

from __future__ import annotations

import os
import sys

DEBUG = bool(os.environ.get("MEMTRACE_DEBUG"))


def log(text: str) -> None:
    """`memtrace: TEXT` on stderr."""
    print(f"memtrace: {text}", file=sys.stderr, flush=True)


def debug(text: str) -> None:
    """`memtrace: debug: TEXT` on stderr when MEMTRACE_DEBUG is set."""
    if DEBUG:
        log(f"debug: {text}")
