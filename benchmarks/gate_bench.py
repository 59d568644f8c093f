"""Cost of the budget gate (docs/gate.md, issue 14): the live gate's work per
tick in `run` (Gate.observe on a tree of one process with N mappings, with
--max-rss, --max-pss and --max-growth), and `check` / `diff` on a synthetic
recording of HOURS hours at a 1 s interval (N mappings, CHANGED of them
changing every tick), written with memtrace.record.writer. No root needed.

    .venv/bin/python benchmarks/gate_bench.py [--mappings 1000] [--hours 1]"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memtrace.record.writer import RecordingWriter, make_header, open_recording_output  # noqa: E402
from memtrace.reports.gate import Budgets, Gate  # noqa: E402

MiB = 1 << 20


def snapshot(ts: float, sizes: dict[str, int]) -> dict[str, Any]:
    maps = []
    for i, (name, rss) in enumerate(sorted(sizes.items())):
        start = 0x10000000 * (i + 1)
        kind = "heap" if name == "[heap]" else "library"
        maps.append({"start": start, "end": start + 0x1000000, "perms": "r--p", "path": name,
                     "kind": kind, "mapping": name, "rss_bytes": rss, "pss_bytes": rss // 2})
    return {"ts": ts, "pid": 1, "comm": "prog", "rss_bytes": sum(sizes.values()),
            "pss_bytes": sum(m["pss_bytes"] for m in maps), "mappings": maps}


def ticks(n_maps: int, n_ticks: int, changed: int) -> Any:
    rng = random.Random(14)
    sizes = {f"/usr/lib/lib{i}.so": rng.randint(1, 100) * 4096 for i in range(n_maps - 1)}
    sizes["[heap]"] = 10 * MiB
    names = sorted(sizes)
    for t in range(n_ticks):
        for k in rng.sample(names, changed):
            sizes[k] += 4096
        yield snapshot(1000.0 + t, sizes)


def live_cost(n_maps: int, n_ticks: int) -> float:
    """Mean seconds of Gate.observe per tick."""
    gate = Gate(Budgets(max_rss=1 << 40, max_pss=1 << 40, max_growth=MiB))
    snaps = list(ticks(n_maps, n_ticks, 20))
    start = time.perf_counter()
    for s in snaps:
        gate.observe({1: s})
    return (time.perf_counter() - start) / n_ticks


def timed(cmd: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, cwd=REPO)
    return time.perf_counter() - start, r.returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mappings", type=int, default=1000)
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--changed", type=int, default=20)
    args = ap.parse_args()
    n_ticks = int(args.hours * 3600)
    print(f"live gate: {live_cost(args.mappings, 300) * 1e3:.2f} ms per tick "
          f"({args.mappings} mappings, 3 budgets)")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "run.mtrace")
        writer = RecordingWriter(open_recording_output(path), make_header("run", 1.0))
        for s in ticks(args.mappings, n_ticks, args.changed):
            writer.snapshot(s)
        writer.close()
        print(f"recording: {n_ticks} ticks, {os.path.getsize(path) / MiB:.1f} MiB")
        mt = [sys.executable, "-m", "memtrace"]
        for name, cmd in (
                ("check --baseline (itself) --max-rss --max-pss --max-growth",
                 [*mt, "check", path, "--baseline", path, "--max-rss", "1G", "--max-pss",
                  "1G", "--max-growth", "20MiB/min"]),
                ("check --max-growth", [*mt, "check", path, "--max-growth", "20MiB/min"]),
                ("diff (itself)", [*mt, "diff", path, path])):
            seconds, code = timed(cmd)
            print(f"{name}: {seconds:.2f} s (exit {code})")


if __name__ == "__main__":
    main()
