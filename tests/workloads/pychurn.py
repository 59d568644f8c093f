"""CPython churning one address before holding it (tests/root/stacks/
test_release_order.py): churn() allocates a 32 MiB bytearray and frees it,
ROUNDS times (malloc maps it, memset faults it, free unmaps it: the kernel
hands out the same addresses each time), then keep() holds one of the same
size, at the same addresses. "held now" must name keep() for it, not churn().
Arguments: rounds, seconds to hold."""

import sys
import time

MiB = 1 << 20


def churn(rounds):
    for _ in range(rounds):
        b = bytearray(32 * MiB)
        del b


def keep():
    return bytearray(32 * MiB)


def main():
    rounds, hold = int(sys.argv[1]), float(sys.argv[2])
    time.sleep(0.5)             # memtrace's first snapshot comes before
    churn(rounds)
    kept = keep()
    time.sleep(hold)
    return len(kept)


if __name__ == "__main__":
    main()
