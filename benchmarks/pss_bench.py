"""CPU per second of computing PSS/USS for N processes once per second with
memtrace.pss.reader, against reading their /proc/PID/smaps_rollup once per second.

    .venv/bin/python benchmarks/pss_bench.py [--procs 20] [--mb 64] [--seconds 20]
        [--reps 3] [--json FILE]

Starts N idle python3 interpreters (each imports a few modules that share
libraries: json, decimal, ssl, hashlib, sqlite3, and writes --mb MiB of its
own memory), then, interleaved for --reps repetitions, runs each method for
--seconds on a fixed 1-per-second schedule in this process and measures its
CPU (user + system, getrusage) per wall second:

  rollup   read and parse /proc/PID/smaps_rollup (Rss, Pss, Private_*) for every pid
  pss      memtrace.pss.reader as `memtrace libs` does: read /proc/PID/maps, PAGEMAP_SCAN
           for the resident and swapped runs, pagemap entries of those runs,
           /proc/kpagecount of the shared pages (one cache per tick, shared by all
           processes), per-VMA Usage
  pss-runs the live case: the VMA list and the resident runs are already known (the
           watch model holds them); only pagemap entries and kpagecount are read

Watch mode (--watch): the live case end to end. The N python3 processes are
active (each allocates and touches 64 KiB every second, keeping the last 32
blocks, so glibc's heap grows, shrinks and reuses pages), and for --reps
repetitions, interleaved, --seconds each:

  rollup          as above, in this process
  watch-nopss     `memtrace watch --format json --interval 1 --pss-interval 0
                  --heap-interval 0 --no-serve PIDS...` (its JSON read from a pipe
                  by this driver and thrown away)
  watch-pss-I     the same with --pss-interval I, for each I of --pss-intervals

The CPU of the memtrace process (utime + stime from /proc/PID/stat) is
measured over --seconds, from one full PSS refresh after every process had its
first snapshot; watch-pss-I minus watch-nopss is what live PSS costs.

After each timed run, memtrace's PSS in kB is checked against smaps_rollup
for every process whose rollup Pss was the same just before and after the
computation (the processes are idle, but the rest of the machine is not, and
library map counts follow it): up to 10 attempts until all 20 were quiet and
agreed; reported, not asserted (tests/root/accuracy/test_pss.py asserts).
Needs root. Children are killed on exit, error and signals.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.benchcommon import cpu_seconds, kill, spawn  # noqa: E402
from memtrace.pss.accounting import PSS_SHIFT
from memtrace.pss.reader import KPageCounts, PssReader  # noqa: E402
from memtrace.trace.procfs import ProcFS  # noqa: E402

PY_CODE = """import sys, json, decimal, ssl, hashlib, sqlite3
n = int(sys.argv[1]) << 20
buf = bytearray(n)
buf[::4096] = b"\\x01" * len(range(0, n, 4096))
print("READY", flush=True)
sys.stdin.read()
"""


ACTIVE_CODE = """import sys, json, decimal, ssl, hashlib, sqlite3, time
n = int(sys.argv[1]) << 20
buf = bytearray(n)
buf[::4096] = b"\\x01" * len(range(0, n, 4096))
print("READY", flush=True)
blocks = []
while True:
    b = bytearray(65536)
    b[::4096] = b"\\x02" * 16
    blocks.append(b)
    del blocks[:-32]
    time.sleep(1)
