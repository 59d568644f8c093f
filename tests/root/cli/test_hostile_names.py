"""Hostile names through every output (issue 16, items 6 and 9; done-when 2).

A program maps files whose names hold Rich markup, terminal escape sequences,
a newline, a carriage return, a byte that is not UTF-8 and, next to them, the
literal texts the old escaping turned them into (\\012, \\xff); its comm holds
a newline, markup and an escape. `memtrace watch` shows it as JSON, serves
/metrics (checked with promtool) and draws the live table (on a terminal and
into a file); `memtrace libs --all-files` writes CSV, JSON and a table. Every
output must give each file its own name (docs/output.md, "Names"), with its
own bytes, hold no control character from a name and never fail."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import groundtruth as gt
from tests.root.harness import ATTACH_TIMEOUT, MEMTRACE, REPO_ROOT, TIMEOUT_SCALE, Memtrace

PAGE = os.sysconf("SC_PAGE_SIZE")
# relative to a fresh directory; '/' in a name makes directories (the issue's
# ".../tag[/bold]name")
NAMES = [
    b"tag[/bold]name",
    b"[link=http://x]a[/link]",
    b"[blink]b[/blink]",
    b"esc\x1b[31mred",
    b"nl\nline",
    b"nl\\012line",          # the text maps writes for the newline above
    b"ff\xff",
    b"ff\\xff",              # the text the old escaping made of the byte above
    b"cr\rline",
]
COMM = b"h\n[/b]\x1b[2J"
# What must never reach a terminal from a name: colour, OSC 8 link, blink, clear.
INJECTED = (b"\x1b[31m", b"\x1b]8", b"\x1b[5m", b"\x1b[2J", b"\x07")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

WORKLOAD = r"""
import ast, ctypes, mmap, os, sys
base = os.fsencode(sys.argv[1])
names = ast.literal_eval(sys.argv[2])
maps = []
for i, name in enumerate(names):
    path = base + b"/" + name
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(bytes([i + 1]) * ((i + 1) * mmap.PAGESIZE))
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    os.close(fd)
    for off in range(0, len(m), mmap.PAGESIZE):
        m[off]
    maps.append(m)
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(15, ctypes.c_char_p(ast.literal_eval(sys.argv[3])), 0, 0, 0)   # PR_SET_NAME
print("READY", flush=True)
sys.stdin.readline()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected(base: bytes) -> list[tuple[bytes, str, int]]:
    """(real path, the name memtrace shows, resident bytes) of every file."""
    out = []
    for i, name in enumerate(NAMES):
        raw = os.path.normpath(base + b"/" + name)      # the kernel shows "//" as "/"
        out.append((raw, gt.decode_path(raw), (i + 1) * PAGE))
    return out


