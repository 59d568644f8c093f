"""Signals and output failures on the live commands (issue 16 items 10-12; root).

- INT, TERM and HUP to `watch` and `agent`: everything detached, exit 0.
- INT, TERM and HUP to `run`: passed on to the command (once), exit with its status.
- A stdout nobody reads does not hold shutdown; what is lost is said.
- `-o /dev/full`, `-o` on a full tmpfs, `-o /proc/version`: one line, exit 14;
  a closed stdout pipe: exit 14, quiet.
"Nothing left attached": the BPF programs and maps memtrace held are gone from
the kernel (looked up by ID with the bpf(2) syscall) once it has exited.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import os
import pty
import shutil
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from tests.root.harness import MEMTRACE, REPO_ROOT, TIMEOUT_SCALE

QUIET = ["--pss-interval", "0", "--heap-interval", "0"]
READY_TIMEOUT = 90.0 * TIMEOUT_SCALE      # BCC compiles its programs at start
EXIT_TIMEOUT = 10.0 * TIMEOUT_SCALE       # "within a couple of seconds", on a loaded machine

# ---------------------------------------------------------------------------
# BPF objects by ID (no bpftool needed)

_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine)
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_MAP_GET_FD_BY_ID = 14
_libc = ctypes.CDLL(None, use_errno=True)


def _bpf_object_exists(cmd: int, obj_id: int) -> bool:
    attr = (ctypes.c_uint32 * 4)(obj_id, 0, 0, 0)
    fd = _libc.syscall(_NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return True
    err = ctypes.get_errno()
    assert err == errno.ENOENT, os.strerror(err)
    return False


def bpf_objects_of(pid: int) -> set[tuple[int, int]]:
    """(command, id) of every BPF program and map pid holds a descriptor of."""
    found = set()
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for f in fdinfo.iterdir():
        with contextlib.suppress(OSError):
            for line in f.read_text().splitlines():
                key, _, value = line.partition(":")
                if key == "prog_id":
                    found.add((_BPF_PROG_GET_FD_BY_ID, int(value)))
                elif key == "map_id":
                    found.add((_BPF_MAP_GET_FD_BY_ID, int(value)))
    return found


def assert_nothing_left(pid: int, objects: set[tuple[int, int]]) -> None:
    assert not Path(f"/proc/{pid}").exists(), "memtrace is still there"
    deadline = time.monotonic() + 10
    left = objects
    while left and time.monotonic() < deadline:   # freed after an RCU grace period
        left = {o for o in left if _bpf_object_exists(*o)}
        time.sleep(0.05)
    assert not left, f"BPF objects of memtrace still loaded: {sorted(left)}"


# ---------------------------------------------------------------------------
# running memtrace


class Memtrace:
    def __init__(self, args: list[str], stdout: int | None = subprocess.DEVNULL,
                 **kw: object) -> None:
        self.proc = subprocess.Popen(
            [*MEMTRACE, *args], cwd=REPO_ROOT, stdout=stdout, stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), start_new_session=True,
            **kw)  # type: ignore[call-overload]
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.objects: set[tuple[int, int]] = set()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<EOF>")
            self._cond.notify_all()

    @property
    def stderr(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(text in line for line in self.lines):
                left = deadline - time.monotonic()
                assert left > 0 and "<EOF>" not in self.lines, \
                    f"no {text!r} from memtrace:\n" + "\n".join(self.lines)
                self._cond.wait(left)
        self.objects = bpf_objects_of(self.proc.pid)

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"memtrace still running {timeout:.0f}s later:\n{self.stderr}")

    def done(self) -> None:
        with self._cond:
            deadline = time.monotonic() + 5
            while "<EOF>" not in self.lines and time.monotonic() < deadline:
                self._cond.wait(0.1)
        assert "Traceback" not in self.stderr, self.stderr
        assert_nothing_left(self.proc.pid, self.objects)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "300"])
    yield p
    p.kill()
    p.wait()


SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_watch_stops_on_signal(sig, sleeper):
    m = Memtrace(["watch", "--no-serve", "--format", "json", *QUIET, str(sleeper.pid)])
    try:
        m.wait_for("first snapshot")
        assert m.objects, "memtrace holds no BPF programs?"
        m.proc.send_signal(sig)
        assert m.wait() == 0, m.stderr
        m.done()
        assert sleeper.poll() is None          # the target is left alone
    finally:
        m.kill()


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_agent_stops_on_signal(sig):
    m = Memtrace(["agent", "--comm", "^memtrace-nomatch$", "--web.listen-address",
                  "127.0.0.1:0", *QUIET])
    try:
        m.wait_for("agent: 1 rule(s)")
        m.proc.send_signal(sig)
        assert m.wait() == 0, m.stderr
        m.done()
        assert "agent: stopped, probes detached" in m.stderr
    finally:
        m.kill()


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_run_passes_the_signal_to_the_command(sig):
    m = Memtrace(["run", "--no-serve", "--format", "json", *QUIET, "--", "sleep", "30"])
    try:
        m.wait_for("first snapshot")
        t0 = time.monotonic()
        m.proc.send_signal(sig)
        code = m.wait()
        assert code == 128 + sig, m.stderr      # the command's status: killed by sig
        assert time.monotonic() - t0 < EXIT_TIMEOUT
        m.done()
        assert f"sleep exited with status {128 + sig}" in m.stderr
    finally:
        m.kill()


def test_run_under_nohup_leaves_sighup_ignored():
    def ignore_hup() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    m = Memtrace(["run", "--no-serve", "--format", "json", *QUIET, "--", "sleep", "30"],
                 preexec_fn=ignore_hup)
    try:
        m.wait_for("first snapshot")
        m.proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert m.proc.poll() is None, m.stderr      # neither memtrace nor sleep stopped
        m.proc.send_signal(signal.SIGTERM)
        assert m.wait() == 128 + signal.SIGTERM, m.stderr
        m.done()
    finally:
        m.kill()


COUNT_SIGINT = r"""
import signal, sys, time
n = 0
def on_int(signum, frame):
    global n
    n += 1
