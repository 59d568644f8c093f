"""--stacks on CPython 3.11 (issue 13, done-when 5): Python frames merged into
the native stack. tests/workloads/pystacks.py makes 64 MiB resident in
fill_big and 16 MiB in fill_small (each 1 MiB block its own malloc mapping,
fill_small's fenced off by 4 MiB untouched reservations), then frees
fill_big's. "held now" names both functions with their bytes, then none for
fill_big; "brought in" keeps both. Bound: 5 %, as for the C program of
done-when 1: the paths have mappings of their own, so held is memtrace's
exact per-mapping figure (64.25 and 16.06 MiB: each block maps 1 MiB +
4 KiB) and brought is exact per 2 MiB chunk but where the paths share one.
With one-page fences fill_small shared chunks with fill_big and with pages
faulted before it, and its brought was 3 % off in 20 runs (5.1 % once in
CI); with the reservations no chunk is shared: 20 runs at 128 KiB, held
within 0.6 %, brought within 1.7 %. pyenv's
3.11.7 (shared libpython) and 3.12.1 (told apart, once on stderr) where present."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.root.harness import MEMTRACE, REPO_ROOT, TIMEOUT_SCALE, skip_reason

PYTHON = Path("/usr/bin/python3.11")
_SKIP = skip_reason() or (None if PYTHON.exists() else f"{PYTHON} is absent (Debian 12's CPython "
                                                      "3.11: the frames read are 3.11's)")
pytestmark = [pytest.mark.root, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

MiB = 1 << 20
WORKLOAD = REPO_ROOT / "tests" / "workloads" / "pystacks.py"
QUIET = ["--no-serve", "--pss-interval", "0", "--heap-interval", "0"]
ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT))


def py_frame(frames: list[str], function: str) -> str | None:
    """The frame `function (pystacks.py:LINE) [py]` of a JSON stack, if any."""
    return next((f for f in frames if f.startswith(f"{function} (pystacks.py:")
                 and f.endswith(") [py]")), None)


def bytes_of(stacks: list[dict[str, Any]], function: str) -> int:
    return sum(s["bytes"] for s in stacks if py_frame(s["frames"], function))


def snapshots(stdout: str) -> list[dict[str, Any]]:
    snaps = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [s for s in snaps if "summary" not in s and "stacks" in s]


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path, str]:
    out_dir = tmp_path_factory.mktemp("py-stacks-out")
    r = subprocess.run(
        [*MEMTRACE, "run", "--format", "json", *QUIET, "--interval", "0.5", "--stacks",
         "--stacks-period", "128K", "--stacks-output", str(out_dir), "--", str(PYTHON),
         str(WORKLOAD), "1.5", "1.5"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180 * TIMEOUT_SCALE,
        stdin=subprocess.DEVNULL, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    snaps = snapshots(r.stdout)
    assert snaps, r.stderr[-2000:]
    return snaps, out_dir, r.stderr


def check_split(snaps: list[dict[str, Any]]) -> None:
    both = [s for s in snaps if s["rss_bytes"] >= 80 * MiB]
    after = [s for s in snaps if 16 * MiB <= s["rss_bytes"] < 40 * MiB]
    assert both and after, [s["rss_bytes"] for s in snaps]
    held = both[-1]["stacks"]["held"]
    assert bytes_of(held, "fill_big") == pytest.approx(64 * MiB, rel=0.05), held
    assert bytes_of(held, "fill_small") == pytest.approx(16 * MiB, rel=0.05), held
    last = after[-1]["stacks"]
    # fill_big's 64 buffers are gone. What it may still hold is a page of an
    # obmalloc arena its bytearray objects were allocated in (PyType_GenericAlloc),
    # made resident by fill_big and kept by the interpreter: when the countdown
    # samples that one fault (~3 % of runs), its share of the arena's mapping
    # (133,131 and 139,264 bytes seen) stays fill_big's, rightly. None of it
    # may be a buffer's (filled by memset).
    kept = [s for s in last["held"] if py_frame(s["frames"], "fill_big")]
    assert sum(s["bytes"] for s in kept) < 2 * MiB, kept
    assert not any(f.startswith("__memset") for s in kept for f in s["frames"]), kept
    assert bytes_of(last["held"], "fill_small") == pytest.approx(16 * MiB, rel=0.05), last
    assert bytes_of(last["brought"], "fill_big") == pytest.approx(64 * MiB, rel=0.05), last
    assert bytes_of(last["brought"], "fill_small") == pytest.approx(16 * MiB, rel=0.05), last


def test_held_and_brought_name_the_python_functions(traced):
    snaps, _, _ = traced
    check_split(snaps)
    for s in snaps:
        assert s["stacks"]["held_bytes"] == s["rss_bytes"], s["stacks"]


def test_python_frames_sit_inside_the_interpreter_frame(traced):
    snaps, _, _ = traced
    top = max(snaps[-1]["stacks"]["brought"], key=lambda s: s["bytes"])
    frames = top["frames"]
    big, main, module = (py_frame(frames, f) for f in ("fill_big", "main", "<module>"))
    assert big and main and module, frames
    i = frames.index(big)
    # leaf first: native callees, then fill_big <- main <- <module> and the
    # native interpreter call they ran in
    assert frames.index(main) > i and frames.index(module) > frames.index(main)
    assert frames[frames.index(module) + 1].startswith("_PyEval_EvalFrameDefault ("), frames
    assert any(f.startswith("__memset") for f in frames[:i]), frames
    assert not top["truncated"], top


def test_output_files_show_python_frames(traced):
    snaps, out_dir, _ = traced
    pid = snaps[0]["pid"]
    folded = (out_dir / f"memtrace-{pid}-brought.folded").read_text()
    assert ";fill_big (pystacks.py:" in folded and ";fill_small (pystacks.py:" in folded
    html = (out_dir / f"memtrace-{pid}-held.html").read_text()
    assert "fill_small (pystacks.py:" in html and 'data-c="python"' in html


def test_watch_attached_to_a_running_python(tmp_path):
    """watch: the running process's CPython is found when memtrace attaches."""
    work = subprocess.Popen([str(PYTHON), str(WORKLOAD), "1.5", "1.5", "go"],
                            stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    err_path = tmp_path / "watch.err"
    watch = None
    try:
        assert work.stdout is not None and work.stdout.readline().strip() == "started"
        with open(err_path, "w") as err:
            watch = subprocess.Popen(
                [*MEMTRACE, "watch", "--format", "json", *QUIET, "--interval", "0.5",
                 "--stacks", "--stacks-period", "128K", str(work.pid)],
                cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                stdin=subprocess.DEVNULL, env=ENV)
        deadline = time.monotonic() + 120 * TIMEOUT_SCALE
        while "first snapshot" not in err_path.read_text():
            assert watch.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.1)
        assert work.stdin is not None
        work.stdin.write("go\n")
        work.stdin.flush()
        out, _ = watch.communicate(timeout=180 * TIMEOUT_SCALE)
    finally:
        work.kill()
        work.wait()
        if watch is not None and watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, err_path.read_text()[-2000:]
    snaps = snapshots(out)
    assert snaps[0]["rss_bytes"] < 40 * MiB, "attached after the fill"
    check_split(snaps)