@pytest.fixture
def hostile():
    base = tempfile.mkdtemp(prefix="mt-h-", dir="/tmp")   # short: table columns fit
    proc = subprocess.Popen([sys.executable, "-c", WORKLOAD, base, repr(NAMES), repr(COMM)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"READY"
        yield proc.pid, os.fsencode(base)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def assert_no_traceback(text: str, what: str) -> None:
    assert "Traceback" not in text and "MarkupError" not in text, f"{what}:\n{text[-3000:]}"


def memtrace_env() -> dict[str, str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(COLUMNS="400", LINES="600", TERM="xterm-256color")
    return env


def watch_args(pid: int, *more: str) -> list[str]:
    return ["watch", "--interval", "0.5", "--pss-interval", "0", "--heap-interval", "0",
            *more, str(pid)]


class PtyTable:
    """`memtrace watch` (the live table) on a pseudo-terminal, 400 x 600."""

    def __init__(self, pid: int, log: Path) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 600, 400, 0, 0))
        self.log = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(MEMTRACE + watch_args(pid, "--no-serve"), stdin=slave,
                                     stdout=slave, stderr=self.log, cwd=str(REPO_ROOT),
                                     env=memtrace_env(), start_new_session=True)
        os.close(slave)
        self.out = bytearray()

    def read(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:         # the terminal's other side closed
                    return
                if not chunk:
                    return
                self.out += chunk
            elif self.proc.poll() is not None:
                return

    def wait_for(self, text: bytes, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while text not in self.out and time.monotonic() < end and self.proc.poll() is None:
            self.read(0.5)
        return text in self.out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.read(10)
        try:
            rc = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.read(1)
        os.close(self.master)
        self.log.close()
        return rc


def test_hostile_names_in_watch_json_metrics_and_table(hostile, tmp_path):
    pid, base = hostile
    want = expected(base)
    shown = [s for _, s, _ in want]
    assert len(set(shown)) == len(shown)
    port = free_port()
    table_file = tmp_path / "table.txt"
    json_mt = Memtrace(watch_args(pid, "--format", "json",
                                  "--web.listen-address", f"127.0.0.1:{port}"),
                       tmp_path / "json.log")
    file_mt = Memtrace(watch_args(pid, "--format", "table", "--no-serve", "-o",
                                  str(table_file)),
                       tmp_path / "file.log", env={"COLUMNS": "400", "LINES": "600"})
    term = PtyTable(pid, tmp_path / "pty.log")
    problems: list[str] = []      # every output is checked; all problems reported together
    try:
        # -- JSON -------------------------------------------------------------
        snap = json_mt.stream.wait_snapshot(pid, 0, timeout=ATTACH_TIMEOUT,
                                            context=json_mt.stderr_tail)
        problems += json_problems(snap, want)
        # -- /metrics, promtool -----------------------------------------------
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                      timeout=10).read().decode("utf-8")
        problems += metrics_problems(text, pid, want)
        # -- the table, on a terminal ------------------------------------------
        if not term.wait_for(shown[-1].encode(), ATTACH_TIMEOUT):
            problems.append(f"table on a terminal never showed {shown[-1]!r}")
        term.read(2)
        # -- the table, into a file (a plain frame per interval) ----------------
        deadline = time.monotonic() + ATTACH_TIMEOUT
        while (b"first snapshot" not in (tmp_path / "file.log").read_bytes()
               and file_mt.alive() and time.monotonic() < deadline):
            time.sleep(0.2)
        time.sleep(1.5 * TIMEOUT_SCALE)
    finally:
        rc_term = term.stop()
        json_mt.stop()
        file_mt.stop()

    out = bytes(term.out)
    pty_log = (tmp_path / "pty.log").read_text(errors="replace")
    problems += table_problems(out, "table on a terminal", shown, pty_log, rc_term, (0, 130))
    problems += table_problems(table_file.read_bytes(), "table into a file", shown,
                               file_mt.log_path.read_text(errors="replace"),
                               file_mt.proc.returncode, (0, -signal.SIGTERM))
    if CONTROL.search(table_file.read_bytes().decode("utf-8", "replace").replace("\n", "")):
        problems.append("table into a file: a control character")
    log = json_mt.log_path.read_text(errors="replace")
    if "Traceback" in log:
        problems.append(f"watch --format json: a traceback:\n{log[-2000:]}")
    assert not problems, "\n".join(problems)


def json_problems(snap: dict, want: list[tuple[bytes, str, int]]) -> list[str]:
    problems = []
    by_path: dict[str, list[dict]] = {}
    for m in snap["mappings"]:
        by_path.setdefault(m["path"], []).append(m)
        for key in ("path", "mapping"):
            if CONTROL.search(m[key]):
                problems.append(f"JSON: control character in {key} {m[key]!r}")
    for raw, name, size in want:
        got = by_path.get(name, [])
        if len(got) != 1:
            problems.append(f"JSON: {len(got)} mappings named {name!r} (file {raw!r})")
        elif got[0]["file_bytes"] != size or got[0]["mapping"] != name:
            problems.append(f"JSON: {name!r}: file_bytes {got[0]['file_bytes']} (want {size}),"
                            f" mapping {got[0]['mapping']!r}")
    if snap["comm"] != gt.decode_path(COMM):
        problems.append(f"JSON: comm {snap['comm']!r}, want {gt.decode_path(COMM)!r}")
    return problems


def metrics_problems(text: str, pid: int, want: list[tuple[bytes, str, int]]) -> list[str]:
    problems = []
    promtool = shutil.which("promtool")
    if not promtool and os.environ.get("CI"):
        problems.append("/metrics: promtool not installed (Debian package prometheus)")
    if promtool:
        r = subprocess.run([promtool, "check", "metrics"], input=text,
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            problems.append(f"/metrics: promtool check metrics: {r.stdout}{r.stderr}")
    if CONTROL.search(text.replace("\n", "")):
        problems.append("/metrics: a control character in the text")
    series: dict[str, float] = {}
    comms = set()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("pid") != str(pid):
                continue
            if "comm" in s.labels:
                comms.add(s.labels["comm"])
            if s.name == "memtrace_mapping_resident_bytes" and s.labels["type"] == "file":
                if s.labels["mapping"] in series:
                    problems.append(f"/metrics: two series for {s.labels}")
                series[s.labels["mapping"]] = s.value
    if comms != {gt.decode_path(COMM)}:
        problems.append(f"/metrics: comm labels {comms}, want {gt.decode_path(COMM)!r}")
    for _, name, size in want:
        if series.get(name) != size:
            problems.append(f"/metrics: {name!r} resident {series.get(name)}, want {size}")
    return problems


def table_problems(out: bytes, what: str, names: list[str], log: str, rc: int | None,
                   codes: tuple[int, ...]) -> list[str]:
    problems = []
    for seq in INJECTED:
        at = out.find(seq)
        if at >= 0:
            problems.append(f"{what}: {seq!r} written: {out[max(0, at - 100):at + 100]!r}")
    try:
        rendered = out.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(f"{what}: not UTF-8 ({e})")
        rendered = out.decode("utf-8", "replace")
    for name in [*names, "[heap]", "[stack]", "[vdso]", gt.decode_path(COMM)]:
        if name not in rendered:
            problems.append(f"{what}: {name!r} not shown")
    if "Traceback" in log or "MarkupError" in log:
        problems.append(f"{what}: a traceback:\n{log[-2000:]}")
    if rc not in codes:
        problems.append(f"{what}: exit status {rc}, want one of {codes}")
    return problems


def test_hostile_names_in_libs_csv_json_and_table(hostile):
    pid, base = hostile
    want = expected(base)
    env = memtrace_env()
    outs = {}
    for fmt in ("csv", "json", "table"):
        r = subprocess.run(MEMTRACE + ["libs", "--all-files", "--format", fmt, str(pid)],
                           capture_output=True, cwd=str(REPO_ROOT), env=env,
                           timeout=120 * TIMEOUT_SCALE)
        assert r.returncode == 0, (fmt, r.stderr.decode(errors="replace"))
        assert_no_traceback(r.stderr.decode(errors="replace"), f"libs --format {fmt}")
        text = r.stdout.decode("utf-8")
        assert not CONTROL.search(text.replace("\n", "")), (fmt, text[-2000:])
        outs[fmt] = text
    rows = list(csv.reader(io.StringIO(outs["csv"])))
    assert rows[0][:3] == ["library", "pid", "comm"]
    totals = {}
    for row in rows[1:]:
        if row[1] == "" and row[0] != "[total]":
            assert row[0] not in totals, row
            totals[row[0]] = int(row[3])
    assert any(r[2] == gt.decode_path(COMM) for r in rows[1:] if r[1] == str(pid))
    doc = json.loads(outs["json"])
    libs: dict[str, int] = {}
    for lib in doc["libraries"]:
        assert lib["path"] not in libs, lib["path"]
        libs[lib["path"]] = lib["rss_bytes"]
    for _, name, size in want:
        assert totals.get(name) == size, (name, size, totals.get(name))
        assert libs.get(name) == size, (name, size, libs.get(name))
        assert name in outs["table"], name
