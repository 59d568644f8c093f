"""deploy/systemd: the unit passes `systemd-analyze verify` and keeps its hardening
(its capability bounding set, as root with BPF: tests/root/deploy/test_systemd_root.py)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from memtrace.exporter.web import DEFAULT_LISTEN

from .helpers import DEPLOY, REPO, parse_unit, tool, unit_values

UNIT = DEPLOY / "systemd" / "memtrace.service"
DEFAULTS = DEPLOY / "systemd" / "memtrace.default"
INSTALLED = "/usr/local/bin/memtrace"
CAPABILITIES = {"CAP_BPF", "CAP_PERFMON", "CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"}


def unit_for_verify(tmp_path: Path) -> Path:
    """The unit itself when its ExecStart binary exists (scripts/setup.sh links it),
    else a copy in tmp_path that runs the venv's memtrace instead."""
    if os.access(INSTALLED, os.X_OK):
        return UNIT
    venv_memtrace = Path(sys.executable).parent / "memtrace"
    if not os.access(venv_memtrace, os.X_OK):
        pytest.skip(f"neither {INSTALLED} nor {venv_memtrace} exists (run scripts/setup.sh)")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(INSTALLED, str(venv_memtrace)))
    return copy


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = tool("systemd-analyze", "Debian package systemd")
    unit = unit_for_verify(tmp_path)
    r = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True,
                       text=True, timeout=60)
    # Warnings (an unknown key, a bad value) leave the exit status at 0: any line
    # about our unit fails the test too. Lines about other units on this machine do not.
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "memtrace" in line]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


def test_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a missing binary and an unknown key are reported."""
    analyze = tool("systemd-analyze", "Debian package systemd")
    broken = tmp_path / "memtrace.service"
    broken.write_text(UNIT.read_text().replace(INSTALLED, "/nonexistent/memtrace")
                      .replace("[Install]", "BogusKey=1\n\n[Install]"))
    r = subprocess.run([analyze, "verify", "--man=no", str(broken)], capture_output=True,
                       text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "/nonexistent/memtrace" in out and "BogusKey" in out, out


def test_unit_hardening():
    entries = parse_unit(UNIT)

    def one(key: str) -> str:
        values = unit_values(entries, "Service", key)
        assert len(values) == 1, f"{key}= set {len(values)} times"
        return values[0]

    expected = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "read-only",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
        "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes", "SystemCallArchitectures": "native",
        "User": "root",
    }
    for key, value in expected.items():
        assert one(key) == value, key
    assert set(one("CapabilityBoundingSet").split()) == CAPABILITIES
    # memtrace reads /proc/PID/* of every process it watches and lists all of /proc.
    assert one("ProtectProc") == "default"
    assert one("ProcSubset") == "all"
    # ProtectKernelModules would hide /usr/lib/modules, where BCC finds the headers.
    assert not unit_values(entries, "Service", "ProtectKernelModules")
    allowed = " ".join(unit_values(entries, "Service", "SystemCallFilter")).split()
    assert {"@system-service", "bpf", "perf_event_open"} <= set(allowed)
    # bpf is in @privileged and perf_event_open in @debug: whatever is removed, the
    # two must be added back after it.
    filters = unit_values(entries, "Service", "SystemCallFilter")
    assert not filters[-1].startswith("~") and {"bpf", "perf_event_open"} <= set(
        filters[-1].split())
    assert set(one("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_unit_runs_the_agent_with_options_from_the_environment_file():
    entries = parse_unit(UNIT)
    (exec_start,) = unit_values(entries, "Service", "ExecStart")
    argv = exec_start.split()
    assert argv[:2] == [INSTALLED, "agent"]
    assert "--web.listen-address=${MEMTRACE_LISTEN}" in argv
    # Unbraced: systemd splits the value into words.
    assert argv[-1] == "$MEMTRACE_OPTS"
    assert unit_values(entries, "Service", "EnvironmentFile") == ["-/etc/default/memtrace"]
    (environment,) = unit_values(entries, "Service", "Environment")
    assert f"MEMTRACE_LISTEN={DEFAULT_LISTEN}" in environment.split()
    assert unit_values(entries, "Install", "WantedBy") == ["multi-user.target"]


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), line
        env[key] = shlex.split(value)[0] if value else ""
    return env


def test_environment_file():
    env = read_env_file(DEFAULTS)
    assert env["MEMTRACE_LISTEN"] == DEFAULT_LISTEN == "127.0.0.1:9877"
    assert "MEMTRACE_OPTS" in env
    # systemd splits at whitespace without quoting: no quotes inside the value.
    assert not re.search(r"['\"]", env["MEMTRACE_OPTS"])


def test_agent_accepts_the_default_options():
    """Every option in memtrace.default is one `memtrace agent` knows."""
    r = subprocess.run([sys.executable, "-m", "memtrace", "agent", "--help"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    if r.returncode != 0:
        pytest.skip("`memtrace agent` is not in this build yet")
    options = [w for w in read_env_file(DEFAULTS)["MEMTRACE_OPTS"].split()
               if w.startswith("--")] + ["--web.listen-address"]
    for option in options:
        assert option in r.stdout, f"memtrace agent --help does not mention {option}"


def test_security_exposure_stays_low():
    """systemd's own score of the sandbox (0 = locked down, 10 = none): 2.8 when
    written; the four capabilities and root account for most of it."""
    analyze = tool("systemd-analyze", "Debian package systemd")
    r = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    if "--offline" in r.stderr and r.returncode != 0:
        pytest.skip("systemd-analyze security has no --offline (systemd < 250)")
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 3.5, r.stdout
