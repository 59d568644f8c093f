"""Recordings written by real runs (issue 14, done-when 2): `memtrace record`
on tests/workloads/heldstacks.c, as root.

- the recording reads back as the snapshots a `--format json` view of the same
  run wrote, with the summary and the end line, and with --stacks the stack
  profile of the peak (both paths of the workload, their frames);
- memtrace killed with SIGKILL after a few ticks: the file reads up to the kill
  (whole snapshots, "no end line"), and the workload runs on, neither stopped
  nor traced (seconds later);
- the workload killed with SIGKILL (as the OOM killer does): the recording has
  the summary (signal 9) and its end line;
- a full disk (a 256 KiB tmpfs): exit 14, the error on stderr naming the file
  and the disk, no traceback, and a file that reads up to where it was cut
  (`record`: after the command exits; `watch --record`: one line, at once, the
  watched process left running);
- `agent --record DIR`: one file in DIR, mode agent, the snapshots of the process
  it attached to on exec, the attach message, the end line after SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from memtrace.record.gzipped import decompressed
from memtrace.record.reader import open_recording
from memtrace.record.stacks import profiles_at
from memtrace.views.jsonl import full_snapshots
from tests.root.harness import MEMTRACE, REPO_ROOT, TIMEOUT_SCALE, build_without_frame_pointers

WORKLOAD = REPO_ROOT / "tests" / "workloads" / "heldstacks.c"
QUIET = ["--no-serve", "--pss-interval", "0", "--heap-interval", "0"]
TIMEOUT = 120.0 * TIMEOUT_SCALE
MiB = 1 << 20
ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT))


@pytest.fixture(scope="module")
def heldstacks(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("heldstacks") / "heldstacks"
    return build_without_frame_pointers(WORKLOAD, out)


def _record(args: list[str], **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run([*MEMTRACE, "record", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL, env=ENV, **kw)


def _snapshot_lines(path: Path) -> int:
    try:
        data = decompressed(str(path))       # a recording being written reads too
    except OSError:
        return 0
    return sum(1 for line in data.splitlines(keepends=True)
               if line.endswith(b"\n") and line.startswith(b'{"ts"'))


def _first_pid(path: Path) -> int:
    return next(int(json.loads(line)["pid"]) for line in decompressed(str(path)).splitlines()
                if line.startswith(b'{"ts"'))


def _max_rss(path: Path) -> int:
    return max((int(json.loads(line)["rss_bytes"]) for line in decompressed(str(path)).splitlines(
        keepends=True) if line.startswith(b'{"ts"') and line.endswith(b"\n")), default=0)


def _wait_for(what, timeout: float = TIMEOUT) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _state(pid: int) -> tuple[str, int] | None:
    """(state letter, TracerPid) of a live process; None once it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    state = stat[stat.rindex(")") + 2]
    tracer = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("TracerPid")))
    return None if state in "ZX" else (state, tracer)