signal.signal(signal.SIGINT, on_int)
print("READY", flush=True)
deadline = time.monotonic() + 30
while n == 0 and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(1.5)          # a second delivery would come now
sys.exit(n)
"""


def test_run_forwards_a_kill_once(tmp_path):
    m = Memtrace(["run", "--no-serve", "--format", "json", "-o", str(tmp_path / "out.json"),
                  *QUIET, "--", sys.executable, "-c", COUNT_SIGINT], stdout=subprocess.PIPE)
    try:
        m.wait_for("first snapshot")
        assert m.proc.stdout is not None
        assert m.proc.stdout.readline() == b"READY\n"    # its handler is in place
        m.proc.send_signal(signal.SIGINT)
        assert m.wait(EXIT_TIMEOUT + 30) == 1, m.stderr   # exactly one SIGINT arrived
        m.done()
    finally:
        m.kill()


def test_run_does_not_repeat_a_terminal_ctrl_c(tmp_path):
    """Ctrl-C reaches the whole foreground process group (memtrace and the
    command): memtrace must not send the command a second SIGINT."""
    master, slave = pty.openpty()

    def controlling_tty() -> None:    # after setsid: the pty is our terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    out = tmp_path / "out.json"
    proc = subprocess.Popen(
        [*MEMTRACE, "run", "--no-serve", "--format", "json", "-o", str(out), *QUIET, "--",
         sys.executable, "-c", COUNT_SIGINT],
        cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        preexec_fn=controlling_tty)
    os.close(slave)
    seen = bytearray()
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while b"first snapshot" not in seen or b"READY" not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            with contextlib.suppress(OSError):
                seen += os.read(master, 4096)
        os.write(master, b"\x03")                 # Ctrl-C
        code = proc.wait(EXIT_TIMEOUT + 30)
        with contextlib.suppress(OSError):
            while chunk := os.read(master, 4096):
                seen += chunk
        assert code == 1, seen.decode(errors="replace")   # one SIGINT, not two
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


# ---------------------------------------------------------------------------
# output that cannot be written (issue 16 items 10 and 12)


def test_stdout_nobody_reads_does_not_hold_shutdown(sleeper):
    r, w = os.pipe()                # nobody reads r
    try:
        m = Memtrace(["watch", "--no-serve", "--format", "json", "--interval", "0.05", *QUIET,
                      str(sleeper.pid)], stdout=w)
        os.close(w)
        m.wait_for("first snapshot")
        # snapshots of ~13 kB every 0.05 s until the pipe (grown to 1 MiB by
        # memtrace, views/output.py) is full, then more wait in the queue
        deadline = time.monotonic() + 30
        while _unread(r) < fcntl.fcntl(r, 1032) and time.monotonic() < deadline:   # F_GETPIPE_SZ
            time.sleep(0.1)
        time.sleep(1)
        t0 = time.monotonic()
        m.proc.send_signal(signal.SIGTERM)
        assert m.wait() == 0, m.stderr
        assert time.monotonic() - t0 < 6
        m.done()
        assert "stdout not read for 2s at exit:" in m.stderr
        assert "not written" in m.stderr
    finally:
        m.kill()
        os.close(r)


def _unread(fd: int) -> int:
    got = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, got, True)
    return got[0]


def _one_error_line(m: Memtrace) -> str:
    errors = [line for line in m.lines if line.startswith("memtrace: error:")]
    assert len(errors) == 1, m.stderr
    return errors[0]


@pytest.mark.parametrize("cmd", ["watch", "agent"])
def test_output_to_dev_full(cmd, sleeper):
    target = (["--exe", "^/usr/bin/sleep$|^/bin/sleep$", "--web.listen-address", "127.0.0.1:0",
               "--max-processes", "1"] if cmd == "agent" else ["--no-serve", str(sleeper.pid)])
    m = Memtrace([cmd, "--format", "json", "-o", "/dev/full", *QUIET, *target])
    try:
        assert m.wait(READY_TIMEOUT) == 14, m.stderr
        m.done()
        assert _one_error_line(m) == \
            "memtrace: error: cannot write /dev/full: No space left on device"
    finally:
        m.kill()


@pytest.fixture
def full_tmpfs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        with open(mnt / "fill", "wb") as f, contextlib.suppress(OSError):
            f.write(b"\0" * (60 << 10))
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_output_on_a_full_tmpfs(full_tmpfs, sleeper):
    out = full_tmpfs / "out.json"
    m = Memtrace(["watch", "--no-serve", "--format", "json", "--interval", "0.1", "-o",
                  str(out), *QUIET, str(sleeper.pid)])
    try:
        assert m.wait(READY_TIMEOUT) == 14, m.stderr
        m.done()
        assert _one_error_line(m) == \
            f"memtrace: error: cannot write {out}: No space left on device"
    finally:
        m.kill()


def test_run_output_to_proc_version():
    m = Memtrace(["run", "--no-serve", "--format", "json", "-o", "/proc/version", *QUIET,
                  "--", "sleep", "1"])
    try:
        assert m.wait(READY_TIMEOUT) == 14, m.stderr
        m.done()
        assert _one_error_line(m) == \
            "memtrace: error: cannot write /proc/version: Input/output error"
        assert "sleep exited with status 0" in m.stderr   # the command ran to its end
    finally:
        m.kill()


@pytest.mark.parametrize("cmd", ["watch", "run", "agent"])
def test_closed_stdout_pipe_is_quiet_exit_14(cmd, sleeper, tmp_path):
    if cmd == "agent":
        exe = tmp_path / "memtrace-sigtest-sleep"
        shutil.copy("/bin/sleep", exe)
        own = subprocess.Popen([str(exe), "300"])
        args = ["agent", "--format", "json", "--exe", f"^{exe}$", "--web.listen-address",
                "127.0.0.1:0"]
    else:
        own = None
        args = [cmd, "--no-serve", "--format", "json"]
        args += [str(sleeper.pid)] if cmd == "watch" else ["--", "sleep", "3"]
    m = Memtrace([*args[:1], "--interval", "0.1", *QUIET, *args[1:]], stdout=subprocess.PIPE)
    try:
        assert m.proc.stdout is not None
        assert len(m.proc.stdout.read(100)) == 100      # like `| head -c 100`
        m.proc.stdout.close()
        assert m.wait(EXIT_TIMEOUT) == 14, m.stderr
        m.done()
        assert not [line for line in m.lines if "error" in line], m.stderr
    finally:
        m.kill()
        if own is not None:
            own.kill()
            own.wait()


@pytest.mark.parametrize("cmd", ["libs", "heap"])
def test_one_shot_commands_on_full_disk_and_closed_pipe(cmd, sleeper):
    """Root-only one-shot commands behave like explain and doctor (tests/unit/test_cli.py)."""
    run = [*MEMTRACE, cmd, str(sleeper.pid)]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    with open("/dev/full", "w") as full:
        r = subprocess.run(run, cwd=REPO_ROOT, env=env, stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=120)
    assert r.returncode == 14, r.stderr
    assert r.stderr.strip().splitlines() == [
        "memtrace: error: cannot write stdout: No space left on device"]
    rd, wr = os.pipe()
    os.close(rd)
    try:
        r = subprocess.run(run, cwd=REPO_ROOT, env=env, stdout=wr, stderr=subprocess.PIPE,
                           text=True, timeout=120)
    finally:
        os.close(wr)
    assert r.returncode == 14 and r.stderr == "", r.stderr
