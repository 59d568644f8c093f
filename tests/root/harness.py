"""The harness of the root tests: memtrace against /proc/PID/smaps.

A plain module (the fixtures and hooks that use it are in tests/root/conftest.py).
The tests of tests/root/accuracy, tests/root/cli and tests/root/exporter are
marked ``root`` and skipped (with the reason, ``skip_reason()``) when not running
as root or when the BCC Python bindings cannot be imported.  Where both are
available (CI), the tests run for real.

The harness
-----------
A workload (tests/workloads/scenarios.c, or any program speaking the same
protocol) writes ``PAUSE <phase> [pid=N] [child=N]`` lines to the fd named by
MT_SYNC_FD and stops itself with SIGSTOP; ``DONE`` ends the run.  For every
PAUSE the harness:

1. waits until every thread of the stopped process is in state T,
2. records t0 and waits for a memtrace snapshot of that pid whose
   ``ts >= t0 + 3 * interval`` (20 s timeout),
3. reads /proc/PID/smaps, statm and status (the process is still stopped),
4. compares them exactly (tests/groundtruth.py: compare_snapshot),
5. resumes the process with SIGCONT.

Watch mode starts ``memtrace watch PID`` while the workload is stopped at its
first point ("PAUSE start"); a PAUSE carrying ``child=N`` (a forked child)
gets its own ``memtrace watch N``, started at the child's first PAUSE.
Run mode starts ``memtrace run -- CMD`` (the workload's PAUSE lines then
arrive on memtrace's stderr, MT_SYNC_FD=2) and checks the exit status.

Differences do not stop a run: they are collected for every phase and
reported together by ``RunResult.assert_accurate()``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKLOADS_DIR = REPO_ROOT / "tests" / "workloads"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests import groundtruth as gt  # noqa: E402

INTERVAL = 0.2  # memtrace --interval
SETTLE_INTERVALS = 3  # snapshot must be taken >= 3 intervals after the stop
# MT_TIMEOUT_SCALE=N multiplies every timeout below (slow machines: the 6.1
# guest under qemu TCG runs with 4, set by scripts/guest-tests.sh).
TIMEOUT_SCALE = float(os.environ.get("MT_TIMEOUT_SCALE") or 1)
SNAPSHOT_TIMEOUT = 20.0 * TIMEOUT_SCALE  # for a snapshot after a pause
ATTACH_TIMEOUT = 90.0 * TIMEOUT_SCALE  # for the first snapshot (BCC compiles its programs)
PAUSE_TIMEOUT = 60.0 * TIMEOUT_SCALE  # for the workload's next PAUSE line
STOP_TIMEOUT = 10.0 * TIMEOUT_SCALE  # for the workload to reach state T
EXIT_TIMEOUT = 30.0 * TIMEOUT_SCALE  # for processes to exit at the end

MEMTRACE = [sys.executable, "-m", "memtrace"]
# The oracle: a stand-in for memtrace that reads /proc itself (always exact at
# quiescent points).  Used only by test_harness_selftest.py.
ORACLE = [sys.executable, str(Path(__file__).resolve().parent / "smaps_oracle.py")]
COMMON_OPTS = [
    "--format",
    "json",
    "--interval",
    str(INTERVAL),
    "--reconcile-interval",
    "0",
    "--no-serve",
]


# ---------------------------------------------------------------------------
# marking and skipping


def skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "memtrace accuracy tests need Linux"
    if os.geteuid() != 0:
        return "memtrace accuracy tests need root (eBPF): run as root"
    try:
        import bcc  # noqa: F401
    except Exception as e:  # ImportError, or a broken libbcc
        return f"memtrace accuracy tests need the BCC Python bindings (import bcc failed: {e!r})"
    return None


# ---------------------------------------------------------------------------
# process totals: statm/status where the kernel's RSS counters are exact,
# else the sums over smaps


def statm_exact() -> bool:
    """Are /proc/PID/statm and status RssAnon/RssFile/RssShmem exact on this
    kernel?  memtrace's own probe decides (memtrace.trace.procfs.statm_is_exact).
    Where they are not (6.1: RSS counters cached per task and synced every
    64 events), the process totals of a snapshot are compared with the sums
    over smaps instead; per-mapping comparisons are exact either way.
    MT_TOTALS_FROM_SMAPS=1 forces the smaps sums (to test that path)."""
    if os.environ.get("MT_TOTALS_FROM_SMAPS") == "1":
        return False
    from memtrace.trace.procfs import statm_is_exact  # probes once, then cached

    return statm_is_exact()


def totals_source() -> str:
    """One line saying what the process totals are compared with."""
    if statm_exact():
        return "statm exact on this kernel: totals compared with statm and /proc/PID/status"
    why = "statm approximate on this kernel"
    if os.environ.get("MT_TOTALS_FROM_SMAPS") == "1":
        why = "MT_TOTALS_FROM_SMAPS=1"
    return f"{why}: totals compared with smaps (sums of Rss, Anonymous, Rss - Anonymous)"


def compare_totals_with_smaps(snapshot: dict, smaps: list[dict]) -> list[str]:
    """Process totals of a snapshot against the sums over smaps: rss_bytes
    with sum(Rss), anon_bytes with sum(Anonymous), file_bytes + shmem_bytes
    with sum(Rss - Anonymous).  Exact; used where statm is approximate."""
    diffs = []
    rss = sum(t["rss_bytes"] for t in smaps)
    anon = sum(t["anonymous_bytes"] for t in smaps)
    got_file, got_shmem = snapshot.get("file_bytes"), snapshot.get("shmem_bytes")
    got_other = (
        got_file + got_shmem
        if isinstance(got_file, int) and isinstance(got_shmem, int)
        else (got_file, got_shmem)
    )
    for what, want, got in (
        ("rss_bytes: sum of smaps Rss", rss, snapshot.get("rss_bytes")),
        ("anon_bytes: sum of smaps Anonymous", anon, snapshot.get("anon_bytes")),
        ("file_bytes + shmem_bytes: sum of smaps Rss - Anonymous", rss - anon, got_other),
    ):
        if got != want:
            diffs.append(
                f"process {what} {gt._b(want)} vs memtrace {gt._b(got)}{gt._delta(got, want)}"
            )
    return diffs


_ran_accuracy_checks = False


def ran_accuracy_checks() -> bool:
    """Has any AccuracyHarness compared a snapshot with /proc in this session?"""
    return _ran_accuracy_checks


# ---------------------------------------------------------------------------
# building the workloads


@dataclass
class Workloads:
    dir: Path
    scenarios: Path
    libdummy: Path


def c_compiler() -> str:
    """$CC, gcc or cc; the test fails when there is none."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        pytest.fail("no C compiler (gcc) found: needed to build tests/workloads")
    return cc