"""
REPO = Path(__file__).resolve().parent.parent


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def read_rollup(pid: int) -> dict[bytes, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
        for line in f.read().splitlines()[1:]:
            key, _, rest = line.partition(b":")
            if key in (b"Rss", b"Pss", b"Private_Clean", b"Private_Dirty", b"Swap"):
                out[key] = int(rest.split()[0])
    return out


class PssMethod:
    def __init__(self, pids: list[int], known_runs: bool) -> None:
        self.pids = pids
        self.known_runs = known_runs
        self.procfs = ProcFS()
        self.counts = KPageCounts()
        self.readers = {pid: PssReader(pid, counts=self.counts) for pid in pids}
        # the live case: VMAs and resident runs as the watch model holds them
        self.vmas = {pid: self.procfs.maps(pid) for pid in pids}
        self.runs = {}
        for pid, r in self.readers.items():
            v = self.vmas[pid]
            self.runs[pid] = r.find_runs(v) if known_runs else None

    def tick(self) -> dict[int, int]:
        self.counts.clear()
        out = {}
        for pid, r in self.readers.items():
            vmas = self.vmas[pid] if self.known_runs else self.procfs.maps(pid)
            usages = r.usage(vmas, self.runs[pid])
            out[pid] = sum(u.pss_fixed for u in usages) >> (PSS_SHIFT + 10)
        return out

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        self.counts.close()


def run_method(name: str, pids: list[int], seconds: float) -> dict[str, float]:
    method = PssMethod(pids, name == "pss-runs") if name != "rollup" else None
    ticks, tick_ms, agree, compared = 0, [], 0, 0
    start_wall = time.monotonic()
    start_cpu = cpu()
    next_at = start_wall
    try:
        while True:
            now = time.monotonic()
            if now - start_wall >= seconds:
                break
            if now < next_at:
                time.sleep(next_at - now)
                continue
            t0 = time.perf_counter()
            if method is None:
                for pid in pids:
                    read_rollup(pid)
            else:
                method.tick()
            tick_ms.append((time.perf_counter() - t0) * 1000)
            ticks += 1
            next_at += 1.0
        wall = time.monotonic() - start_wall
        used = cpu() - start_cpu
        # agreement check, outside the timed part: up to 10 attempts, until
        # every process whose Pss was the same before and after agrees
        attempts = 0
        while method is not None and attempts < 10:
            attempts += 1
            before = {pid: read_rollup(pid)[b"Pss"] for pid in pids}
            mine = method.tick()
            after = {pid: read_rollup(pid)[b"Pss"] for pid in pids}
            quiet = [pid for pid in pids if before[pid] == after[pid]]
            compared = len(quiet)
            agree = sum(mine[pid] == before[pid] for pid in quiet)
            if compared == len(pids) and agree == compared:
                break
    finally:
        if method is not None:
            method.close()
    return {"cpu_s": used, "wall_s": wall, "cpu_per_s": used / wall, "ticks": ticks,
            "tick_ms_median": statistics.median(tick_ms) if tick_ms else 0.0,
            "agree": agree, "compared": compared, "check_attempts": attempts}


def run_watch(pids: list[int], pss_interval: float, seconds: float) -> dict[str, float]:
    """CPU per second of one `memtrace watch` of `pids` (see the docstring)."""
    argv = [sys.executable, "-m", "memtrace", "watch", "--format", "json", "--interval", "1",
            "--pss-interval", str(pss_interval), "--heap-interval", "0", "--no-serve",
            *map(str, pids)]
    mt = spawn(argv, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: set[int] = set()
    ticks: list[float] = []
    all_seen = threading.Event()

    def read() -> None:
        assert mt.stdout is not None
        for line in mt.stdout:
            snap = json.loads(line)
            seen.add(snap["pid"])
            ticks.append(snap["tick_seconds"])
            if len(seen) == len(pids):
                all_seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not all_seen.wait(120):
            assert mt.stderr is not None
            raise SystemExit(f"memtrace watch did not report every pid: {seen}")
        time.sleep(max(pss_interval, 1.0) + 1.0)
        n_before = len(ticks)
        c0, t0 = cpu_seconds(mt.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds(mt.pid), time.monotonic()
        window = ticks[n_before:]
    finally:
        kill(mt, term_first=True)
    err = mt.stderr.read().decode(errors="replace") if mt.stderr else ""
    if "PSS unavailable" in err:
        raise SystemExit(f"memtrace: {err}")
    return {"cpu_s": c1 - c0, "wall_s": t1 - t0, "cpu_per_s": (c1 - c0) / (t1 - t0),
            "snapshots": len(window)}


def watch_main(args: argparse.Namespace, pids: list[int], rss: int, nvmas: int) -> None:
    intervals = [float(x) for x in args.pss_intervals.split(",")]
    names = ["rollup", "watch-nopss", *(f"watch-pss-{i:g}" for i in intervals)]
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for rep in range(args.reps):
        for name in names:
            if name == "rollup":
                r = run_method(name, pids, args.seconds)
            elif name == "watch-nopss":
                r = run_watch(pids, 0, args.seconds)
            else:
                r = run_watch(pids, float(name.rsplit("-", 1)[1]), args.seconds)
            results[name].append(r)
            print(f"rep {rep + 1} {name:14s}: {r['cpu_per_s'] * 1000:7.2f} ms CPU per s "
                  f"over {r['wall_s']:.1f} s; load {loadavg()}", flush=True)
    med = {name: statistics.median(r["cpu_per_s"] for r in rs) for name, rs in results.items()}
    base = med["rollup"]
    parts = [f"rollup {base * 1000:.2f} ms", f"watch-nopss {med['watch-nopss'] * 1000:.2f} ms"]
    for name in names[2:]:
        extra = med[name] - med["watch-nopss"]
        parts.append(f"{name} {med[name] * 1000:.2f} ms (PSS share {extra * 1000:.2f} ms = "
                     f"{extra / base:.2f}x rollup)")
    print("median CPU per second: " + ", ".join(parts) + f"; load after: {loadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results,
                                               "median_cpu_per_s": med, "rss_kib": rss,
                                               "vmas": nvmas}, indent=2))


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=20)
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--watch", action="store_true",
                    help="measure memtrace watch with and without live PSS (active processes)")
    ap.add_argument("--pss-intervals", default="5,1",
                    help="--watch: the --pss-interval values to measure")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("pss_bench.py needs root (PFNs and /proc/kpagecount)", file=sys.stderr)
        return 3
    children = []
    try:
        for _ in range(args.procs):
            p = spawn(["/usr/bin/python3", "-c", ACTIVE_CODE if args.watch else PY_CODE,
                       str(args.mb)],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            children.append(p)
        for p in children:
            assert p.stdout is not None
            if p.stdout.readline().strip() != b"READY":
                raise SystemExit("a workload process failed to start")
        pids = [p.pid for p in children]
        rss = sum(read_rollup(pid)[b"Rss"] for pid in pids)
        nvmas = sum(len(ProcFS().maps(pid)) for pid in pids)
        print(f"{args.procs} python3 processes, {rss // 1024} MiB RSS in total, "
              f"{nvmas} VMAs; load before: {loadavg()}", flush=True)
        if args.watch:
            watch_main(args, pids, rss, nvmas)
            return 0
        results: dict[str, list[dict[str, float]]] = {"rollup": [], "pss": [], "pss-runs": []}
        for rep in range(args.reps):
            for name in results:
                r = run_method(name, pids, args.seconds)
                results[name].append(r)
                check = (f", PSS = smaps_rollup for {r['agree']}/{r['compared']} quiet "
                         f"processes (check attempt {r['check_attempts']})"
                         if name != "rollup" else "")
                print(f"rep {rep + 1} {name:8s}: {r['cpu_per_s'] * 1000:7.2f} ms CPU per s, "
                      f"tick median {r['tick_ms_median']:7.2f} ms, {r['ticks']} ticks"
                      f"{check}; load {loadavg()}", flush=True)
        med = {name: statistics.median(r["cpu_per_s"] for r in rs) for name, rs in results.items()}
        print(f"median CPU per second: rollup {med['rollup'] * 1000:.2f} ms, pss "
              f"{med['pss'] * 1000:.2f} ms ({med['pss'] / med['rollup']:.2f}x rollup), pss-runs "
              f"{med['pss-runs'] * 1000:.2f} ms ({med['pss-runs'] / med['rollup']:.2f}x rollup); "
              f"load after: {loadavg()}")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results,
                                                   "median_cpu_per_s": med, "rss_kib": rss,
                                                   "vmas": nvmas}, indent=2))
    finally:
        for p in children:
            kill(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
