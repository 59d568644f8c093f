"""Slowdown of a workload's own timed loop while memtrace, or its peer, watches it.

    sudo .venv/bin/python benchmarks/overhead.py [--reps 5] [--only fault,mmaploop,brk]
        [--kinds baseline,memtrace,stacks,stackcount,floor] [--warmup 1] [--memtrace-args ...]

For each workload (benchmarks/workloads/overhead.c) it runs every kind of run once
per round, the order rotated every round (A B C D, B C D A, ...), after --warmup
uncounted rounds. Kinds:

- baseline:   nothing attached
- memtrace:   `memtrace watch PID --format json --interval 1 --reconcile-interval 0
              --no-serve` (its defaults otherwise; plus --memtrace-args)
- stacks:     the same with `--stacks` (period 512 KiB unless --memtrace-args says)
- ref:        memtrace with its defaults from another checkout (--ref PATH to its
              memtrace), to compare two versions in the same rounds
- record:     `memtrace` with `--record FILE` (the recording, issue 14): its cost
              against `memtrace` is what recording costs; the recording's bytes
              written during the timed loop are kept (bytes/hour at that rate)
- record-stacks: `stacks` with `--record FILE`
- floor:      BPF programs that return at once on the tracepoints memtrace's
              fault, mmap, munmap and brk paths use (floor_probes.py): what the
              tracepoints themselves cost, below which no tracer of every fault
              and call can go
- stackcount: the peer, `stackcount-bpfcc -U -p PID TRACEPOINT` on the one
              tracepoint the workload hits (PEERS below): a user stack per event

A run starts the workload, which prints its pid and waits on stdin; the driver
starts the tool and waits until it is attached (memtrace: its first JSON
snapshot; stackcount: its "Tracing" line) before sending "go". The workload
times its own loop and prints the elapsed seconds. Also recorded per tool run:
the tool's CPU (user+sys from /proc/PID/stat) during the timed loop, and for
memtrace from its start to the first snapshot, its peak RSS (VmHWM) at the end
of the loop, and the start-to-first-snapshot time.

Verdicts: each kind's paired ratio (the median of each round's time over that
round's baseline) comes with a 90 % distribution-free interval (order
statistics, benchcommon.median_ci; from 5 rounds). A goal is "met" or "MISSED"
only when the whole interval lies on one side of it, else "not decided"; memtrace
against the peer likewise, from each round's memtrace time over the peer's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchcommon as bc

WORKLOADS = {
    # name: (argv tail, goal ratio for memtrace with its defaults, description); brk's
    # goal is only the peer's figure (issue 15: no workload behind its peer)
    "fault": (["fault", "16"], 1.15, "first-touch faults, 16 x 256 MiB (4 GiB), touch loops timed"),
    "mmaploop": (["mmaploop", "200000"], 1.10, "200k x (mmap 64 KiB, touch 16 pages, munmap)"),
    "brk": (["brk", "200000"], None, "200k x (sbrk +64 KiB, touch 16 pages, sbrk -64 KiB)"),
    "malloc": (["malloc", "50000000"], 1.02, "50M x (malloc 64..1024 B, write, free)"),
}
# The peer's one tracepoint per workload: the event the workload hits most. In
# mmaploop mmap and munmap are each called once per iteration; sys_enter_mmap
# is the one glibc's start-up also calls, so it is hit (slightly) most.
PEERS = {
    "fault": "t:exceptions:page_fault_user",
    "mmaploop": "t:syscalls:sys_enter_mmap",
    "brk": "t:syscalls:sys_enter_brk",
}
KINDS = ("baseline", "memtrace", "stacks", "stackcount", "floor", "ref", "record",
         "record-stacks")
LABELS = {"floor": "floor (empty programs)", "memtrace": "memtrace",
          "stacks": "memtrace --stacks", "stackcount": "stackcount (peer)", "ref": "ref",
          "record": "--record", "record-stacks": "--stacks --record"}
MEMTRACE_KINDS = ("memtrace", "stacks", "ref", "record", "record-stacks")
STACKS_GOAL = {"fault": 1.05, "mmaploop": 1.10}     # issue 13, done-when 3
LOOP_TIMEOUT = 600.0
ATTACH_TIMEOUT = 180.0


def start_stackcount(pid: int, tracepoint: str, log: Path) -> subprocess.Popen[bytes]:
    """The peer, attached to `pid` only (as memtrace is), once it says it traces."""
    return start_tracer(["stackcount-bpfcc", "-U", "-p", str(pid), tracepoint], log)


def start_tracer(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A tracer process (the peer, or the floor's empty programs), once it prints
    "Tracing"."""
    out = log.open("wb")
    # SIGINT makes it print its counts: undo an ignored SIGINT inherited from a
    # driver started in the background
    p = bc.spawn(argv, stdout=out,
                 stderr=subprocess.STDOUT,
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + ATTACH_TIMEOUT
    while b"Tracing" not in log.read_bytes():
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{argv[0]} did not start: {log.read_text()[-500:]}")
        time.sleep(0.1)
    return p


def stop_stackcount(p: subprocess.Popen[bytes], log: Path) -> int:
    """SIGINT makes stackcount print its counts and exit; returns the events it
    counted in its stacks (the sum of the count lines)."""
    p.send_signal(signal.SIGINT)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        bc.kill(p, term_first=True)
    total = 0
    for line in log.read_text(errors="replace").splitlines():
        f = line.split()
        if len(f) == 1 and f[0].isdigit():
            total += int(f[0])
    return total


def one_run(binary: Path, workload: str, kind: str, memtrace: Path, interval: float,
            extra: list[str], tmp: Path, ref: Path | None = None) -> dict[str, Any]:
    wl = bc.spawn([str(binary), *WORKLOADS[workload][0]], stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE)
    mt: bc.Memtrace | None = None
    peer: subprocess.Popen[bytes] | None = None
    peer_log = tmp / "stackcount.out"
    try:
        assert wl.stdin is not None and wl.stdout is not None
        pid = int(bc.read_line(wl.stdout, 30, "workload").split()[1])
        res: dict[str, Any] = {"kind": kind, "memtrace": kind in MEMTRACE_KINDS}
        tool_pid = None
        recording = tmp / "overhead.mtrace"
        if res["memtrace"]:
            args = extra + (["--stacks"] if kind in ("stacks", "record-stacks") else [])
            args += ["--record", str(recording)] if kind.startswith("record") else []
            exe = ref if kind == "ref" and ref is not None else memtrace
            mt = bc.Memtrace(exe, pid, interval, extra=args)
            res["first_snapshot_wall_s"] = mt.wait_first_snapshot(ATTACH_TIMEOUT)
            res["cpu_to_first_snapshot_s"] = bc.tree_cpu_seconds(mt.pid)
            tool_pid = mt.pid
        elif kind == "stackcount":
            peer = start_stackcount(pid, PEERS[workload], peer_log)
            res["peer"] = f"stackcount-bpfcc -U -p PID {PEERS[workload]}"
            tool_pid = peer.pid
        elif kind == "floor":
            peer = start_tracer([sys.executable, str(Path(__file__).with_name("floor_probes.py"))],
                                peer_log)
            tool_pid = peer.pid
        cpu0 = bc.tree_cpu_seconds(tool_pid) if tool_pid else 0.0
        rec0 = recording.stat().st_size if kind.startswith("record") else 0
        watch = bc.Interference([wl.pid] + ([tool_pid] if tool_pid else []))
        t0 = time.monotonic()
        wl.stdin.write(b"g")
        wl.stdin.flush()
        line = bc.read_line(wl.stdout, LOOP_TIMEOUT, "workload")
        wall = time.monotonic() - t0
        if kind.startswith("record"):
            res["record_bytes_loop"] = recording.stat().st_size - rec0
            res["record_bytes_per_hour"] = res["record_bytes_loop"] / wall * 3600
        res["foreign_cpu_s"] = watch.stop()
        res["foreign_memtrace_pids"] = sorted(watch.foreign_mt)
        res["loop_wall_s"] = wall
        if tool_pid:
            res["cpu_loop_s"] = bc.tree_cpu_seconds(tool_pid) - cpu0
        if not line.startswith("elapsed "):
            raise RuntimeError(f"workload printed {line!r}")
        f = line.split()
        res["elapsed_s"] = float(f[1])
        res["loop_cpu_s"] = float(f[3])
        if peer is not None and kind == "stackcount":
            res["peer_events"] = stop_stackcount(peer, peer_log)
        if mt:
            if mt.proc.poll() is not None:
                raise RuntimeError(mt.failure("exited during the timed loop"))
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
                st = last.get("stacks")
                if isinstance(st, dict):
                    res["snapshot_after_loop"]["stacks"] = {
                        k: st.get(k) for k in ("samples", "lost", "held_bytes",
                                               "brought_bytes")}
            except ValueError:
                res["snapshot_after_loop"] = None
        wl.stdin.close()  # workload exits on EOF
        wl.wait(30)
        if mt:
            rc = mt.wait_exit(3 * interval + 10)
            res["memtrace_exit"] = rc
            res["first_snapshot_logged_s"] = mt.logged_first_snapshot()
            res["unexpected_stderr"] = [ln for ln in mt.unexpected_stderr()
                                        if not ln.startswith("memtrace: recording to ")]
            if kind.startswith("record"):
                res["record_bytes"] = recording.stat().st_size
                res["record_readable"] = _recording_problem(recording)
            if rc != 0:
                res["stderr_tail"] = mt.stderr[-20:]
        return res
    finally:
        bc.kill(wl)
        if mt:
            bc.kill(mt.proc, term_first=True)
        if peer is not None:
            bc.kill(peer, term_first=True)


def _recording_problem(path: Path) -> str:
    """"ok" for a recording that reads to its end line, else what its reader says."""
    sys.path.insert(0, str(bc.REPO))
    from memtrace.record.reader import open_recording

    rec = open_recording(str(path))
    n = sum(1 for _ in rec.snapshots())
    return f"ok ({n} snapshots)" if rec.problem is None else rec.problem


def fmt(x: float, d: int = 3) -> str:
    return f"{x:.{d}f}"


def kinds_for(workload: str, kinds: list[str]) -> list[str]:
    """The kinds that apply to a workload (no peer where none is named)."""
    return [k for k in kinds if k != "stackcount" or workload in PEERS]


def run_all(opts: argparse.Namespace, binary: Path, names: list[str], kinds: list[str],
            tmp: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[Any]], list[str]]:
    """Warm-up rounds, then --reps rounds per workload, each kind once per round in
    an order rotated every round."""
    all_runs: dict[str, list[dict[str, Any]]] = {}
    discarded: dict[str, list[dict[str, Any]]] = {}
    errors: list[str] = []
    extra = opts.memtrace_args.split()
    for name in names:
        runs: list[dict[str, Any]] = []
        all_runs[name] = runs
        ks = kinds_for(name, kinds)
        for rnd in range(-opts.warmup, opts.reps):
            order = ks[rnd % len(ks):] + ks[:rnd % len(ks)]
            for kind in order:
                for attempt in range(1 + opts.retries):
                    waited, _busy_with = bc.wait_quiet(opts.quiet_wait)
                    try:
                        r = one_run(binary, name, kind, opts.memtrace, opts.interval, extra, tmp,
                                    opts.ref)
                    except (RuntimeError, TimeoutError, EOFError, OSError) as e:
                        errors.append(f"{name} round {rnd} {kind}: {e}")
                        print(f"[{name} round {rnd} {kind}] FAILED: {e}", file=sys.stderr,
                              flush=True)
                        break
                    r.update(rep=rnd, attempt=attempt, quiet_wait_s=waited,
                             load1=os.getloadavg()[0], warmup=rnd < 0)
                    r["disturbed"] = bool(r["foreign_memtrace_pids"]) or (
                        r["foreign_cpu_s"] > opts.max_foreign * r["loop_wall_s"])
                    print_run(name, r)
                    if rnd < 0:
                        discarded.setdefault(name, []).append(r)
                        break
                    if not r["disturbed"] or attempt == opts.retries:
                        runs.append(r)
                        break
                    discarded.setdefault(name, []).append(r)
    return all_runs, discarded, errors


