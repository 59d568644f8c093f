"""`--stacks` through JIT code, on Node.js (a program nobody here wrote): V8's
builtins have symbols but no CFI and its JIT code has no ELF file at all, so
a CFI-only walk stopped at the first of them (`[truncated]`
after `Builtins_CEntry...`: the JavaScript that asked was never named). The
unwinder follows the frame-pointer chain V8 keeps through code with no CFI and
names JIT code from the process's perf map (`node --perf-basic-prof
--interpreted-frames-native-stack` writes /tmp/perf-PID.map).

tests/workloads/jitstacks.js fills 64 buffers of 1 MiB in the JavaScript
function fillOutsideTheHeap (the pages made resident by memset under
Buffer.prototype.fill) and keeps them: "held now" must give them to stacks
that name that function, from `_start` down to memset (a few pages to
malloc's chunk headers), not cut."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.root.harness import MEMTRACE, REPO_ROOT, TIMEOUT_SCALE, skip_reason

_SKIP = skip_reason() or (None if shutil.which("node") else "node is not installed")
pytestmark = [pytest.mark.root, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

MiB = 1 << 20
FILLED_MIB = 64
WORKLOAD = REPO_ROOT / "tests" / "workloads" / "jitstacks.js"


def _folded(path: Path) -> list[tuple[list[str], int]]:
    """(frames outermost first, without the mapping; bytes) of a folded file."""
    out = []
    for line in path.read_text().splitlines():
        stack, _, weight = line.rpartition(" ")
        out.append((stack.split(";")[1:], int(weight)))
    return out


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[list[str], int]]:
    out_dir = tmp_path_factory.mktemp("jit-stacks")
    p = subprocess.Popen(
        [*MEMTRACE, "run", "--format", "none", "--no-serve", "--pss-interval", "0",
         "--heap-interval", "0", "--interval", "0.5", "--stacks", "--stacks-period", "64K",
         "--stacks-output", str(out_dir), "--", "node", "--perf-basic-prof",
         "--interpreted-frames-native-stack", str(WORKLOAD), str(FILLED_MIB)],
        # node --perf-basic-prof leaves isolate-*-v8.log files in its cwd
        cwd=out_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    try:
        assert p.stdout is not None and p.stdin is not None
        line = p.stdout.readline()
        assert line.startswith("filled"), (line, p.stderr.read() if p.stderr else "")
        time.sleep(1.5)         # a few ticks while the buffers are held
        p.stdin.close()
        p.stdin = None          # closed: the program's cue to exit
        _, err = p.communicate(timeout=60 * TIMEOUT_SCALE)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err[-2000:]
    files = list(out_dir.glob("memtrace-*-held.folded"))
    assert len(files) == 1, (files, err[-2000:])
    node_pid = files[0].name.split("-")[1]
    Path(f"/tmp/perf-{node_pid}.map").unlink(missing_ok=True)     # node leaves it
    return _folded(files[0])


def test_the_javascript_function_is_named_and_holds_what_it_filled(held):
    mine = [(frames, w) for frames, w in held
            if any("fillOutsideTheHeap" in f for f in frames)]
    assert sum(w for _, w in mine) == pytest.approx(FILLED_MIB * MiB, rel=0.10), held[:5]
    # named from the perf map, with its file
    names = {f for frames, _ in mine for f in frames if "fillOutsideTheHeap" in f}
    assert all(str(WORKLOAD) in n for n in names), names


def test_its_stacks_run_from_start_to_memset_through_the_builtins(held):
    mine = [(frames, w) for frames, w in held if any("fillOutsideTheHeap" in f for f in frames)]
    assert mine
    for frames, _ in mine:
        assert frames[0] == "_start" and "[truncated]" not in frames, frames
        assert any(f.startswith("Builtins_") for f in frames), frames
    # the pages themselves by memset (a few by malloc's chunk headers)
    by_memset = sum(w for frames, w in mine if "memset" in frames[-1])
    assert by_memset >= 0.9 * FILLED_MIB * MiB, [(f[-3:], w) for f, w in mine]
