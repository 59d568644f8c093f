"""memtrace on managed runtimes nobody here wrote, under allocation churn:
OpenJDK 17 with ZGC (its heap one memfd mapped at several addresses of the
same process, so each page is mapped more than once) and Node.js (V8 maps,
protects and discards its pages all the time). Compared with the kernel on
the stopped process (SIGSTOP, every thread in T):

* `memtrace watch` (events followed for a while first): every mapping's
  rss_bytes, anon_bytes, bounds, perms, offset and path as smaps; the totals
  as statm and status (tests/groundtruth.py: compare_snapshot), in each of
  ROUNDS stops;
* memtrace's PSS walk (what `libs` runs): every mapping's RSS/PSS/USS/swap as
  smaps, and the `libs` process totals as smaps_rollup (test_pss.py's
  comparison, retried while smaps changes under it).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import groundtruth as gt
from tests.root.harness import REPO_ROOT, Memtrace, skip_reason

from .test_pss import _compare_once, _libs, _process_key, _rollup, _rollup_key
from .test_real_servers import _stopped

_SKIP = skip_reason()
pytestmark = [pytest.mark.root, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

WORKLOADS = REPO_ROOT / "tests" / "workloads"
SECONDS = 60            # the runtime's own deadline (it is killed before)
ROUNDS = 3
ATTEMPTS = 5


def _jvm(tmp: Path) -> list[str] | None:
    if not (shutil.which("java") and shutil.which("javac")):
        return None
    subprocess.run(["javac", "-d", str(tmp), str(WORKLOADS / "JavaChurn.java")], check=True,
                   timeout=120)
    return ["java", "-XX:+UseZGC", "-Xmx512m", "-cp", str(tmp), "JavaChurn", str(SECONDS)]


def _node(tmp: Path) -> list[str] | None:
    if not shutil.which("node"):
        return None
    return ["node", str(WORKLOADS / "nodechurn.js"), str(SECONDS)]


@pytest.fixture(params=["jvm-zgc", "node"])
def runtime(request, tmp_path) -> Iterator[int]:
    argv = {"jvm-zgc": _jvm, "node": _node}[request.param](tmp_path)
    if argv is None:
        pytest.skip(f"{request.param}: not installed")
    p = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(2.0)                 # started, its heap in use
        assert p.poll() is None, p.stderr.read() if p.stderr else ""
        yield p.pid
    finally:
        p.kill()
        p.wait()


def test_watch_follows_every_mapping_exactly(runtime, tmp_path):
    pid = runtime
    mt = Memtrace(["watch", "--format", "json", "--interval", "0.5", "--reconcile-interval", "0",
                   "--heap-interval", "0", "--pss-interval", "0", "--no-serve", str(pid)],
                  tmp_path / "watch.log")
    try:
        mt.stream.wait_snapshot(pid, 0, 60, context=mt.stderr_tail)
        bad = []
        for i in range(ROUNDS):
            time.sleep(2.0)             # memtrace follows the churn
            with _stopped([pid]):
                snap = mt.stream.wait_snapshot(pid, time.time() + 1.5, 30,
                                               context=mt.stderr_tail)
                diffs = gt.compare_snapshot(snap, gt.read_smaps(pid), gt.read_statm(pid),
                                            gt.read_status_rss(pid))
            if diffs:
                bad.append(f"round {i} ({len(snap['mappings'])} mappings): " + "\n  ".join(diffs))
        assert not bad, "\n".join(bad)
    finally:
        mt.stop()


def test_pss_walk_and_libs_totals_equal_smaps(runtime):
    pid = runtime
    time.sleep(1.0)
    with _stopped([pid]):
        last = ""
        for _ in range(ATTEMPTS):
            diffs, compared, unstable = _compare_once(pid, use_scan=True)
            if not diffs and not unstable:
                break
            last = f"{len(diffs)} differences, {unstable} unstable: {diffs[:8]}"
            time.sleep(0.05)
        else:
            pytest.fail(f"per mapping, no clean attempt in {ATTEMPTS}: {last}")
        assert compared > 50
        for _ in range(ATTEMPTS):
            before = _rollup_key(_rollup(pid))
            got = _process_key(_libs([pid])["processes"][0])
            after = _rollup_key(_rollup(pid))
            if before == after:
                assert got == before, f"libs (rss, pss, uss, swap) kB {got} vs rollup {before}"
                break
        else:
            pytest.fail(f"smaps_rollup changed during every one of {ATTEMPTS} attempts")