def build_without_frame_pointers(source: Path, out: Path, *flags: str) -> Path:
    """Compile one C workload -O2 without frame pointers (as Debian builds libc),
    for the tests whose stacks must unwind through CFI; `flags` added."""
    subprocess.run([c_compiler(), "-O2", "-fomit-frame-pointer", *flags, "-o", str(out),
                    str(source)], check=True)
    return out


def build_workloads(out: Path) -> Workloads:
    """Compile tests/workloads (scenarios, libdummy.so) into the directory out."""
    cc = c_compiler()
    scen, lib = out / "scenarios", out / "libdummy.so"
    cmds = [
        [cc, "-O1", "-pthread", "-o", str(scen), str(WORKLOADS_DIR / "scenarios.c"), "-ldl"],
        [cc, "-O1", "-shared", "-fPIC", "-o", str(lib), str(WORKLOADS_DIR / "libdummy.c")],
    ]
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"building workload failed: {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return Workloads(out, scen, lib)


# ---------------------------------------------------------------------------
# helpers


class HarnessError(AssertionError):
    """The run could not go on (timeout, a process died, protocol error)."""


_SYNC_RE = re.compile(r"(PAUSE|DONE)(?: ([^\s=]+))?((?: \w+=\d+)*)\s*$")


@dataclass
class SyncEvent:
    kind: str  # "PAUSE" or "DONE"
    phase: str
    pid: int | None
    child: int | None
    raw: str
    fields: dict[str, int] = field(default_factory=dict)  # the key=N tokens

    @classmethod
    def parse(cls, line: str) -> SyncEvent | None:
        """Parse "PAUSE <phase> [key=N...]" or "DONE [key=N...]".  The line
        may sit at the end of someone else's unterminated output (in run mode
        the workload shares stderr with memtrace, whose partial line can
        precede it); the workload writes each line with a single write()."""
        m = _SYNC_RE.match(line)
        if not m:
            # embedded at the end of another line: only with an explicit pid=
            m = _SYNC_RE.search(line)
            if not m or " pid=" not in m.group(3):
                return None
        kind, phase = m.group(1), m.group(2) or ""
        kv = {k: int(v) for k, v in (p.split("=", 1) for p in m.group(3).split())}
        pid = kv.get("pid")
        child = kv.get("child")
        if child is not None:
            pid = child
        return cls(kind, phase, pid, child, m.group(0), kv)


