"""The fault path's per-CPU memory of the last process that was not a target
(bpf/memtrace.bpf.c target_epoch): a process that faulted on a CPU before it
became a target is counted from the moment it is one. Root + BCC only."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.root.harness import skip_reason

pytestmark = [pytest.mark.root]

PAGES = 256
# A Python workload pinned to one CPU: on each line, a fresh anonymous mapping
# of PAGES pages written page by page (PAGES user faults on that CPU).
TOUCHER = f"""
import mmap, os, sys
os.sched_setaffinity(0, {{int(sys.argv[1])}})
print("ready", flush=True)
for _ in sys.stdin:
    m = mmap.mmap(-1, {PAGES} * 4096)
    for i in range(0, {PAGES} * 4096, 4096):
        m[i] = 1
    print("touched", flush=True)
"""


@pytest.fixture(scope="module")
def probes() -> Iterator[object]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    from memtrace.trace.probes import Probes

    p = Probes(rss_stat_probe=False, stream_events=False)
    try:
        yield p
    finally:
        p.close()


def test_a_process_that_faulted_before_it_was_a_target_is_counted_after(probes) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[-1]
    mine = os.sched_getaffinity(0)
    if len(cpus) > 1:
        os.sched_setaffinity(0, set(cpus[:-1]))     # this process faults elsewhere
    proc = subprocess.Popen([sys.executable, "-c", TOUCHER, str(cpu)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"

        def touch() -> None:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "touched\n"

        for _ in range(3):
            touch()                     # faults of a process that is not a target
        probes.add_target(proc.pid)
        probes.drain()
        touch()
        faults = sum(m.faults for m in probes.drain().chunks.get(proc.pid, []))
        assert faults >= PAGES
    finally:
        os.sched_setaffinity(0, mine)
        proc.kill()
        proc.wait()
