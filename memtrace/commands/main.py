"""Command line: memtrace watch | run | record | agent | heap | libs | explain |
doctor | rebuild | report | check | diff.

The top-level group gets each subcommand from its module (memtrace/commands/);
main() runs it and turns what fails into one line on stderr and the exit code
that says why (docs/exit-codes.md)."""

from __future__ import annotations

import contextlib
import errno
import os
import sys

import click

from memtrace import __version__
from memtrace.commands.agent import agent
from memtrace.commands.check import check
from memtrace.commands.diff import diff
from memtrace.commands.doctor import doctor
from memtrace.commands.explain import explain
from memtrace.commands.heap import heap
from memtrace.commands.libs import libs
from memtrace.commands.options import EXIT_CODES_HELP
from memtrace.commands.rebuild import rebuild
from memtrace.commands.record import record
from memtrace.commands.report import report
from memtrace.commands.run import run
from memtrace.commands.watch import watch
from memtrace.errors import ExitCode, MemtraceError, OutputError
from memtrace.util.log import log


@click.group(epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]},
             commands=[watch, run, record, agent, heap, libs, explain, doctor, rebuild,
                       report, check, diff])
@click.version_option(__version__, prog_name="memtrace")
def cli() -> None:
    """Exact per-mapping resident memory of processes, from eBPF events."""


def _silence_stdout() -> None:
    """After an output failure: nothing more reaches fd 1 (Python's flush at
    exit would fail again and turn the exit code into 120)."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)


def _usage_line(e: click.ClickException) -> str:
    """A click error as one line: the message and where to find help."""
    message = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"memtrace: error: {message}{where}"


_OUTPUT_ERRNOS = {errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def main() -> None:
    try:
        cli.main(prog_name="memtrace", standalone_mode=False)
        sys.stdout.flush()
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        print(_usage_line(e), file=sys.stderr)
        sys.exit(ExitCode.USAGE)
    except OutputError as e:
        _silence_stdout()
        if not e.quiet:
            log(f"error: {e.message}")
        sys.exit(e.code)
    except MemtraceError as e:
        log(f"error: {e.message}")
        sys.exit(e.code)
    except OSError as e:
        # click's own output (--help, --version) to a closed pipe or full disk
        if e.errno not in _OUTPUT_ERRNOS or not _from_click_echo(e):
            raise
        _silence_stdout()
        if e.errno != errno.EPIPE:
            log(f"error: cannot write stdout: {e.strerror}")
        sys.exit(ExitCode.OUTPUT_FAILED)
    except KeyboardInterrupt:
        sys.exit(130)


def _from_click_echo(e: BaseException) -> bool:
    """Whether e was raised writing click's own output (help, version)."""
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "echo" and "click" in code.co_filename:
            return True
        tb = tb.tb_next
    return False
