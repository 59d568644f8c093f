"""Done-when 1 of issue 14: a recording of a real program under load gives a
report that renders in headless Chromium with the expected charts.

redis-server (jemalloc) under redis-benchmark, and next to it a python3 that
fills its glibc heap, loads a library (libsqlite3, by ctypes) and frees half of what
it allocated, are recorded together by `memtrace watch --stacks --record` (the recorder's
own file: changed-only snapshots and the stack profile's lines);
`memtrace report` makes the page (timed: <= 10 s). Chromium runs the page's
script: the charts it drew (read back from the DOM summary) hold the series of
the report with their largest values, the peak, the calls, the dlopen marker,
the heap's three states, and the PNG export; a screenshot shows the stacked
areas in their colours.

Needs root and BCC (BPF), Chromium, redis-server and redis-benchmark
(scripts/setup.sh installs them); skipped, with the reason, without them."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from memtrace.record.gzipped import decompressed
from tests.root.harness import REPO_ROOT, skip_reason
from tests.root.stacks.test_flamegraph_render import Screenshot

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REDIS = shutil.which("redis-server")
BENCH = shutil.which("redis-benchmark")
_missing = skip_reason() or (
    "headless Chromium not found (Debian package chromium)" if CHROMIUM is None else
    "redis-server / redis-benchmark not found (Debian packages redis-server, redis-tools)"
    if REDIS is None or BENCH is None else None)
pytestmark = [pytest.mark.root, pytest.mark.skipif(_missing is not None, reason=str(_missing))]
SCALE = float(os.environ.get("MT_TIMEOUT_SCALE") or 1)
WINDOW = (1280, 1500)
MIB = 1 << 20

# a glibc process: 2 s of 1.5 KiB allocations (brk heap), a library loaded, half freed
PY_WORKLOAD = r"""
import ctypes, os, sys, time
go = sys.argv[1]
while not os.path.exists(go):
    time.sleep(0.05)
blocks = []
for i in range(20):
    blocks.extend(bytes(1500) for _ in range(1500))
    time.sleep(0.1)
