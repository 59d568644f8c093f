"""--malloc on the command line: what is refused, with one line and its code."""

from __future__ import annotations

import os

from tests.unit.test_cli import assert_one_line_error, memtrace


def test_watch_refuses_malloc_and_says_to_use_run():
    r = memtrace("watch", "--malloc", str(os.getpid()))
    assert_one_line_error(r, 2, "use memtrace run --malloc -- CMD")


def test_malloc_output_needs_malloc():
    assert_one_line_error(memtrace("run", "--malloc-output", "/tmp/x", "--", "true"), 2,
                          "--malloc-output needs --malloc")


def test_malloc_period_is_bounded():
    assert_one_line_error(memtrace("run", "--malloc", "--malloc-period", "2G", "--", "true"),
                          2, "--malloc-period")
