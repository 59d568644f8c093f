"""Latency of a /metrics scrape with many watched processes (no root, no BPF).

    .venv/bin/python benchmarks/scrape_latency.py [--processes 100] [--mappings 200]
        [--scrapes 200] [--clients 2] [--max-series 50] [--changed 1.0,0.1]
        [--gzip auto|zlib] [--json]

1. Builds an TickState by hand: --processes synthetic processes with
   --mappings VMAs each, shaped like real ones (an executable and ~35 shared
   libraries in 4 segments each, [heap], [stack], [vvar]/[vdso], anonymous
   regions, some named [anon:...], data files under /var/lib, shared memfds,
   per-identity faults and syscall counters). Identities per process exceed
   the default cap of 50, so [other] folding is exercised as in production.
   Each process has two contents (the second with more heap and one more brk).
2. Serves it with memtrace's own MetricsServer + MemtraceCollector (and the
   ProcessCollector, as `memtrace watch` does) on 127.0.0.1:0, in a child
   process, so the client's work does not share the server's GIL.
3. Every scrape sees a new tick, published by the server just before it
   renders (as if the watch loop had ticked since the last scrape; its cost,
   ~0.1 ms, is inside the measured time): new snapshot dicts for every process,
   each with a `generation` key as the watch loop sets it, and (unless
   --no-builder-sums) the per-identity sums (`Snapshot.identity_sums`) that
   the watch loop's SnapshotBuilder keeps incrementally at each tick, computed
   here once per content before scraping. For each fraction F
   in --changed, a random F of the processes flip to their other content with
   a new generation, the rest keep theirs. F = 1.0 is the worst case: no
   process's text can come from the collector's cache (as without
   generations); F = 0.1 is a mostly idle host.
4. For each F, scrapes --scrapes times sequentially, one connection per
   scrape, first with the headers Prometheus 2.x sends (OpenMetrics accepted,
   gzip), then as plain text without compression; then with --clients
   concurrent clients (--scrapes scrapes in all, Prometheus headers). Reports
   median, p90, p99 and max latency of the whole request (connect to last body
   byte), the payload size, memtrace_scrape_build_seconds (the collector's own
   part) as reported by the last scrape, the server's CPU time and minor page
   faults per scrape (from /proc; CPU time does not depend on contention), the
   server's cyclic garbage collections during the run (count and time per
   generation, longest; from gc.callbacks) and the load average before and after
   each run (the machine may be shared).

Goal (exporter issue): p99 < 100 ms on a 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import http.client
import json
import multiprocessing as mp
import os
import platform
import random
import re
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PAGE = 4096
LIBDIR = "/usr/lib/x86_64-linux-gnu"
LIBS = [
    "libc.so.6", "libm.so.6", "libstdc++.so.6.0.30", "libgcc_s.so.1", "libssl.so.3",
    "libcrypto.so.3", "libz.so.1.2.13", "libzstd.so.1.5.4", "liblzma.so.5.4.1",
    "libbz2.so.1.0.4", "libffi.so.8.1.2", "libexpat.so.1.8.10", "libsqlite3.so.0.8.6",
    "libuuid.so.1.3.0", "libicuuc.so.72.1", "libicudata.so.72.1", "libxml2.so.2.9.14",
    "libcurl.so.4.8.0", "libnghttp2.so.14.24.1", "libidn2.so.0.3.8", "libpsl.so.5.3.4",
    "libgssapi_krb5.so.2.2", "libkrb5.so.3.3", "libk5crypto.so.3.1", "libcom_err.so.2.1",
    "libkeyutils.so.1.10", "libresolv.so.2", "libsystemd.so.0.35.0", "libcap.so.2.66",
    "libgcrypt.so.20.4.1", "libgpg-error.so.0.33.1", "liblz4.so.1.9.4", "libselinux.so.1",
    "libpcre2-8.so.0.11.2", "libunistring.so.2.2.0",
]
PY_EXT = "/usr/lib/python3/dist-packages/{pkg}/{mod}.cpython-311-x86_64-linux-gnu.so"
PY_MODS = [("numpy/core", "_multiarray_umath"), ("numpy/linalg", "_umath_linalg"),
           ("yaml", "_yaml"), ("markupsafe", "_speedups"), ("psycopg2", "_psycopg"),
           ("lxml", "etree"), ("grpc/_cython", "cygrpc"), ("zmq/backend/cython", "_zmq")]
COMMS = ["postgres", "nginx", "python3", "java", "node", "redis-server", "envoy", "gunicorn"]
SYSCALLS = ("brk", "mmap", "munmap", "mremap", "madvise", "mprotect")


def synthetic_process(pid: int, n_maps: int, rng: random.Random) -> dict[str, Any]:
    comm = rng.choice(COMMS)
    maps: list[dict[str, Any]] = []

    def add(path: str, kind: str, pages: int, anon: int = 0, file: int = 0,
            shmem: int = 0, perms: str = "r--p", identity: str | None = None) -> None:
        maps.append({
            "start": 0, "end": pages * PAGE, "perms": perms, "offset": 0, "path": path,
            "kind": kind, "mapping": identity or path, "rss_bytes": (anon + file + shmem) * PAGE,
            "anon_bytes": anon * PAGE, "file_bytes": file * PAGE, "shmem_bytes": shmem * PAGE,
            "virtual_bytes": pages * PAGE, "faults": rng.randrange(0, 500),
            # live PSS is on by default in watch: shared file pages count half
            "pss_bytes": (anon + shmem + file // 2) * PAGE, "uss_bytes": anon * PAGE,
            "swap_bytes": 0})

    def segments(path: str, kind: str) -> None:
        size = rng.randrange(8, 3000)
        add(path, kind, size // 8, file=rng.randrange(0, size // 8 + 1))
        add(path, kind, size, file=rng.randrange(0, size + 1), perms="r-xp")
        add(path, kind, size // 4, file=rng.randrange(0, size // 4 + 1))
        add(path, kind, 4, anon=rng.randrange(0, 4), file=1, perms="rw-p")

    segments(f"/usr/local/bin/{comm}", "executable")
    libs = rng.sample(LIBS, 30) + [PY_EXT.format(pkg=p, mod=m) for p, m in
                                   rng.sample(PY_MODS, 5)]
    for lib in libs:
        segments(lib if lib.startswith("/") else f"{LIBDIR}/{lib}", "library")
    add("[heap]", "heap", 20_000, anon=rng.randrange(100, 20_000), perms="rw-p")
    add("[stack]", "stack", 33, anon=12, perms="rw-p", identity="[stack]")
    add("[vvar]", "special", 4)
    add("[vdso]", "special", 2, file=1, perms="r-xp")
    i = 0
    while len(maps) < n_maps:
        r = i % 10
        if r < 6:
            pages = rng.randrange(16, 65_536)
            add("", "anon", pages, anon=rng.randrange(0, pages), perms="rw-p",
                identity="[anon]")
        elif r < 7:
            name = f"[anon:{rng.choice(['jemalloc', 'v8 heap', 'dalvik-main', 'arena'])}]"
            add(name, "anon", 4096, anon=rng.randrange(0, 4096), perms="rw-p")
        elif r < 9:
            path = f"/var/lib/{comm}/data/base/16384/{rng.randrange(10_000, 99_999)}"
            add(path, "file", 32_768, file=rng.randrange(0, 32_768), perms="rw-s")
        else:
            path = f"/memfd:{comm}-shm-{i} (deleted)"
            add(path, "shmem", 8192, shmem=rng.randrange(0, 8192), perms="rw-s")
        i += 1
    maps = maps[:n_maps]
    addr = 0x5555_0000_0000
    for m in maps:
        size = m["virtual_bytes"]
        m["start"], m["end"] = addr, addr + size
        addr += size + PAGE
    fbm: dict[str, int] = {}
    for m in maps:
        fbm[m["mapping"]] = fbm.get(m["mapping"], 0) + m["faults"]
    tot = {t: sum(m[f"{t}_bytes"] for m in maps) for t in ("anon", "file", "shmem")}
    return {
        "ts": time.time(), "pid": pid, "comm": comm,
        "rss_bytes": sum(tot.values()), "anon_bytes": tot["anon"], "file_bytes": tot["file"],
        "shmem_bytes": tot["shmem"], "virtual_bytes": sum(m["virtual_bytes"] for m in maps),
        "statm_rss_bytes": sum(tot.values()), "drift_bytes": 0,
        "faults": sum(fbm.values()), "faults_by_mapping": fbm,
        "syscalls": {s: rng.randrange(0, 10_000) for s in SYSCALLS},
        "syscall_bytes": {s: rng.randrange(0, 1 << 34) for s in SYSCALLS},
        "full_rescans": {"attach": 1}, "events_lost": 0, "events_sampled_out": 0,
        "tick_seconds": 0.002, "mappings": maps,
        "pss_bytes": sum(m["pss_bytes"] for m in maps),
        "uss_bytes": sum(m["uss_bytes"] for m in maps), "swap_bytes": 0,
    }


def build_state(processes: int, mappings: int, seed: int) -> Any:
    from memtrace.published import TickState

    rng = random.Random(seed)
    snaps = {1000 + i: synthetic_process(1000 + i, mappings, rng) for i in range(processes)}
    return TickState(snapshots=snaps, full_rescans={"attach": processes},
                         tick_seconds=0.05, attach_seconds={p: 0.01 for p in snaps})


def grown(snap: dict[str, Any]) -> dict[str, Any]:
    """The process one tick later: 10 more heap pages, one more brk."""
    out = {**snap, "mappings": [dict(m) for m in snap["mappings"]],
           "syscalls": dict(snap["syscalls"])}
    heap = next(m for m in out["mappings"] if m["mapping"] == "[heap]")
    heap["anon_bytes"] += 10 * PAGE
    heap["rss_bytes"] += 10 * PAGE
    heap["pss_bytes"] += 10 * PAGE
    heap["uss_bytes"] += 10 * PAGE
    out["pss_bytes"] += 10 * PAGE
    out["uss_bytes"] += 10 * PAGE
    out["anon_bytes"] += 10 * PAGE
    out["rss_bytes"] += 10 * PAGE
    out["syscalls"]["brk"] += 1
    return out


class Ticker:
    """The watch loop as the scrapes see it: tick() publishes the next tick, in
    which a fraction of the processes changed (other content, new generation)."""

    def __init__(self, args: argparse.Namespace, box: Any) -> None:
        base = build_state(args.processes, args.mappings, 1)
        self.base = base
        self.contents = {pid: (snap, grown(snap)) for pid, snap in base.snapshots.items()}
        # what the watch loop's SnapshotBuilder keeps tick by tick (summed
        # incrementally, as mappings change): the per-identity sums
        self.sums: dict[tuple[int, int], Any] = {}
        if args.builder_sums:
            from memtrace.snapshot import identity_sums
            self.sums = {(pid, k): identity_sums(c[k]["mappings"])
                         for pid, c in self.contents.items() for k in (0, 1)}
        self.which = dict.fromkeys(base.snapshots, 0)
        self.generation = dict.fromkeys(base.snapshots, 1)
        self.box = box
        self.fraction = 1.0
        self.rng = random.Random(3)
        self.lock = threading.Lock()
        self.tick()

    def _snapshot(self, pid: int, now: float) -> dict[str, Any]:
        from memtrace.snapshot import Snapshot

        k = self.which[pid]
        snap = Snapshot({**self.contents[pid][k], "ts": now, "generation": self.generation[pid]})
        snap.identity_sums = self.sums.get((pid, k))
        return snap

    def tick(self) -> None:
        from memtrace.published import TickState

        with self.lock:
            pids = list(self.contents)
            for pid in self.rng.sample(pids, round(self.fraction * len(pids))):
                self.which[pid] ^= 1
                self.generation[pid] += 1
            now = time.time()
            snaps = {pid: self._snapshot(pid, now) for pid in pids}
            self.box.set(TickState(
                snapshots=snaps, full_rescans=self.base.full_rescans, tick_seconds=0.05,
                attach_seconds=self.base.attach_seconds))


class GcClock:
    """The server process's cyclic garbage collections (gc.callbacks): how many
    and how long, per generation, since the last take()."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self.take()
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        gen, dt = info["generation"], time.perf_counter() - self._t0
        self.collections[gen] += 1
        self.seconds[gen] += dt
        self.longest = max(self.longest, dt)

    def take(self) -> dict[str, Any]:
        out = {"collections": getattr(self, "collections", None),
               "ms": [round(x * 1000, 1) for x in getattr(self, "seconds", [])],
               "longest_ms": round(getattr(self, "longest", 0.0) * 1000, 1)}
        self.collections, self.seconds, self.longest = [0, 0, 0], [0.0, 0.0, 0.0], 0.0
        return out


