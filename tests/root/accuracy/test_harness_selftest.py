"""The harness against smaps_oracle.py (exact by construction): if these fail,
the harness or the workloads are broken, not memtrace."""

from __future__ import annotations

import pytest

from tests.root.harness import ORACLE, AccuracyHarness

from .test_accuracy import PHASES, _argv

pytestmark = [pytest.mark.root]


def test_oracle_watch_fork(oracle_harness, workloads, tmp_path):
    result = oracle_harness.watch(_argv(workloads, tmp_path, "fork"), label="oracle: fork")
    result.assert_accurate()
    parent = result.main_pid
    assert result.phases(parent) == ["start"] + PHASES["fork"]
    assert len({c.pid for c in result.checks}) == 2


def test_oracle_watch_filemap(oracle_harness, workloads, tmp_path):
    result = oracle_harness.watch(_argv(workloads, tmp_path, "filemap"), label="oracle: filemap")
    result.assert_accurate()
    assert result.phases() == ["start"] + PHASES["filemap"]


def test_oracle_run_exit_status(oracle_harness, workloads, tmp_path):
    result = oracle_harness.run(
        _argv(workloads, tmp_path, "exit", ["3"]), label="oracle: exit 3", expect_status=3
    )
    result.assert_accurate()
    assert result.phases() == ["start"] + PHASES["exit"]


def test_harness_detects_a_wrong_tracer(tmp_path, workloads):
    """An oracle skewed by one page in its biggest mapping must fail every
    check, with the mapping named, and the run must still go to the end."""
    h = AccuracyHarness(tmp_path, memtrace_cmd=ORACLE + ["--skew", "4096"])
    try:
        result = h.watch(_argv(workloads, tmp_path, "zeropage"), label="skewed oracle")
    finally:
        h.close()
    assert result.phases() == ["start"] + PHASES["zeropage"]
    assert all(not c.ok for c in result.checks)
    report = result.failure_report()
    assert "rss smaps" in report and "(memtrace +4096 B)" in report
    with pytest.raises(AssertionError):
        result.assert_accurate()
