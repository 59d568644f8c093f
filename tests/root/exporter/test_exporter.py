"""The /metrics endpoint of a real `memtrace watch` (root + BPF): at quiescent
points its series equal /proc/PID/status and smaps summed by mapping identity,
a real Prometheus server scrapes it and reads back the same values, series of
an exited process go away, and an exposed listener without protection warns.

Root + BCC only (see tests/root/harness.py); the Prometheus tests also need the
`prometheus` binary (Debian package prometheus) and skip without it:
    sudo .venv/bin/python -m pytest tests/root/exporter/test_exporter.py -v
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from memtrace.exporter.rows import safe_label
from tests.root import harness as harness_conftest
from tests.root.harness import (
    ATTACH_TIMEOUT,
    EXIT_TIMEOUT,
    INTERVAL,
    AccuracyHarness,
    HarnessError,
    Memtrace,
    SyncEvent,
    gt,
)
from tests.unit.exporter.helpers import Scrape

pytestmark = [pytest.mark.root]

OTHER = "[other]"
TYPES = ("anon", "file", "shmem")
# MT_TIMEOUT_SCALE (slow guests), when the harness knows it
SCALE = getattr(harness_conftest, "TIMEOUT_SCALE", 1.0)
PROMETHEUS_TIMEOUT = 60.0 * SCALE  # for Prometheus to start, and to scrape a fresh sample
SERIES_TIMEOUT = 10.0 * SCALE  # for memtrace to show or drop a process's series

# A file name that is hard on every layer: quotes, backslash, braces, spaces,
# '=' and ',', a newline (maps shows it as \012) and a byte that is not UTF-8
# (memtrace shows it as \xff).
HOSTILE_NAME = b'we"ird \\ {name}=a,b\n\xff.bin'

WORKLOAD = textwrap.dedent("""
    import mmap, os, signal, sys
    fd = int(os.environ.get("MT_SYNC_FD", "2"))
    PAGE = mmap.PAGESIZE

    def pause(name):
        os.write(fd, ("PAUSE %s pid=%d\\n" % (name, os.getpid())).encode())
        os.kill(os.getpid(), signal.SIGSTOP)

    def touch(m, step=PAGE):
        for off in range(0, len(m), step):
            m[off] = 1

    pause("start")
    anon = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    touch(anon)
    shared = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    touch(shared, 2 * PAGE)
    mfd = os.memfd_create("mt-exporter")
    os.ftruncate(mfd, 2 << 20)
    memfd = mmap.mmap(mfd, 2 << 20, flags=mmap.MAP_SHARED)
    touch(memfd)
    path = os.fsencode(sys.argv[1])
    with open(path, "wb") as f:
        f.write(os.urandom(4 << 20))
    hfd = os.open(path, os.O_RDWR)
    hostile = mmap.mmap(hfd, 4 << 20, flags=mmap.MAP_PRIVATE)
    total = sum(hostile[off] for off in range(0, len(hostile), 2 * PAGE))
    for off in range(0, 1 << 20, PAGE):  # copy-on-write: anon pages in a file mapping
        hostile[off] = 7
    blob = bytearray(8 << 20)
    blob[::PAGE] = b"x" * len(blob[::PAGE])
    pause("allocated")
    anon.close()
    hostile.madvise(mmap.MADV_DONTNEED, 0, 2 << 20)
    del blob
    pause("freed")
    os.write(fd, ("DONE pid=%d\\n" % os.getpid()).encode())
