"""Where memtrace's start-up goes: each phase's duration and memory, in process.

    sudo .venv/bin/python benchmarks/startup_phases.py watch PID --once --format json \\
        --heap-interval 0 --no-serve --reconcile-interval 0 > /dev/null

Runs the memtrace command given (its arguments as for `memtrace`) with timers
around the imports, the BPF compile and load (Probes.__init__), the initial scan
(ProcessTracker.start), the first PSS pass (Session._update_pss), the first build
(SnapshotBuilder.build) and the whole attach; prints on stderr, per phase, when it
started and how long it took (seconds from the start of this script) and VmHWM /
VmRSS (MiB) at its end. With NOGC=1 the cyclic garbage collector is off throughout.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import os
import sys
import time
from collections.abc import Callable
from typing import Any

T0 = time.monotonic()
if os.environ.get("NOGC"):
    gc.disable()
marks: list[tuple[str, float, float, str]] = []


def _memory() -> str:
    with open("/proc/self/status") as f:
        st = {line.split(":")[0]: line.split()[1] for line in f
              if line.startswith(("VmHWM", "VmRSS"))}
    return f"hwm {int(st['VmHWM']) >> 10} rss {int(st['VmRSS']) >> 10} MiB"


def timed(module: str, qualname: str) -> None:
    owner: Any = importlib.import_module(module)
    parts = qualname.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    inner: Callable[..., Any] = getattr(owner, parts[-1])

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.monotonic()
        try:
            return inner(*args, **kwargs)
        finally:
            marks.append((qualname, t - T0, time.monotonic() - t, _memory()))
    setattr(owner, parts[-1], wrapper)


def main() -> None:
    t = time.monotonic()
    import memtrace.commands.main as cli
    marks.append(("imports", t - T0, time.monotonic() - t, _memory()))
    timed("memtrace.trace.probes", "Probes.__init__")
    timed("memtrace.trace.tracker", "ProcessTracker.start")
    timed("memtrace.session", "Session._update_pss")
    timed("memtrace.snapshot", "SnapshotBuilder.build")
    timed("memtrace.session", "Session.attach")
    sys.argv = ["memtrace", *sys.argv[1:]]
    with contextlib.suppress(SystemExit):
        cli.main()
    for name, at, took, memory in marks:
        print(f"{name:24s} at {at:6.3f} s took {took:6.3f} s  {memory}", file=sys.stderr)


if __name__ == "__main__":
    main()
