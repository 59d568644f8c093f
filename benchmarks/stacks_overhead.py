"""Cost of sampling stacks (--stacks, issue 13) on the 4 GiB first-touch fault loop.

    sudo .venv/bin/python benchmarks/stacks_overhead.py [--reps 5] [--period BYTES]

Until watch/run have a --stacks option this driver loads memtrace's BPF program
itself (memtrace.trace.probes.Probes, as the session does: no rss_stat probe on
a kernel with exact statm, no event stream), adds the workload as its target
and drains every --interval seconds on a thread. Kinds of run, alternated per
repetition (the order rotates every repetition):

- baseline:   nothing attached
- probes:     Probes(stacks=False): memtrace's fault path as it is
- stacks:     Probes(stacks=True, stack_period=--period)
- stackcount: `stackcount-bpfcc -U t:exceptions:page_fault_user` (the peer: a
              frame-pointer user stack walk on every fault)

The workload is benchmarks/workloads/overhead.c `fault 16` (16 x 256 MiB first
touch, MADV_NOHUGEPAGE, touch loops timed by the workload itself). Reported:
median elapsed seconds of the timed loops per kind, ratios to baseline and of
stacks to probes, the workload's own CPU (BPF programs run in its context), this
driver's CPU while the loop ran (the drains), and for stacks the samples taken
and lost."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import benchcommon as bc

sys.path.insert(0, str(bc.REPO))

from memtrace.trace.probes import Probes  # noqa: E402
from memtrace.trace.sampling import DEFAULT_STACK_PERIOD  # noqa: E402

KINDS = ("baseline", "probes", "stacks", "stackcount")
STACKCOUNT = ["stackcount-bpfcc", "-U", "t:exceptions:page_fault_user"]
LOOP_TIMEOUT = 600.0


class Drainer:
    """Drains the probes every interval on a thread, as the session's loop does."""

    def __init__(self, probes: Probes, interval: float) -> None:
        self.probes, self.interval = probes, interval
        self.samples = 0
        self.last: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._drain()

    def _drain(self) -> None:
        d = self.probes.drain()
        self.samples += d.sample_count()
        self.last = d

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()


def start_stackcount(log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    p = bc.spawn(STACKCOUNT, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while b"Tracing" not in log.read_bytes():
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"stackcount did not start: {log.read_text()[-500:]}")
        time.sleep(0.2)
    return p


def one_run(binary: Path, kind: str, period: int, interval: float, tmp: Path) -> dict[str, Any]:
    probes: Probes | None = None
    peer: subprocess.Popen[bytes] | None = None
    res: dict[str, Any] = {"kind": kind}
    if kind in ("probes", "stacks"):
        probes = Probes(rss_stat_probe=False, stream_events=False, stacks=kind == "stacks",
                        stack_period=period)
    elif kind == "stackcount":
        peer = start_stackcount(tmp / "stackcount.out")
    wl = bc.spawn([str(binary), "fault", "16"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    drainer = None
    try:
        assert wl.stdin is not None and wl.stdout is not None
        pid = int(bc.read_line(wl.stdout, 30, "workload").split()[1])
        if probes is not None:
            probes.add_target(pid)
            drainer = Drainer(probes, interval)
        cpu0 = bc.own_cpu_seconds()
        wl.stdin.write(b"g")
        wl.stdin.flush()
        f = bc.read_line(wl.stdout, LOOP_TIMEOUT, "workload").split()
        res["driver_cpu_s"] = bc.own_cpu_seconds() - cpu0
        res["elapsed_s"], res["loop_cpu_s"] = float(f[1]), float(f[3])
        if drainer is not None and probes is not None:
            drainer.stop()
            st = drainer.last.stats.get(pid)
            res["stack_records"] = drainer.samples
            if st is not None:
                res["stacks_sampled"], res["stacks_lost"] = st.stacks_sampled, st.stacks_lost
        wl.stdin.close()
        wl.wait(30)
        return res
    finally:
        bc.kill(wl)
        if peer is not None:
            peer.send_signal(signal.SIGINT)
            bc.kill(peer, term_first=True)
        if probes is not None:
            probes.close()


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    med = {k: bc.median([r["elapsed_s"] for r in runs if r["kind"] == k]) for k in KINDS
           if any(r["kind"] == k for r in runs)}
    cpu = {k: bc.median([r["loop_cpu_s"] for r in runs if r["kind"] == k]) for k in med}
    out: dict[str, Any] = {"median_elapsed_s": med, "median_loop_cpu_s": cpu}
    if "baseline" in med:
        out["ratio"] = {k: med[k] / med["baseline"] for k in med}
        out["cpu_ratio"] = {k: cpu[k] / cpu["baseline"] for k in cpu}
    if "stacks" in med and "probes" in med:
        out["stacks_over_probes"] = med["stacks"] / med["probes"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--period", type=int, default=DEFAULT_STACK_PERIOD,
                    help="mean bytes between samples")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between drains")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--json", type=Path, help="also write the raw runs here")
    opts = ap.parse_args()
    kinds = [k for k in opts.kinds.split(",") if k]
    if "stackcount" in kinds and not shutil.which(STACKCOUNT[0]):
        ap.error("stackcount-bpfcc not found (apt-get install bpfcc-tools)")
    binary = bc.build("overhead")
    print(f"load {os.getloadavg()}, period {opts.period} B, interval {opts.interval} s",
          file=sys.stderr)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(opts.reps):
            order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
            for kind in order:
                r = one_run(binary, kind, opts.period, opts.interval, Path(tmp))
                r["rep"], r["load1"] = rep, os.getloadavg()[0]
                runs.append(r)
                print(f"[rep {rep} {kind}] " + " ".join(
                    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in r.items() if k not in ("kind", "rep")),
                      file=sys.stderr, flush=True)
    s = summarise(runs)
    rows = [[k, f"{s['median_elapsed_s'][k]:.3f}", f"{s['ratio'].get(k, 0):.3f}x",
             f"{s['median_loop_cpu_s'][k]:.3f}", f"{s['cpu_ratio'].get(k, 0):.3f}x"]
            for k in s["median_elapsed_s"]] if "ratio" in s else []
    print(bc.table(["kind", "elapsed s (median)", "ratio", "loop CPU s", "CPU ratio"], rows))
    if "stacks_over_probes" in s:
        print(f"stacks / probes: {s['stacks_over_probes']:.3f}x")
    for r in runs:
        if r["kind"] == "stacks":
            print(f"rep {r['rep']}: {r.get('stack_records')} records, sampled "
                  f"{r.get('stacks_sampled')}, lost {r.get('stacks_lost')}, driver CPU "
                  f"{r['driver_cpu_s']:.2f}s")
    if opts.json:
        opts.json.write_text(json.dumps({"runs": runs, "summary": s}, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        bc.cleanup()