""")
WORKLOAD_PHASES = ["start", "allocated", "freed"]


# ---------------------------------------------------------------------------
# helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str, *, timeout: float = 5.0, context: ssl.SSLContext | None = None,
          headers: dict[str, str] | None = None) -> bytes:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
        return r.read()


def scrape(port: int) -> Scrape:
    return Scrape(fetch(f"http://127.0.0.1:{port}/metrics").decode("utf-8"))


def identity(path: str) -> str:
    """The mapping label memtrace reports for a maps path (docs/output.md,
    docs/metrics.md): the path, [heap], [stack], [anon] or [anon:name]; values
    over 512 characters are cut and end in a hash of the whole value."""
    if not path:
        return "[anon]"
    if path.startswith("[stack"):
        return "[stack]"
    return safe_label(path)


def statm_exact() -> bool:
    """Are /proc/PID/status RssAnon/RssFile/RssShmem exact on this kernel? (The
    harness decides, where it knows how; they are on kernels without cached
    per-task RSS counters.)"""
    check = getattr(harness_conftest, "statm_exact", None)
    return True if check is None else bool(check())


def _bss_range(pid: int, first: dict) -> tuple[int, int] | None:
    """[start, end) of an object's zero-fill pages past its file data, from
    `readelf -lW` (independent of memtrace's own ELF reader): the last writable
    PT_LOAD's VirtAddr + FileSiz .. VirtAddr + MemSiz, page-rounded, biased by
    where the object's first VMA (file offset 0) sits."""
    mf = f"/proc/{pid}/map_files/{first['start']:x}-{first['end']:x}"
    r = subprocess.run(["readelf", "-lW", mf], capture_output=True, text=True)
    loads = [ln.split() for ln in r.stdout.splitlines() if ln.strip().startswith("LOAD ")]
    if r.returncode != 0 or not loads:
        return None
    up = lambda x: (x + 4095) & ~4095  # noqa: E731
    bias = first["start"] - (int(loads[0][2], 16) & ~4095)
    rw = [f for f in loads if "W" in "".join(f[6:-1])]
    if not rw:
        return None
    va, filesz, memsz = int(rw[-1][2], 16), int(rw[-1][4], 16), int(rw[-1][5], 16)
    return bias + up(va + filesz), bias + up(va + memsz)


def identities(smaps: list[dict], pid: int | None) -> list[str]:
    """The mapping label of every VMA: identity(path), except that the bss of a
    library or of the executable (the anonymous rw- VMA right after its data,
    inside the ELF's zero-fill range) carries its object's path (docs/metrics.md)."""
    out = [identity(m["path"]) for m in smaps]
    if pid is None:
        return out
    first: dict[str, dict] = {}
    for i, m in enumerate(smaps):
        if m["path"] and m["offset"] == 0 and not m["path"].startswith("["):
            first[m["path"]] = m
        if (i == 0 or m["path"] or m["perms"] != "rw-p" or m["inode"]
                or smaps[i - 1]["perms"] != "rw-p" or smaps[i - 1]["end"] != m["start"]):
            continue
        prev = smaps[i - 1]
        if not prev["path"] or prev["path"].startswith("[") or prev["path"] not in first:
            continue
        bss = _bss_range(pid, first[prev["path"]])
        if bss and m["start"] == bss[0] and m["end"] <= bss[1]:
            out[i] = identity(prev["path"])
    return out


def truth_by_identity(smaps: list[dict], pid: int | None = None) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"rss": 0, "anon": 0, "virtual": 0})
    for m, name in zip(smaps, identities(smaps, pid)):
        t = out[name]
        t["rss"] += m["rss_bytes"]
        t["anon"] += m["anonymous_bytes"]
        t["virtual"] += m["size_bytes"]
    return dict(out)


