"""A CPython workload for `run --malloc` with Python frames whose code objects
die (tests/root/malloc/test_malloc_root.py): each round exec's a new function
f_K, calls it (it keeps a bytearray of (K + 1) * 16 KiB + 1 bytes) and drops it,
so its code object is freed and the next round's is likely allocated at its
address; every 10th function is kept alive. Argument: rounds."""

import sys
import time

keep = []
alive = []


def main():
    rounds = int(sys.argv[1])
    for k in range(rounds):
        scope = {}
        exec(f"def f_{k}(keep):\n    keep.append(bytearray({(k + 1) << 14} + 1))\n", scope)
        scope[f"f_{k}"](keep)
        if k % 10 == 0:
            alive.append(scope[f"f_{k}"])
        del scope
    print(f"rounds {rounds}", flush=True)
    time.sleep(1.5)         # memtrace drains while the kept functions live


if __name__ == "__main__":
    main()
