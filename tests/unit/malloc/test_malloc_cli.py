"""--malloc on the command line: what is refused, with one line and its code."""

from __future__ import annotations

from tests.unit.test_cli import assert_one_line_error, memtrace


def test_watch_malloc_of_a_missing_pid_is_one_line():
    r = memtrace("watch", "--malloc", "4194304")      # above pid_max's ceiling
    assert_one_line_error(r, 6, "4194304")


def test_malloc_output_needs_malloc():
    assert_one_line_error(memtrace("run", "--malloc-output", "/tmp/x", "--", "true"), 2,
                          "--malloc-output needs --malloc")


def test_malloc_period_is_bounded():
    assert_one_line_error(memtrace("run", "--malloc", "--malloc-period", "2G", "--", "true"),
                          2, "--malloc-period")