PYENV = Path("/root/.pyenv/versions")


@pytest.mark.parametrize("version", ["3.11.7", "3.12.1"])
def test_pyenv_builds_shared_libpython(version):
    """pyenv's builds link libpython3.X.so (a PIE executable, the runtime in
    the library): 3.11 gets Python frames, 3.12 is named once on stderr."""
    python = PYENV / version / "bin" / "python3"
    if not python.exists():
        pytest.skip(f"{python} absent (pyenv's builds on the development VM)")
    r = subprocess.run(
        [*MEMTRACE, "run", "--format", "json", *QUIET, "--interval", "0.5", "--stacks",
         "--stacks-period", "128K", "--", str(python), str(WORKLOAD), "1", "0.5"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180 * TIMEOUT_SCALE,
        stdin=subprocess.DEVNULL, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    brought = snapshots(r.stdout)[-1]["stacks"]["brought"]
    why = [line for line in r.stderr.splitlines() if "no Python frames" in line]
    if version.startswith("3.11"):
        assert bytes_of(brought, "fill_big") == pytest.approx(64 * MiB, rel=0.05), brought
        assert any("(libpython3.11.so" in f for s in brought for f in s["frames"]), brought
        assert not why, why
    else:
        assert bytes_of(brought, "fill_big") == 0
        assert len(why) == 1 and f"CPython {version}" in why[0], r.stderr[-2000:]