def process_diffs(got_proc: dict[str, int], pid: int, smaps: list[dict],
                  status: dict) -> list[str]:
    """memtrace_process_resident_bytes by type against /proc/PID/status, or
    against the smaps sums where the kernel's RSS counters are approximate."""
    diffs = []
    if statm_exact():
        for t in TYPES:
            want, got = status[f"rss_{t}_bytes"], got_proc.get(t)
            if got != want:
                diffs.append(f"memtrace_process_resident_bytes{{pid={pid},type={t}}} = {got}, "
                             f"/proc/PID/status Rss{t.capitalize()} = {want}")
    else:  # RSS counters approximate on this kernel (6.1): the smaps sums are exact
        anon = sum(m["anonymous_bytes"] for m in smaps)
        other = sum(m["rss_bytes"] for m in smaps) - anon
        got_other = got_proc.get("file", 0) + got_proc.get("shmem", 0)
        if got_proc.get("anon") != anon:
            diffs.append(f"memtrace_process_resident_bytes{{pid={pid},type=anon}} = "
                         f"{got_proc.get('anon')}, sum of smaps Anonymous = {anon}")
        if got_other != other:
            diffs.append(f"memtrace_process_resident_bytes{{pid={pid},type=file+shmem}} = "
                         f"{got_other}, sum of smaps Rss - Anonymous = {other}")
    return diffs


def compare_metrics(values: dict[str, dict], pid: int, smaps: list[dict],
                    status: dict) -> list[str]:
    """values: {"process": {type: bytes}, "virtual": bytes, "mappings": {identity:
    {"rss", "anon", "virtual"}}} as read from a scrape or from Prometheus."""
    diffs = process_diffs(values["process"], pid, smaps, status)
    if "virtual" in values:
        want = sum(m["size_bytes"] for m in smaps)
        if values["virtual"] != want:
            diffs.append(f"memtrace_process_virtual_bytes = {values['virtual']}, "
                         f"sum of smaps Size = {want}")
    truth, got = truth_by_identity(smaps, pid), values["mappings"]
    for name in sorted(set(truth) | set(got)):
        t, g = truth.get(name), got.get(name)
        if t is None:
            diffs.append(f"mapping {name!r}: in the metrics {g} but not in smaps")
        elif g is None:
            diffs.append(f"mapping {name!r}: in smaps {t} but no series")
        else:
            for key in g:
                if g[key] != t[key]:
                    diffs.append(f"mapping {name!r} {key}: metrics {g[key]}, smaps {t[key]}")
    return diffs


def values_from_scrape(s: Scrape, pid: int) -> dict[str, dict]:
    p = str(pid)
    maps: dict[str, dict[str, int]] = defaultdict(lambda: {"rss": 0, "anon": 0, "virtual": 0})
    for labels, v in s.series("memtrace_mapping_resident_bytes", pid=p):
        maps[labels["mapping"]]["rss"] += int(v)
        if labels["type"] == "anon":
            maps[labels["mapping"]]["anon"] += int(v)
    for labels, v in s.series("memtrace_mapping_virtual_bytes", pid=p):
        maps[labels["mapping"]]["virtual"] += int(v)
    return {
        "process": {lab["type"]: int(v)
                    for lab, v in s.series("memtrace_process_resident_bytes", pid=p)},
        "virtual": int(s.value("memtrace_process_virtual_bytes", pid=p)),
        "mappings": dict(maps),
    }


def self_consistency(s: Scrape, pid: int) -> list[str]:
    """The per-mapping series sum to the process series, type by type."""
    p, diffs = str(pid), []
    for t in TYPES:
        total = s.total("memtrace_mapping_resident_bytes", pid=p, type=t)
        proc = s.value("memtrace_process_resident_bytes", pid=p, type=t)
        if total != proc:
            diffs.append(f"type {t}: mapping series sum to {total}, process series {proc}")
    if s.duplicates():
        diffs.append(f"duplicate series: {s.duplicates()[:3]}")
    return diffs


def read_truth(pid: int) -> tuple[list[dict], dict]:
    smaps, status = gt.read_smaps(pid), gt.read_status_rss(pid)
    states = gt.task_states(pid)
    if not all(s in ("T", "t") for s in states.values()):
        raise HarnessError(f"pid {pid} resumed while reading the ground truth: {states}")
    return smaps, status