def print_run(name: str, r: dict[str, Any]) -> None:
    extra = ""
    if "cpu_loop_s" in r:
        extra = f" tool cpu {fmt(r['cpu_loop_s'], 2)}s"
    if r["memtrace"]:
        extra += (f" hwm {r['vm_hwm_kib'] / 1024:.0f}MiB"
                  f" first-snap {fmt(r['first_snapshot_wall_s'], 2)}s"
                  f" exit {r['memtrace_exit']}")
    if "peer_events" in r:
        extra += f" peer events {r['peer_events']}"
    print(f"[{name} round {r['rep']}{' warm-up' if r['warmup'] else ''} {r['kind']} try "
          f"{r['attempt']}] elapsed {fmt(r['elapsed_s'], 4)}s loop cpu "
          f"{fmt(r['loop_cpu_s'], 4)}s{extra} foreign cpu {fmt(r['foreign_cpu_s'], 2)}s "
          f"foreign memtrace {r['foreign_memtrace_pids']} load {r['load1']:.2f} waited "
          f"{r['quiet_wait_s']:.0f}s{' DISTURBED' if r['disturbed'] else ''}",
          file=sys.stderr, flush=True)


def _paired(runs: list[dict[str, Any]],
            base: list[dict[str, Any]]) -> tuple[float | None, tuple[float, float] | None]:
    """The median of each round's elapsed time over that round's baseline (or
    another kind's), and its 90 % interval: the kinds of one round ran minutes
    apart at most, so a slower stretch of the host moves them together, where it
    moves one column's median alone."""
    base_by_rep = {r["rep"]: r["elapsed_s"] for r in base}
    ratios = [r["elapsed_s"] / base_by_rep[r["rep"]] for r in runs if r["rep"] in base_by_rep]
    return (bc.median(ratios) if ratios else None), bc.median_ci(ratios)