class LineReader:
    """Reads lines from a binary file object on a thread.  Lines that are
    PAUSE/DONE events go to .events, everything else to .other."""

    def __init__(self, fobj, name: str, keep_other: bool = True):
        self.fobj = fobj
        self.name = name
        self.events: queue.Queue[SyncEvent] = queue.Queue()
        self.other: list[str] = []
        self.keep_other = keep_other
        self.eof = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"reader-{name}", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for raw in self.fobj:
                line = raw.decode("utf-8", errors="backslashreplace").rstrip("\n")
                ev = SyncEvent.parse(line)
                if ev is not None:
                    self.events.put(ev)
                elif self.keep_other:
                    self.other.append(line)
                    del self.other[:-400]
        except (OSError, ValueError):
            pass
        finally:
            self.eof.set()

    def next_event(self, timeout: float, alive=lambda: True, context=lambda: "") -> SyncEvent:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.events.get(timeout=0.1)
            except queue.Empty:
                pass
            if self.eof.is_set() and self.events.empty():
                raise HarnessError(
                    f"{self.name}: stream closed before the next PAUSE/DONE line{context()}"
                )
            if not alive() and self.events.empty():
                # give the reader a moment to drain the pipe
                time.sleep(0.3)
                if self.events.empty():
                    raise HarnessError(
                        f"{self.name}: process exited before the next PAUSE/DONE line{context()}"
                    )
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{self.name}: no PAUSE/DONE line within {timeout:.0f} s{context()}"
                )