def serve(args: argparse.Namespace, conn: Any) -> None:
    """The server process: memtrace's exporter on 127.0.0.1:0."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.process_collector import ProcessCollector

    from memtrace.exporter import web
    from memtrace.exporter.collector import MemtraceCollector, freeze_startup_objects
    from memtrace.exporter.web import MetricsServer, WebConfig
    from memtrace.published import StateBox

    freeze_startup_objects()  # as live.serve_metrics does, before any process is watched
    if args.gzip == "zlib":
        import zlib
        web.GZIP = zlib
    box = StateBox()
    ticker = Ticker(args, box)
    collector = MemtraceCollector(box, args.max_series)
    registry = CollectorRegistry()
    registry.register(ProcessCollector(registry=None))

    def render() -> list[bytes]:  # a new tick since the last scrape, then the scrape
        ticker.tick()
        return collector.render_chunks()

    # as memtrace serves it (live.serve_metrics): memtrace's families through the fast
    # text renderer, the process collector through prometheus_client
    server = MetricsServer(registry, "127.0.0.1:0", WebConfig(), fast=render)
    gc_clock = GcClock()
    conn.send(server.httpd.server_port)
    while True:  # ("changed", F) sets the fraction; "gc" takes the GC figures; "stop" stops
        msg = conn.recv()
        if msg == "stop":
            break
        if msg == "gc":
            conn.send(gc_clock.take())
            continue
        ticker.fraction = msg[1]
        conn.send("ok")
    server.close()


PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
              "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
    "User-Agent": "Prometheus/2.42.0",
    "X-Prometheus-Scrape-Timeout-Seconds": "10",
}
PLAIN_HEADERS = {"Accept": "text/plain"}


def one_scrape(port: int, headers: dict[str, str]) -> tuple[float, int, bytes]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")
    finally:
        conn.close()
    return time.perf_counter() - t0, len(body), body


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[7])


def run(port: int, scrapes: int, clients: int, headers: dict[str, str],
        server_pid: int) -> dict[str, Any]:
    latencies: list[float] = []
    sizes: list[int] = []
    last: list[bytes] = []
    lock = threading.Lock()
    errors: list[str] = []
    per_client = [scrapes // clients + (1 if i < scrapes % clients else 0)
                  for i in range(clients)]
    barrier = threading.Barrier(clients)

    def client(n: int) -> None:
        barrier.wait()
        for _ in range(n):
            try:
                dt, size, body = one_scrape(port, headers)
            except (OSError, RuntimeError, http.client.HTTPException) as e:
                with lock:
                    errors.append(repr(e))
                continue
            with lock:
                latencies.append(dt)
                sizes.append(size)
                last[:] = [body]

    cpu0 = cpu_seconds(server_pid)
    faults0 = minor_faults(server_pid)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in per_client]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    server_cpu = cpu_seconds(server_pid) - cpu0
    faults = minor_faults(server_pid) - faults0
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, max(0, round(p / 100 * len(lat)) - 1))] * 1000

    build = None
    if last:
        body = last[0]
        if headers.get("Accept-Encoding") == "gzip":
            import gzip
            body = gzip.decompress(body)
        m = re.search(rb"^memtrace_scrape_build_seconds (\S+)", body, re.M)
        build = float(m.group(1)) * 1000 if m else None
        series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return {
        "clients": clients, "scrapes": len(lat), "errors": len(errors),
        "median_ms": statistics.median(lat) * 1000 if lat else None,
        "p90_ms": pct(90) if lat else None, "p99_ms": pct(99) if lat else None,
        "max_ms": lat[-1] * 1000 if lat else None,
        "scrapes_per_s": len(lat) / wall if wall else None,
        "payload_bytes": statistics.median(sizes) if sizes else None,
        "series": series if last else None, "collector_build_ms": build,
        "server_cpu_ms_per_scrape": server_cpu / len(lat) * 1000 if lat else None,
        "server_minor_faults_per_scrape": faults / len(lat) if lat else None,
        "first_errors": errors[:3],
    }


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=100)
    ap.add_argument("--mappings", type=int, default=200)
    ap.add_argument("--scrapes", type=int, default=200)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--max-series", type=int, default=50)
    ap.add_argument("--changed", default="1.0,0.1",
                    help="comma-separated fractions of the processes whose snapshot "
                         "changes between two scrapes; one set of runs each "
                         "(1.0: the worst case, nothing from the cache)")
    ap.add_argument("--gzip", choices=["auto", "zlib"], default="auto",
                    help="auto: gzip as memtrace does (ISA-L where the isal package is "
                         "installed, else zlib); zlib: always zlib")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-builder-sums", dest="builder_sums", action="store_false",
                    help="snapshots without the per-identity sums the watch loop's "
                         "SnapshotBuilder keeps (the exporter then sums every mapping, "
                         "as for agent groups)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args()
    fractions = [float(f) for f in args.changed.split(",")]
    if not all(0.0 <= f <= 1.0 for f in fractions):
        ap.error("--changed: fractions between 0 and 1")

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # run the finally below: stop the server child

    signal.signal(signal.SIGTERM, on_signal)
    load_before = _loadavg()
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    t0 = time.perf_counter()
    server = ctx.Process(target=serve, args=(args, child), daemon=True)
    server.start()
    runs: dict[str, dict[str, Any]] = {}
    try:
        if not parent.poll(300):
            print("server did not start", file=sys.stderr)
            return 1
        port = parent.recv()
        setup = time.perf_counter() - t0
        for fraction in fractions:
            parent.send(("changed", fraction))
            parent.recv()
            for _ in range(args.warmup):
                one_scrape(port, PROMETHEUS_HEADERS)
            changed = f"{fraction:.0%} changed per scrape"
            for name, clients, headers in (
                    ("sequential, Prometheus headers (OpenMetrics, gzip)", 1,
                     PROMETHEUS_HEADERS),
                    ("sequential, plain text, no gzip", 1, PLAIN_HEADERS),
                    (f"{args.clients} concurrent clients, Prometheus headers", args.clients,
                     PROMETHEUS_HEADERS)):
                load0 = _loadavg()
                parent.send("gc")
                parent.recv()
                r = run(port, args.scrapes, clients, headers, server.pid)
                parent.send("gc")
                r["server_gc"] = parent.recv()
                r["changed"] = fraction
                r["loadavg"] = f"{load0} -> {_loadavg()}"
                runs[f"{name}; {changed}"] = r
    finally:
        with contextlib.suppress(OSError):
            parent.send("stop")
        server.join(10)
        if server.is_alive():
            server.kill()  # our own child, by its pid
    from memtrace.exporter import web
    gzip_module = "zlib" if args.gzip == "zlib" else web.GZIP.__name__
    info = {
        "processes": args.processes, "mappings_per_process": args.mappings,
        "gzip": gzip_module, "builder_sums": args.builder_sums,
        "max_series": args.max_series, "cpus": os.cpu_count(),
        "python": platform.python_version(), "setup_seconds": round(setup, 1),
        "loadavg_before": load_before, "loadavg_after": _loadavg(),
        "runs": runs,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.processes} processes x {args.mappings} mappings, --max-mapping-series "
          f"{args.max_series}; gzip by {gzip_module}; {os.cpu_count()} CPUs; "
          f"Python {platform.python_version()}; "
          f"state built and server up in {setup:.1f}s; load average before "
          f"{info['loadavg_before']}, after {info['loadavg_after']}")
    print(f"{'run':<80} {'n':>4} {'err':>3} {'median':>8} {'p90':>8} {'p99':>8} {'max':>8} "
          f"{'scr/s':>6} {'payload':>9} {'series':>7} {'build':>7} {'srv CPU':>8} "
          f"{'faults':>6}  load")
    for name, r in runs.items():
        print(f"{name:<80} {r['scrapes']:>4} {r['errors']:>3} {r['median_ms']:>6.1f}ms "
              f"{r['p90_ms']:>6.1f}ms {r['p99_ms']:>6.1f}ms {r['max_ms']:>6.1f}ms "
              f"{r['scrapes_per_s']:>6.1f} {r['payload_bytes'] / 1e6:>7.2f}MB "
              f"{r['series']:>7} {r['collector_build_ms']:>5.1f}ms "
              f"{r['server_cpu_ms_per_scrape']:>6.1f}ms "
              f"{r['server_minor_faults_per_scrape']:>6.0f}  {r['loadavg']}")
        g = r["server_gc"]
        print(f"    server GC: collections per generation {g['collections']}, "
              f"ms {g['ms']}, longest {g['longest_ms']} ms")
        if r["first_errors"]:
            print(f"    errors: {r['first_errors']}")
    for fraction in fractions:
        worst = max(r["p99_ms"] for r in runs.values() if r["changed"] == fraction)
        print(f"{fraction:.0%} changed per scrape: goal p99 < 100 ms "
              f"{'met' if worst < 100 else 'NOT met'} (worst p99 {worst:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
