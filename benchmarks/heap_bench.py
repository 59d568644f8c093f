"""Time `memtrace heap` on a large glibc heap (root).

Builds tests/heap/heapprog.c, runs it in mode `many N` (N chunks of 512..1535
bytes, every third freed: about 1 GiB and a million chunks for N = 1000000),
then analyses it: without stopping (analysis time; the walk is retried if the
heap changes, which this idle program does not), and with --stop (the pause:
SIGSTOP, copy of the heap's resident pages into a pre-faulted buffer, SIGCONT;
and the total). Prints one JSON object per run and a Markdown table.

    sudo .venv/bin/python benchmarks/heap_bench.py [--chunks 1000000] [--repeat 3]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memtrace import heap  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("heap_bench needs root", file=sys.stderr)
        return 3
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "heapprog"
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe),
                        str(REPO / "tests" / "heap" / "heapprog.c")], check=True)
        p = subprocess.Popen([str(exe), "many", str(args.chunks)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
        try:
            assert p.stdout is not None
            t0 = time.monotonic()
            ready = p.stdout.readline().decode()
            assert ready.startswith("READY"), ready
            build_s = time.monotonic() - t0
            rows = []
            for mode in ("running", "stop"):
                for _ in range(args.repeat):
                    t = time.monotonic()
                    r = heap.analyse_process(p.pid, stop=mode == "stop")
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
        print(f"| {mode} | {heap.human(sel[0]['heap_bytes'])} | {sel[0]['chunks']} | "
              f"{wall:.2f} s | {pause} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