class JsonStream:
    """memtrace's JSON Lines stdout, parsed on a thread into one queue per pid."""

    def __init__(self, fobj, name: str):
        self.name = name
        self.fobj = fobj
        self._lock = threading.Lock()
        self._queues: dict[int, queue.Queue] = {}
        self.pids_in_order: list[int] = []
        self.first_pid_seen = threading.Event()
        self.bad_lines: list[str] = []
        self.summary: dict | None = None
        self.count = 0
        self.eof = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"json-{name}", daemon=True)
        self.thread.start()

    def queue_for(self, pid: int) -> queue.Queue:
        with self._lock:
            q = self._queues.get(pid)
            if q is None:
                q = self._queues[pid] = queue.Queue()
            return q

    def _run(self):
        try:
            for raw in self.fobj:
                line = raw.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                    if isinstance(obj, dict) and set(obj) == {"summary"}:
                        self.summary = obj["summary"]    # run's last line
                        continue
                    pid = int(obj["pid"])
                except (ValueError, KeyError, TypeError):
                    self.bad_lines.append(line[:300].decode("utf-8", "backslashreplace"))
                    del self.bad_lines[:-20]
                    continue
                self.count += 1
                with self._lock:
                    if pid not in self.pids_in_order:
                        self.pids_in_order.append(pid)
                self.first_pid_seen.set()
                self.queue_for(pid).put(obj)
        except (OSError, ValueError):
            pass
        finally:
            self.eof.set()

    def wait_snapshot(self, pid: int, min_ts: float, timeout: float, context=lambda: "") -> dict:
        """The first snapshot of PID with ts >= min_ts (older ones are dropped)."""
        q = self.queue_for(pid)
        deadline = time.monotonic() + timeout
        last_ts = None
        while True:
            try:
                obj = q.get(timeout=0.05)
            except queue.Empty:
                if self.eof.is_set() and q.empty():
                    raise HarnessError(
                        f"{self.name}: memtrace's stdout closed while waiting for a snapshot"
                        f" of pid {pid} with ts >= {min_ts:.3f} (last ts seen {last_ts};"
                        f" {self.count} JSON objects in all; non-JSON stdout lines:"
                        f" {self.bad_lines[-3:]}){context()}"
                    ) from None
                if time.monotonic() > deadline:
                    raise HarnessError(
                        f"{self.name}: no snapshot of pid {pid} with ts >= {min_ts:.3f}"
                        f" within {timeout:.0f} s (now {time.time():.3f}, last ts seen for"
                        f" that pid {last_ts}; pids seen {self.pids_in_order}; non-JSON"
                        f" stdout lines: {self.bad_lines[-3:]}){context()}"
                    ) from None
                continue
            ts = obj.get("ts")
            last_ts = ts
            if isinstance(ts, (int, float)) and ts >= min_ts:
                return obj


