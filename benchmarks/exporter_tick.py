"""The watch loop's tick under concurrent scrapes (issue 15, done-when 5). Root.

    sudo .venv/bin/python benchmarks/exporter_tick.py [--processes 100] [--regions 200]
        [--scrapers 4] [--seconds 30] [--interval 1] [--src DIR] [--json]

1. Starts --processes copies of workloads/manymaps.c, each with --regions
   anonymous regions of 4 pages (~225 mappings with its executable, libc,
   stack and the rest), all resident; after memtrace has attached, each
   refaults 1 % of its regions every second (2 regions at 200), so every
   process changes every tick, as busy processes do.
2. Runs `python -m memtrace watch PID... --format none --interval I
   --reconcile-interval 0 --web.listen-address 127.0.0.1:PORT` (defaults
   otherwise: live PSS, heap walks), the code from --src (default: this
   checkout; e.g. an export of main's tree for the "before" run), and waits
   until /metrics shows every process.
3. After a 3 s warm-up, --scrapers processes scrape /metrics back to back for
   --seconds, each with the headers Prometheus 2.x sends (gzip), each in its
   own process (their CPU is not memtrace's, but shares the machine). The first
   scraper also decompresses its body every 0.5 s and reads
   memtrace_tick_duration_seconds (the last tick's duration as memtrace
   measured it); consecutive equal values are one tick. With --scrapers 0,
   one scrape every 0.5 s only reads the tick (the tick without scrape load).
4. Reports tick p50/p99/max against the interval, scrape latency p50/p99/max
   and scrapes per second, memtrace's CPU (all threads; and with its heap
   walker process) per second of the window, and the load average before and
   after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import multiprocessing as mp
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchcommon as bc  # noqa: E402

HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
              "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
    "User-Agent": "Prometheus/2.42.0",
    "X-Prometheus-Scrape-Timeout-Seconds": "10",
}
_TICK = re.compile(rb"^memtrace_tick_duration_seconds (\S+)$", re.M)
_TARGETS = re.compile(rb"^memtrace_targets (\S+)$", re.M)


def scrape(port: int) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics", headers=HEADERS)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")
        if resp.getheader("Content-Encoding") == "gzip":
            return time.perf_counter() - t0, body
        return time.perf_counter() - t0, gzip.compress(body, 1)
    finally:
        conn.close()


def scraper(port: int, until: float, sample_ticks: bool, pause: float, conn: Any) -> None:
    """Scrape back to back (or `pause` s apart) until `until` (time.time());
    send latencies, errors and (first scraper) the tick durations read."""
    latencies: list[float] = []
    ticks: list[float] = []
    errors: list[str] = []
    next_sample = 0.0
    while time.time() < until:
        try:
            dt, body = scrape(port)
        except (OSError, RuntimeError, http.client.HTTPException) as e:
            errors.append(repr(e))
            continue
        latencies.append(dt)
        if sample_ticks and time.time() >= next_sample:
            next_sample = time.time() + 0.5
            m = _TICK.search(gzip.decompress(body))
            if m:
                ticks.append(float(m.group(1)))
        time.sleep(pause)
    conn.send({"latencies": latencies, "ticks": ticks, "errors": errors})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_targets(port: int, n: int, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            _, body = scrape(port)
            m = _TARGETS.search(gzip.decompress(body))
            if m and float(m.group(1)) >= n:
                return time.monotonic() - t0
        except (OSError, RuntimeError, http.client.HTTPException):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"/metrics did not show {n} targets within {timeout:.0f}s")


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(p / 100 * len(v)) - 1))]


def distinct_ticks(samples: list[float]) -> list[float]:
    out: list[float] = []
    for x in samples:
        if not out or x != out[-1]:
            out.append(x)
    return out


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def start_workloads(n: int, regions: int) -> list[Any]:
    exe = bc.build("manymaps")
    procs = [bc.spawn([str(exe), str(regions), "4", "3600", "refault"],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(n)]
    for p in procs:
        bc.read_line(p.stdout, 30, "manymaps")             # pid N
        if bc.read_line(p.stdout, 60, "manymaps") != "ready":
            raise RuntimeError("manymaps did not get ready")
    return procs


def run(args: argparse.Namespace) -> dict[str, Any]:
    load0 = loadavg()
    procs = start_workloads(args.processes, args.regions)
    maps = len(Path(f"/proc/{procs[0].pid}/maps").read_text().splitlines())
    port = free_port()
    src = str(Path(args.src).resolve())
    argv = [sys.executable, "-m", "memtrace", "watch", *(str(p.pid) for p in procs),
            "--format", "none", "--interval", str(args.interval), "--reconcile-interval",
            "0", "--web.listen-address", f"127.0.0.1:{port}"]
    env = {**os.environ, "PYTHONPATH": src}
    with open(args.log or os.devnull, "wb") as err:
        mt = bc.spawn(argv, cwd=src, env=env, stdin=subprocess.DEVNULL,
                      stdout=subprocess.DEVNULL, stderr=err)
    up = wait_targets(port, args.processes, 300)
    for p in procs:  # start the refaults
        p.stdin.write(b"g")
        p.stdin.flush()
    time.sleep(3.0)
    ctx = mp.get_context("fork")
    until = time.time() + args.seconds
    pipes, workers = [], []
    cpu0, tree0, t0 = bc.cpu_seconds(mt.pid), bc.tree_cpu_seconds(mt.pid), time.monotonic()
    # --scrapers 0: one scrape every 0.5 s, only to read the tick durations
    pause = 0.5 if args.scrapers == 0 else 0.0
    for i in range(max(1, args.scrapers)):
        parent, child = ctx.Pipe()
        w = ctx.Process(target=scraper, args=(port, until, i == 0, pause, child), daemon=True)
        w.start()
        pipes.append(parent)
        workers.append(w)
    results = [p.recv() for p in pipes]
    cpu, tree = bc.cpu_seconds(mt.pid) - cpu0, bc.tree_cpu_seconds(mt.pid) - tree0
    wall = time.monotonic() - t0
    for w in workers:
        w.join(10)
    alive = mt.poll() is None
    bc.kill(mt, term_first=True)
    for p in procs:
        bc.kill(p)
    lat = [x for r in results for x in r["latencies"]]
    ticks = distinct_ticks(results[0]["ticks"])
    return {
        "src": src, "processes": args.processes, "mappings_first_process": maps,
        "scrapers": args.scrapers, "seconds": round(wall, 1), "interval": args.interval,
        "startup_to_all_targets_s": round(up, 1), "memtrace_alive_at_end": alive,
        "scrapes": len(lat), "errors": sum(len(r["errors"]) for r in results),
        "scrapes_per_s": round(len(lat) / wall, 1),
        "scrape_ms": {"p50": round(statistics.median(lat) * 1000, 1),
                      "p99": round(pct(lat, 99) * 1000, 1),
                      "max": round(max(lat) * 1000, 1)} if lat else None,
        "ticks_seen": len(ticks),
        "tick_s": {"p50": round(statistics.median(ticks), 3), "p99": round(pct(ticks, 99), 3),
                   "max": round(max(ticks), 3),
                   "over_interval": sum(1 for t in ticks if t > args.interval)}
        if ticks else None,
        "memtrace_cpu_per_s": round(cpu / wall, 3),
        "memtrace_tree_cpu_per_s": round(tree / wall, 3),
        "loadavg_before": load0, "loadavg_after": loadavg(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=100)
    ap.add_argument("--regions", type=int, default=200)
    ap.add_argument("--scrapers", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--src", default=str(bc.REPO),
                    help="directory holding the memtrace package to run (PYTHONPATH)")
    ap.add_argument("--log", help="write memtrace's stderr here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (memtrace loads BPF programs)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGINT, lambda s, f: sys.exit(130))
    r = run(args)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['processes']} processes x {r['mappings_first_process']} mappings, "
          f"{r['scrapers']} scrapers for {r['seconds']} s, interval {r['interval']} s "
          f"(memtrace from {r['src']}); load {r['loadavg_before']} -> {r['loadavg_after']}")
    t, s = r["tick_s"], r["scrape_ms"]
    if t:
        print(f"tick: p50 {t['p50']} s, p99 {t['p99']} s, max {t['max']} s; "
              f"{t['over_interval']} of {r['ticks_seen']} ticks seen over the interval")
    if s:
        print(f"scrapes: {r['scrapes']} ({r['scrapes_per_s']}/s, {r['errors']} errors), "
              f"p50 {s['p50']} ms, p99 {s['p99']} ms, max {s['max']} ms")
    print(f"memtrace CPU {r['memtrace_cpu_per_s']} s/s "
          f"({r['memtrace_tree_cpu_per_s']} with its heap walker); "
          f"all targets on /metrics {r['startup_to_all_targets_s']} s after start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
