"""--malloc cost on a malloc/free loop (issue 13, item 4; benchmarks/README.md).

benchmarks/workloads/mallocloop.c times its own loop (64 live blocks, each
step frees the oldest and mallocs 16 B .. 4 KiB) and prints ns per
malloc+free pair; every mode below runs the same binary:

  bare           the loop alone
  shim           the --malloc sampler preloaded (LD_PRELOAD), no memtrace, no probes,
                 with memtrace's rate cap (--max-rate)
  shim ref       the same with another build of the sampler (--ref-shim PATH.so)
  shim + empty uprobes  the sampler, and empty BPF programs on its two probed
                 functions (attached while the loop waits): the uprobe hits alone
  shim + malloc.bpf     the sampler, and memtrace's --malloc BPF object with its
                 reader thread, in this process: no unwinding, no ticks
  run            memtrace run (no --malloc)
  run --malloc   memtrace run --malloc: the sampler, its uprobes, the unwinding
  watch --malloc memtrace watch --malloc PID, attached while the loop waits: the
                 sampler put into the running loop (ptrace, dlopen, GOT slots)
  memleak        bcc's memleak-bpfcc -p PID (uprobes on every libc allocation
                 call and free), attached while the loop waits
  uprobe ...     an empty BPF program on libc's malloc entry (push: emulated),
                 free + 9 (its first push, the non-NULL path) or free + 0
                 (test %rdi,%rdi: single-stepped): what `watch --malloc` would
                 pay per call with probes in libc, before any work

Modes are interleaved, REPEAT rounds; the median of each is reported, and the
median of its per-round ratios to the bare loop of the same round ("paired", with
its 90 % distribution-free interval from 5 rounds: benchcommon.median_ci).
Run as root: sudo .venv/bin/python benchmarks/malloc_overhead.py
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.benchcommon import (  # noqa: E402
    DEFAULT_MEMTRACE,
    build,
    kill,
    median,
    median_ci,
    ratio_text,
    spawn,
    table,
)
from memtrace.commands.options import DEFAULT_MALLOC_MAX_RATE  # noqa: E402
from memtrace.malloc.shim import build_shim, child_env  # noqa: E402

LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
QUIET = ["--format", "none", "--no-serve", "--pss-interval", "0", "--heap-interval", "0"]
PERIOD = 512 * 1024
MAX_RATE = DEFAULT_MALLOC_MAX_RATE


def _ns(out: str) -> float:
    m = re.search(r"ns_per_pair ([0-9.]+)", out)
    if not m:
        raise RuntimeError(f"no figure in {out[-500:]!r}")
    return float(m.group(1))


TOUCH = "0"     # set by --touch: the loop writes each block whole


def bare(loop: Path, steps: int, env: dict[str, str] | None = None) -> float:
    return _ns(subprocess.run([str(loop), str(steps), "0", TOUCH], capture_output=True,
                              text=True, check=True, env=env).stdout)


SAMPLES: list[str] = []     # run --malloc: samples taken and lost, per run


def memtrace_run(loop: Path, steps: int, malloc: bool, max_rate: int | None = None) -> float:
    rate = MAX_RATE if max_rate is None else max_rate
    extra = (["--malloc", "--malloc-period", str(PERIOD), "--malloc-max-rate", str(rate)]
             if malloc else [])
    fmt = ["--format", "json"] if malloc else []
    r = subprocess.run([str(DEFAULT_MEMTRACE), "run", *QUIET, *fmt, *extra, "--", str(loop),
                        str(steps), "0", TOUCH], capture_output=True, text=True, check=True)
    if malloc:
        # run's last word (stderr), not the last snapshot: a loop shorter than an
        # interval ends between two ticks, and its samples are in no snapshot
        m = re.search(r"--malloc pid \d+: \d+ bytes outstanding in sampled allocations "
                      r"\((\d+) samples[^;]*(?:; (\d+) samples or frees lost)?", r.stderr)
        SAMPLES.append(f"{m.group(1)} sampled, {m.group(2) or 0} lost" if m else
                       "no --malloc line on stderr")
    return _ns(r.stdout)


def memtrace_watch(loop: Path, steps: int, delay: float) -> float:
    """watch --malloc PID on the loop while it waits `delay` s; a run whose
    sampler was not in place before the loop started is an error."""
    p = spawn([str(loop), str(steps), str(delay), TOUCH], stdout=subprocess.PIPE)
    started = time.monotonic()
    w = spawn([str(DEFAULT_MEMTRACE), "watch", *QUIET, "--malloc", "--malloc-period",
               str(PERIOD), "--malloc-max-rate", str(MAX_RATE), str(p.pid)],
              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        out, _ = p.communicate(timeout=3600)
    finally:
        kill(w, term_first=True)
        kill(p)
    err = w.stderr.read().decode() if w.stderr else ""
    m = re.search(r"sampler loaded into pid \d+: .*held ([0-9.]+) ms", err)
    if not m:
        raise RuntimeError(f"watch --malloc did not load its sampler: {err[-500:]!r}")
    SAMPLES.append(f"watch: one thread held {m.group(1)} ms")
    if time.monotonic() - started < delay:
        raise RuntimeError("the loop ended before its delay")
    return _ns(out.decode())


def attached(loop: Path, steps: int, delay: float, tracer: list[str] | None,
             probes: list[tuple[str, int]] | None = None, library: str = LIBC,
             env: dict[str, str] | None = None) -> float:
    """The loop, waiting `delay` s before it starts, with a tracer command
    (-p PID appended) or empty uprobes (bcc) on `library` at (symbol, offset)."""
    p = spawn([str(loop), str(steps), str(delay), TOUCH], stdout=subprocess.PIPE, env=env)
    t = bpf = None
    try:
        if tracer is not None:
            t = spawn([*tracer, "-p", str(p.pid)], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
        else:
            import bcc  # type: ignore[import-not-found]

            bpf = bcc.BPF(text=b"int empty(void *ctx) { return 0; }")
            for sym, off in probes or []:
                bpf.attach_uprobe(name=library.encode(), sym=sym.encode(), sym_off=off,
                                  fn_name=b"empty", pid=p.pid)
        out, _ = p.communicate(timeout=3600)
        return _ns(out.decode())
    finally:
        if t is not None:
            kill(t, term_first=True)
        if bpf is not None:
            bpf.cleanup()
        kill(p)


def with_malloc_probes(loop: Path, steps: int, delay: float, shim: str,
                       env: dict[str, str]) -> float:
    """The loop with the sampler preloaded and memtrace's --malloc BPF object
    (bpf/malloc.bpf.c, its reader thread) attached in this process: what
    `run --malloc` costs without the rest of memtrace (no unwinding, no ticks)."""
    import bcc

    from memtrace.trace.mallocprobes import MallocProbes
    from memtrace.trace.probes import MAX_TARGETS

    p = spawn([str(loop), str(steps), str(delay), TOUCH], stdout=subprocess.PIPE, env=env)
    probes = None
    try:
        probes = MallocProbes(bcc, Path(__file__).resolve().parents[1] / "bpf", shim,
                              MAX_TARGETS)
        probes.add(p.pid)
        out, _ = p.communicate(timeout=3600)
        records, counts = probes.take()
        SAMPLES.append(f"malloc.bpf: {sum(map(len, records.values()))} records, "
                       f"{counts['lost']} lost")
        return _ns(out.decode())
    finally:
        if probes is not None:
            probes.close()
        kill(p)


def main() -> None:
    global TOUCH, PERIOD, MAX_RATE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30_000_000)
    ap.add_argument("--slow-steps", type=int, default=200_000,
                    help="steps for memleak and the uprobe modes (ns per pair is per step)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--delay", type=float, default=12.0,
                    help="seconds the loop waits for memleak or the uprobes to attach")
    ap.add_argument("--touch", action="store_true", help="the loop writes each block whole")
    ap.add_argument("--period", type=int, default=PERIOD, help="--malloc-period in bytes")
    ap.add_argument("--max-rate", type=int, default=MAX_RATE,
                    help="--malloc-max-rate (samples a second; 0: no cap), also for the shim modes")
    ap.add_argument("--more-rates", default="",
                    help="comma-separated other caps: a mode 'run --malloc, cap N' each")
    ap.add_argument("--ref-shim", default="",
                    help="another build of the sampler (.so), run as mode 'shim ref'")
    ap.add_argument("--only", default="", help="comma-separated mode names (prefixes) to run")
    args = ap.parse_args()
    TOUCH = "1" if args.touch else "0"
    PERIOD = args.period
    MAX_RATE = args.max_rate
    loop = build("mallocloop")
    shim = str(build_shim())
    shim_env = child_env(os.environ, shim, args.period, args.max_rate)
    memleak = shutil.which("memleak-bpfcc")
    modes: dict[str, Callable[[], float]] = {
        "bare": lambda: bare(loop, args.steps),
        "shim (LD_PRELOAD only)": lambda: bare(loop, args.steps, shim_env),
        **({"shim ref": lambda: bare(loop, args.steps, child_env(
            os.environ, args.ref_shim, args.period, args.max_rate))} if args.ref_shim else {}),
        "shim + empty uprobes": lambda: attached(
            loop, args.steps, args.delay / 3, None,
            [("memtrace_malloc_sampled", 0), ("memtrace_malloc_freed", 0)], shim, shim_env),
        "shim + malloc.bpf": lambda: with_malloc_probes(loop, args.steps, args.delay / 3, shim,
                                                         shim_env),
        "memtrace run": lambda: memtrace_run(loop, args.steps, False),
        "memtrace run --malloc": lambda: memtrace_run(loop, args.steps, True),
        **{f"memtrace run --malloc, cap {n}": functools.partial(memtrace_run, loop, args.steps,
                                                                True, n)
           for n in (int(x) for x in args.more_rates.split(",") if x)},
        "memtrace watch --malloc": lambda: memtrace_watch(loop, args.steps, args.delay),
        "uprobe malloc+0, free+9 (emulated push)": lambda: attached(
            loop, args.slow_steps, args.delay / 3, None, [("malloc", 0), ("free", 9)]),
        "uprobe malloc+0, free+0 (free single-stepped)": lambda: attached(
            loop, args.slow_steps, args.delay / 3, None, [("malloc", 0), ("free", 0)]),
    }
    if memleak:
        modes["memleak-bpfcc -p PID"] = lambda: attached(
            loop, args.slow_steps, args.delay, [memleak])
    if args.only:
        keep = [w.strip() for w in args.only.split(",")]
        modes = {m: f for m, f in modes.items() if m == "bare" or any(m.startswith(k)
                                                                       for k in keep)}
    results: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.repeat):
        for name, fn in modes.items():
            results[name].append(fn())
            print(f"round {r + 1} {name}: {results[name][-1]:.2f} ns/pair", flush=True)
    base = median(results["bare"])
    # Each round's bare loop ran next to its other modes: the median of the
    # per-round ratios cancels much of the host's slower stretches, which move
    # the medians of whole columns by more than the few per cent sought.
    rows = [(name, f"{median(v):.2f}", f"{median(v) / base:.3f}x",
             _paired(v, results["bare"]), " ".join(f"{x:.1f}" for x in v))
            for name, v in results.items()]
    print(table(["mode", "ns per malloc+free (median)", "vs bare", "paired (90 %)", "runs"],
                rows))
    print(f"run --malloc samples per run: {'; '.join(SAMPLES)} (steps {args.steps}, "
          f"period {PERIOD}, max rate {MAX_RATE}, touch {TOUCH})")
    print(f"load average: {os.getloadavg()}; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")


def _paired(times: list[float], bare: list[float]) -> str:
    """The median of the per-round ratios to the bare loop, with its 90 %
    distribution-free interval (benchcommon.median_ci) from 5 rounds."""
    ratios = [x / b for x, b in zip(times, bare)]
    return ratio_text(median(ratios), median_ci(ratios))


if __name__ == "__main__":
    main()
