"""memtrace.util.log: the one `memtrace: ...` stderr logger and MEMTRACE_DEBUG."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from memtrace.util import log as log_mod

REPO = Path(__file__).resolve().parents[2]


def test_log_line(capsys):
    log_mod.log("probes loaded")
    log_mod.log("warning: detaching probes: x")
    assert capsys.readouterr().err == ("memtrace: probes loaded\n"
                                       "memtrace: warning: detaching probes: x\n")


def test_debug_follows_memtrace_debug():
    code = "from memtrace.util.log import debug; debug('pid 1 tick 2')"
    for value, want in (("1", "memtrace: debug: pid 1 tick 2\n"), ("", "")):
        env = {k: v for k, v in os.environ.items() if k != "MEMTRACE_DEBUG"}
        env.update(MEMTRACE_DEBUG=value, PYTHONPATH=str(REPO))
        r = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", want)


def test_the_old_loggers_are_gone():
    """session.log, tracker.log_debug, views/output._log: one logger now, and no
    module prints its own `memtrace: ` line but cli's usage line."""
    import re

    for path in (REPO / "memtrace").rglob("*.py"):
        if path.name == "log.py":
            continue
        text = path.read_text()
        assert not re.search(r"def (log|_log|log_debug)\(", text), path
        assert not re.search(r"print\(f?\"memtrace: ", text), path
