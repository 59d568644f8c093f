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


def test_malloc_max_rate_is_not_negative():
    assert_one_line_error(memtrace("run", "--malloc", "--malloc-max-rate", "-1", "--", "true"),
                          2, "--malloc-max-rate")


def test_malloc_max_rate_reaches_the_options():
    """The cap rides with the period to the command's sampler (run) or the
    process's (watch); its default is 1,000 samples a second."""
    import click

    from memtrace.commands.options import DEFAULT_MALLOC_MAX_RATE, MallocOptions, malloc_options

    seen: list[MallocOptions | None] = []

    @click.command()
    @malloc_options
    def cmd(malloc_opts: MallocOptions | None) -> None:
        seen.append(malloc_opts)

    cmd.main(["--malloc"], standalone_mode=False)
    cmd.main(["--malloc", "--malloc-max-rate", "0", "--malloc-period", "64K"],
             standalone_mode=False)
    cmd.main([], standalone_mode=False)
    assert seen == [MallocOptions(512 << 10, None, DEFAULT_MALLOC_MAX_RATE),
                    MallocOptions(64 << 10, None, 0), None]
    assert DEFAULT_MALLOC_MAX_RATE == 1_000
