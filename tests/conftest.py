"""Options for every test directory (see tests/golden.py)."""

from __future__ import annotations

import os

import pytest

from tests.golden import ENV


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the golden files (tests/unit/**/golden/) from the current "
                          f"output instead of comparing with them (same as {ENV}=1)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--update-golden"):
        os.environ[ENV] = "1"