class Memtrace:
    """One memtrace process (watch or run) and its output streams."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        *,
        stderr_events: bool = False,
        cmd: list[str] = MEMTRACE,
        **popen,
    ):
        self.args = args
        self.log_path = log_path
        env = os.environ.copy()
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env.update(popen.pop("env", {}))
        self._log = None
        if stderr_events:
            stderr = subprocess.PIPE
        else:
            self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
            stderr = self._log
        self.proc = subprocess.Popen(
            cmd + args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=str(REPO_ROOT),
            env=env,
            **popen,
        )
        self.stream = JsonStream(self.proc.stdout, name=f"memtrace {args[0]}")
        self.stderr_reader = (
            LineReader(self.proc.stderr, name="memtrace run stderr") if stderr_events else None
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_tail(self, n: int = 30) -> str:
        if self.stderr_reader is not None:
            lines = self.stderr_reader.other[-n:]
        else:
            try:
                lines = (
                    self.log_path.read_bytes().decode("utf-8", "backslashreplace").splitlines()[-n:]
                )
            except OSError:
                lines = []
        rc = self.proc.poll()
        status = rc if rc is not None else "still running"
        head = f"memtrace {' '.join(self.args)} (exit status {status})"
        return (
            head + ", stderr tail:\n    " + "\n    ".join(lines)
            if lines
            else head + ", stderr empty"
        )

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._log:
            self._log.close()


def wait_stopped(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """Wait until every thread of PID is stopped (T, or t under a tracer)."""
    deadline = time.monotonic() + timeout
    while True:
        states = gt.task_states(pid)
        if not states:
            raise HarnessError(f"pid {pid} vanished while waiting for it to stop")
        if all(s in ("T", "t") for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise HarnessError(
                f"pid {pid} not stopped after {timeout:.0f} s (thread states {states})"
            )
        time.sleep(0.005)


def _kill(pid: int | None) -> None:
    if not pid:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------
# results


@dataclass
class PhaseCheck:
    pid: int
    phase: str
    diffs: list[str]
    snapshot_ts: float
    stopped_at: float
    truth_rss: int
    memtrace_rss: object

    @property
    def ok(self) -> bool:
        return not self.diffs


@dataclass
class RunResult:
    label: str
    mode: str
    main_pid: int | None = None
    checks: list[PhaseCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # exit statuses etc.
    workload_status: int | None = None
    memtrace_status: dict[int, int | None] = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)

    def phases(self, pid: int | None = None) -> list[str]:
        return [c.phase for c in self.checks if pid is None or c.pid == pid]

    def failure_report(self) -> str:
        out = []
        bad = [c for c in self.checks if not c.ok]
        if bad:
            good = len(self.checks) - len(bad)
            out.append(
                f"{self.label} ({self.mode} mode): {len(bad)} of {len(self.checks)} quiescent"
                f" points differ from the kernel ({good} exact):"
            )
            out.append(f"  ({totals_source()})")
            for c in bad:
                rss = c.memtrace_rss
                out.append(
                    f"  pid {c.pid} phase {c.phase!r} (snapshot ts {c.snapshot_ts:.3f},"
                    f" {c.snapshot_ts - c.stopped_at:.2f} s after the stop;"
                    f" statm rss {c.truth_rss}, memtrace rss {rss}):"
                )
                out.extend("    " + d for d in c.diffs)
        if self.problems:
            out.append(f"{self.label} ({self.mode} mode): other problems:")
            out.extend("  " + p for p in self.problems)
        if out and self.logs:
            out.append("logs:")
            out.extend("  " + line for line in self.logs)
        return "\n".join(out)

    def assert_accurate(self) -> None:
        report = self.failure_report()
        assert not report, "\n" + report


# ---------------------------------------------------------------------------
# the harness


class AccuracyHarness:
    def __init__(
        self, tmp_path: Path, interval: float = INTERVAL, memtrace_cmd: list[str] = MEMTRACE
    ):
        self.tmp = tmp_path
        self.interval = interval
        self.memtrace_cmd = memtrace_cmd
        self._memtraces: list[Memtrace] = []
        self._pids: dict[int, int] = {}  # pid -> start time
        self._procs: list[subprocess.Popen] = []

    # -- memtrace processes --------------------------------------------------
    def _opts(self) -> list[str]:
        return [
            "--format",
            "json",
            "--interval",
            str(self.interval),
            "--reconcile-interval",
            "0",
            "--no-serve",
        ]

    def start_watch(self, pid: int) -> Memtrace:
        n = len(self._memtraces)
        mt = Memtrace(
            ["watch", str(pid)] + self._opts(),
            self.tmp / f"memtrace-watch-{pid}-{n}.log",
            cmd=self.memtrace_cmd,
        )
        self._memtraces.append(mt)
        return mt

    # -- one quiescent point ---------------------------------------------------
    def check_point(self, result: RunResult, mt: Memtrace, ev: SyncEvent) -> PhaseCheck:
        pid = ev.pid
        wait_stopped(pid)
        t0 = time.time()
        snap = mt.stream.wait_snapshot(
            pid,
            t0 + SETTLE_INTERVALS * self.interval,
            SNAPSHOT_TIMEOUT,
            context=lambda: f" [phase {ev.phase!r}]\n{mt.stderr_tail()}",
        )
        # ground truth, read while the process is still stopped
        smaps = gt.read_smaps(pid)
        statm = gt.read_statm(pid)
        status = gt.read_status_rss(pid)
        states = gt.task_states(pid)
        if not all(s in ("T", "t") for s in states.values()):
            raise HarnessError(
                f"pid {pid} resumed during the check of phase {ev.phase!r}: {states}"
            )
        if statm_exact():
            diffs = gt.compare_snapshot(snap, smaps, statm, status)
        else:
            # statm/status approximate here: totals against the smaps sums;
            # every mapping is still compared exactly.
            diffs = compare_totals_with_smaps(snap, smaps) + gt.compare_snapshot(snap, smaps)
        global _ran_accuracy_checks
        _ran_accuracy_checks = True
        chk = PhaseCheck(
            pid,
            ev.phase,
            diffs,
            float(snap.get("ts", 0.0)),
            t0,
            statm["resident_bytes"],
            snap.get("rss_bytes"),
        )
        result.checks.append(chk)
        return chk

    @staticmethod
    def resume(pid: int) -> None:
        os.kill(pid, signal.SIGCONT)

    # -- watch mode --------------------------------------------------------------
    def watch(
        self,
        argv: list[str],
        *,
        label: str | None = None,
        env: dict | None = None,
        expect_status: int = 0,
        hooks: dict[str, Callable[[SyncEvent], None]] | None = None,
    ) -> RunResult:
        """Run ARGV, attach `memtrace watch` at its first PAUSE, check every
        quiescent point.  Forked children (PAUSE ... child=N) get their own
        `memtrace watch N` from their first PAUSE on.  hooks[phase](event) is
        called once the process is stopped at that phase, before the check
        (to change the stopped process's memory from outside)."""
        result = RunResult(label or " ".join(map(str, argv)), "watch")
        r, w = os.pipe()
        wl_env = os.environ.copy()
        wl_env.update(env or {})
        wl_env["MT_SYNC_FD"] = str(w)
        wl_log_path = self.tmp / "workload.stderr"
        with open(wl_log_path, "wb") as wl_log:
            wl = subprocess.Popen(
                [str(a) for a in argv],
                pass_fds=(w,),
                env=wl_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=wl_log,
                cwd=str(self.tmp),
            )
        os.close(w)
        self._procs.append(wl)
        self._track(wl.pid)
        result.main_pid = wl.pid
        sync = LineReader(os.fdopen(r, "rb"), name=f"workload {result.label}")
        watchers: dict[int, Memtrace] = {}

        def ctx() -> str:
            parts = [
                f"\nworkload exit status: {wl.poll()}; workload stderr tail:\n    "
                + "\n    ".join(_tail(wl_log_path))
            ]
            parts += ["\n" + m.stderr_tail() for m in watchers.values()]
            return "".join(parts)

        ev = sync.next_event(PAUSE_TIMEOUT, alive=lambda: wl.poll() is None, context=ctx)
        if ev.kind != "PAUSE" or ev.phase != "start":
            raise HarnessError(
                f"first line from the workload should be 'PAUSE start', got {ev.raw!r}"
            )
        pid = ev.pid or wl.pid
        if pid != wl.pid:
            raise HarnessError(f"'PAUSE start' came from pid {pid}, expected {wl.pid}")
        while True:
            if ev.kind == "DONE":
                break
            pid = ev.pid or wl.pid
            self._track(pid)
            wait_stopped(pid)
            if pid not in watchers:
                if pid != wl.pid and ev.child is None:
                    raise HarnessError(f"PAUSE from unknown pid {pid}: {ev.raw!r}")
                mt = watchers[pid] = self.start_watch(pid)
                mt.stream.wait_snapshot(
                    pid,
                    0.0,
                    ATTACH_TIMEOUT,
                    context=functools.partial(_first_snapshot_context, mt),
                )
            if hooks and ev.phase in hooks:
                hooks[ev.phase](ev)
            self.check_point(result, watchers[pid], ev)
            self.resume(pid)
            ev = sync.next_event(PAUSE_TIMEOUT, alive=lambda: wl.poll() is None, context=ctx)

        try:
            result.workload_status = wl.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            result.problems.append(f"workload did not exit within {EXIT_TIMEOUT:.0f} s after DONE")
        if result.workload_status != expect_status:
            result.problems.append(
                f"workload exit status {result.workload_status}, expected {expect_status}"
            )
            result.logs.extend(_tail(wl_log_path))
        for wpid, mt in watchers.items():
            rc = mt.wait(EXIT_TIMEOUT)
            result.memtrace_status[wpid] = rc
            if rc != 0:
                what = "did not exit" if rc is None else f"exited with status {rc}"
                result.problems.append(
                    f"memtrace watch {wpid} {what} after the watched process exited"
                    " (expected exit 0)"
                )
                result.logs.append(mt.stderr_tail())
            bad = mt.stream.bad_lines
            if bad:
                result.problems.append(
                    f"memtrace watch {wpid} printed non-JSON lines on stdout: {bad[:3]}"
                )
        if any(not c.ok for c in result.checks):
            for mt in watchers.values():
                result.logs.append(mt.stderr_tail(15))
        return result

    # -- run mode ------------------------------------------------------------------
    def run(
        self, argv: list[str], *, label: str | None = None, expect_status: int = 0
    ) -> RunResult:
        """`memtrace run -- ARGV`: the workload reports on stderr (MT_SYNC_FD=2,
        which memtrace passes through); its pid is the first pid in the JSON
        stream.  Checks every quiescent point and memtrace's exit status."""
        result = RunResult(label or " ".join(map(str, argv)), "run")
        n = len(self._memtraces)
        mt = Memtrace(
            ["run"] + self._opts() + ["--"] + [str(a) for a in argv],
            self.tmp / f"memtrace-run-{n}.log",
            stderr_events=True,
            cmd=self.memtrace_cmd,
            env={"MT_SYNC_FD": "2"},
        )
        self._memtraces.append(mt)
        ctx = lambda: "\n" + mt.stderr_tail()  # noqa: E731

        ev = mt.stderr_reader.next_event(PAUSE_TIMEOUT, alive=mt.alive, context=ctx)
        if ev.kind != "PAUSE" or ev.phase != "start":
            raise HarnessError(
                f"first line from the workload should be 'PAUSE start', got {ev.raw!r}"
            )
        if ev.pid:
            self._track(ev.pid)
        # the traced pid is the first pid in memtrace's JSON stream
        if not mt.stream.first_pid_seen.wait(ATTACH_TIMEOUT):
            raise HarnessError(
                f"memtrace run printed no snapshot within {ATTACH_TIMEOUT:.0f} s{ctx()}"
            )
        main_pid = mt.stream.pids_in_order[0]
        result.main_pid = main_pid
        self._track(main_pid)
        if ev.pid and ev.pid != main_pid:
            result.problems.append(
                f"first pid in memtrace run's JSON stream is {main_pid}, but the "
                f"command's pid is {ev.pid}"
            )
            main_pid = ev.pid
        while ev.kind != "DONE":
            pid = ev.pid or main_pid
            if pid != main_pid:
                raise HarnessError(
                    f"run mode: PAUSE from pid {pid} is not supported here: {ev.raw!r}"
                )
            self.check_point(result, mt, ev)
            self.resume(pid)
            ev = mt.stderr_reader.next_event(PAUSE_TIMEOUT, alive=mt.alive, context=ctx)

        rc = mt.wait(EXIT_TIMEOUT)
        result.memtrace_status[main_pid] = rc
        result.workload_status = rc
        if rc != expect_status:
            what = "did not exit" if rc is None else f"exited with status {rc}"
            result.problems.append(
                f"memtrace run {what}; expected the command's status {expect_status}"
            )
        if mt.stream.bad_lines:
            result.problems.append(
                f"memtrace run printed non-JSON lines on stdout: {mt.stream.bad_lines[:3]}"
            )
        if result.problems or any(not c.ok for c in result.checks):
            result.logs.append(mt.stderr_tail(15))
        return result

    # -- cleanup ---------------------------------------------------------------------
    def close(self) -> None:
        # workloads first (they may be stopped; SIGKILL works on stopped ones)
        for pid, start in self._pids.items():
            if _starttime(pid) == start:  # still the same process
                _kill(pid)
        for p in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        for mt in self._memtraces:
            mt.stop()

    def _track(self, pid: int | None) -> None:
        """Remember PID (with its start time) to kill it if the test fails."""
        if pid and pid not in self._pids:
            start = _starttime(pid)
            if start is not None:
                self._pids[pid] = start


def _starttime(pid: int) -> int | None:
    """Start time of a live, non-zombie PID (None otherwise)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _first_snapshot_context(mt: Memtrace) -> str:
    return f" [first snapshot]\n{mt.stderr_tail()}"


def _tail(path: Path, n: int = 20) -> list[str]:
    try:
        return path.read_bytes().decode("utf-8", "backslashreplace").splitlines()[-n:]
    except OSError:
        return []


