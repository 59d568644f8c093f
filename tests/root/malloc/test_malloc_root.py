"""`run --malloc` end to end (issue 13, item 4): tests/workloads/mallocleak.c,
built -O2 without frame pointers, allocates through two paths at known rates:
churn_blocks mallocs 64 KiB blocks and frees each one, leak_slowly keeps
1 MiB/s outstanding in 4 KiB blocks. Outstanding bytes by stack must give
leak_slowly its exact leaked bytes within 10 % and churn_blocks nothing; the
leak report (stderr and JSON) must name leak_slowly and not churn_blocks."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.root.harness import (
    MEMTRACE,
    REPO_ROOT,
    TIMEOUT_SCALE,
    build_without_frame_pointers,
    skip_reason,
)

_SKIP = skip_reason()
pytestmark = [pytest.mark.root, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

WORKLOAD = REPO_ROOT / "tests" / "workloads" / "mallocleak.c"
QUIET = ["--no-serve", "--pss-interval", "0", "--heap-interval", "0"]
# The tests pick a small --malloc-period for precision; the default cap (1,000
# samples a second) would raise it while a program allocates fast.
CAP = ["--malloc-max-rate", "10000"]


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mallocleak") / "mallocleak"
    return build_without_frame_pointers(WORKLOAD, out)


@pytest.fixture(scope="module")
def traced(program: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out_dir = tmp_path_factory.mktemp("malloc-out")
    # 16 KiB between samples: ~500 samples of leak_slowly's 8 MiB (4.4 % RSD); the
    # whole program then takes ~8,300 samples a second, so the cap is raised above
    # that (the default, 1,000, would raise the period eightfold: ~13 % RSD)
    r = subprocess.run(
        [*MEMTRACE, "run", "--format", "json", *QUIET, "--interval", "1", "--malloc",
         "--malloc-period", "16K", *CAP, "--malloc-output", str(out_dir), "--",
         str(program), "8", "3"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180 * TIMEOUT_SCALE,
        stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"leaked (\d+) churned (\d+)", r.stdout)
    assert m, r.stdout[-2000:]
    snaps = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    snaps = [s for s in snaps if "summary" not in s]
    assert snaps and all("malloc" in s for s in snaps), r.stderr[-2000:]
    return {"snaps": snaps, "leaked": int(m.group(1)), "churned": int(m.group(2)),
            "stderr": r.stderr, "out": out_dir}


def _bytes_of(entries: list[dict[str, Any]], function: str) -> int:
    return sum(e["bytes"] for e in entries
               if any(f.split(" (")[0] == function for f in e["frames"]))


def test_outstanding_by_stack_gives_the_leak_its_bytes_and_the_churn_none(traced):
    last = traced["snaps"][-1]["malloc"]      # in the pause: nothing moves any more
    assert _bytes_of(last["outstanding"], "leak_slowly") == pytest.approx(
        traced["leaked"], rel=0.10), last["outstanding"]
    assert _bytes_of(last["outstanding"], "churn_blocks") == 0, last["outstanding"]
    assert _bytes_of(last["allocated"], "churn_blocks") == pytest.approx(
        traced["churned"], rel=0.10), last["allocated"]
    assert last["lost"] == 0


def test_frames_go_from_malloc_through_the_path_to_main(traced):
    top = traced["snaps"][-1]["malloc"]["outstanding"][0]
    names = [f.split(" (")[0] for f in top["frames"]]
    assert names[:3] == ["malloc", "leak_slowly", "main"], names
    assert not top["truncated"]


def test_the_leak_report_names_the_leak_and_not_the_churn(traced):
    leaks = traced["snaps"][-1]["malloc"]["leaks"]
    assert _bytes_of(leaks, "leak_slowly") > 0 and _bytes_of(leaks, "churn_blocks") == 0
    report = [line for line in traced["stderr"].splitlines() if "--malloc pid" in line
              or "B/s)" in line]
    assert any("leak_slowly" in line for line in report), traced["stderr"][-2000:]
    assert not any("churn_blocks" in line for line in report), report


def test_malloc_output_files(traced):
    pid = traced["snaps"][0]["pid"]
    out: Path = traced["out"]
    outstanding = (out / f"memtrace-{pid}-malloc-outstanding.folded").read_text()
    assert "leak_slowly" in outstanding and "churn_blocks" not in outstanding
    assert "churn_blocks" in (out / f"memtrace-{pid}-malloc-allocated.folded").read_text()
    graph = (out / f"memtrace-{pid}-malloc-outstanding.html").read_text()
    assert "Allocations by call stack: outstanding now" in graph and "leak_slowly" in graph
    assert "churn_blocks" in (out / f"memtrace-{pid}-malloc-allocated.html").read_text()
    profile = gzip.decompress((out / f"memtrace-{pid}-malloc.pb.gz").read_bytes())
    assert b"outstanding_space" in profile and b"leak_slowly" in profile


def test_samples_the_sampler_cannot_remember_are_counted(tmp_path: Path):
    """200,000 blocks held at once, every one sampled (period 1 byte): more than
    the sampler's table of live samples holds. What it could not remember is
    still reported, as `untracked` and in the --malloc line, never silently
    dropped (samples the ring lost are `lost`). No rate cap: it would raise
    the period and sample a few of them."""
    prog = build_without_frame_pointers(REPO_ROOT / "tests" / "workloads" / "mallochold.c",
                                        tmp_path / "mallochold")
    r = subprocess.run(
        [*MEMTRACE, "run", "--format", "json", *QUIET, "--interval", "1", "--malloc",
         "--malloc-period", "1", "--malloc-max-rate", "0", "--", str(prog), "200000", "3"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180 * TIMEOUT_SCALE,
        stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert r.returncode == 0, r.stderr[-2000:]
    snaps = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    last = [s for s in snaps if "malloc" in s][-1]["malloc"]
    assert last["untracked"] > 0, last
    assert last["samples"] + last["lost"] >= 200_000, last
    assert last["outstanding_bytes"] < last["allocated_bytes"]
    assert f"{last['untracked']} samples not tracked" in r.stderr, r.stderr[-2000:]


def test_the_rate_cap_holds_a_fast_allocator_to_its_samples_a_second(tmp_path: Path):
    """mallocfast allocates tens of GB a second: at 64 KiB it would take some
    500,000 samples a second. With --malloc-max-rate 2000 the sampler raises
    its period until its samples come at most that fast; the period it went
    to reaches the snapshot (each sample carries it through its uprobe) and
    run's --malloc line, nothing is lost, and the weights, taken with each
    sample's own period, still estimate the bytes allocated (~6,000 samples:
    1.3 % relative standard deviation; 10 % asked)."""
    prog = build_without_frame_pointers(REPO_ROOT / "tests" / "workloads" / "mallocfast.c",
                                        tmp_path / "mallocfast")
    cap, seconds = 2000, 3.0
    r = subprocess.run(
        [*MEMTRACE, "run", "--format", "json", *QUIET, "--interval", "1", "--malloc",
         "--malloc-period", "64K", "--malloc-max-rate", str(cap), "--", str(prog),
         str(seconds), "2.5"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180 * TIMEOUT_SCALE,
        stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert r.returncode == 0, r.stderr[-2000:]
    allocated = int(re.search(r"allocated (\d+)", r.stdout).group(1))  # type: ignore[union-attr]
    snaps = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    last = [s for s in snaps if "summary" not in s and "malloc" in s][-1]["malloc"]
    assert last["period_bytes"] == 64 << 10
    assert last["period_max_bytes"] > 16 * last["period_bytes"], last
    assert 0.25 * cap * seconds < last["samples"] < 1.5 * cap * seconds + 200, last
    assert last["lost"] == 0 and last["untracked"] == 0, last
    assert last["allocated_bytes"] == pytest.approx(allocated, rel=0.10)
    assert f"raised the period up to {last['period_max_bytes']} bytes" in r.stderr, \
        r.stderr[-2000:]


PYTHON = Path("/usr/bin/python3.11")


@pytest.mark.skipif(not PYTHON.exists(), reason=f"{PYTHON} is absent (Debian 12's CPython 3.11)")
def test_python_frames_name_the_leaking_python_function(tmp_path: Path):
    """--malloc on CPython 3.11: the sampled allocations carry the Python
    frames of the allocating thread, merged into the native stack as
    --stacks does; the leak names leak_py, and its bytes are the kept ones."""
    r = subprocess.run(
        [*MEMTRACE, "run", "--format", "json", *QUIET, "--interval", "0.5", "--malloc",
         "--malloc-period", "16K", *CAP, "--", str(PYTHON),
         str(REPO_ROOT / "tests" / "workloads" / "pymalloc.py"), "60"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120 * TIMEOUT_SCALE,
        stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert r.returncode == 0, r.stderr[-2000:]
    leaked = int(re.search(r"leaked (\d+)", r.stdout).group(1))     # type: ignore[union-attr]
    snaps = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    last = [s for s in snaps if "summary" not in s and "malloc" in s][-1]["malloc"]

    def held_by(function: str) -> int:
        return sum(s["bytes"] for s in last["outstanding"]
                   if any(f.startswith(f"{function} (pymalloc.py:") and f.endswith("[py]")
                          for f in s["frames"]))

    # whole, not cut as pytest cuts a long repr: a rare failure in CI (one
    # run in ~20) showed a stack of Python frames no run has shown again
    everything = json.dumps(last["outstanding"], indent=1) + "\n" + r.stderr[-3000:]
    # each 256 KiB block is sampled at a 16 KiB period (chance 1 - e^-16)
    assert held_by("leak_py") == pytest.approx(leaked, rel=0.02), everything
    # none of churn_py's blocks is outstanding (what the interpreter itself
    # keeps from inside it, ~20 KB of caches, may be)
    assert held_by("churn_py") < 256 << 10, everything
    assert "leak_py (pymalloc.py:" in r.stderr, r.stderr[-2000:]


@pytest.mark.skipif(not PYTHON.exists(), reason=f"{PYTHON} is absent (Debian 12's CPython 3.11)")
def test_frames_of_freed_code_objects_are_not_named_as_the_newer_ones(tmp_path: Path):
    """Each round of pyexec.py exec's a new function f_K that keeps a bytearray
    of (K + 1) * 16 KiB + 1 bytes, then drops it: its code object is freed
    before memtrace names the frame, and a later round's is allocated at its
    address. Such a frame reads [unknown]; none takes another round's name
    (before the fingerprint BPF reads at the sample, about two in three did);
    the functions kept alive (every 10th) are named."""
    rounds = 300
    r = subprocess.run(
        [*MEMTRACE, "run", "--format", "none", *QUIET, "--interval", "0.5", "--malloc",
         "--malloc-period", "1K", "--malloc-max-rate", "0", "--malloc-output", str(tmp_path),
         "--", str(PYTHON), str(REPO_ROOT / "tests" / "workloads" / "pyexec.py"), str(rounds)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120 * TIMEOUT_SCALE,
        stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert r.returncode == 0, r.stderr[-2000:]
    folded = next(tmp_path.glob("memtrace-*-malloc-allocated.folded")).read_text()
    named: dict[int, int] = {}
    wrong = []
    for line in folded.splitlines():
        frames, nbytes = line.rsplit(" ", 1)
        found = re.findall(r"(?:^|;)f_(\d+) \(<string>:2\)", frames)
        if not found or int(nbytes) < 16 << 10:    # not its bytearray: the list's growth
            continue
        k = int(found[-1])
        if int(nbytes) == ((k + 1) << 14) + 2:       # bytearray(n) allocates n + 1
            named[k] = int(nbytes)
        else:
            wrong.append(line[-300:])
    assert not wrong, wrong[:5]
    kept = set(range(0, rounds, 10))
    assert len(kept & set(named)) >= 0.9 * len(kept), sorted(named)


def test_a_command_shorter_than_an_interval_still_has_its_figures(program: Path,
                                                                  tmp_path: Path):
    """The command exits before memtrace's first tick after attach: what it
    sampled until it exited still counts (the report and --malloc-output),
    though no snapshot follows. Before, both were empty. (Period 4 KiB and no
    cap: ~150 samples of the 0.6 s's leak, among ~20,000.)"""
    r = subprocess.run(
        [*MEMTRACE, "run", "--format", "json", *QUIET, "--interval", "5", "--malloc",
         "--malloc-period", "4K", "--malloc-max-rate", "0", "--malloc-output", str(tmp_path), "--",
         str(program), "0.6", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120 * TIMEOUT_SCALE,
        stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert r.returncode == 0, r.stderr[-2000:]
    leaked = int(re.search(r"leaked (\d+)", r.stdout).group(1))     # type: ignore[union-attr]
    folded = next(tmp_path.glob("memtrace-*-malloc-outstanding.folded")).read_text()
    kept = sum(int(line.rsplit(" ", 1)[1]) for line in folded.splitlines()
               if ";leak_slowly;" in line)
    assert kept == pytest.approx(leaked, rel=0.15), folded
    assert "churn_blocks" not in folded


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not all(os.path.exists(p) for p in ("/usr/bin/redis-server",
                                                        "/usr/bin/redis-benchmark")),
                    reason="redis-server and redis-benchmark are installed by scripts/setup.sh")
def test_redis_server_with_jemalloc_runs_under_the_sampler(tmp_path: Path):
    """Debian's redis-server links jemalloc: under the first sampler (which
    called glibc's malloc) it died of SIGSEGV before serving anything. Now it
    serves redis-benchmark, its allocations are sampled and netted, and it
    exits 0 on SHUTDOWN."""
    port = str(_free_port())
    run = subprocess.Popen(
        [*MEMTRACE, "run", "--format", "json", *QUIET, "--interval", "0.5", "--malloc",
         "--malloc-period", "16K", *CAP, "--", "/usr/bin/redis-server", "--port", port,
         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    try:
        bench = ["/usr/bin/redis-benchmark", "-p", port, "-n", "20000", "-q", "-t",
                 "set,lpush"]
        for _ in range(int(60 * TIMEOUT_SCALE)):
            ok = subprocess.run(["/usr/bin/redis-cli", "-p", port, "ping"],
                                capture_output=True, text=True)
            if ok.stdout.strip() == "PONG" or run.poll() is not None:
                break
            time.sleep(0.5)
        assert run.poll() is None, run.communicate()[1][-2000:]
        b = subprocess.run(bench, capture_output=True, text=True, timeout=120)
        assert b.returncode == 0 and "requests per second" in b.stdout, b.stdout + b.stderr
        time.sleep(1.5)         # a tick or more with the load's samples
        subprocess.run(["/usr/bin/redis-cli", "-p", port, "shutdown", "nosave"],
                       capture_output=True, timeout=30)
        out, err = run.communicate(timeout=120 * TIMEOUT_SCALE)
    finally:
        run.kill()
    assert run.returncode == 0, err[-2000:]
    assert "exited with status 0" in err, err[-2000:]
    reports = [json.loads(x)["malloc"] for x in out.splitlines() if '"malloc"' in x]
    assert reports and reports[-1]["samples"] > 100 and reports[-1]["frees"] > 0, reports[-1:]
