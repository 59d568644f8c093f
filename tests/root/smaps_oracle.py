"""A stand-in for memtrace that reads /proc itself: the harness's self-test.

    smaps_oracle.py [--skew N] watch PID [PID...] [--interval S] [other memtrace options]
    smaps_oracle.py [--skew N] run [--interval S] [other options] -- CMD [ARGS...]

It prints memtrace-shaped JSON Lines snapshots built from /proc/PID/smaps,
statm and status, so at quiescent points it is exact by construction: a
harness run against it must pass.  If it does not, the harness (or the
workload) is wrong, not memtrace.  Not a tracer: no eBPF, nothing else.
--skew N adds N bytes to the rss of the biggest mapping of every snapshot
(a deliberately wrong tracer, to check that the harness notices).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests import groundtruth as gt  # noqa: E402


def _kind(path: str) -> str:
    if path == "":
        return "anon"
    if path == "[heap]":
        return "heap"
    if path.startswith("[stack"):
        return "stack"
    if path.startswith("["):
        return "special"
    if path.startswith(("/memfd:", "/dev/zero", "/SYSV", "/dev/shm/")):
        return "shmem"
    if ".so" in path:
        return "library"
    return "file"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


SKEW = 0


def snapshot(pid: int) -> dict | None:
    try:
        maps = gt.read_smaps(pid)
        statm = gt.read_statm(pid)
        status = gt.read_status_rss(pid)
        with open(f"/proc/{pid}/comm", "rb") as f:
            comm = gt.decode_path(f.read().removesuffix(b"\n"))
    except (OSError, ValueError):
        return None
    mappings = []
    for m in maps:
        anon = m["anonymous_bytes"]
        kind = _kind(m["path"])
        rest = m["rss_bytes"] - anon
        mappings.append(
            {
                "start": m["start"],
                "end": m["end"],
                "perms": m["perms"],
                "offset": m["offset"],
                "path": m["path"],
                "kind": kind,
                "rss_bytes": m["rss_bytes"],
                "anon_bytes": anon,
                "file_bytes": 0 if kind == "shmem" else rest,
                "shmem_bytes": rest if kind == "shmem" else 0,
                "virtual_bytes": m["end"] - m["start"],
                "faults": 0,
            }
        )
    if SKEW and mappings:
        max(mappings, key=lambda m: m["rss_bytes"])["rss_bytes"] += SKEW
    return {
        "ts": time.time(),
        "pid": pid,
        "comm": comm,
        "rss_bytes": statm["resident_bytes"],
        "anon_bytes": status.get("rss_anon_bytes", 0),
        "file_bytes": status.get("rss_file_bytes", 0),
        "shmem_bytes": status.get("rss_shmem_bytes", 0),
        "virtual_bytes": statm["size_bytes"],
        "statm_rss_bytes": statm["resident_bytes"],
        "mappings": mappings,
    }


def emit(pids: list[int], interval: float, done) -> None:
    while True:
        live = [p for p in pids if _alive(p)]
        for p in live:
            snap = snapshot(p)
            if snap is not None:
                sys.stdout.write(json.dumps(snap) + "\n")
        sys.stdout.flush()
        if not live or done():
            return
        time.sleep(interval)


def main(argv: list[str]) -> int:
    global SKEW
    if argv[:1] == ["--skew"]:
        SKEW = int(argv[1])
        argv = argv[2:]
    if not argv or argv[0] not in ("watch", "run"):
        print(__doc__, file=sys.stderr)
        return 2
    mode, rest = argv[0], argv[1:]
    cmd: list[str] = []
    if mode == "run":
        if "--" not in rest:
            print("run needs -- CMD", file=sys.stderr)
            return 2
        i = rest.index("--")
        rest, cmd = rest[:i], rest[i + 1 :]
    interval = 1.0
    pids = []
    it = iter(rest)
    for a in it:
        if a == "--interval":
            interval = float(next(it))
        elif a in ("--format", "--reconcile-interval"):
            next(it)
        elif a.isdigit():
            pids.append(int(a))
    print(f"smaps_oracle: {mode} interval={interval}", file=sys.stderr, flush=True)
    if mode == "watch":
        emit(pids, interval, lambda: False)
        return 0
    proc = subprocess.Popen(cmd, stdout=sys.stderr.fileno())
    emit([proc.pid], interval, lambda: proc.poll() is not None)
    rc = proc.wait()
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
