"""What the cyclic garbage collector costs memtrace while it watches.

    sudo .venv/bin/python benchmarks/gc_stats.py watch PID --count 40 --interval 1 \\
        --format json --heap-interval 0 --no-serve --reconcile-interval 0 > /dev/null

Runs the memtrace command given (its arguments as for `memtrace`) with a
gc.callbacks hook; from SKIP_SECONDS (4) after the start (after the first
snapshot) to the exit, counts the collections of each generation and the
time spent in them, printed on stderr at exit.
"""

from __future__ import annotations

import atexit
import gc
import sys
import threading
import time
from typing import Any

SKIP_SECONDS = 4.0
stats: dict[int, list[float]] = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
window: dict[str, float] = {"from": 0.0}
started = [0.0]


def on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        started[0] = time.perf_counter()
        return
    s = stats[info["generation"]]
    s[0] += 1
    s[1] += time.perf_counter() - started[0]


def reset_after(seconds: float) -> None:
    time.sleep(seconds)
    for s in stats.values():
        s[0], s[1] = 0, 0.0
    window["from"] = time.perf_counter()


def report() -> None:
    seconds = time.perf_counter() - window["from"]
    per_gen = {g: (int(n), round(t, 3)) for g, (n, t) in stats.items()}
    print(f"gc over {seconds:.1f} s: generation -> (collections, seconds) {per_gen}",
          file=sys.stderr)


def main() -> None:
    gc.callbacks.append(on_gc)
    atexit.register(report)
    threading.Thread(target=reset_after, args=(SKIP_SECONDS,), daemon=True).start()
    import memtrace.commands.main as cli
    sys.argv = ["memtrace", *sys.argv[1:]]
    cli.main()


if __name__ == "__main__":
    main()
