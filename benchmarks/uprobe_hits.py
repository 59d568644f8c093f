"""What uprobe hits cost a busy loop besides their own time (issue 13 item 4;
benchmarks/README.md).

`run --malloc` calls an empty, uprobed function once per sampled allocation and
once per free of a sampled block. benchmarks/workloads/uprobeloop.c runs
mallocloop's malloc/free loop and every EVERY steps calls such a function
(`nop; ret`), with or without an empty BPF program on a uprobe there, or makes
a getppid system call instead, or copies 8 KiB of its stack as a sampler
without uprobes would (process_vm_readv of its own process, or memcpy into
shared memory). Modes, interleaved, REPEAT rounds:

  no probe          the calls, nothing attached
  probe, no hit     an empty uprobe program attached, the function never called
  N hits            an empty uprobe program, hit N times in the loop
  N getppid         N system calls instead (a kernel entry without a uprobe)
  N process_vm_readv  N copies of 8 KiB of the stack by the kernel (safe at an
                    unmapped page)
  N memcpy          N copies of 8 KiB of the stack into a MAP_SHARED page

Reported: ns per step (median), the median of per-round ratios to "no probe",
the loop time lost per hit, and the mean time one call takes with its hit
(measured around the call in the loop). Run as root:
sudo .venv/bin/python benchmarks/uprobe_hits.py
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.benchcommon import build, kill, median, spawn, table  # noqa: E402

EMPTY = b"int empty(void *ctx) { return 0; }"


def one(loop: Path, steps: int, hits: int, mode: int, probe: bool,
        delay: float) -> tuple[float, float]:
    """ns per step and µs per call of one run of the loop."""
    every = steps // (hits + 1) if hits else steps + 1
    p = spawn([str(loop), str(steps), str(every), str(mode), str(delay)],
              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    bpf = None
    try:
        if probe:
            import bcc  # type: ignore[import-not-found]

            bpf = bcc.BPF(text=EMPTY)
            bpf.attach_uprobe(name=str(loop).encode(), sym=b"uprobeloop_mark",
                              fn_name=b"empty", pid=p.pid)
        out, err = p.communicate(timeout=600)
    finally:
        if bpf is not None:
            bpf.cleanup()
        kill(p)
    ns = re.search(rb"ns_per_step ([0-9.]+)", out)
    us = re.search(rb"in_call_us ([0-9.]+)", err)
    if not ns or not us:
        raise RuntimeError(f"uprobeloop said {out!r} {err!r}")
    return float(ns.group(1)), float(us.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100_000_000)
    ap.add_argument("--hits", default="1,140,500", help="comma-separated hits per run")
    ap.add_argument("--repeat", type=int, default=13)
    ap.add_argument("--delay", type=float, default=1.0,
                    help="seconds the loop waits for the uprobe to attach")
    args = ap.parse_args()
    loop = build("uprobeloop")
    counts = [int(h) for h in args.hits.split(",") if h]
    modes: dict[str, tuple[int, int, bool]] = {"no probe": (max(counts), 1, False),
                                               "probe, no hit": (0, 1, True)}
    for n in counts:
        modes[f"{n} hits"] = (n, 1, True)
    modes[f"{max(counts)} getppid"] = (max(counts), 2, False)
    modes[f"{max(counts)} process_vm_readv"] = (max(counts), 3, False)
    modes[f"{max(counts)} memcpy"] = (max(counts), 4, False)
    ns: dict[str, list[float]] = {m: [] for m in modes}
    us: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.repeat):
        for name, (hits, mode, probe) in modes.items():
            a, b = one(loop, args.steps, hits, mode, probe, args.delay)
            ns[name].append(a)
            us[name].append(b)
            print(f"round {r + 1} {name}: {a:.3f} ns/step, {b:.2f} us/call", flush=True)
    base = ns["no probe"]
    rows = []
    for name, v in ns.items():
        hits = modes[name][0] if name != "no probe" else 0
        paired = median([x / b for x, b in zip(v, base)])
        lost = (paired - 1) * median(base) * args.steps / hits / 1000 if hits else 0.0
        rows.append((name, f"{median(v):.3f}", f"{paired:.4f}x",
                     f"{lost:.1f}" if hits else "-", f"{median(us[name]):.2f}"))
    print(table(["mode", "ns per step (median)", "paired vs no probe",
                 "loop time lost per hit, us", "one call with its hit, us"], rows))
    print(f"steps {args.steps}; load average {os.getloadavg()}; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")


if __name__ == "__main__":
    main()
