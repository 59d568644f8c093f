"""deploy/systemd: the unit's capability bounding set is enough for memtrace (as root,
with BPF; the checks without root: tests/unit/deploy/test_systemd.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.unit.deploy.helpers import DEPLOY, REPO, tool, unit_capabilities

UNIT = DEPLOY / "systemd" / "memtrace.service"


def bcc_available() -> bool:
    r = subprocess.run([sys.executable, "-c", "import bcc"], capture_output=True, timeout=60)
    return r.returncode == 0


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root and BPF")
def test_capability_bounding_set_is_enough(tmp_path):
    """memtrace, as root with only the unit's capabilities, reads a process owned by
    another user (nobody): the case that needs every one of them."""
    setpriv = tool("setpriv", "Debian package util-linux")
    if not bcc_available():
        pytest.skip("bcc is not importable (python3-bpfcc)")
    bounding = "-all," + ",".join("+" + c.removeprefix("CAP_").lower()
                                  for c in sorted(unit_capabilities(UNIT)))
    target = subprocess.Popen([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                               "sleep", "600"])
    out = tmp_path / "out.jsonl"
    err = tmp_path / "err.txt"
    memtrace = None
    try:
        time.sleep(0.3)
        with out.open("w") as o, err.open("w") as e:
            memtrace = subprocess.Popen(
                [setpriv, "--bounding-set", bounding, "--inh-caps", "-all", "--",
                 sys.executable, "-m", "memtrace", "watch", str(target.pid), "--format",
                 "json", "--no-serve", "--interval", "0.2"],
                stdout=o, stderr=e, cwd=REPO)
        deadline = time.monotonic() + 120  # BCC compiles the programs first
        while time.monotonic() < deadline and memtrace.poll() is None:
            if out.read_text().strip():
                break
            time.sleep(0.2)
        lines = out.read_text().splitlines()
        assert lines, f"no snapshot with bounding set {bounding}: {err.read_text()}"
        snap = json.loads(lines[0])
        assert snap["pid"] == target.pid and snap["rss_bytes"] > 0 and snap["mappings"]
    finally:
        if memtrace and memtrace.poll() is None:
            memtrace.send_signal(signal.SIGTERM)
            try:
                memtrace.wait(30)
            except subprocess.TimeoutExpired:
                memtrace.kill()
                memtrace.wait()
        target.kill()
        target.wait()

