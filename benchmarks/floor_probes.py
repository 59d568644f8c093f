"""The floor of any tracer that sees what memtrace sees: BPF programs that return
at once, attached to the tracepoints memtrace's fault, mmap, munmap and brk paths
use (raw page_fault_user; syscalls sys_enter/exit_{mmap,munmap,brk}). What a
workload loses under it is the cost of the tracepoints themselves on this kernel
and machine, which no change inside memtrace's programs can remove.

    sudo .venv/bin/python benchmarks/floor_probes.py     # prints "Tracing", then waits

overhead.py runs it as the kind `floor`, in the same rounds as memtrace and the
peer. The programs run for every process (as memtrace's and stackcount's do
before their pid filter); SIGINT or SIGTERM detaches them.
"""

from __future__ import annotations

import signal
import sys

import benchcommon as bc

sys.path.insert(0, str(bc.REPO))

from memtrace.trace.probes import import_bcc  # noqa: E402

EMPTY_SRC = b"""
RAW_TRACEPOINT_PROBE(page_fault_user) { return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_mmap) { return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_mmap) { return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_munmap) { return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_munmap) { return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_brk) { return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_brk) { return 0; }
"""


def main() -> int:
    bpf = import_bcc().BPF(text=EMPTY_SRC)
    print("Tracing", flush=True)
    stop = {"now": False}

    def on_signal(_sig: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop["now"]:
        signal.pause()
    bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
