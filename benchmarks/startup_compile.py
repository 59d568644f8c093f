"""Compile cost of memtrace's BPF program, old source against new, interleaved.

    sudo .venv/bin/python benchmarks/startup_compile.py OLD_BPF_DIR [NEW_BPF_DIR] [--rounds N]

OLD_BPF_DIR holds another version's memtrace.bpf.c and memtrace.h (e.g.
`git show REV:bpf/memtrace.bpf.c > /tmp/old/memtrace.bpf.c`, the same for the
header). Each round compiles both (BCC/clang, the watch-mode flags) without
loading or attaching, and prints the compile time, the number of BPF functions
and their total instructions.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import bcc  # type: ignore[import-not-found]

FLAGS = ["-DMT_MAX_TARGETS=1024", "-DMT_MAX_CHUNKS=65536", "-DMT_RANGES_PAGES=64",
         "-DMT_EVENTS_PAGES=64", "-Wno-macro-redefined", "-DMT_NO_RSS_STAT",
         "-DMT_NO_EVENT_STREAM", f"-DMT_PAGE_SIZE={os.sysconf('SC_PAGE_SIZE')}"]


def measure(src: Path) -> tuple[float, int, int]:
    """(compile seconds, functions, instructions) of src/memtrace.bpf.c."""
    bcc.BPF._trace_autoload = lambda self: None     # compile only
    t0 = time.perf_counter()
    b = bcc.BPF(src_file=str(src / "memtrace.bpf.c").encode(), cflags=[f"-I{src}", *FLAGS])
    seconds = time.perf_counter() - t0
    n = bcc.lib.bpf_num_functions(b.module)
    insns = sum(bcc.lib.bpf_function_size(b.module, bcc.lib.bpf_function_name(b.module, i))
                for i in range(n)) // 8
    b.cleanup()
    return seconds, n, insns


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path, nargs="?",
                    default=Path(__file__).resolve().parents[1] / "bpf")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for _ in range(args.rounds):
        for label, src in (("old", args.old), ("new", args.new)):
            seconds, n, insns = measure(src)
            print(f"{label}: compile {seconds:.2f} s, {n} functions, {insns} instructions",
                  flush=True)


if __name__ == "__main__":
    main()
