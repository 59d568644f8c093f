"""memtrace.cli, run as a subprocess with bcc made unimportable: the paths
tested here must fail early, with one clear line and a documented exit code."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Block bcc (None in sys.modules makes `import bcc` raise ImportError), then run
# memtrace exactly as `python -m memtrace` would.
LAUNCH = (
    "import runpy, sys; sys.modules['bcc'] = None; "
    "runpy.run_module('memtrace', run_name='__main__', alter_sys=True)"
)


def memtrace(*args: str, code: str = LAUNCH) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="100")
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("memtrace: error: ")
    for w in words:
        assert w in lines[0]
    assert r.stdout == ""


def free_pid() -> int:
    pid = 999999
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


def test_help():
    r = memtrace("--help")
    assert r.returncode == 0, r.stderr
    for word in ("watch", "run", "doctor", "Exit codes"):
        assert word in r.stdout
    assert r.stderr == ""


def test_plain_python_dash_m_help():
    r = subprocess.run(
        [sys.executable, "-m", "memtrace", "-h"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert r.returncode == 0 and "watch" in r.stdout


@pytest.mark.parametrize("cmd", ["watch", "run", "doctor"])
def test_subcommand_help(cmd):
    r = memtrace(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout


def test_version():
    r = memtrace("--version")
    assert r.returncode == 0
    assert "0.1.0" in r.stdout


def test_watch_without_pid_is_usage_error():
    r = memtrace("watch")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert "PIDS" in r.stderr or "Missing argument" in r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["watch", "abc"],
        ["watch", "--format", "xml", "1"],
        ["watch", "--interval", "0", "1"],
        ["no-such-command"],
    ],
)
def test_usage_errors(args):
    r = memtrace(*args)
    assert r.returncode == 2, (args, r.stderr)
    assert "Traceback" not in r.stderr


def test_watch_missing_pid():
    pid = free_pid()
    r = memtrace("watch", str(pid))
    assert_one_line_error(r, 6, str(pid))


def test_watch_pid_zero():
    assert_one_line_error(memtrace("watch", "0"), 6, "invalid PID 0")


def test_watch_own_pid():
    code = "import os, sys; sys.argv[1:] = ['watch', str(os.getpid())]; " + LAUNCH
    assert_one_line_error(memtrace(code=code), 9)


def test_watch_kernel_thread():
    stat = Path("/proc/2/stat")
    if not stat.exists() or not int(stat.read_text().rsplit(")", 1)[1].split()[6]) & 0x00200000:
        pytest.skip("pid 2 is not a kernel thread here (pid namespace)")
    assert_one_line_error(memtrace("watch", "2"), 7, "kernel thread")


def test_watch_zombie():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "child did not become a zombie"
            time.sleep(0.01)
        assert_one_line_error(memtrace("watch", str(child.pid)), 8, "zombie")
    finally:
        child.wait()


def test_watch_thread_id():
    code = (
        "import os, sys, threading\n"
        "ev = threading.Event(); out = []\n"
        "t = threading.Thread(target=lambda: (out.append(threading.get_native_id()),"
        " ev.wait()))\n"
        "t.start()\n"
        "while not out: pass\n"
        "sys.argv[1:] = ['watch', str(out[0])]\n"
        "try:\n"
        "    exec(" + repr(LAUNCH) + ")\n"
        "finally:\n"
        "    ev.set()\n"
    )
    r = memtrace(code=code)
    assert_one_line_error(r, 6, "thread of process")


def test_run_nonexistent_command():
    assert_one_line_error(memtrace("run", "--", "/nonexistent"), 10, "/nonexistent")


def test_run_command_not_on_path():
    assert_one_line_error(
        memtrace("run", "--", "memtrace-no-such-cmd-xyz"), 10, "command not found"
    )


def test_run_directory(tmp_path):
    assert_one_line_error(memtrace("run", "--", str(tmp_path)), 10, "cannot execute")


def test_run_not_executable(tmp_path):
    f = tmp_path / "script.sh"
    f.write_text("#!/bin/sh\necho hi\n")
    f.chmod(0o644)
    assert_one_line_error(memtrace("run", "--", str(f)), 10, "not an executable")


def test_run_without_command_is_usage_error():
    r = memtrace("run")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("cmd", ["watch", "run"])
def test_unwritable_output_is_one_clear_line(cmd, tmp_path):
    out = str(tmp_path / "no-such-dir" / "out.json")
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        args = ["-o", out, str(sleeper.pid)] if cmd == "watch" else ["-o", out, "--", "true"]
        r = memtrace(cmd, *args)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert "Traceback" not in r.stderr
    assert r.returncode not in (0, 1)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and out in lines[0]


def test_format_none_reports_nothing_but_log_lines(capsys):
    from memtrace.cli import _NullReporter, _reporter

    reporter = _reporter("none", None)
    assert isinstance(reporter, _NullReporter)
    reporter.snapshot({"pid": 1, "mappings": []})
    reporter.message("pid 1 exited")
    out, err = capsys.readouterr()
    assert out == "" and "pid 1 exited" in err