def wait_for(what: str, predicate: Callable[[], object], timeout: float,
             context: Callable[[], str] = lambda: "") -> object:
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
        except (OSError, ValueError, KeyError) as e:
            last_error, result = e, None
        if result:
            return result
        time.sleep(0.1)
    raise HarnessError(f"timed out after {timeout:.0f} s waiting for {what}"
                       f" (last error: {last_error!r}){context()}")


def log_text(mt: Memtrace) -> str:
    try:
        return mt.log_path.read_bytes().decode("utf-8", "backslashreplace")
    except OSError:
        return ""


# ---------------------------------------------------------------------------
# the harness, serving /metrics


class ExporterHarness(AccuracyHarness):
    """The accuracy harness with /metrics served: at every quiescent point,
    after the JSON snapshot has been checked, one scrape is compared with
    /proc too (the process is still stopped), then on_point(ev, port) runs."""

    def __init__(self, tmp_path: Path, port: int | None = None,
                 extra_opts: list[str] | None = None,
                 on_point: Callable[[SyncEvent, int], None] | None = None) -> None:
        super().__init__(tmp_path)
        self.next_port = port
        self.extra_opts = extra_opts or []
        self.on_point = on_point
        self.ports: dict[int, int] = {}  # watched pid -> its memtrace's port
        self.metric_diffs: list[str] = []
        self.scrapes: dict[tuple[int, str], Scrape] = {}

    def _opts(self) -> list[str]:
        opts = [o for o in super()._opts() if o != "--no-serve"]
        return opts + ["--web.listen-address", f"127.0.0.1:{self._port}"] + self.extra_opts

    def start_watch(self, pid: int) -> Memtrace:
        self._port = self.next_port or free_port()
        self.next_port = None
        self.ports[pid] = self._port
        return super().start_watch(pid)

    def check_point(self, result, mt, ev):
        chk = super().check_point(result, mt, ev)
        pid, port = ev.pid, self.ports[ev.pid]
        s = scrape(port)
        smaps, status = read_truth(pid)
        self.scrapes[(pid, ev.phase)] = s
        diffs = compare_metrics(values_from_scrape(s, pid), pid, smaps, status)
        diffs += self_consistency(s, pid)
        self.metric_diffs += [f"phase {ev.phase!r}: {d}" for d in diffs]
        if self.on_point:
            self.on_point(ev, port)
        return chk

    def report(self) -> str:
        if not self.metric_diffs:
            return ""
        logs = "\n".join(m.stderr_tail(15) for m in self._memtraces)
        return ("/metrics differs from the kernel at quiescent points:\n  "
                + "\n  ".join(self.metric_diffs) + "\n" + logs)


@pytest.fixture
def exporter_harness(tmp_path):
    harnesses: list[ExporterHarness] = []

    def make(**kw) -> ExporterHarness:
        h = ExporterHarness(tmp_path, **kw)
        harnesses.append(h)
        return h

    try:
        yield make
    finally:
        for h in harnesses:
            h.close()


def hostile_path(tmp_path: Path) -> tuple[bytes, str]:
    """The workload's file (bytes) and the name memtrace shows for it (str:
    the real bytes escaped, docs/output.md "Names")."""
    d = tmp_path / "data dir"
    d.mkdir(exist_ok=True)
    raw = os.fsencode(d) + b"/" + HOSTILE_NAME
    return raw, gt.decode_path(raw)


def watch_workload(h: ExporterHarness, raw: bytes):
    return h.watch([sys.executable, "-c", WORKLOAD, os.fsdecode(raw)],
                   label="python3 exporter workload")


# ---------------------------------------------------------------------------
# /metrics against /proc


