"""The CI gate of `run` (issue 14, done-when 3) on tests/workloads/leakrate.c:

- a program leaking 1 MiB/s (touched [heap] pages) fails `--max-growth
  20MiB/min` (and a small --max-rss) with exit 17, a line naming [heap] and
  when, and a JUnit file that parses with the failures in it;
- a steady program passes, and `run` exits with its own status (3 here), which
  the JUnit and JSON results carry too.
"""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.root.harness import MEMTRACE, REPO_ROOT, TIMEOUT_SCALE, WORKLOADS_DIR, c_compiler

TIMEOUT = 180.0 * TIMEOUT_SCALE     # BCC compiles the program on a loaded machine
QUIET = ["--format", "none", "--no-serve", "--heap-interval", "0", "--interval", "0.5"]
GROWTH = ["--max-growth", "20MiB/min", "--growth-window", "6", "--warm-up", "2"]


@pytest.fixture(scope="module")
def leakrate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gate") / "leakrate"
    subprocess.run([c_compiler(), "-O1", "-o", str(out), str(WORKLOADS_DIR / "leakrate.c")],
                   check=True)
    return out


def memtrace(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MEMTRACE, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))


def junit(path: Path) -> ET.Element:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    [suite] = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert int(suite.get("tests", "-1")) == len(cases) > 0
    assert int(suite.get("failures", "-1")) == sum(c.find("failure") is not None for c in cases)
    return suite


def test_a_leak_of_1_mib_per_second_fails_the_growth_budget(leakrate, tmp_path):
    j, res = tmp_path / "gate.xml", tmp_path / "gate.json"
    r = memtrace("run", *QUIET, "--pss-interval", "0", *GROWTH, "--max-rss", "6MiB",
                 "--junit", str(j), "--results", str(res), "--", str(leakrate), "12", "1024", "0")
    assert r.returncode == 17, r.stderr
    assert "held 12582912 bytes" in r.stdout          # the command ran to its end
    growth = [ln for ln in r.stderr.splitlines() if "budget: rss growth" in ln]
    assert growth and "[heap]" in growth[0], r.stderr
    rss = [ln for ln in r.stderr.splitlines() if "budget: rss " in ln and "> 6.0 MiB" in ln]
    assert rss and "[heap]" in rss[0] and " at " in rss[0], r.stderr
    suite = junit(j)
    assert suite.get("failures") == "2"
    failures = [c.find("failure") for c in suite.findall("testcase")]
    assert all(f is not None and "[heap]" in f.get("message", "") for f in failures)
    doc = json.loads(res.read_text())
    assert doc["exit_code"] == 17 and not doc["passed"] and doc["command_exit_status"] == 0
    [g] = [b for b in doc["budgets"] if b["budget"] == "max-growth"]
    # 1 MiB/s leaked: the fitted slope is close to it (ticks and the first
    # page-ins of malloc's arena blur it a little)
    assert 0.7 * (1 << 20) <= g["breach"]["value"] <= 1.3 * (1 << 20), g
    assert g["breach"]["grew"][0]["mapping"] == "[heap]"


def test_a_steady_program_passes_with_its_own_status(leakrate, tmp_path):
    j, res = tmp_path / "gate.xml", tmp_path / "gate.json"
    r = memtrace("run", *QUIET, "--pss-interval", "1", *GROWTH, "--max-rss", "512MiB",
                 "--max-pss", "512MiB", "--junit", str(j), "--results", str(res), "--",
                 str(leakrate), "10", "0", "3")
    assert r.returncode == 3, r.stderr
    assert "budget:" not in r.stderr, r.stderr
    suite = junit(j)
    assert suite.get("failures") == "0"
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["command_exit_status"] == "3"
    doc = json.loads(res.read_text())
    assert doc["passed"] and doc["exit_code"] == 3 and doc["command_exit_status"] == 3
    status = {b["budget"]: b["status"] for b in doc["budgets"]}
    assert status == {"max-rss": "passed", "max-pss": "passed", "max-growth": "passed"}, doc
    [g] = [b for b in doc["budgets"] if b["budget"] == "max-growth"]
    assert abs(g["worst"]) < (20 << 20) / 60 / 4, g     # far below the budget


def test_fail_fast_stops_the_command(leakrate, tmp_path):
    r = memtrace("run", *QUIET, "--pss-interval", "0", "--max-rss", "6MiB", "--fail-fast",
                 "--", str(leakrate), "30", "1024", "0")
    assert r.returncode == 17, r.stderr
    assert "--fail-fast: SIGTERM" in r.stderr and "exited with status 143" in r.stderr


def test_the_budget_is_on_the_tree(leakrate, tmp_path):
    """A shell that runs the leaker as its child: the tree's total (the shell
    holds little) breaks --max-rss, and the line names the child's [heap]."""
    res = tmp_path / "gate.json"
    r = memtrace("run", *QUIET, "--pss-interval", "0", "--max-rss", "8MiB", "--results",
                 str(res), "--", "/bin/sh", "-c", f"{leakrate} 8 1024 0; exit 5")
    assert r.returncode == 17, r.stderr
    assert "following pid" in r.stderr
    doc = json.loads(res.read_text())
    [b] = doc["budgets"]
    assert b["status"] == "failed" and b["breach"]["grew"][0]["mapping"] == "[heap]"
    assert doc["command_exit_status"] == 5


def _recording(leakrate: Path, tmp_path: Path, name: str, rate_kib: int) -> Path:
    """A recording of a real run: `run --format json --changed-only` lines are
    the recording's snapshot lines (docs/recording.md); the header and end line
    are added here, as memtrace.record.writer writes them (`record` is not
    part of this branch)."""
    from memtrace.record.writer import make_header

    jsonl = tmp_path / f"{name}.jsonl"
    r = memtrace("run", "--format", "json", "--changed-only", "--full-every", "10", "-o",
                 str(jsonl), "--no-serve", "--heap-interval", "0", "--interval", "0.5",
                 "--", str(leakrate), "6", str(rate_kib), "0")
    assert r.returncode == 0, r.stderr
    header = make_header("run", 0.5, command=[str(leakrate)], full_every=10)
    out = tmp_path / f"{name}.mtrace"
    out.write_text(json.dumps(header) + "\n" + jsonl.read_text()
                   + json.dumps({"end": {"ts": 0, "snapshots": 0, "dropped": 0}}) + "\n")
    return out


def test_check_and_diff_on_real_recordings(leakrate, tmp_path):
    base = _recording(leakrate, tmp_path, "base", 256)       # 1.5 MiB in 6 s
    new = _recording(leakrate, tmp_path, "new", 1024)        # 6 MiB in 6 s
    j = tmp_path / "check.xml"
    r = memtrace("check", str(new), "--baseline", str(base), "--junit", str(j))
    assert r.returncode == 17, r.stderr
    assert "budget: tree RSS peak" in r.stderr and "budget: process leakrate" in r.stderr
    assert "libc.so.6" not in r.stderr                       # libraries did not grow
    assert junit(j).get("failures") == "3"                   # tree RSS, PSS, process
    r = memtrace("check", str(base), "--baseline", str(base))
    assert r.returncode == 0, r.stderr
    r = memtrace("diff", "--format", "json", str(base), str(new))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    top = doc["mappings"][0]
    assert top["name"] == "[heap]" and 3 << 20 <= top["delta_peak_bytes"] <= 6 << 20, top
    r = memtrace("diff", str(base), str(new))
    assert max(len(ln) for ln in r.stdout.splitlines()) <= 80
