"""Options for every test directory (see tests/golden.py)."""

from __future__ import annotations

import os
import signal

import pytest

from tests.golden import ENV


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the golden files (tests/unit/**/golden/) from the current "
                          f"output instead of comparing with them (same as {ENV}=1)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--update-golden"):
        os.environ[ENV] = "1"
    _untangle_inherited_ignores()


def _untangle_inherited_ignores() -> None:
    """The suite started in the background of a non-interactive shell (`cmd &`
    in a script, without job control) inherits SIGINT and SIGQUIT ignored,
    and so would every memtrace it starts: `run` keeps an ignored signal
    ignored for itself and its command (nohup's contract, tested on its own
    with SIGHUP), so the SIGINT tests saw nothing happen. The tests mean
    memtrace as started from a terminal: children get the default actions."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
