"""memtrace's own CPU per `--stacks` sample (issue 13: what sampling costs the
tool, on the other CPU of the target).

    sudo .venv/bin/python benchmarks/stacks_cpu.py [--ref CHECKOUT] [--rounds 5]
        [--loops 64] [--period 256K] [--json FILE]

1. Live: benchmarks/workloads/overhead.c `fault LOOPS` (LOOPS x 256 MiB first
   touch) under `memtrace watch --stacks --stacks-period PERIOD PID` of this
   checkout (and of --ref's, whose `.venv/bin/memtrace` runs from there),
   rounds interleaved, the order rotating. memtrace's CPU (all its threads,
   /proc/PID/stat) from its first snapshot to a snapshot that came after the
   loop ended, over the samples that snapshot reports: CPU microseconds a
   sample, which includes its ticks (~1 s each) over that window. With --ref:
   the per-round ratio to --ref, its median and 90 % interval.
2. Replay (needs no root after the capture): the records and VMA lists one
   live run of this checkout handed to `StackTracker.add` (the unwinding and
   netting on memtrace's main thread), captured by running memtrace with that
   method wrapped, then fed again to a fresh tracker of each checkout in its
   own process: thread CPU a record, best of 5 passes."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchcommon as bc

CAPTURE = """
import pickle, sys
sys.path.insert(0, {repo!r})
from memtrace.stacks import netting
batches = []
_add = netting.StackTracker.add
def add(self, records, vmas):
    records = list(records)
    batches.append((self.pid, records, list(vmas)))
    return _add(self, records, vmas)
netting.StackTracker.add = add
from memtrace.commands.main import main
sys.argv = ["memtrace"] + sys.argv[1:]
try:
    main()
finally:
    with open({out!r}, "wb") as f:
        pickle.dump(batches, f)
"""

REPLAY = """
import os, pickle, sys, time
sys.path.insert(0, sys.argv[1])
from memtrace.stacks.netting import StackTracker
from memtrace.stacks.unwind import Unwinder
batches = pickle.load(open(sys.argv[2], "rb"))
records = sum(len(r) for _, r, _ in batches)
per = []
for _ in range(5):
    tracker = StackTracker(batches[0][0], Unwinder(sys.argv[3]))
    t = time.thread_time()
    for _, recs, vmas in batches:
        tracker.add(recs, vmas)
    per.append((time.thread_time() - t) / records * 1e6)
print(records, min(per))
"""


def _snapshots(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue            # a line still being written
    return out


def live_round(argv0: list[str], cwd: Path, loops: int, period: str,
               capture: Path | None = None) -> dict[str, float]:
    """One loop under one build: memtrace's CPU, its samples and the loop's time."""
    loop = bc.build("overhead")
    wl = bc.spawn([str(loop), "fault", str(loops)], stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE)
    assert wl.stdin is not None and wl.stdout is not None
    pid = int(wl.stdout.readline().split()[1])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "watch.jsonl"
        mt = bc.spawn([*argv0, "watch", "--stacks", "--stacks-period", period, "--format",
                       "json", "-o", str(out), "--no-serve", "--interval", "1", str(pid)],
                      cwd=str(cwd), stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not _snapshots(out):
                if time.monotonic() > deadline or mt.poll() is not None:
                    raise RuntimeError(f"no snapshot from {argv0}")
                time.sleep(0.1)
            cpu0 = bc.cpu_seconds(mt.pid)
            wl.stdin.write(b"g")
            wl.stdin.flush()
            elapsed = float(wl.stdout.readline().split()[1])
            ended = time.time()
            while True:     # a snapshot taken after the loop ended, samples settled
                snaps = [s for s in _snapshots(out) if s.get("ts", 0) > ended + 1.5]
                if snaps:
                    break
                time.sleep(0.2)
            cpu = bc.cpu_seconds(mt.pid) - cpu0
            stacks = snaps[-1].get("stacks") or {}
        finally:
            bc.kill(mt, term_first=True)
            wl.stdin.close()
            bc.kill(wl)
    samples = int(stacks.get("samples", 0))
    return {"cpu_s": cpu, "samples": samples, "lost": int(stacks.get("lost", 0)),
            "us_per_sample": cpu / samples * 1e6 if samples else float("nan"),
            "loop_s": elapsed}


def replay(checkout: Path, batches: Path, proc_root: str) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-c", REPLAY, str(checkout), str(batches),
                          proc_root], capture_output=True, text=True, check=True).stdout
    records, us = out.split()
    return int(records), float(us)


def _fake_proc(base: Path, pid: int, exe: Path) -> str:
    """A /proc for a process that has exited: its root is / and its exe the loop."""
    root = str(base / "proc")
    os.makedirs(f"{root}/{pid}")
    os.symlink("/", f"{root}/{pid}/root")
    os.symlink(str(exe), f"{root}/{pid}/exe")
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", type=Path, help="another checkout with its own .venv")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--loops", type=int, default=64, help="256 MiB loops a run")
    ap.add_argument("--period", default="256K", help="--stacks-period")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    builds = {"this": ([str(bc.DEFAULT_MEMTRACE)], bc.REPO)}
    if args.ref:
        builds["ref"] = ([str(args.ref / ".venv" / "bin" / "memtrace")], args.ref)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in builds}
    names = list(builds)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            argv0, cwd = builds[name]
            res = live_round(argv0, cwd, args.loops, args.period)
            runs[name].append(res)
            print(f"round {r} {name}: {res['us_per_sample']:.2f} us/sample "
                  f"({res['cpu_s']:.2f} s, {res['samples']} samples, {res['lost']} lost; "
                  f"loop {res['loop_s']:.2f} s)", flush=True)
    result: dict[str, Any] = {"commit": bc.git_commit(), "args": vars(args) | {
        "ref": str(args.ref) if args.ref else None, "json": None}, "runs": runs}
    rows = [[name, f"{bc.median([x['us_per_sample'] for x in rs]):.2f}",
             " ".join(f"{x['us_per_sample']:.1f}" for x in rs)] for name, rs in runs.items()]
    print(bc.table(["build", "us/sample (median)", "runs"], rows))
    if args.ref:
        ratios = [a["us_per_sample"] / b["us_per_sample"]
                  for a, b in zip(runs["this"], runs["ref"])]
        ci = bc.median_ci(ratios)
        result["paired"] = {"median": bc.median(ratios), "ci90": ci}
        print("this / ref, per round:", bc.ratio_text(bc.median(ratios), ci))

    with tempfile.TemporaryDirectory() as tmp:       # the replay
        batches = Path(tmp) / "batches.pkl"
        script = Path(tmp) / "capture.py"
        script.write_text(CAPTURE.format(repo=str(bc.REPO), out=str(batches)))
        live_round([sys.executable, str(script)], bc.REPO, args.loops // 4, args.period)
        pid = pickle_pid(batches)
        proc_root = _fake_proc(Path(tmp), pid, bc.build("overhead"))
        result["replay"] = {}
        for name, (_, cwd) in builds.items():
            records, us = replay(cwd, batches, proc_root)
            result["replay"][name] = {"records": records, "us_per_record": us}
            print(f"replay {name}: {us:.2f} us a record ({records} records)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


def pickle_pid(batches: Path) -> int:
    with open(batches, "rb") as f:
        data = pickle.load(f)
    if not data:
        raise RuntimeError("the capture holds no samples")
    return int(data[0][0])


if __name__ == "__main__":
    sys.exit(main())