ctypes.CDLL("libsqlite3.so.0")
time.sleep(3)
del blocks[::2]
print("freed", flush=True)
time.sleep(600)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chromium(tmp_path: Path, *args: str) -> str:
    cmd = [str(CHROMIUM), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
           "--force-device-scale-factor=1", "--no-first-run", "--disable-extensions",
           "--virtual-time-budget=10000", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120 * SCALE,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _drawn(tmp_path: Path, url: str) -> dict[str, Any]:
    """What the page's script drew (its <pre id="summary">), after it ran."""
    dom = _chromium(tmp_path, "--dump-dom", url)
    tag = re.search(r"<html[^>]*>", dom)
    assert tag and 'data-report="ready"' in tag.group(0), (tag.group(0) if tag else dom)[:3000]
    m = re.search(r'<pre id="summary">(.*?)</pre>', dom, re.S)
    assert m, "no summary in the DOM"
    return json.loads(m.group(1).replace("&amp;", "&").replace("&lt;", "<")
                      .replace("&gt;", ">").replace("&quot;", '"'))


def _memtrace(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "memtrace", *args], capture_output=True,
                          text=True, timeout=120 * SCALE, cwd=REPO_ROOT, env=env)


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """redis-server under redis-benchmark and the python3 workload, recorded."""
    tmp = tmp_path_factory.mktemp("report-redis")
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis = subprocess.Popen([str(REDIS), "--port", str(port), "--save", "", "--appendonly",
                                  "no", "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        procs.append(redis)
        (tmp / "work.py").write_text(PY_WORKLOAD)
        py = subprocess.Popen([sys.executable, "-S", str(tmp / "work.py"), str(tmp / "go")],
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        procs.append(py)
        deadline = time.monotonic() + 10 * SCALE
        while subprocess.run([str(BENCH).replace("benchmark", "cli"), "-p", str(port), "ping"],
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)
        rec = tmp / "run.mtrace"
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        watch = subprocess.Popen(
            [sys.executable, "-m", "memtrace", "watch", "--format", "none", "--record",
             str(rec), "--no-serve", "--stacks", "--heap-interval", "1",
             "--interval", "0.5", str(redis.pid), str(py.pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(tmp / "watch.err", "wb"), cwd=REPO_ROOT, env=env)  # noqa: SIM115
        procs.append(watch)
        deadline = time.monotonic() + 60 * SCALE
        while not rec.exists() or decompressed(str(rec)).count(b'\n{"ts"') < 2:
            assert watch.poll() is None, (tmp / "watch.err").read_text()
            assert time.monotonic() < deadline, "no snapshot from memtrace watch"
            time.sleep(0.1)
        (tmp / "go").touch()
        subprocess.run([str(BENCH), "-p", str(port), "-q", "-n", "60000", "-d", "1500",
                        "-r", "30000", "-t", "set,lpush"], capture_output=True,
                       timeout=120 * SCALE, check=True)
        assert py.stdout is not None and py.stdout.readline().strip() == b"freed"
        time.sleep(3)                                      # a heap walk after the free
        subprocess.run([str(BENCH).replace("benchmark", "cli"), "-p", str(port), "flushall"],
                       capture_output=True, check=True)
        time.sleep(2)
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=30 * SCALE) == 0, (tmp / "watch.err").read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return rec


def test_the_report_renders_with_the_expected_charts(recording, tmp_path):  # type: ignore[no-untyped-def]
    html = tmp_path / "report.html"
    t0 = time.monotonic()
    r = _memtrace("report", str(recording), "-o", str(html))
    took = time.monotonic() - t0
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert took <= 10, f"report took {took:.1f} s"
    j = _memtrace("report", str(recording), "--format", "json")
    assert j.returncode == 0, j.stderr
    report = json.loads(j.stdout)
    redis_pid, py_pid = json.loads(decompressed(str(recording)).split(b"\n", 1)[0])["pids"]
    by_pid = {p["pid"]: p for p in report["processes"]}
    redis, py = by_pid[redis_pid], by_pid[py_pid]
    assert redis["comm"] == "redis-server"

    # redis: its values (jemalloc: no heap figures, anon memory) as drawn
    anon = next(s for s in redis["series"]["rss"] if s["name"] == "anon")
    assert max(anon["values"]) >= 40 * MIB and redis["stacks"] is not None
    # the flame graph at the peak: the stack profile the recording kept
    assert "recorded at the peak" in redis["stacks"]["source"], redis["stacks"]["source"]
    assert redis["stacks"]["held"] and redis["stacks"]["ts"] <= redis["peak"]["ts"]
    drawn = _drawn(tmp_path, html.as_uri() + f"?view={redis['key']}")
    mem = drawn["charts"]["memory"]
    assert [s["name"] for s in mem["series"]] == [s["name"] for s in redis["series"]["rss"]]
    for got, want in zip(mem["series"], redis["series"]["rss"]):
        assert got["max"] == max(want["values"]) and got["points"] == len(want["values"])
    assert mem["peak"] == redis["peak"]["rss_bytes"] and mem["points"] == redis["points"]
    calls = {s["name"]: s["calls"] for s in mem["strips"]}
    assert calls["mmap"] == sum(redis["calls"]["mmap"]) > 0
    assert any(s["name"].endswith("/libc.so.6") for s in mem["series"])
    assert redis["heap"]["status"] == "unsupported" and "heap" not in drawn["charts"]
    # the PSS toggle, asked for in the URL: the same series, PSS values
    drawn = _drawn(tmp_path, html.as_uri() + f"?view={redis['key']}&measure=pss")
    assert drawn["measure"] == "pss"
    pss = drawn["charts"]["memory"]
    for got, want in zip(pss["series"], redis["series"]["pss"]):
        assert got["name"] == want["name"]
        assert got["max"] == max(v for v in want["values"] if v is not None)
    assert pss["peak"] == max(v for v in redis["totals"]["pss"] if v is not None)

    # python3: the glibc heap's three states, the dlopen marker, the PNG export
    loads = [e for e in py["library_events"] if e["event"] == "library_load"]
    assert any("libsqlite3.so" in e["mapping"] for e in loads), py["library_events"]
    drawn = _drawn(tmp_path, html.as_uri() + f"?view={py['key']}&png=1")
    assert drawn["charts"]["memory"]["markers"] == len(py["library_events"]) >= 1
    heap = drawn["charts"]["heap"]
    assert [s["name"] for s in heap["series"]] == ["in_use", "free_kept", "trimmable"]
    assert heap["points"] == len(py["heap"]["ts"]) >= 3
    assert max(py["heap"]["in_use"]) >= 30 * MIB and py["heap"]["verdict_at_peak"]
    png = drawn["png"]
    assert png["prefix"] == "data:image/png;base64," and png["bytes"] > 10_000, png

    # the total: both processes, stacked by kind
    drawn = _drawn(tmp_path, html.as_uri() + "?view=total")
    total = drawn["charts"]["memory"]
    assert {"anon", "heap", "library"} <= {s["name"] for s in total["series"]}
    assert total["peak"] == report["total"]["peak"]["rss_bytes"]

    # the screenshot: redis's anon area in its colour, over most of the plot's width
    png_path = tmp_path / "report.png"
    _chromium(tmp_path, f"--screenshot={png_path}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
              html.as_uri() + f"?view={redis['key']}")
    shot = Screenshot(png_path)
    if os.environ.get("MT_ARTIFACTS"):
        shutil.copy(png_path, Path(os.environ["MT_ARTIFACTS"]) / "report-redis.png")
        shutil.copy(html, Path(os.environ["MT_ARTIFACTS"]) / "report-redis.html")
        shutil.copy(recording, Path(os.environ["MT_ARTIFACTS"]) / "report-redis.mtrace")
    orange = _over_white((0xfb, 0x8c, 0x00), 0.85)
    cols = {x for y in range(0, shot.height, 2) for x in range(shot.width)
            if _near(shot.pixel(x, y), orange)}
    assert len(cols) >= 300, f"anon area drawn in {len(cols)} columns"
    colours = {shot.pixel(x, y) for y in range(0, shot.height, 7) for x in range(0, shot.width, 5)}
    assert len(colours) > 50, "the page looks blank"


def _over_white(rgb: tuple[int, int, int], alpha: float) -> tuple[int, int, int]:
    r, g, b = (round(c * alpha + 255 * (1 - alpha)) for c in rgb)
    return r, g, b


def _near(a: tuple[int, int, int], b: tuple[int, int, int], tol: int = 4) -> bool:
    return all(abs(p - q) <= tol for p, q in zip(a, b))
