"""Fixtures and hooks of the root tests (the harness itself: tests/root/harness.py).

The tests of accuracy/, cli/ and exporter/ (memtrace attached with BPF) are marked
``root`` here and skipped, with the reason, without root or the BCC Python bindings.
heap/ and deploy/ mark and skip their own tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.root.harness import (
    ORACLE,
    AccuracyHarness,
    Workloads,
    build_workloads,
    ran_accuracy_checks,
    skip_reason,
    totals_source,
)

HERE = Path(__file__).resolve().parent
# the directories whose tests need root and BCC (tests/integration before)
BPF_DIRS = tuple(HERE / d for d in ("accuracy", "cli", "exporter"))


def pytest_configure(config):
    config.addinivalue_line("markers", "root: needs root and BCC (eBPF); memtrace accuracy tests")


def pytest_report_header(config):
    if skip_reason() is None:
        return f"memtrace accuracy: {totals_source()}"
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if ran_accuracy_checks():
        terminalreporter.write_line(f"memtrace accuracy: {totals_source()}")


def pytest_collection_modifyitems(config, items):
    reason = None
    checked = False
    for item in items:
        path = Path(str(getattr(item, "path", item.fspath))).resolve()
        if not any(d in path.parents for d in BPF_DIRS):
            continue
        item.add_marker(pytest.mark.root)
        if not checked:
            reason, checked = skip_reason(), True
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def workloads(tmp_path_factory) -> Workloads:
    return build_workloads(tmp_path_factory.mktemp("workloads"))


@pytest.fixture
def harness(tmp_path):
    h = AccuracyHarness(tmp_path)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def oracle_harness(tmp_path):
    """The same harness, with smaps_oracle.py standing in for memtrace."""
    h = AccuracyHarness(tmp_path, memtrace_cmd=ORACLE)
    try:
        yield h
    finally:
        h.close()
