#!/usr/bin/env python3
"""How long must a process live for `memtrace agent` to see it?

Starts `memtrace agent --comm '^mtshort$'` and then, per lifetime, N processes
named mtshort that live that long: either exec'd (a launcher forks, the child
execs a copy of sleep named mtshort: seen through the exec notice) or forked
without exec by a watched mtshort parent (seen through the fork notice).
Counts the ones the agent attached to ("attached to pid N" on its stderr).

    sudo .venv/bin/python benchmarks/agent_floor.py --interval 1.0 --n 50
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAUNCHER = r"""
import ctypes, os, signal, sys, time
mode, exe = sys.argv[1], sys.argv[2]
ctypes.CDLL(None).prctl(15, b"mtshort" if mode == "fork" else b"mtlauncher", 0, 0, 0)
signal.signal(signal.SIGCHLD, signal.SIG_IGN)         # children reaped by the kernel
print("ready", flush=True)
for line in sys.stdin:
    life, n, gap = line.split()
    pids = []
    for _ in range(int(n)):
        pid = os.fork()
        if pid == 0:
            if mode == "exec":
                os.execv(exe, [exe, life])
            time.sleep(float(life))
            os._exit(0)
        pids.append(pid)
        time.sleep(float(gap))
    print(" ".join(map(str, pids)), flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--gap", type=float, default=0.05, help="seconds between starts")
    ap.add_argument("--lifetimes", default="0.05,0.1,0.3,0.6,1.0,1.5")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="agentfloor"))
    exe = tmp / "mtshort"
    shutil.copy("/bin/sleep", exe)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err_path = tmp / "agent.err"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(err_path, "wb") as err:
        agent = subprocess.Popen(
            [sys.executable, "-m", "memtrace", "agent", "--comm", "^mtshort$", "--interval",
             str(args.interval), "--web.listen-address", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)
    launchers = []
    try:
        deadline = time.monotonic() + 120
        while "agent: 1 rule" not in err_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        print(f"interval {args.interval} s, {args.n} processes per lifetime, "
              f"one every {args.gap} s")
        print(f"{'lifetime s':>10} {'exec: seen':>12} {'fork: seen':>12}")
        results: dict[str, dict[float, int]] = {"exec": {}, "fork": {}}
        for mode in ("exec", "fork"):
            launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, mode, str(exe)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
            launchers.append(launcher)
            assert launcher.stdin and launcher.stdout
            launcher.stdout.readline()
            if mode == "fork":      # the parent must be watched before it forks
                while f"attached to pid {launcher.pid} " not in err_path.read_text():
                    time.sleep(0.1)
            for life in (float(x) for x in args.lifetimes.split(",")):
                launcher.stdin.write(f"{life} {args.n} {args.gap}\n")
                launcher.stdin.flush()
                pids = launcher.stdout.readline().split()
                time.sleep(life + 2 * args.interval + 1)
                text = err_path.read_text()
                results[mode][life] = sum(f"attached to pid {p} " in text for p in pids)
        for life in results["exec"]:
            print(f"{life:>10} {results['exec'][life]:>9}/{args.n} "
                  f"{results['fork'][life]:>9}/{args.n}")
    finally:
        for p in launchers:
            p.kill()
            p.wait()
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
