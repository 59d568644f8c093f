"""Slowdown of a workload's own timed loop while memtrace watches it.

    sudo .venv/bin/python benchmarks/overhead.py [--reps 5] [--only fault,mmaploop,malloc]
        [--memtrace-args '--stacks']

For each workload (benchmarks/workloads/overhead.c) it alternates runs without
and with `memtrace watch PID --format json --interval 1 --reconcile-interval 0
--no-serve` (order swapped every repetition: A B, B A, ...). A run starts the
workload, which prints its pid and waits on stdin; with memtrace, the driver
starts memtrace and waits for its first JSON snapshot before sending "go". The
workload times its own loop and prints the elapsed seconds. Also recorded per
memtrace run: memtrace's CPU (user+sys from /proc/PID/stat) during the timed
loop and from its start to the first snapshot, its peak RSS (VmHWM) at the end
of the loop, and the start-to-first-snapshot time (wall clock measured here,
and the value memtrace logs on stderr).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchcommon as bc

WORKLOADS = {
    # name: (argv tail, goal ratio, description)
    "fault": (["fault", "16"], 1.15, "first-touch faults, 16 x 256 MiB (4 GiB), touch loops timed"),
    "mmaploop": (["mmaploop", "200000"], 1.25, "200k x (mmap 64 KiB, touch 16 pages, munmap)"),
    "malloc": (["malloc", "50000000"], 1.02, "50M x (malloc 64..1024 B, write, free)"),
}
LOOP_TIMEOUT = 600.0
ATTACH_TIMEOUT = 180.0


def one_run(binary: Path, args: list[str], memtrace: Path | None,
            interval: float, extra: list[str] | None = None) -> dict[str, Any]:
    wl = bc.spawn([str(binary), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    mt: bc.Memtrace | None = None
    try:
        assert wl.stdin is not None and wl.stdout is not None
        pid = int(bc.read_line(wl.stdout, 30, "workload").split()[1])
        res: dict[str, Any] = {"memtrace": memtrace is not None}
        if memtrace is not None:
            mt = bc.Memtrace(memtrace, pid, interval, extra=extra or [])
            res["first_snapshot_wall_s"] = mt.wait_first_snapshot(ATTACH_TIMEOUT)
            res["cpu_to_first_snapshot_s"] = bc.tree_cpu_seconds(mt.pid)
        cpu0 = bc.tree_cpu_seconds(mt.pid) if mt else 0.0
        watch = bc.Interference([wl.pid] + ([mt.pid] if mt else []))
        t0 = time.monotonic()
        wl.stdin.write(b"g")
        wl.stdin.flush()
        line = bc.read_line(wl.stdout, LOOP_TIMEOUT, "workload")
        wall = time.monotonic() - t0
        res["foreign_cpu_s"] = watch.stop()
        res["foreign_memtrace_pids"] = sorted(watch.foreign_mt)
        res["loop_wall_s"] = wall
        if not line.startswith("elapsed "):
            raise RuntimeError(f"workload printed {line!r}")
        f = line.split()
        res["elapsed_s"] = float(f[1])
        res["loop_cpu_s"] = float(f[3])
        if mt:
            if mt.proc.poll() is not None:
                raise RuntimeError(mt.failure("exited during the timed loop"))
            res["cpu_loop_s"] = bc.tree_cpu_seconds(mt.pid) - cpu0
            res["vm_hwm_kib"] = bc.status_kb(mt.pid, "VmHWM")
            res["snapshots_during"] = mt.lines
            # One more snapshot, taken at least one interval after the loop ended,
            # to record memtrace's totals against statm at rest.
            after = mt.wait_snapshot_after(time.time() + interval, 10 * interval + 30)
            try:
                last = json.loads(after)
                res["snapshot_after_loop"] = {k: last.get(k) for k in (
                    "rss_bytes", "statm_rss_bytes", "drift_bytes", "faults", "full_rescans",
                    "events_lost", "events_sampled_out", "tick_seconds")}
            except ValueError:
                res["snapshot_after_loop"] = None
        wl.stdin.close()  # workload exits on EOF
        wl.wait(30)
        if mt:
            rc = mt.wait_exit(3 * interval + 10)
            res["memtrace_exit"] = rc
            res["first_snapshot_logged_s"] = mt.logged_first_snapshot()
            res["unexpected_stderr"] = mt.unexpected_stderr()
            if rc != 0:
                res["stderr_tail"] = mt.stderr[-20:]
        return res
    finally:
        bc.kill(wl)
        if mt:
            bc.kill(mt.proc, term_first=True)


def fmt(x: float, d: int = 3) -> str:
    return f"{x:.{d}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="runs of each kind per workload")
    ap.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--memtrace", type=Path, default=bc.DEFAULT_MEMTRACE)
    ap.add_argument("--json", type=Path, help="also write all raw results here")
    ap.add_argument("--memtrace-args", default="",
                    help="more arguments for memtrace watch, e.g. '--stacks' "
                    "(split on spaces)")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="before each run, wait up to this long for no other memtrace "
                    "process and < 0.1 busy core on the machine")
    ap.add_argument("--max-foreign", type=float, default=0.10,
                    help="a run is 'disturbed' if other processes used more than this "
                    "many cores on average during its timed loop, or another memtrace ran")
    ap.add_argument("--retries", type=int, default=2,
                    help="re-run a disturbed run up to this many times (the last is kept)")
    opts = ap.parse_args()
    binary = bc.build("overhead")
    names = [n for n in opts.only.split(",") if n]
    for n in names:
        if n not in WORKLOADS:
            ap.error(f"unknown workload {n}")

    all_runs: dict[str, list[dict[str, Any]]] = {}
    discarded: dict[str, list[dict[str, Any]]] = {}
    errors: list[str] = []
    for name in names:
        args = WORKLOADS[name][0]
        runs: list[dict[str, Any]] = []
        all_runs[name] = runs
        for rep in range(opts.reps):
            order = [None, opts.memtrace] if rep % 2 == 0 else [opts.memtrace, None]
            for mt in order:
                tag = "memtrace" if mt else "baseline"
                for attempt in range(1 + opts.retries):
                    waited, busy_with = bc.wait_quiet(opts.quiet_wait)
                    try:
                        r = one_run(binary, args, mt, opts.interval,
                                    opts.memtrace_args.split())
                    except (RuntimeError, TimeoutError, EOFError, OSError) as e:
                        errors.append(f"{name} rep {rep} {tag}: {e}")
                        print(f"[{name} rep {rep} {tag}] FAILED: {e}", file=sys.stderr,
                              flush=True)
                        break
                    r["rep"] = rep
                    r["attempt"] = attempt
                    r["quiet_wait_s"] = waited
                    r["disturbed"] = bool(r["foreign_memtrace_pids"]) or (
                        r["foreign_cpu_s"] > opts.max_foreign * r["loop_wall_s"])
                    extra = ""
                    if mt:
                        extra = (f" memtrace cpu {fmt(r['cpu_loop_s'], 2)}s"
                                 f" hwm {r['vm_hwm_kib'] / 1024:.0f}MiB"
                                 f" first-snap {fmt(r['first_snapshot_wall_s'], 2)}s"
                                 f" exit {r['memtrace_exit']}")
                    print(f"[{name} rep {rep} {tag} try {attempt}] elapsed "
                          f"{fmt(r['elapsed_s'], 4)}s loop cpu {fmt(r['loop_cpu_s'], 4)}s"
                          f"{extra} foreign cpu "
                          f"{fmt(r['foreign_cpu_s'], 2)}s foreign memtrace "
                          f"{r['foreign_memtrace_pids']} waited {waited:.0f}s"
                          f"{' DISTURBED' if r['disturbed'] else ''}",
                          file=sys.stderr, flush=True)
                    if not r["disturbed"] or attempt == opts.retries:
                        runs.append(r)
                        break
                    discarded.setdefault(name, []).append(r)

    print()
    print("Raw runs kept (wall seconds/CPU seconds of the workload's timed loop, in run")
    print("order; '*' = still disturbed after all retries):")
    for name, runs in all_runs.items():
        for kind in (False, True):
            vals = [f"{r['elapsed_s']:.4f}/{r['loop_cpu_s']:.4f}"
                    + ("*" if r["disturbed"] else "")
                    for r in runs if r["memtrace"] is kind]
            print(f"  {name}: {'memtrace' if kind else 'baseline'} {' '.join(vals)}")
        d = discarded.get(name, [])
        if d:
            print(f"  {name}: {len(d)} disturbed run(s) re-run and not counted: " + ", ".join(
                f"{'memtrace' if r['memtrace'] else 'baseline'} {fmt(r['elapsed_s'], 4)} "
                f"(foreign cpu {fmt(r['foreign_cpu_s'], 2)}s, "
                f"foreign memtrace {r['foreign_memtrace_pids']})" for r in d))
    print()
    rows = []
    summary: dict[str, Any] = {}
    for name, runs in all_runs.items():
        base = [r["elapsed_s"] for r in runs if not r["memtrace"]]
        mts = [r for r in runs if r["memtrace"]]
        withm = [r["elapsed_s"] for r in mts]
        if not base or not withm:
            rows.append([name] + ["-"] * 11)
            continue
        ratio = bc.median(withm) / bc.median(base)
        base_cpu = [r["loop_cpu_s"] for r in runs if not r["memtrace"]]
        with_cpu = [r["loop_cpu_s"] for r in mts]
        cpu_ratio = bc.median(with_cpu) / bc.median(base_cpu)
        goal = WORKLOADS[name][1]
        cpu_loop = bc.median([r["cpu_loop_s"] for r in mts])
        loop_wall = bc.median([r["loop_wall_s"] for r in mts])
        summary[name] = {
            "n_baseline": len(base), "n_memtrace": len(withm),
            "median_baseline_s": bc.median(base), "median_memtrace_s": bc.median(withm),
            "ratio": ratio, "goal": goal,
            "median_baseline_loop_cpu_s": bc.median(base_cpu),
            "median_memtrace_loop_cpu_s": bc.median(with_cpu), "cpu_ratio": cpu_ratio,
            "disturbed_kept": sum(1 for r in runs if r["disturbed"]),
            "median_foreign_cpu_s": bc.median([r["foreign_cpu_s"] for r in runs]),
            "median_memtrace_cpu_loop_s": cpu_loop,
            "median_memtrace_cpu_to_first_snapshot_s":
                bc.median([r["cpu_to_first_snapshot_s"] for r in mts]),
            "max_vm_hwm_kib": max(r["vm_hwm_kib"] for r in mts),
            "median_vm_hwm_kib": bc.median([r["vm_hwm_kib"] for r in mts]),
            "median_first_snapshot_wall_s":
                bc.median([r["first_snapshot_wall_s"] for r in mts]),
            "median_first_snapshot_logged_s": bc.median(
                [r["first_snapshot_logged_s"] for r in mts
                 if r["first_snapshot_logged_s"] is not None]),
            "memtrace_exit_codes": [r["memtrace_exit"] for r in mts],
        }
        s = summary[name]
        rows.append([
            name, f"{len(base)}/{len(withm)}", fmt(s["median_baseline_s"]),
            fmt(s["median_memtrace_s"]), f"{ratio:.3f}x",
            f"<= {goal:.2f}x {'met' if ratio <= goal else 'MISSED'}",
            f"{s['median_baseline_loop_cpu_s']:.3f} / {s['median_memtrace_loop_cpu_s']:.3f}"
            f" = {cpu_ratio:.3f}x",
            f"{fmt(cpu_loop, 2)} ({100 * cpu_loop / loop_wall:.1f}%)",
            fmt(s["median_memtrace_cpu_to_first_snapshot_s"], 2),
            f"{s['median_vm_hwm_kib'] / 1024:.0f} / {s['max_vm_hwm_kib'] / 1024:.0f}",
            fmt(s["median_first_snapshot_wall_s"], 2),
            fmt(s["median_first_snapshot_logged_s"], 2),
        ])
    print(bc.table(["workload", "runs b/m", "baseline s", "memtrace s", "ratio", "goal",
                    "loop CPU s b/m = ratio",
                    "mt CPU in loop s (% core)", "mt CPU to 1st snap s",
                    "mt VmHWM MiB med/max", "1st snap wall s", "1st snap logged s"], rows))
    print()
    print("All values are medians over the runs counted in 'runs b/m'. 'loop CPU' is the")
    print("workload's own CPU time (user+sys) in its timed part; memtrace's BPF programs")
    print("run in the workload's context and are counted there.")
    for name, s in summary.items():
        print(f"{name}: runs kept while still disturbed: {s['disturbed_kept']}; median CPU "
              f"used by other processes during a timed loop: {s['median_foreign_cpu_s']:.2f}s")
    for name, runs in all_runs.items():
        odd = [(r["rep"], r["unexpected_stderr"]) for r in runs
               if r["memtrace"] and r["unexpected_stderr"]]
        bad = [(r["rep"], r["memtrace_exit"]) for r in runs
               if r["memtrace"] and r["memtrace_exit"] != 0]
        for rep, lines in odd:
            print(f"note: {name} rep {rep}: memtrace stderr: {lines}")
        for rep, rc in bad:
            print(f"note: {name} rep {rep}: memtrace exit status {rc} "
                  "(None = did not exit by itself)")
        for r in runs:
            a = r.get("snapshot_after_loop")
            if r["memtrace"] and a is not None:
                print(f"{name} rep {r['rep']}: snapshot >= 1 interval after the loop: "
                      f"rss {a['rss_bytes']} statm {a['statm_rss_bytes']} "
                      f"drift {a['drift_bytes']} faults {a['faults']} "
                      f"full_rescans {a['full_rescans']} events_lost {a['events_lost']} "
                      f"sampled_out {a['events_sampled_out']} tick {a['tick_seconds']}s")
    for e in errors:
        print(f"ERROR: {e}")
    if opts.json:
        opts.json.write_text(json.dumps({"runs": all_runs, "discarded": discarded,
                                         "summary": summary, "errors": errors}, indent=1))
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        bc.cleanup()
