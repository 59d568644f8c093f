"""A CPython workload for --stacks' Python frames (tests/root/stacks/
test_python_stacks.py): fill_big makes 64 MiB resident (bytearrays, zeroed by
memset), fill_small 16 MiB (str repetition, memset), each 1 MiB block in a
malloc mapping of its own; read-only reservations around fill_small's blocks
keep the kernel from merging their mappings with fill_big's or any other
anonymous memory (obmalloc arenas), so memtrace's exact per-mapping figures
split them. The reservations are 4 MiB, never touched: no 2 MiB chunk holds
both fill_small's blocks and anything else that faults, so "brought in" (exact
per chunk, split by samples where paths share one) is exact for both paths.
Then fill_big's blocks are freed (unmapped).
Arguments: seconds to hold both, seconds to hold after the release, and
optionally `go`: wait for a line on stdin before filling (a tracer attaches)."""

import mmap
import sys
import time

MiB = 1 << 20
GUARD = 4 * MiB                 # > 2 MiB: a whole chunk apart


def fill_big():
    return [bytearray(MiB) for _ in range(64)]


def fill_small():
    return [chr(65 + i % 26) * MiB for i in range(16)]


def main():
    hold, after = float(sys.argv[1]), float(sys.argv[2])
    if len(sys.argv) > 3:           # "go": wait for a line on stdin (a tracer attached)
        print("started", flush=True)
        sys.stdin.readline()
    big = fill_big()
    guards = [mmap.mmap(-1, GUARD, prot=mmap.PROT_READ)]
    small = fill_small()
    guards.append(mmap.mmap(-1, GUARD, prot=mmap.PROT_READ))
    print("ready", flush=True)
    time.sleep(hold)
    del big
    print("released", flush=True)
    time.sleep(after)
    for g in guards:
        g.close()
    return len(small)


if __name__ == "__main__":
    main()
