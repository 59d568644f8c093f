"""Cost of CPython frames in --stacks (docs/stacks.md, "Python") on a Python
fault loop.

    sudo .venv/bin/python benchmarks/python_stacks.py [--reps 5] [--gib 1]
        [--depth 8] [--period BYTES]

The workload is benchmarks/workloads/pytouch.py run by /usr/bin/python3.11:
GIB GiB made resident in 16 MiB bytearrays from DEPTH nested Python frames,
the loop timed by the workload. The driver loads memtrace's BPF program
itself (memtrace.trace.probes.Probes with stacks=True, as the session does
here: no rss_stat probe, no event stream), with kernel.bpf_stats_enabled set
for the run (restored after), adds the workload as its target and drains
every second on a thread. Kinds, alternated per repetition (order rotated):

- baseline: nothing attached
- stacks:   --stacks, the process not registered as CPython (native stacks only)
- python:   --stacks with the process registered (pydetect + set_python, as
            the session does): BPF walks its interpreter frames at each sample

Printed per kind: the loop's elapsed and CPU seconds (medians) and ratios to
baseline; per sample, the fault program's BPF time (run_time_ns over the
samples: python minus stacks is the walk); and for python, user space's time
to name the frames of the samples (PyResolver.groups: cold, a new resolver,
and warm), measured while the workload waits, before it exits."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import benchcommon as bc
from bpf_cost import prog_stats

sys.path.insert(0, str(bc.REPO))

from memtrace.stacks.pydetect import PyDetector  # noqa: E402
from memtrace.stacks.python import PyResolver  # noqa: E402
from memtrace.trace.events import StackRecord  # noqa: E402
from memtrace.trace.probes import Probes  # noqa: E402
from memtrace.trace.procfs import ProcFS  # noqa: E402
from memtrace.trace.sampling import DEFAULT_STACK_PERIOD  # noqa: E402

KINDS = ("baseline", "stacks", "python")
PYTHON = "/usr/bin/python3.11"
WORKLOAD = Path(__file__).parent / "workloads" / "pytouch.py"
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


class Drainer:
    """Drains every second on a thread, keeping the stack records."""

    def __init__(self, probes: Probes) -> None:
        self.probes = probes
        self.records: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        for recs in self.probes.drain().stacks.values():
            self.records.extend(r for r in recs if isinstance(r, StackRecord))

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._drain()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()


def name_cost(pid: int, offsets: Any, records: list[Any]) -> dict[str, float]:
    """µs per sample to name its Python frames: a new resolver, then again."""
    with_py = [r for r in records if r.py_frames]
    out: dict[str, float] = {"samples_with_py": len(with_py)}
    if not with_py:
        return out
    resolver = PyResolver(pid, offsets)
    try:
        for label in ("cold_us", "warm_us"):
            t0 = time.perf_counter()
            groups = [resolver.groups(r.py_frames) for r in with_py]
            out[label] = (time.perf_counter() - t0) / len(with_py) * 1e6
        out["frames_per_sample"] = sum(len(r.py_frames) for r in with_py) / len(with_py)
        out["example"] = " <- ".join(f.function for g in groups[-1] for f in g)  # type: ignore
    finally:
        resolver.close()
    return out


def one_run(kind: str, gib: float, depth: int, period: int) -> dict[str, Any]:
    probes = Probes(rss_stat_probe=False, stream_events=False, stacks=True,
                    stack_period=period) if kind != "baseline" else None
    wl = bc.spawn([PYTHON, str(WORKLOAD), str(gib), str(depth)], stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE)
    res: dict[str, Any] = {"kind": kind}
    drainer = None
    try:
        assert wl.stdin is not None and wl.stdout is not None
        pid = int(bc.read_line(wl.stdout, 30, "workload").split()[1])
        offsets = None
        if probes is not None:
            probes.add_target(pid)
            if kind == "python":
                found = PyDetector().check(pid, ProcFS().maps(pid))
                if found.offsets is None:
                    raise RuntimeError(f"no CPython 3.11 found: {found.reason}")
                probes.set_python(pid, 0, found.runtime)
                offsets = found.offsets
            drainer = Drainer(probes)
        before = prog_stats(probes.bpf) if probes is not None else {}
        wl.stdin.write(b"g")
        wl.stdin.flush()
        f = bc.read_line(wl.stdout, 600, "workload").split()
        res["elapsed_s"], res["loop_cpu_s"] = float(f[1]), float(f[3])
        if probes is not None and drainer is not None:
            after = prog_stats(probes.bpf)
            drainer.stop()
            cnt, ns = (after[k][i] - before.get(k, (0, 0))[i] for i, k in
                       ((0, "raw_tracepoint__page_fault_user"),
                        (1, "raw_tracepoint__page_fault_user")))
            samples = len(drainer.records)
            res.update(faults=cnt, fault_prog_ms=ns / 1e6, samples=samples,
                       bpf_ns_per_fault=ns / max(cnt, 1))
            res["py_read"] = sum(1 for r in drainer.records if r.py_flags & 4)
            if offsets is not None:
                res.update(name_cost(pid, offsets, drainer.records))
        wl.stdin.write(b"x")
        wl.stdin.close()
        wl.wait(30)
        return res
    finally:
        bc.kill(wl)
        if probes is not None:
            probes.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--period", type=int, default=DEFAULT_STACK_PERIOD)
    ap.add_argument("--json", type=Path)
    opts = ap.parse_args()
    old = STATS_SYSCTL.read_text().strip()
    STATS_SYSCTL.write_text("1")
    print(f"load {os.getloadavg()}, commit {bc.git_commit()}, period {opts.period} B, "
          f"{opts.gib} GiB, depth {opts.depth}", file=sys.stderr)
    runs: list[dict[str, Any]] = []
    try:
        for rep in range(opts.reps):
            order = KINDS[rep % len(KINDS):] + KINDS[:rep % len(KINDS)]
            for kind in order:
                r = one_run(kind, opts.gib, opts.depth, opts.period)
                r["rep"], r["load1"] = rep, os.getloadavg()[0]
                runs.append(r)
                print(f"[rep {rep} {kind}] " + " ".join(
                    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in r.items() if k not in ("kind", "rep", "example")),
                      file=sys.stderr, flush=True)
    finally:
        STATS_SYSCTL.write_text(old)
    report(runs)
    if opts.json:
        opts.json.write_text(json.dumps({"runs": runs}, indent=1))
    return 0


def report(runs: list[dict[str, Any]]) -> None:
    def med(kind: str, key: str) -> float:
        return bc.median([r[key] for r in runs if r["kind"] == kind and key in r])

    base = med("baseline", "elapsed_s")
    rows = []
    for k in KINDS:
        el, cpu = med(k, "elapsed_s"), med(k, "loop_cpu_s")
        spread = [r["elapsed_s"] for r in runs if r["kind"] == k]
        rows.append([k, f"{el:.3f}", f"{min(spread):.3f}-{max(spread):.3f}",
                     f"{el / base:.3f}x", f"{cpu:.3f}",
                     f"{med(k, 'bpf_ns_per_fault'):.1f}" if k != "baseline" else "-",
                     f"{med(k, 'samples'):.0f}" if k != "baseline" else "-"])
    print(bc.table(["kind", "loop s (median)", "min-max", "ratio", "loop CPU s",
                    "fault program ns/fault (median)", "samples"], rows))
    # the walk's BPF time per sample: the fault program's extra time per fault,
    # over the samples per fault
    extra_ns = (med("python", "bpf_ns_per_fault") - med("stacks", "bpf_ns_per_fault")) \
        * med("python", "faults") / med("python", "samples")
    print(f"Python walk: {extra_ns / 1000:.2f} µs per sample (BPF time per fault, python "
          "minus stacks, times faults per sample)")
    py = [r for r in runs if r["kind"] == "python"]
    if py:
        print(f"naming (user space): cold {med('python', 'cold_us'):.1f} µs, warm "
              f"{med('python', 'warm_us'):.1f} µs per sample; "
              f"{med('python', 'frames_per_sample'):.1f} frames per sample; "
              f"samples {[r['samples'] for r in py]}, with frames read "
              f"{[r['py_read'] for r in py]}")
        print(f"example: {py[-1].get('example')}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        bc.cleanup()