def _kill(pid: int | None) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_record_reads_back_as_the_view_with_its_stacks(heldstacks, tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "run.mtrace"
    r = _record(["-o", str(path), "--format", "json", "--interval", "0.2", "--stacks",
                 *QUIET, "--", str(heldstacks), "1", "0.5"])
    assert r.returncode == 0, r.stderr
    assert f"recording to {path}" in r.stderr and "summary:" not in r.stdout
    view = [ln for ln in r.stdout.splitlines()   # the workload prints on stdout too
            if ln.startswith('{') and not ln.startswith('{"summary"')]
    rec = open_recording(str(path))
    records = list(rec.records())
    assert rec.problem is None and rec.ended
    snaps = [x.data for x in records if x.kind == "snapshot"]
    assert snaps == list(full_snapshots(view)) and len(snaps) >= 3
    summary = next(x.data for x in records if x.kind == "summary")
    assert summary["exit_status"] == 0 and summary["peak_rss_bytes"] >= 80 * MiB
    assert rec.header["mode"] == "run" and rec.header["command"][1:] == ["1", "0.5"]
    assert rec.header["options"]["stacks"] is True
    # the flame graph at the peak: both paths of the workload hold their bytes
    peak = max(snaps, key=lambda s: s["rss_bytes"])
    [(pid, profile)] = profiles_at(str(path), peak["ts"]).items()
    assert pid == peak["pid"] and profile.ts == peak["ts"]
    funcs = {s.stack.frames[1].function: s.held_bytes for s in profile.samples
             if len(s.stack.frames) > 1}
    assert funcs.get("fill_big", 0) >= 48 * MiB and funcs.get("fill_small", 0) >= 12 * MiB
    assert abs(profile.held_total() - peak["stacks"]["held_bytes"]) <= peak["rss_bytes"] // 32


def test_recorder_killed_leaves_a_readable_file_and_a_free_target(heldstacks, tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "killed.mtrace"
    out = (tmp_path / "workload.out").open("w")
    p = subprocess.Popen([*MEMTRACE, "record", "-o", str(path), "--interval", "0.1", "--stacks",
                          *QUIET, "--", str(heldstacks), "30", "0"], cwd=REPO_ROOT,
                         stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=ENV)
    child = None
    try:
        _wait_for(lambda: _snapshot_lines(path) >= 5)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        child = _first_pid(path)
        # the workload runs on: not stopped, not traced
        for _ in range(3):
            st = _state(child)
            assert st is not None and st[0] not in "Tt" and st[1] == 0, st
            time.sleep(0.5)
        assert "ready" in (tmp_path / "workload.out").read_text()
        rec = open_recording(str(path))
        snaps = list(rec.snapshots())
        assert len(snaps) >= 5 and not rec.ended and not rec.corrupt
        assert rec.problem and ("no end line" in rec.problem or "cut short" in rec.problem)
        assert all(s["pid"] == child for s in snaps)
    finally:
        _kill(p.pid)
        _kill(child)
        out.close()


def test_target_killed_by_sigkill_is_summarised(heldstacks, tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "oom.mtrace"
    p = subprocess.Popen([*MEMTRACE, "record", "-o", str(path), "--interval", "0.1", *QUIET,
                          "--", str(heldstacks), "30", "0"], cwd=REPO_ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL, env=ENV)
    child = None
    try:
        # killed once its 82 MiB are resident (as the OOM killer would find it)
        _wait_for(lambda: _snapshot_lines(path) >= 3 and _max_rss(path) >= 80 * MiB)
        child = _first_pid(path)
        os.kill(child, signal.SIGKILL)
        _, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 137, err
        rec = open_recording(str(path))
        records = list(rec.records())
        assert rec.ended and rec.problem is None
        kinds = [r.kind for r in records]
        assert kinds[-2:] == ["summary", "end"] and kinds.count("snapshot") >= 3
        summary = records[-2].data
        assert (summary["exit_status"], summary["signal"]) == (137, 9)
        assert summary["peak_rss_bytes"] >= 80 * MiB
        assert records[-1].data["snapshots"] == kinds.count("snapshot")
    finally:
        _kill(p.pid)
        _kill(child)


@pytest.fixture
def small_disk(tmp_path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path, leave: int) -> None:
    """Take all of the disk but `leave` bytes (a recording is gzip: a few KiB
    hold its first ticks)."""
    st = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - leave))


def test_a_full_disk_is_exit_14_and_a_readable_file(heldstacks, small_disk):  # type: ignore[no-untyped-def]
    path = small_disk / "full.mtrace"
    # all of the disk taken but one page: the whole first snapshot fits (gzip:
    # ~2.5 KB), the ticks that follow fill the rest (the whole run: ~7 KB)
    _fill(small_disk, 4 << 10)
    r = _record(["-o", str(path), "--interval", "0.05", "--stacks", *QUIET, "--",
                 str(heldstacks), "4", "0"])
    assert r.returncode == 14, r.stderr
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "No space left on device" in ln]
    assert errors and all(str(path) in ln for ln in errors), r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"memtrace: error: cannot write {path}: " \
        "No space left on device"
    rec = open_recording(str(path))
    snaps = list(rec.snapshots())
    assert len(snaps) >= 1 and not rec.ended and not rec.corrupt and rec.problem


def test_watch_on_a_full_disk_stops_with_one_line(heldstacks, small_disk):  # type: ignore[no-untyped-def]
    path = small_disk / "watch.mtrace"
    _fill(small_disk, 12 << 10)
    wl = subprocess.Popen([str(heldstacks), "60", "0"], stdout=subprocess.PIPE,
                          stdin=subprocess.DEVNULL)
    try:
        assert wl.stdout is not None and wl.stdout.readline() == b"ready\n"
        r = subprocess.run([*MEMTRACE, "watch", "--record", str(path), "--format", "none",
                            "--interval", "0.05", "--stacks", *QUIET, str(wl.pid)],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                           stdin=subprocess.DEVNULL, env=ENV)
        assert r.returncode == 14, r.stderr
        errors = [ln for ln in r.stderr.splitlines() if "No space left" in ln]
        assert errors == [f"memtrace: error: cannot write {path}: No space left on device"], \
            r.stderr
        assert wl.poll() is None            # the process watched is left as it was
        st = _state(wl.pid)
        assert st is not None and st[0] not in "Tt" and st[1] == 0
        rec = open_recording(str(path))
        assert len(list(rec.snapshots())) >= 1 and not rec.corrupt and rec.problem
    finally:
        _kill(wl.pid)
        wl.wait(10)


def test_agent_records_each_run_in_its_directory(heldstacks, tmp_path):  # type: ignore[no-untyped-def]
    directory = tmp_path / "recs"
    agent = subprocess.Popen([*MEMTRACE, "agent", "--comm", "^heldstacks$", "--record",
                              str(directory), "--interval", "0.1", "--pss-interval", "0",
                              "--heap-interval", "0", "--web.listen-address", "127.0.0.1:0"],
                             cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, stdin=subprocess.DEVNULL, env=ENV)
    wl = None
    try:
        _wait_for(lambda: directory.is_dir() and any(directory.iterdir()))
        [path] = list(directory.iterdir())
        assert path.name.startswith("memtrace-") and path.suffix == ".mtrace"
        time.sleep(0.5)     # the probes loaded: the agent attaches on exec
        wl = subprocess.Popen([str(heldstacks), "30", "0", "1"], stdout=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL)
        _wait_for(lambda: _snapshot_lines(path) >= 3)
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=TIMEOUT)
        assert agent.returncode == 0, err
        assert f"recording to {path}" in err
        rec = open_recording(str(path))
        records = list(rec.records())
        assert rec.ended and rec.problem is None and rec.header["mode"] == "agent"
        assert {r.data["pid"] for r in records if r.kind == "snapshot"} == {wl.pid}
        assert any(r.kind == "message" and f"attached to pid {wl.pid}" in r.data
                   for r in records)
    finally:
        _kill(agent.pid)
        if wl is not None:
            _kill(wl.pid)
            wl.wait(10)
