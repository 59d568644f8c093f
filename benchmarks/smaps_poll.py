"""The polling alternative to memtrace: read and parse /proc/PID/smaps once per
interval, in a plain Python loop.

    .venv/bin/python benchmarks/smaps_poll.py PID [--seconds 20] [--interval 1]
        [--parse rss|full] [--go-stdin]

Each read parses, per mapping, its start address and Rss (--parse rss, the
default: two regex passes, the cheapest Python poller we found), or its header
and every "kB" field into a dict (--parse full), keyed by the mapping's start
address: what a smaps-based per-mapping monitor has to do. Reads start on a
fixed 1-per-interval schedule; a read that overruns its slot makes the next one
start at the next slot. With --go-stdin it prints "ready" and waits for a byte
on stdin before the first read, and waits for EOF on stdin after printing its
summary (so the driver can read its CPU time). The summary is one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

_HEX = frozenset(b"0123456789abcdef")


def parse_smaps(data: bytes) -> dict[int, dict[str, int]]:
    """{start: {"end": int, "Rss": bytes, "Pss": bytes, ...}} from smaps text."""
    out: dict[int, dict[str, int]] = {}
    cur: dict[str, int] = {}
    for line in data.split(b"\n"):
        if not line:
            continue
        if line[0] in _HEX:
            rng = line.split(b" ", 1)[0]
            start_s, _, end_s = rng.partition(b"-")
            cur = {"end": int(end_s, 16)}
            out[int(start_s, 16)] = cur
        elif line.endswith(b" kB"):
            key, _, rest = line.partition(b":")
            cur[key.decode()] = int(rest[:-3]) * 1024
    return out


_HEADER_RE = re.compile(rb"\n([0-9a-f]+)-")
_RSS_RE = re.compile(rb"\nRss: +(\d+) kB")


def parse_smaps_rss(data: bytes) -> dict[int, dict[str, int]]:
    """Only what a resident-memory monitor needs, {start: {"Rss": bytes}}, from two
    regex passes over the text (each mapping has exactly one Rss line)."""
    data = b"\n" + data
    starts = _HEADER_RE.findall(data)
    rss = _RSS_RE.findall(data)
    if len(starts) != len(rss):
        raise ValueError(f"{len(starts)} mappings but {len(rss)} Rss lines")
    return {int(s, 16): {"Rss": int(r) * 1024} for s, r in zip(starts, rss)}


PARSERS = {"rss": parse_smaps_rss, "full": parse_smaps}


def read_smaps(pid: int) -> bytes:
    with open(f"/proc/{pid}/smaps", "rb") as f:
        return f.read()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pid", type=int)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--go-stdin", action="store_true")
    ap.add_argument("--parse", choices=sorted(PARSERS), default="rss",
                    help="rss: start address and Rss of each mapping (one regex pass); "
                    "full: every field of every mapping into a dict")
    opts = ap.parse_args()
    if opts.go_stdin:
        print("ready", flush=True)
        if not sys.stdin.buffer.read(1):
            return 3
    parse = PARSERS[opts.parse]
    t_cpu0 = os.times()
    start = time.monotonic()
    end = start + opts.seconds
    reads = 0
    read_wall = parse_wall = 0.0
    skipped = 0
    mappings = rss = 0
    slot = start
    while slot < end:
        a = time.monotonic()
        try:
            data = read_smaps(opts.pid)
        except OSError as e:
            print(json.dumps({"error": str(e)}), flush=True)
            return 1
        b = time.monotonic()
        parsed = parse(data)
        c = time.monotonic()
        reads += 1
        read_wall += b - a
        parse_wall += c - b
        mappings = len(parsed)
        rss = sum(m.get("Rss", 0) for m in parsed.values())
        slot += opts.interval
        while slot < c:  # overran: start at the next free slot
            slot += opts.interval
            skipped += 1
        time.sleep(max(0.0, slot - time.monotonic()))
    t_cpu1 = os.times()
    cpu = (t_cpu1.user - t_cpu0.user) + (t_cpu1.system - t_cpu0.system)
    print(json.dumps({"parse": opts.parse, "reads": reads, "skipped_slots": skipped,
                      "seconds": time.monotonic() - start, "cpu_s": cpu,
                      "read_wall_s": read_wall, "parse_wall_s": parse_wall,
                      "mappings": mappings, "rss_bytes": rss}), flush=True)
    if opts.go_stdin:
        sys.stdin.buffer.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
