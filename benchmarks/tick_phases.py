"""Where memtrace's watch tick goes: CPU time (this thread's, user + system) per
tick of each phase, in process.

    sudo .venv/bin/python benchmarks/tick_phases.py OUT.txt watch PID --format json \\
        --interval 1 --reconcile-interval 0 --no-serve --changed-only > /dev/null &
    kill -USR1 $!      # once the workload is in its steady state: counts start again
    kill -INT $!       # the table is written to OUT.txt at exit

Runs the memtrace command given (its arguments as for `memtrace`) with timers
(time.thread_time) around the tick (Session.tick) and its phases: the BPF drain
and its batch read of the dirty chunks, the tracker's update (its targeted
rescans, PAGEMAP_SCAN spans, attribution, statm reads), the snapshot build, the
publish for the exporter, PSS and the JSON view. Nested phases count in their
callers too. Used in benchmarks/README.md on the 60k-mapping workload of
polling.py (benchmarks/workloads/manymaps.c, refault mode).
"""

from __future__ import annotations

import collections
import runpy
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

spent: collections.Counter[str] = collections.Counter()
calls: collections.Counter[str] = collections.Counter()


def timed(owner: Any, name: str) -> None:
    func: Callable[..., Any] = getattr(owner, name)
    label = f"{owner.__name__}.{name}"

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.thread_time()
        try:
            return func(*args, **kwargs)
        finally:
            spent[label] += time.thread_time() - t0
            calls[label] += 1

    setattr(owner, name, wrapper)


def table() -> str:
    ticks = max(calls["Session.tick"], 1)
    rows = [f"{label:40s} {seconds * 1000 / ticks:8.3f} ms/tick  calls {calls[label]}"
            for label, seconds in spent.most_common()]
    return "\n".join(rows + [f"ticks {calls['Session.tick']}"]) + "\n"


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["memtrace", *sys.argv[2:]]
    from memtrace import published, session, snapshot
    from memtrace.trace import model, probes, tracker
    from memtrace.views import jsonl

    for owner, names in (
            (session.Session, ("tick", "publish", "_update_pss", "_library_events")),
            (tracker.ProcessTracker, ("update", "_targeted", "_scan_spans", "_check",
                                      "_count_faults", "_read_statm")),
            (model.AddressSpace, ("attribute",)),
            (snapshot.SnapshotBuilder, ("build", "_rebuild_changed", "_snapshot", "_entry")),
            (snapshot._TextBlocks, ("replace",)),
            (probes.Probes, ("drain", "_swap", "_grace_period")),
            (probes.ChunkBatch, ("drain",)),
            (jsonl.JsonReporter, ("snapshot",)),
            (published.StateBox, ("set",))):
        for name in names:
            timed(owner, name)
    signal.signal(signal.SIGUSR1, lambda *_: (spent.clear(), calls.clear()))
    try:
        runpy.run_module("memtrace", run_name="__main__")
    finally:
        with open(out, "w") as f:
            f.write(table())


if __name__ == "__main__":
    main()