def verdict(ci: tuple[float, float] | None, ratio: float, goal: float) -> str:
    """met / MISSED when the 90 % interval of the paired ratio lies on one side
    of the goal; "not decided" when it holds the goal (the rounds' spread is
    wider than the margin); by the ratio alone without an interval."""
    if ci is None:
        return "met" if ratio <= goal else "MISSED"
    if ci[1] <= goal:
        return "met"
    if ci[0] > goal:
        return "MISSED"
    return "not decided"


def summarise(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_kind.setdefault(r["kind"], []).append(r)
    base = by_kind.get("baseline", [])
    if not base:
        return {}
    base_s = bc.median([r["elapsed_s"] for r in base])
    base_cpu = bc.median([r["loop_cpu_s"] for r in base])
    out: dict[str, Any] = {"median_baseline_s": base_s, "median_baseline_loop_cpu_s": base_cpu,
                           "n_baseline": len(base), "kinds": {}}
    for kind, rs in by_kind.items():
        if kind == "baseline":
            continue
        med = bc.median([r["elapsed_s"] for r in rs])
        cpu = bc.median([r["loop_cpu_s"] for r in rs])
        paired, ci = _paired(rs, base)
        k: dict[str, Any] = {
            "n": len(rs), "median_s": med, "ratio": med / base_s,
            "paired_ratio": paired, "paired_ci90": ci,
            "median_loop_cpu_s": cpu, "cpu_ratio": cpu / base_cpu,
            "disturbed_kept": sum(1 for r in rs if r["disturbed"]),
            "median_tool_cpu_loop_s": bc.median([r["cpu_loop_s"] for r in rs]),
            "median_loop_wall_s": bc.median([r["loop_wall_s"] for r in rs]),
        }
        if kind == "memtrace" and WORKLOADS[name][1] is not None:
            k["goal"] = WORKLOADS[name][1]
        if kind == "stacks" and name in STACKS_GOAL:
            k["goal"] = STACKS_GOAL[name]
        if kind.startswith("record"):
            k["median_record_bytes_per_hour"] = bc.median(
                [r["record_bytes_per_hour"] for r in rs])
            k["record_readable"] = sorted({r["record_readable"].split(" (")[0] for r in rs})
        if rs[0]["memtrace"]:
            k.update({
                "median_cpu_to_first_snapshot_s":
                    bc.median([r["cpu_to_first_snapshot_s"] for r in rs]),
                "median_vm_hwm_kib": bc.median([r["vm_hwm_kib"] for r in rs]),
                "max_vm_hwm_kib": max(r["vm_hwm_kib"] for r in rs),
                "median_first_snapshot_wall_s":
                    bc.median([r["first_snapshot_wall_s"] for r in rs]),
                "memtrace_exit_codes": [r["memtrace_exit"] for r in rs],
            })
        else:
            k["peer"] = rs[0].get("peer")
            k["peer_events"] = [r.get("peer_events") for r in rs]
        out["kinds"][kind] = k
    out["median_foreign_cpu_s"] = bc.median([r["foreign_cpu_s"] for r in runs])
    if "memtrace" in by_kind and "stackcount" in by_kind:
        # memtrace's time over the peer's in the same round
        paired, ci = _paired(by_kind["memtrace"], by_kind["stackcount"])
        out["memtrace_over_peer"] = {"paired": paired, "ci90": ci}
    return out


def _against_peer(s: dict[str, Any]) -> str:
    """memtrace over the peer, round by round: its median and 90 % interval, and
    whether that interval says ahead, behind or neither."""
    o = s.get("memtrace_over_peer")
    if not o or o["paired"] is None:
        return ""
    ci = o["ci90"]
    text = f"; paired memtrace/peer {bc.ratio_text(o['paired'], ci, unit='')}"
    if ci is None:
        return text
    side = "ahead" if ci[1] < 1 else "BEHIND" if ci[0] > 1 else "level within the rounds' spread"
    return f"{text}: {side}"


def report(all_runs: dict[str, list[dict[str, Any]]], discarded: dict[str, list[Any]],
           summary: dict[str, Any], errors: list[str]) -> None:
    print("Raw runs kept (wall seconds/CPU seconds of the workload's timed loop, in run")
    print("order; '*' = still disturbed after all retries):")
    for name, runs in all_runs.items():
        for kind in KINDS:
            vals = [f"{r['elapsed_s']:.4f}/{r['loop_cpu_s']:.4f}" + ("*" if r["disturbed"] else "")
                    for r in runs if r["kind"] == kind]
            if vals:
                print(f"  {name}: {kind} {' '.join(vals)}")
        d = [r for r in discarded.get(name, []) if not r["warmup"]]
        if d:
            print(f"  {name}: {len(d)} disturbed run(s) re-run and not counted: " + ", ".join(
                f"{r['kind']} {fmt(r['elapsed_s'], 4)} (foreign cpu "
                f"{fmt(r['foreign_cpu_s'], 2)}s)" for r in d))
    print()
    rows = []
    for name, s in summary.items():
        if not s:
            continue
        row = [name, fmt(s["median_baseline_s"])]
        for kind in KINDS[1:]:
            k = s["kinds"].get(kind)
            if k is None:
                row.append("-")
                continue
            ci = k.get("paired_ci90")
            goal = f" (<= {k['goal']:.2f}x " \
                f"{verdict(ci, k['paired_ratio'] or k['ratio'], k['goal'])})" if "goal" in k else ""
            paired = f" (paired {bc.ratio_text(k['paired_ratio'], ci)})" \
                if k.get("paired_ratio") else ""
            row.append(f"{fmt(k['median_s'])} = {k['ratio']:.3f}x{paired}{goal}; tool CPU "
                       f"{fmt(k['median_tool_cpu_loop_s'], 2)}")
        rows.append(row)
    shown = [k for k in KINDS[1:] if any(k in s.get("kinds", {}) for s in summary.values())]
    rows = [[row[0], row[1]] + [row[2 + KINDS[1:].index(k)] for k in shown] for row in rows]
    print(bc.table(["workload", "baseline s"] + [LABELS[k] for k in shown], rows))
    print()
    print("Medians over the kept runs. Ratio = median elapsed / baseline median; paired = "
          "median of each round's elapsed / that round's baseline, with its 90 % "
          "distribution-free interval (order statistics); a goal is met or missed when "
          "that interval lies on one side of it, else not decided. 'tool CPU'")
    print("is the tool's own CPU (user+sys, with children) during the timed loop; BPF")
    print("programs run in the workload's context and are counted in its time.")
    for name, s in summary.items():
        if not s:
            continue
        mt, peer = s["kinds"].get("memtrace"), s["kinds"].get("stackcount")
        if mt and peer:
            side = "ahead" if mt["ratio"] <= peer["ratio"] else "BEHIND"
            print(f"{name}: memtrace {mt['ratio']:.3f}x vs {peer['peer']} "
                  f"{peer['ratio']:.3f}x: {side}{_against_peer(s)}")
        floor = s["kinds"].get("floor")
        if floor:
            over = [f"{LABELS[k]} {s['kinds'][k]['median_s'] / floor['median_s']:.3f}x"
                    for k in ("memtrace", "stacks", "stackcount") if k in s["kinds"]]
            print(f"{name}: the tracepoints alone (empty programs) {floor['ratio']:.3f}x; "
                  f"over that floor: {', '.join(over)}")
        for kind, base in (("record", "memtrace"), ("record-stacks", "stacks")):
            rec, without = s["kinds"].get(kind), s["kinds"].get(base)
            if rec:
                vs = (f"; {rec['median_s'] / without['median_s']:.3f}x {base} without it"
                      if without else "")
                print(f"{name}: {LABELS[kind]}: {rec['ratio']:.3f}x baseline{vs}; recording "
                      f"{rec['median_record_bytes_per_hour'] / 1e6:.1f} MB/hour during the "
                      f"timed loop; read back: {', '.join(rec['record_readable'])}")
        print(f"{name}: median CPU of other processes per timed loop "
              f"{s['median_foreign_cpu_s']:.2f}s")
    for name, runs in all_runs.items():
        for r in runs:
            if r["memtrace"] and r["memtrace_exit"] != 0:
                print(f"note: {name} round {r['rep']} {r['kind']}: memtrace exit status "
                      f"{r['memtrace_exit']} (None = did not exit by itself)")
            if r["memtrace"] and r["unexpected_stderr"]:
                print(f"note: {name} round {r['rep']}: memtrace stderr: {r['unexpected_stderr']}")
            a = r.get("snapshot_after_loop")
            if r["memtrace"] and a is not None:
                print(f"{name} round {r['rep']} {r['kind']}: snapshot after the loop: rss "
                      f"{a['rss_bytes']} statm {a['statm_rss_bytes']} drift {a['drift_bytes']} "
                      f"faults {a['faults']} full_rescans {a['full_rescans']}"
                      + (f" stacks {a['stacks']}" if "stacks" in a else ""))
    for e in errors:
        print(f"ERROR: {e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="counted rounds per workload")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted rounds first")
    ap.add_argument("--only", default="fault,mmaploop,brk", help="comma-separated workloads "
                    f"(of {','.join(WORKLOADS)})")
    ap.add_argument("--kinds", default="baseline,memtrace,stacks,stackcount,floor",
                    help=f"comma-separated kinds of run (of {','.join(KINDS)})")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--memtrace", type=Path, default=bc.DEFAULT_MEMTRACE)
    ap.add_argument("--json", type=Path, help="also write all raw results here")
    ap.add_argument("--ref", type=Path, help="another checkout's memtrace, for kind 'ref'")
    ap.add_argument("--memtrace-args", default="",
                    help="more arguments for memtrace watch in memtrace and stacks runs, "
                    "e.g. '--stacks-period 256K' (split on spaces)")
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
    kinds = [k for k in opts.kinds.split(",") if k]
    for n in names:
        if n not in WORKLOADS:
            ap.error(f"unknown workload {n}")
    for k in kinds:
        if k not in KINDS:
            ap.error(f"unknown kind {k}")
    if "ref" in kinds and opts.ref is None:
        ap.error("kind 'ref' needs --ref PATH")
    print(f"load {os.getloadavg()}, commit {bc.git_commit()}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        all_runs, discarded, errors = run_all(opts, binary, names, kinds, Path(tmp))
    summary = {name: summarise(name, runs) for name, runs in all_runs.items()}
    print()
    report(all_runs, discarded, summary, errors)
    if opts.json:
        opts.json.write_text(json.dumps({"runs": all_runs, "discarded": discarded,
                                         "summary": summary, "errors": errors,
                                         "commit": bc.git_commit(), "kinds": kinds,
                                         "peers": PEERS}, indent=1))
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        bc.cleanup()
