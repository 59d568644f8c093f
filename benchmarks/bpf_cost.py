"""Where the time of memtrace's BPF side goes, per program, on one workload.

    sudo .venv/bin/python benchmarks/bpf_cost.py [--only mmaploop] [--reps 3]
        [--kinds baseline,empty,probes,stacks]

Kinds of run, alternated per repetition (order rotated every repetition):

- baseline: nothing attached
- empty:    a program that returns at once on each tracepoint memtrace's fault,
            mmap, munmap and brk paths use (raw page_fault_user, syscalls
            sys_enter/exit_{mmap,munmap,brk}): the cost of the tracepoints
            themselves, which no change inside memtrace's programs can remove
- rawexit:  what one raw_syscalls:sys_exit program would cost instead of the
            syscalls enter/exit pairs (a prototype, not memtrace's design): it
            reads the syscall number from the uapi pt_regs (orig_ax) on every
            syscall of the system, and the argument registers of mmap, munmap
            and brk; plus the same empty raw page_fault_user program
- probes:   memtrace's BPF program as the session loads it on this kernel
            (memtrace.trace.probes.Probes: no rss_stat probe, no event stream),
            the workload added as its target, drained every second on a thread
- stacks:   the same with stacks=True (period 512 KiB unless --period)

With kernel.bpf_stats_enabled set for the run (restored after), each of the
driver's programs reports run_cnt and run_time_ns (/proc/self/fdinfo of its fd;
a tail-called program's time counts in its caller's). Printed per kind: the
workload's elapsed time and ratio to baseline, and per program the calls, ns
per call and total ms. bpf_stats itself adds two clock reads per program run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import benchcommon as bc

sys.path.insert(0, str(bc.REPO))

from floor_probes import EMPTY_SRC  # noqa: E402

from memtrace.trace.events import X86_64_SYSCALL_NAMES  # noqa: E402
from memtrace.trace.probes import Probes, import_bcc  # noqa: E402
from memtrace.trace.sampling import DEFAULT_STACK_PERIOD  # noqa: E402

KINDS = ("baseline", "empty", "faultonly", "exitregs", "rawexit", "probes", "stacks")
WORKLOADS = {"fault": ["fault", "16"], "mmaploop": ["mmaploop", "200000"],
             "brk": ["brk", "200000"]}
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


EXITREGS_SRC = b"""
RAW_TRACEPOINT_PROBE(page_fault_user) { return 0; }
BPF_ARRAY(sink, u64, 1);
static __always_inline int from_regs(s64 ret)
{
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    u64 a[2] = {};      /* rsi rdi: the first two arguments */
    bpf_probe_read_kernel(a, sizeof(a), (char *)regs + 104);
    int zero = 0;
    u64 *v = sink.lookup(&zero);
    if (v)
        *v += a[0] + a[1] + ret;
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_exit_mmap) { return from_regs(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_munmap) { return from_regs(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_brk) { return from_regs(args->ret); }
"""

RAWEXIT_SRC = b"""
RAW_TRACEPOINT_PROBE(page_fault_user) { return 0; }
BPF_ARRAY(sink, u64, 1);
RAW_TRACEPOINT_PROBE(sys_exit)
{
    u64 regs = ctx->args[0];
    u64 nr = 0;
    bpf_probe_read_kernel(&nr, sizeof(nr), (void *)(regs + 120));   /* orig_ax */
    if (nr != NR_MMAP && nr != NR_MUNMAP && nr != NR_BRK)
        return 0;
    u64 a[9] = {};      /* r10 r9 r8 rax rcx rdx rsi rdi orig_ax */
    bpf_probe_read_kernel(a, sizeof(a), (void *)(regs + 56));
    int zero = 0;
    u64 *v = sink.lookup(&zero);
    if (v)
        *v += a[7] + a[6] + ctx->args[1];
    return 0;
}
"""


def prog_stats(bpf: Any) -> dict[str, tuple[int, int]]:
    """name -> (run_cnt, run_time_ns) of every loaded program of `bpf`."""
    out = {}
    for name, fn in bpf.funcs.items():
        fields = {}
        for line in Path(f"/proc/self/fdinfo/{fn.fd}").read_text().splitlines():
            k, _, v = line.partition(":")
            fields[k.strip()] = v.strip()
        key = name.decode() if isinstance(name, bytes) else str(name)
        out[key] = (int(fields.get("run_cnt", 0)), int(fields.get("run_time_ns", 0)))
    return out


class Drainer:
    """Drains the probes every second on a thread, as the session's loop does."""

    def __init__(self, probes: Probes) -> None:
        self.probes = probes
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.samples += self.probes.drain().sample_count()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.samples += self.probes.drain().sample_count()


def one_run(binary: Path, workload: str, kind: str, period: int) -> dict[str, Any]:
    bpf: Any = None
    probes: Probes | None = None
    if kind == "empty":
        bpf = import_bcc().BPF(text=EMPTY_SRC)
    elif kind == "faultonly":
        bpf = import_bcc().BPF(text=b"RAW_TRACEPOINT_PROBE(page_fault_user) { return 0; }")
    elif kind == "exitregs":
        bpf = import_bcc().BPF(text=EXITREGS_SRC)
    elif kind == "rawexit":
        nrs = {v: k for k, v in X86_64_SYSCALL_NAMES.items()}
        bpf = import_bcc().BPF(text=RAWEXIT_SRC, cflags=[
            f"-DNR_{n.upper()}={nrs[n]}" for n in ("mmap", "munmap", "brk")])
    elif kind in ("probes", "stacks"):
        probes = Probes(rss_stat_probe=False, stream_events=False, stacks=kind == "stacks",
                        stack_period=period)
        bpf = probes.bpf
    wl = bc.spawn([str(binary), *WORKLOADS[workload]], stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE)
    drainer = None
    res: dict[str, Any] = {"kind": kind}
    try:
        assert wl.stdin is not None and wl.stdout is not None
        pid = int(bc.read_line(wl.stdout, 30, "workload").split()[1])
        if probes is not None:
            probes.add_target(pid)
            drainer = Drainer(probes)
        before = prog_stats(bpf) if bpf is not None else {}
        cpu0 = bc.own_cpu_seconds()
        wl.stdin.write(b"g")
        wl.stdin.flush()
        f = bc.read_line(wl.stdout, 600, "workload").split()
        after = prog_stats(bpf) if bpf is not None else {}
        res["driver_cpu_s"] = bc.own_cpu_seconds() - cpu0
        res["elapsed_s"], res["loop_cpu_s"] = float(f[1]), float(f[3])
        res["progs"] = {n: (after[n][0] - before[n][0], after[n][1] - before[n][1])
                        for n in after if after[n][0] > before[n][0]}
        if drainer is not None:
            drainer.stop()
            res["stack_records"] = drainer.samples
        wl.stdin.close()
        wl.wait(30)
        return res
    finally:
        bc.kill(wl)
        if probes is not None:
            probes.close()
        elif bpf is not None:
            bpf.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="mmaploop")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--period", type=int, default=DEFAULT_STACK_PERIOD)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-stats", action="store_true",
                    help="leave kernel.bpf_stats_enabled alone (off): elapsed times without "
                         "the stats' clock reads, no per-program figures")
    opts = ap.parse_args()
    kinds = [k for k in opts.kinds.split(",") if k]
    binary = bc.build("overhead")
    old = STATS_SYSCTL.read_text().strip()
    if not opts.no_stats:
        STATS_SYSCTL.write_text("1")
    print(f"load {os.getloadavg()}, commit {bc.git_commit()}", file=sys.stderr)
    out: dict[str, Any] = {"commit": bc.git_commit(), "runs": {}}
    try:
        for workload in opts.only.split(","):
            runs: list[dict[str, Any]] = []
            out["runs"][workload] = runs
            for rep in range(opts.reps):
                for kind in kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]:
                    r = one_run(binary, workload, kind, opts.period)
                    r["rep"], r["load1"] = rep, os.getloadavg()[0]
                    runs.append(r)
                    print(f"[{workload} rep {rep} {kind}] elapsed {r['elapsed_s']:.4f} load "
                          f"{r['load1']:.2f} " + " ".join(
                              f"{n}={c}x{t / c:.0f}ns" for n, (c, t) in r["progs"].items()),
                          file=sys.stderr, flush=True)
            report(workload, runs, kinds)
    finally:
        STATS_SYSCTL.write_text(old)
    if opts.json:
        opts.json.write_text(json.dumps(out, indent=1))
    return 0


def report(workload: str, runs: list[dict[str, Any]], kinds: list[str]) -> None:
    base = bc.median([r["elapsed_s"] for r in runs if r["kind"] == "baseline"]) \
        if "baseline" in kinds else float("nan")
    print(f"\n{workload}:")
    rows = []
    for kind in kinds:
        rs = [r for r in runs if r["kind"] == kind]
        med = bc.median([r["elapsed_s"] for r in rs])
        names = sorted({n for r in rs for n in r["progs"]})
        progs = []
        total_ms = 0.0
        for n in names:
            cnt = bc.median([r["progs"].get(n, (0, 0))[0] for r in rs])
            ns = bc.median([r["progs"].get(n, (0, 0))[1] for r in rs])
            total_ms += ns / 1e6
            if cnt:
                progs.append(f"{n.replace('tracepoint__syscalls__', '')} {cnt:.0f}x"
                             f"{ns / cnt:.0f}ns={ns / 1e6:.0f}ms")
        rows.append([kind, f"{med:.3f}", f"{med / base:.3f}x", f"{total_ms:.0f}",
                     "; ".join(progs)])
    print(bc.table(["kind", "elapsed s", "ratio", "BPF ms", "programs (median calls x ns)"],
                   rows))


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        bc.cleanup()
