"""`memtrace explain PID` against the real /proc (root: memtrace's figures come
from an exact scan of the page tables). A stopped process, so statm, status and
the scan all see the same pages.

    sudo .venv/bin/python -m pytest tests/root/cli/test_explain.py -v
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import groundtruth as gt
from tests.root.harness import REPO_ROOT, wait_stopped

pytestmark = [pytest.mark.root]


def test_explain_matches_proc():
    code = "b = bytearray(32 << 20); b[::4096] = b'x' * len(b[::4096]); import time; " \
           "time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGSTOP)
        wait_stopped(proc.pid)
        r = subprocess.run([sys.executable, "-m", "memtrace", "explain", str(proc.pid),
                            "--format", "json"], capture_output=True, text=True,
                           cwd=REPO_ROOT, timeout=60)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        statm = gt.read_statm(proc.pid)
        status = gt.read_status_rss(proc.pid)
        smaps = gt.read_smaps(proc.pid)
        with open("/proc/meminfo") as f:
            total = int(next(x for x in f if x.startswith("MemTotal:")).split()[1]) * 1024
    finally:
        proc.kill()
        proc.wait()
    p = report["process"]
    rows = {x["field"]: x for x in p["rows"]}
    for name in ("size", "resident", "shared", "text", "lib", "data", "dt"):
        assert rows[f"statm {name}"]["bytes"] == statm[f"{name}_bytes"], name
    assert rows["statm resident"]["status_bytes"] == status["vm_rss_bytes"]
    assert rows["statm size"]["status_bytes"] == status["vm_size_bytes"]
    assert rows["statm lib"]["bytes"] == 0 and rows["statm dt"]["bytes"] == 0
    ours = p["memtrace"]
    assert ours is not None, "memtrace's figures missing (not root?)"
    # memtrace's exact scan equals the kernel's counters and smaps
    assert ours["resident"] == statm["resident_bytes"] == sum(m["rss_bytes"] for m in smaps)
    assert ours["shared"] == statm["shared_bytes"]
    assert ours["size"] == statm["size_bytes"]
    assert ours["data"] == status["rss_anon_bytes"] >= 32 << 20
    print(f"\nresident {ours['resident']} B, shared {ours['shared']} B, anon {ours['data']} B "
          f"= statm/status; MemTotal {report['machine']['meminfo']['MemTotal']} B")
    assert report["machine"]["meminfo"]["MemTotal"] == total
    assert report["machine"]["summary"].startswith("machine: RAM ")