def test_metrics_equal_status_and_smaps(exporter_harness, tmp_path):
    raw, shown = hostile_path(tmp_path)
    h = exporter_harness(extra_opts=["--max-mapping-series", "1000"])
    result = watch_workload(h, raw)
    assert result.phases() == WORKLOAD_PHASES, result.failure_report()
    result.assert_accurate()  # the JSON snapshots (the same data) are exact
    assert not h.report(), h.report()
    s = h.scrapes[(result.main_pid, "allocated")]
    names = s.label_values("memtrace_mapping_resident_bytes", "mapping", pid=str(result.main_pid))
    assert shown in names, f"hostile file {shown!r} not among {sorted(names)}"
    assert "[heap]" in names and "[anon]" in names and OTHER not in names
    libs = [n for n in names if re.search(r"/lib(c|python3[.\d]*)\.so", n)]
    assert libs, f"no library series among {sorted(names)}"


def test_metrics_with_the_series_cap(exporter_harness, tmp_path):
    """With --max-mapping-series 5 the process series are still exact, the
    mapping series (with [other]) still sum to them, and the 4 largest
    identities keep exact series of their own."""
    raw, _ = hostile_path(tmp_path)
    h = exporter_harness(extra_opts=["--max-mapping-series", "5"])
    checked = []

    def on_point(ev: SyncEvent, port: int) -> None:
        s = h.scrapes[(ev.pid, ev.phase)]
        smaps, _ = read_truth(ev.pid)
        truth = truth_by_identity(smaps, ev.pid)
        got = values_from_scrape(s, ev.pid)["mappings"]
        assert len(got) == 5 and OTHER in got, sorted(got)
        top = sorted(truth.values(), key=lambda t: t["rss"], reverse=True)[:4]
        kept = [v for k, v in got.items() if k != OTHER]
        assert sorted(t["rss"] for t in top) == sorted(v["rss"] for v in kept), (top, kept)
        for name, v in got.items():
            if name != OTHER:
                assert v == truth[name], name
        checked.append(ev.phase)

    h.on_point = on_point
    # the expected diffs: identities folded into [other] are "missing"
    result = watch_workload(h, raw)
    result.assert_accurate()
    assert checked == WORKLOAD_PHASES
    wrong = [d for d in h.metric_diffs if "memtrace_process" in d or "mapping series sum" in d
             or "duplicate" in d]
    assert not wrong, "\n".join(wrong)


LONG_PATHS_WORKLOAD = textwrap.dedent("""
    import mmap, os, signal, sys
    fd = int(os.environ.get("MT_SYNC_FD", "2"))

    def pause(name):
        os.write(fd, ("PAUSE %s pid=%d\\n" % (name, os.getpid())).encode())
        os.kill(os.getpid(), signal.SIGSTOP)

    pause("start")
    maps = []
    for name, pages in (("a.bin", 64), ("b.bin", 128)):
        path = os.path.join(sys.argv[1], name)
        with open(path, "wb") as f:
            f.write(b"x" * (pages * mmap.PAGESIZE))
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        sum(m[off] for off in range(0, len(m), mmap.PAGESIZE))
        maps.append(m)
    pause("mapped")
    os.write(fd, ("DONE pid=%d\\n" % os.getpid()).encode())
""")


def test_long_paths_with_a_common_prefix(exporter_harness, tmp_path):
    deep = tmp_path.joinpath(*["d" * 200] * 3)  # > 600 characters before the file name
    deep.mkdir(parents=True)
    h = exporter_harness(extra_opts=["--max-mapping-series", "1000"])
    result = h.watch([sys.executable, "-c", LONG_PATHS_WORKLOAD, str(deep)],
                     label="python3 long paths workload")
    assert result.phases() == ["start", "mapped"], result.failure_report()
    result.assert_accurate()  # the JSON output has both paths in full
    assert not h.report(), h.report()


# ---------------------------------------------------------------------------
# a real Prometheus server


