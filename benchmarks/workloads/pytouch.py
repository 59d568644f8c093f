"""A CPython fault loop for benchmarks/python_stacks.py: `pid N` on stdout,
waits for a byte on stdin, then makes GIB GiB resident in 16 MiB bytearrays
(zeroed by memset: first-touch faults) from a Python stack DEPTH frames deep,
timed; prints `done ELAPSED cpu CPU` and waits for another byte before it
exits (the driver reads its memory meanwhile).
Usage: pytouch.py GIB DEPTH"""

import os
import sys
import time

CHUNK = 16 << 20


def touch(n):
    return [bytearray(CHUNK) for _ in range(n)]


def nested(depth, n):
    if depth <= 1:
        return touch(n)
    return nested(depth - 1, n)


def main():
    gib, depth = float(sys.argv[1]), int(sys.argv[2])
    print(f"pid {os.getpid()}", flush=True)
    sys.stdin.buffer.read(1)
    t0, c0 = time.perf_counter(), time.process_time()
    kept = nested(depth, int(gib * (1 << 30)) // CHUNK)
    print(f"done {time.perf_counter() - t0:.6f} cpu {time.process_time() - c0:.6f}", flush=True)
    sys.stdin.buffer.read(1)
    return len(kept)


if __name__ == "__main__":
    main()
