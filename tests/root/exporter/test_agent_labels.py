"""The agent's labels on a live system (issue 11; root): a process in a cgroup
named as the kubelet names a container's (cgroupfs driver) carries its
container_id and pod_uid, one outside any container carries empty values, and
--group-by group labels series with the rule's NAME (not its regex)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.root.harness import TIMEOUT_SCALE

from .test_listen import SERVING, _Watch

READY_TIMEOUT = 90.0 * TIMEOUT_SCALE


def _cgroup2_root() -> Path | None:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2" and os.access(fields[1], os.W_OK):
            return Path(fields[1])
    return None


def test_container_labels_and_named_group(tmp_path):
    root = _cgroup2_root()
    if root is None:
        pytest.skip("no writable cgroup2 mount")
    pod, cid = str(uuid.uuid4()), os.urandom(32).hex()
    tag = os.urandom(3).hex()
    comm = f"mtnap{tag}"                               # unique: no other process matches
    exe = tmp_path / comm
    shutil.copy("/bin/sleep", exe)
    group_dir = root / f"mt-test-{tag}" / "kubepods" / "burstable" / f"pod{pod}" / cid
    group_dir.mkdir(parents=True)
    inside = outside = None
    agent = None
    try:
        inside = subprocess.Popen([str(exe), "600"])
        (group_dir / "cgroup.procs").write_text(str(inside.pid))
        outside = subprocess.Popen([str(exe), "600"])
        agent = _Watch("--comm", f"naps=^{comm}$", "--group-by", "group",
                       "--web.listen-address", "127.0.0.1:0", "--interval", "0.2",
                       "--pss-interval", "0", "--heap-interval", "0", command="agent")
        url = agent.wait_for(SERVING).group(1)
        agent.wait_for(re.compile(r"watching 2 process"))
        assert any(f"attached to pid {inside.pid} ({comm}, naps)" in line
                   for line in agent.lines), agent.lines
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            with urllib.request.urlopen(url, timeout=10) as r:
                text = r.read().decode()
            rows = {tuple(sorted(s.labels.items()))
                    for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "memtrace_process_virtual_bytes"}
            if len(rows) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert rows == {
            (("comm", comm), ("container_id", cid), ("group", "naps"), ("pod_uid", pod)),
            (("comm", comm), ("container_id", ""), ("group", "naps"), ("pod_uid", "")),
        }, rows
        assert agent.stop() == 0
    finally:
        if agent is not None and agent.proc.poll() is None:
            agent.proc.kill()
        for p in (inside, outside):
            if p is not None:
                p.kill()
                p.wait()
        for d in (group_dir, *list(group_dir.parents)[:4]):
            with contextlib.suppress(OSError):
                d.rmdir()