class Prometheus:
    def __init__(self, tmp: Path, scrape_configs: list[dict]) -> None:
        exe = shutil.which("prometheus")
        if not exe:
            pytest.skip("prometheus not installed (Debian package prometheus): "
                        "cannot test a real scrape")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                             "evaluation_interval": "1s"},
                  "scrape_configs": scrape_configs}
        cfg_path = tmp / "prometheus.yml"
        cfg_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        (tmp / "tsdb").mkdir()
        self.log_path = tmp / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [exe, f"--config.file={cfg_path}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, cwd=tmp)
        wait_for("Prometheus to be ready",
                 lambda: self.proc.poll() is None and fetch(f"{self.url}/-/ready") is not None,
                 PROMETHEUS_TIMEOUT, self.context)

    def context(self) -> str:
        tail = self.log_path.read_bytes().decode("utf-8", "replace").splitlines()[-15:]
        return "\nprometheus log tail:\n    " + "\n    ".join(tail)

    def api(self, path: str, **params: str) -> object:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        body = json.loads(fetch(url))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, q: str) -> list[tuple[dict[str, str], float]]:
        data = self.api("query", query=q)
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def own_metrics(self) -> Scrape:
        """Prometheus's own /metrics (its scrape-failure counters)."""
        return Scrape(fetch(f"{self.url}/metrics").decode("utf-8"))

    def target(self, job: str) -> dict:
        for t in self.api("targets")["activeTargets"]:
            if t["labels"]["job"] == job:
                return t
        raise KeyError(job)

    def wait_up(self, job: str) -> dict:
        def up():
            t = self.target(job)
            return t if t["health"] == "up" and t["lastScrape"] != "0001-01-01T00:00:00Z" \
                else None
        try:
            return wait_for(f"target {job} up", up, PROMETHEUS_TIMEOUT, self.context)
        except HarnessError:
            with contextlib.suppress(Exception):
                t = self.target(job)
                raise HarnessError(f"target {job} is {t['health']}: {t['lastError']!r}"
                                   f"{self.context()}") from None
            raise

    def wait_fresh(self, selector: str, after: float) -> None:
        """Until every series of `selector` has a sample newer than `after`."""
        def fresh():
            ts = self.query(f"timestamp({selector})")
            return ts and min(v for _, v in ts) > after
        wait_for(f"a sample of {selector} newer than {after:.3f}", fresh,
                 PROMETHEUS_TIMEOUT, self.context)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


@pytest.fixture
def prometheus(tmp_path):
    started: list[Prometheus] = []

    def start(scrape_configs: list[dict]) -> Prometheus:
        d = tmp_path / f"prometheus{len(started)}"
        d.mkdir()
        p = Prometheus(d, scrape_configs)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            p.stop()


def values_from_prometheus(prom: Prometheus, pid: int) -> dict[str, dict]:
    maps: dict[str, dict[str, int]] = defaultdict(lambda: {"rss": 0, "anon": 0, "virtual": 0})
    sel = f'{{pid="{pid}",job="memtrace"}}'
    for labels, v in prom.query(f"memtrace_mapping_resident_bytes{sel}"):
        maps[labels["mapping"]]["rss"] += int(v)
        if labels["type"] == "anon":
            maps[labels["mapping"]]["anon"] += int(v)
    for labels, v in prom.query(f"memtrace_mapping_virtual_bytes{sel}"):
        maps[labels["mapping"]]["virtual"] += int(v)
    return {
        "process": {lab["type"]: int(v)
                    for lab, v in prom.query(f"memtrace_process_resident_bytes{sel}")},
        "virtual": int(prom.query(f"memtrace_process_virtual_bytes{sel}")[0][1]),
        "mappings": dict(maps),
    }


