#!/usr/bin/env python3
"""What writing a whole JSON snapshot to a pipe costs, against the kernel's floor
(issue 15 item 2; benchmarks/README.md, "Whole JSON: the pipe's floor").

A record the size of a whole snapshot at 60k mappings (17 MB in ~235 blocks, as
memtrace.snapshot's _TextBlocks give them) is written N times, one every
--gap seconds, to a pipe a Python reader drains line by line (as polling.py
reads memtrace), by:

  stream   memtrace's OutputStream (views/output.py: its writer thread; CPU of
           that thread, from /proc/self/task/TID/schedstat)
  writev   a plain blocking os.writev of the same pieces, 1024 at a time
  join     b"".join of the pieces, then one blocking os.write

and prints the CPU per record of the writing thread for each, interleaved.

    .venv/bin/python benchmarks/pipe_floor.py --records 20 --rounds 3
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memtrace.views.output import PIPE_SIZE, OutputStream  # noqa: E402

_F_SETPIPE_SZ = 1031
READER = "import sys\nfor line in sys.stdin.buffer: pass"


def record(blocks: int, block_bytes: int) -> list[bytes]:
    body = [os.urandom(block_bytes // 2 + 1).hex().encode()[:block_bytes] for _ in range(blocks)]
    parts = [b'{"pid":1,"mappings":[']
    for i, b in enumerate(body):
        parts += [b",", b] if i else [b]
    return [*parts, b"]}\n"]


def thread_cpu(tid: int) -> float:
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def one(mode: str, parts: list[bytes], records: int, gap: float) -> float:
    """CPU seconds per record of the thread that writes, in `mode`."""
    r, w = os.pipe()
    reader = subprocess.Popen([sys.executable, "-c", READER], stdin=r)
    os.close(r)
    try:
        if mode == "stream":
            before_threads = set(threading.enumerate())
            stream = OutputStream(w, "pipe")
            tid = next(t.native_id for t in set(threading.enumerate()) - before_threads
                       if t.name.startswith("memtrace-output"))
            assert tid is not None
            before = thread_cpu(tid)
            for _ in range(records):
                stream.write_record(parts)
                time.sleep(gap)
            stream.close()
            spent = thread_cpu(tid) - before
        else:
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)   # as OutputStream grows it
            before = time.clock_gettime(time.CLOCK_THREAD_CPUTIME_ID)
            for _ in range(records):
                if mode == "join":
                    os.write(w, b"".join(parts))
                else:
                    _writev_all(w, parts)
                time.sleep(gap)
            spent = time.clock_gettime(time.CLOCK_THREAD_CPUTIME_ID) - before
    finally:
        os.close(w)
        reader.wait(timeout=60)
    return spent / records


def _writev_all(fd: int, parts: list[bytes]) -> None:
    views = [memoryview(p) for p in parts]
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i:i + 1024])
        while n:
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=235)
    ap.add_argument("--block-bytes", type=int, default=72_500)
    ap.add_argument("--gap", type=float, default=0.25, help="seconds between records")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    parts = record(args.blocks, args.block_bytes)
    size = sum(map(len, parts))
    print(f"record: {size} bytes in {len(parts)} pieces; {args.records} records a run")
    modes = ("stream", "writev", "join")
    ms: dict[str, list[float]] = {m: [] for m in modes}
    for rnd in range(args.rounds):
        for mode in modes[rnd % 3:] + modes[:rnd % 3]:
            ms[mode].append(one(mode, parts, args.records, args.gap) * 1000)
    for mode in modes:
        runs = " ".join(f"{x:.2f}" for x in ms[mode])
        print(f"{mode:7} {statistics.median(ms[mode]):6.2f} ms/record  (runs {runs})")
    if args.json:
        Path(args.json).write_text(json.dumps({"record_bytes": size, "pieces": len(parts),
                                               "ms_per_record": ms}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
