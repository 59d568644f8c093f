"""`memtrace agent` works inside the sandbox of deploy/systemd/memtrace.service.

No systemd runs on the project's machines (nor in CI), so the unit's settings are
emulated, read from the unit file where they are parameters:
  ProtectSystem=strict, ProtectHome=read-only  every mount remounted read-only
  ProtectKernelTunables, ProtectControlGroups  /sys and /proc/sys read-only,
                                               /proc/kallsyms and /proc/kcore emptied
  PrivateDevices   a /dev with null, zero, full, random, urandom, tty only
  PrivateTmp       fresh /tmp and /var/tmp (unless the repository lives there)
  CapabilityBoundingSet, NoNewPrivileges       setpriv
  SystemCallFilter, SystemCallErrorNumber, MemoryDenyWriteExecute,
  RestrictAddressFamilies                      seccomp (tests/root/deploy/seccomp_exec.py)
all in a private mount namespace (unshare), so the host sees none of it. Not emulated:
RestrictNamespaces, RestrictRealtime, RestrictSUIDSGID, LockPersonality, ProtectClock,
ProtectHostname, ProtectKernelLogs, PrivateMounts, UMask (memtrace does none of what
they forbid)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.unit.deploy.helpers import DEPLOY, REPO, tool, unit_capabilities

# The emulated unit mounts a private /tmp (PrivateTmp=yes): a checkout under /tmp
# (as in a fresh CI clone there) disappears inside the sandbox.
pytestmark = pytest.mark.skipif(
    str(Path(__file__).resolve()).startswith(("/tmp/", "/var/tmp/")),
    reason="checkout under /tmp is hidden by the sandbox's private /tmp")

UNIT = DEPLOY / "systemd" / "memtrace.service"
SECCOMP_EXEC = Path(__file__).resolve().parent / "seccomp_exec.py"
TARGET_COMM = "mtsbx-target"

SANDBOX = r"""
set -eu
stage=$1; caps=$2; private_tmp=$3; shift 3
# ProtectSystem=strict, ProtectHome=read-only; then ProtectKernelTunables and
# ProtectControlGroups: /sys and its submounts, and /proc/sys, read-only too.
findmnt -rn -o TARGET | sort -u | while read -r mp; do
  mp=$(printf '%b' "$mp")
  case $mp in /proc|/proc/*|/dev|/dev/*) continue;; esac
  mount -o remount,bind,ro "$mp" 2>/dev/null || true
done
mount -n --bind /proc/sys /proc/sys && mount -n -o remount,bind,ro /proc/sys
mount -n -t tmpfs tmpfs "$stage"
: > "$stage/inaccessible"; chmod 000 "$stage/inaccessible"
for f in /proc/kallsyms /proc/kcore; do
  [ -e "$f" ] && mount -n --bind "$stage/inaccessible" "$f"
done
# PrivateDevices
mkdir "$stage/dev"; mount -n -t tmpfs -o mode=755 tmpfs "$stage/dev"
for d in null zero full random urandom tty; do
  : > "$stage/dev/$d"; mount -n --bind "/dev/$d" "$stage/dev/$d"
done
mkdir "$stage/dev/shm" "$stage/dev/pts"
mount -n --move "$stage/dev" /dev
# PrivateTmp
if [ "$private_tmp" = yes ]; then
  mount -n -t tmpfs tmpfs /tmp; mount -n -t tmpfs tmpfs /var/tmp
fi
exec setpriv --bounding-set "$caps" --inh-caps -all --no-new-privs -- "$@"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())
    except OSError:
        return ""


def sandboxed(unit: Path, stage: Path, *command: str) -> list[str]:
    """argv that runs COMMAND under unit's sandbox, emulated. Give it the unit's text
    on stdin: a copy under /tmp would be hidden by PrivateTmp."""
    caps = "-all," + ",".join("+" + c.removeprefix("CAP_").lower()
                              for c in sorted(unit_capabilities(unit)))
    in_tmp = any(Path(p) in (REPO, *REPO.parents) for p in ("/tmp", "/var/tmp"))
    stage.mkdir(exist_ok=True)
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", SANDBOX,
            "sandbox", str(stage), caps, "no" if in_tmp else "yes",
            sys.executable, str(SECCOMP_EXEC), "-", "--", *command]


@pytest.fixture
def sandbox_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for name, why in (("unshare", "util-linux"), ("setpriv", "util-linux"),
                      ("findmnt", "util-linux"), ("systemd-analyze", "systemd")):
        tool(name, f"Debian package {why}")
    r = subprocess.run([sys.executable, "-c", "import seccomp"], capture_output=True,
                       timeout=60)
    if r.returncode != 0:
        pytest.skip("seccomp is not importable (Debian package python3-seccomp)")


@pytest.mark.root
def test_sandbox_is_in_force(sandbox_tools, tmp_path):
    probe = ("grep -E '^(CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; "
             "touch /usr/.memtrace-sandbox-probe 2>&1; wc -c < /proc/kallsyms; ls /dev; "
             "python3 -c 'import socket; socket.socket(socket.AF_PACKET)' 2>&1 | tail -1")
    r = subprocess.run(sandboxed(UNIT, tmp_path / "stage", "/bin/sh", "-c", probe),
                       input=UNIT.read_text(), capture_output=True, text=True, timeout=60)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    status = dict(re.findall(r"^(\w+):\s+(\S+)$", out, re.M))
    names = {c.removeprefix("CAP_").lower() for c in unit_capabilities(UNIT)}
    decoded = subprocess.run(["capsh", f"--decode={status['CapBnd']}"], capture_output=True,
                             text=True).stdout if shutil.which("capsh") else ""
    if decoded:
        assert {c.removeprefix("cap_") for c in decoded.split("=")[1].strip().split(",")} \
            == names
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert "Read-only file system" in out
    assert re.search(r"^0$", out, re.M)  # /proc/kallsyms is empty
    devices = set(re.findall(r"^(\w+)$", out.split("\n0\n", 1)[1], re.M))
    assert {"null", "urandom"} <= devices and "kmsg" not in devices and "sda" not in devices
    assert "Address family not supported" in out


def run_agent(unit: Path, tmp_path: Path, timeout: float) -> tuple[int | None, str, str, int]:
    """Start the sandboxed agent on a process of nobody's; return (exit status or None
    if it still runs, its stderr, the last scrape, the target's pid)."""
    port = free_port()
    target = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
         "-c", f"import ctypes, time; ctypes.CDLL(None).prctl(15, b'{TARGET_COMM}', 0, 0, 0); "
               "time.sleep(600)"])
    err = tmp_path / "memtrace.err"
    memtrace = None
    pattern = re.compile(r'memtrace_process_resident_bytes\{[^}]*pid="' + str(target.pid)
                         + r'"[^}]*type="file"\} ([0-9.e+]+)')
    metrics = ""
    try:
        with err.open("w") as e:
            memtrace = subprocess.Popen(
                sandboxed(unit, tmp_path / "stage", sys.executable, "-m", "memtrace",
                          "agent", f"--web.listen-address=127.0.0.1:{port}",
                          "--comm", f"^{TARGET_COMM}$", "--interval", "0.2"),
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=e, cwd=REPO,
                text=True)
        assert memtrace.stdin
        memtrace.stdin.write(unit.read_text())
        memtrace.stdin.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and memtrace.poll() is None:
            metrics = scrape(port)
            m = pattern.search(metrics)
            if m and float(m.group(1)) > 0:
                break
            time.sleep(0.5)
        if memtrace.poll() is None:
            memtrace.send_signal(signal.SIGTERM)
            try:
                memtrace.wait(60)
            except subprocess.TimeoutExpired:
                memtrace.kill()
                memtrace.wait()
        return memtrace.returncode, err.read_text(), metrics, target.pid
    finally:
        if memtrace and memtrace.poll() is None:
            memtrace.kill()
            memtrace.wait()
        target.kill()
        target.wait()


@pytest.mark.root
def test_agent_runs_in_the_units_sandbox(sandbox_tools, tmp_path):
    r = subprocess.run([sys.executable, "-c", "import bcc"], capture_output=True, timeout=60)
    if r.returncode != 0:
        pytest.skip("bcc is not importable (python3-bpfcc)")
    status, err, metrics, pid = run_agent(UNIT, tmp_path, timeout=150)  # BCC compiles first
    assert re.search(r'memtrace_process_resident_bytes\{[^}]*pid="' + str(pid) + '"',
                     metrics), (
        f"no metrics for pid {pid} from the sandboxed agent:\n{err}")
    assert re.search(r"^memtrace_targets 1(\.0)?$", metrics, re.M), metrics
    assert status == 0, err  # SIGTERM: probes detached, exit 0
    assert "memtrace: error" not in err, err


@pytest.mark.root
def test_the_emulated_filter_bites(sandbox_tools, tmp_path):
    """Without the line that adds bpf and perf_event_open back, the same agent cannot
    load its programs: the emulation enforces the unit's filter."""
    r = subprocess.run([sys.executable, "-c", "import bcc"], capture_output=True, timeout=60)
    if r.returncode != 0:
        pytest.skip("bcc is not importable (python3-bpfcc)")
    unit = tmp_path / "memtrace.service"
    unit.write_text(UNIT.read_text().replace("SystemCallFilter=bpf perf_event_open\n", ""))
    assert unit.read_text() != UNIT.read_text()
    status, err, _, _ = run_agent(unit, tmp_path, timeout=150)
    assert status not in (0, None) and "BPF" in err, err