def test_prometheus_scrapes_exact_values(exporter_harness, prometheus, tmp_path):
    raw, shown = hostile_path(tmp_path)
    port = free_port()
    prom = prometheus([{"job_name": "memtrace",
                        "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}])
    h = exporter_harness(port=port, extra_opts=["--max-mapping-series", "1000"])
    compared: dict[str, list[str]] = {}

    def on_point(ev: SyncEvent, _port: int) -> None:
        if ev.phase == "start":
            prom.wait_up("memtrace")
            return
        stopped_at = time.time()
        prom.wait_fresh(f'memtrace_mapping_resident_bytes{{pid="{ev.pid}"}}', stopped_at)
        got = values_from_prometheus(prom, ev.pid)
        smaps, status = read_truth(ev.pid)
        compared[ev.phase] = compare_metrics(got, ev.pid, smaps, status)
        if ev.phase == "allocated":
            assert shown in got["mappings"], (
                f"Prometheus has no series for {shown!r}: {sorted(got['mappings'])}")
        # every scrape so far parsed (the hostile path included) and none failed
        t = prom.target("memtrace")
        assert t["health"] == "up" and not t["lastError"], t
        (_, up), = prom.query('up{job="memtrace"}')
        assert up == 1.0
        own = prom.own_metrics()
        dropped = {n: own.value(n) for n in (
            "prometheus_target_scrapes_sample_duplicate_timestamp_total",
            "prometheus_target_scrapes_sample_out_of_order_total",
            "prometheus_target_scrapes_sample_out_of_bounds_total")}
        assert not any(dropped.values()), f"Prometheus dropped memtrace samples: {dropped}"

    h.on_point = on_point
    result = watch_workload(h, raw)
    result.assert_accurate()
    assert not h.report(), h.report()
    assert set(compared) == {"allocated", "freed"}, compared
    bad = {k: v for k, v in compared.items() if v}
    assert not bad, "Prometheus's values differ from the kernel:\n" + "\n".join(
        f"  {phase}: {d}" for phase, ds in bad.items() for d in ds)


def test_prometheus_scrapes_through_tls_and_basic_auth(prometheus, tmp_path):
    bcrypt = pytest.importorskip("bcrypt")
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed: cannot make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    hashed = bcrypt.hashpw(b"scrape-pw", bcrypt.gensalt(rounds=6)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                   f"basic_auth_users:\n  prom: '{hashed}'\n")
    target = subprocess.Popen(["sleep", "600"])
    port = free_port()
    mt = Memtrace(["watch", str(target.pid), "--format", "json", "--interval", str(INTERVAL),
                   "--reconcile-interval", "0", "--web.listen-address", f"127.0.0.1:{port}",
                   "--web.config.file", str(web)], tmp_path / "memtrace-tls.log")
    try:
        mt.stream.wait_snapshot(target.pid, 0.0, ATTACH_TIMEOUT,
                                context=lambda: "\n" + mt.stderr_tail())
        prom = prometheus([{
            "job_name": "memtrace", "scheme": "https",
            "tls_config": {"ca_file": str(cert)},
            "basic_auth": {"username": "prom", "password": "scrape-pw"},
            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}])
        prom.wait_up("memtrace")
        after = time.time()
        prom.wait_fresh(f'memtrace_process_resident_bytes{{pid="{target.pid}"}}', after)
        got = {lab["type"]: int(v) for lab, v in prom.query(
            f'memtrace_process_resident_bytes{{pid="{target.pid}"}}')}
        # sleep(1) does not touch its memory while it sleeps
        diffs = process_diffs(got, target.pid, gt.read_smaps(target.pid),
                              gt.read_status_rss(target.pid))
        assert not diffs, diffs
        assert "https://127.0.0.1" in log_text(mt)
    finally:
        target.kill()
        target.wait()
        mt.stop()


# ---------------------------------------------------------------------------
# lifecycle and warnings


def test_exited_target_leaves_the_scrape_and_serving_continues(tmp_path):
    a = subprocess.Popen(["sleep", "600"])
    b = subprocess.Popen(["sleep", "600"])
    port = free_port()
    mt = Memtrace(["watch", str(a.pid), str(b.pid), "--format", "json", "--interval",
                   str(INTERVAL), "--reconcile-interval", "0",
                   "--web.listen-address", f"127.0.0.1:{port}"], tmp_path / "memtrace.log")
    ctx = lambda: "\n" + mt.stderr_tail()  # noqa: E731
    try:
        for p in (a, b):
            mt.stream.wait_snapshot(p.pid, 0.0, ATTACH_TIMEOUT, context=ctx)

        def pids() -> set[str]:
            return scrape(port).label_values("memtrace_process_resident_bytes", "pid")

        wait_for("both pids in the scrape", lambda: pids() == {str(a.pid), str(b.pid)},
                 SERIES_TIMEOUT, ctx)
        a.kill()
        a.wait()  # reaped: the pid is gone, as when a real parent reaps its child
        gone_line = f"pid {a.pid} exited"
        wait_for(f"'{gone_line}' on memtrace's stderr", lambda: gone_line in log_text(mt),
                 SERIES_TIMEOUT, ctx)
        time.sleep(2 * INTERVAL)  # the tick that printed the line has published
        s = scrape(port)
        left = [(n, lab) for n, lab, _ in s.samples if lab.get("pid") == str(a.pid)]
        assert not left, f"series of the exited pid still served: {left[:5]}"
        assert s.label_values("memtrace_process_resident_bytes", "pid") == {str(b.pid)}
        assert s.value("memtrace_targets") == 1
        for _ in range(5):  # it does not come back, and the exporter keeps serving
            time.sleep(INTERVAL)
            s = scrape(port)
            assert s.label_values("memtrace_process_resident_bytes", "pid") == {str(b.pid)}
        assert mt.alive(), mt.stderr_tail()
        b.kill()
        b.wait()
        assert mt.wait(EXIT_TIMEOUT) == 0, mt.stderr_tail()
        with pytest.raises(OSError):  # the server went away with memtrace
            scrape(port)
    finally:
        for p in (a, b):
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()
        mt.stop()


def test_exposed_listen_address_without_protection_warns(tmp_path):
    target = subprocess.Popen(["sleep", "600"])
    port = free_port()
    mt = Memtrace(["watch", str(target.pid), "--format", "json", "--interval", str(INTERVAL),
                   "--web.listen-address", f"0.0.0.0:{port}"], tmp_path / "memtrace.log")
    try:
        mt.stream.wait_snapshot(target.pid, 0.0, ATTACH_TIMEOUT,
                                context=lambda: "\n" + mt.stderr_tail())
        lines = log_text(mt).splitlines()
        assert f"memtrace: serving metrics on http://0.0.0.0:{port}/metrics" in lines, lines
        warnings = [line for line in lines if "warning" in line.lower()]
        assert len(warnings) == 1, lines
        assert warnings[0].startswith("memtrace: warning:") and f"0.0.0.0:{port}" in warnings[0]
        assert "TLS" in warnings[0] and "auth" in warnings[0]
        assert scrape(port).value("memtrace_targets") == 1  # it does serve
    finally:
        target.kill()
        target.wait()
        mt.stop()


def test_loopback_listen_address_does_not_warn(tmp_path):
    target = subprocess.Popen(["sleep", "600"])
    port = free_port()
    mt = Memtrace(["watch", str(target.pid), "--format", "json", "--interval", str(INTERVAL),
                   "--web.listen-address", f"127.0.0.1:{port}"], tmp_path / "memtrace.log")
    try:
        mt.stream.wait_snapshot(target.pid, 0.0, ATTACH_TIMEOUT,
                                context=lambda: "\n" + mt.stderr_tail())
        text = log_text(mt)
        assert f"serving metrics on http://127.0.0.1:{port}/metrics" in text
        assert "warning" not in text.lower(), text
        os.kill(target.pid, signal.SIGTERM)
        target.wait()
        assert mt.wait(EXIT_TIMEOUT) == 0, mt.stderr_tail()
    finally:
        with contextlib.suppress(ProcessLookupError):
            target.kill()
        target.wait()
        mt.stop()
