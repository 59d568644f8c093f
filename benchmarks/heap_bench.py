"""Time `memtrace heap` on a large glibc heap (root).

Builds tests/root/heap/heapprog.c, runs it in mode `many N` (N chunks of 512..1535
bytes, every third freed: about 1 GiB and a million chunks for N = 1000000),
then analyses it: without stopping (analysis time; the walk is retried if the
heap changes, which this idle program does not), and with --stop (the pause:
SIGSTOP, copy of the heap's resident pages into a pre-faulted buffer, SIGCONT;
and the total). Prints one JSON object per run and a Markdown table.

    sudo .venv/bin/python benchmarks/heap_bench.py [--chunks 1000000] [--repeat 3]

With --background it measures instead what a background walk (watch/run/agent
--heap-interval) does to the watch loop: a stand-in tick (about 2 ms of Python
work with 20 small /proc reads in between, due every 20 ms; timed from when it
was due to its end) while nothing walks, while a walk runs in a thread of the
same process (the GIL is shared), and while it runs in HeapSampler's walker
process (what memtrace does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memtrace.heap.process import analyse_process  # noqa: E402
from memtrace.heap.sampler import HeapSampler  # noqa: E402
from memtrace.heap.worker import sample_once  # noqa: E402
from memtrace.util.units import fmt_bytes  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--background", action="store_true",
                    help="measure the effect of a background walk on the watch tick")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("heap_bench needs root", file=sys.stderr)
        return 3
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "heapprog"
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe),
                        str(REPO / "tests" / "root" / "heap" / "heapprog.c")], check=True)
        p = subprocess.Popen([str(exe), "many", str(args.chunks)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
        try:
            assert p.stdout is not None
            t0 = time.monotonic()
            ready = p.stdout.readline().decode()
            assert ready.startswith("READY"), ready
            build_s = time.monotonic() - t0
            if args.background:
                return background(p.pid, args.repeat)
            rows = []
            for mode in ("running", "stop"):
                for _ in range(args.repeat):
                    t = time.monotonic()
                    r = analyse_process(p.pid, stop=mode == "stop")
                    wall = time.monotonic() - t
                    a = r["arenas"][0]
                    row = {"mode": mode, "wall_seconds": round(wall, 3),
                           "pause_seconds": (round(r["pause_seconds"], 3)
                                             if r["pause_seconds"] is not None else None),
                           "attempts": r["attempts"], "heap_bytes": a["size_bytes"],
                           "resident_bytes": a["resident_bytes"],
                           "chunks": a["in_use_chunks"] + a["free_chunks"],
                           "bytes_read": r["bytes_read"]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            p.kill()
            p.wait()
    load = os.getloadavg()[0]
    print(f"\nheap built in {build_s:.1f} s; {os.cpu_count()} CPUs, load average {load:.1f}")
    print("| mode | heap | chunks | wall (median) | pause (median) |")
    print("|---|---|---|---|---|")
    for mode in ("running", "stop"):
        sel = [r for r in rows if r["mode"] == mode]
        wall = statistics.median(r["wall_seconds"] for r in sel)
        pauses = [r["pause_seconds"] for r in sel if r["pause_seconds"] is not None]
        pause = f"{statistics.median(pauses):.2f} s" if pauses else "—"
        print(f"| {mode} | {fmt_bytes(sel[0]['heap_bytes'])} | {sel[0]['chunks']} | "
              f"{wall:.2f} s | {pause} |")
    return 0


def _work(n: int) -> int:
    """Python work with 20 small reads of /proc in between, like a tick (each read
    releases the GIL and must take it back)."""
    x = 0
    for _ in range(20):
        with open("/proc/self/statm", "rb") as f:
            x += len(f.read())
        for i in range(n // 20):
            x += i * i
    return x


def background(pid: int, repeat: int) -> int:
    """Stand-in ticks (fixed Python work) while a walk runs, three ways."""
    import threading

    n = 10_000
    t = time.perf_counter()
    _work(n)
    per = time.perf_counter() - t
    n = max(1, int(n * 0.002 / per))  # about 2 ms of work

    def ticks(busy: threading.Event | None, seconds: float = 0.0) -> list[float]:
        out = []
        end = time.monotonic() + seconds
        due = time.perf_counter()
        while (busy is not None and busy.is_set()) or (busy is None and time.monotonic() < end):
            _work(n)
            out.append(time.perf_counter() - due)  # from when it was due to its end
            due = max(due + 0.02, time.perf_counter())
            time.sleep(max(0.0, due - time.perf_counter()))
        return out

    def summary(name: str, d: list[float], walk: float | None) -> dict[str, object]:
        d = sorted(d)
        row = {"case": name, "ticks": len(d), "tick_ms_median": round(1000 * d[len(d) // 2], 2),
               "tick_ms_p99": round(1000 * d[min(len(d) - 1, int(len(d) * 0.99))], 2),
               "tick_ms_max": round(1000 * d[-1], 2),
               "walk_seconds": round(walk, 2) if walk is not None else None}
        print(json.dumps(row), flush=True)
        return row

    def while_walking(name: str, walk: Any) -> dict[str, object]:
        """Ticks while walk() runs in a helper thread; walk returns the report."""
        busy = threading.Event()
        busy.set()
        took: list[float] = []

        def run() -> None:
            t0 = time.monotonic()
            r = walk()
            took.append(time.monotonic() - t0)
            assert r["status"] == "ok", r
            busy.clear()

        th = threading.Thread(target=run)
        th.start()
        d = ticks(busy)
        th.join()
        return summary(name, d, took[0])

    def in_sampler() -> dict[str, Any]:
        sampler = HeapSampler(3600.0)
        try:
            sampler.track(pid, 1)
            while sampler.latest(pid, 1)["status"] == "pending":
                time.sleep(0.005)
            return sampler.latest(pid, 1)
        finally:
            sampler.close()

    rows = []
    for _ in range(repeat):
        rows.append(summary("no walk", ticks(None, 3.0), None))
        rows.append(while_walking("walk in a thread (same GIL)", lambda: sample_once(pid)))
        rows.append(while_walking("walk in HeapSampler's walker process", in_sampler))
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("| case | ticks | tick median | tick p99 | tick max | walk |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        walk = f"{r['walk_seconds']:.2f} s" if r["walk_seconds"] is not None else "—"
        print(f"| {r['case']} | {r['ticks']} | {r['tick_ms_median']} ms | {r['tick_ms_p99']} ms"
              f" | {r['tick_ms_max']} ms | {walk} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
