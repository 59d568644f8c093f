"""A CPython workload for `run --malloc` with Python frames
(tests/root/malloc/test_malloc_root.py): leak_py keeps a 256 KiB bytearray
(one malloc'd block) each round, churn_py allocates one and drops it, twice.
Argument: rounds (0.05 s each)."""

import sys
import time

keep = []


def leak_py():
    keep.append(bytearray(256 << 10))


def churn_py():
    x = bytearray(256 << 10)
    del x


def main():
    for _ in range(int(sys.argv[1])):
        leak_py()
        churn_py()
        churn_py()
        time.sleep(0.05)
    print(f"leaked {len(keep) * (256 << 10)}", flush=True)


if __name__ == "__main__":
    main()
