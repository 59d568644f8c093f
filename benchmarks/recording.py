"""Bytes per hour of a recording for a big process, without BPF: the real writer
(memtrace.record.writer.RecordingWriter, with --stacks lines) fed synthetic
ticks of a process with --mappings mappings and --stacks (stack, mapping)
pairs, as the watch loop would feed it at a 1 s interval.

    .venv/bin/python benchmarks/recording.py [--mappings 1000] [--stacks 10000]
        [--ticks 1200] [--scenario steady,busy,worst]

Each tick, per scenario (70 % of the stacks hold heap, the rest library pages):
- steady:  1 % of the mappings change (their resident bytes), 50 stacks get new
  samples (brought in grows by a sample's 512 KiB), the heap moves by +-0.1 %
  (every stack in it is rescaled: its held bytes move a little);
- growing: the same, but the heap grows by 10 % an hour (a slow leak);
- busy:    10 % of the mappings change, 500 stacks get samples, the heap moves
  by +-2 % a tick;
- worst:   every mapping changes, every stack gets a sample and its held bytes
  move by up to 5 %.

A snapshot's head is a real one's (tests/unit/fixtures is not needed: the keys
below are those of memtrace 0.1's snapshots), its mappings 350-byte dicts like
the real ones, its stacks the top-10 summary of the profile (stacks_summary);
stacks have 8-30 frames of 40-byte names over 1,500 distinct functions. Reported:
bytes per hour: the frames and stacks defined once (written by the first stacks
line), plus the rest of the lines extrapolated from --ticks to 3600 (use a
multiple of 600: a whole snapshot and a whole stacks line every 600 ticks);
split by line kind; and the writer's CPU per tick.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtrace.record.gzipped import open_lines  # noqa: E402
from memtrace.record.reader import open_recording  # noqa: E402
from memtrace.record.stacks import profiles_at  # noqa: E402
from memtrace.record.writer import RecordingWriter, make_header, open_recording_output  # noqa: E402
from memtrace.stacks.profile import Frame, Stack, StackProfile, StackSample  # noqa: E402
from memtrace.stacks.summary import stacks_summary  # noqa: E402

PAGE = 4096
SCENARIOS = {
    # mappings changed per tick (fraction), stacks sampled per tick, heap move per
    # tick (random +-, or a growth factor)
    "steady": (0.01, 50, 0.001),
    "growing": (0.01, 50, 1.1 ** (1 / 3600) - 1),
    "busy": (0.10, 500, 0.02),
    "worst": (1.0, None, 0.05),
}
HEAD = {"comm": "server", "rss_bytes": 0, "anon_bytes": 0, "file_bytes": 0, "shmem_bytes": 0,
        "virtual_bytes": 0, "pss_bytes": 0, "uss_bytes": 0, "swap_bytes": 0,
        "statm_rss_bytes": 0, "peak_rss_bytes": 0, "minor_faults": 0, "major_faults": 0,
        "drift_bytes": 0, "faults": 0, "faults_by_mapping": {}, "syscalls": {},
        "syscall_bytes": {}, "full_rescans": 0, "events_lost": 0, "events_sampled_out": 0,
        "tick_seconds": 0.0012, "generation": 1,
        "heap": {"arenas": 1, "in_use_bytes": 0, "free_bytes": 0, "trimmable_bytes": 0},
        "pss_refreshed_ts": 0.0, "library_events": [], "library_totals": {"loaded": 40}}


def _mapping(i: int, rng: random.Random) -> dict[str, Any]:
    start = 0x7f0000000000 + i * 0x200000
    path = f"/usr/lib/x86_64-linux-gnu/lib{i % 300:03d}example.so.{i % 7}"
    rss = rng.randint(1, 512) * PAGE
    return {"start": start, "end": start + 0x200000, "perms": "r-xp", "offset": 0,
            "path": path, "kind": "library", "mapping": path, "segment": "text",
            "rss_bytes": rss, "anon_bytes": 0, "file_bytes": rss, "shmem_bytes": 0,
            "virtual_bytes": 0x200000, "faults": 0, "pss_bytes": rss, "uss_bytes": rss,
            "swap_bytes": 0}


class Process:
    def __init__(self, n_maps: int, n_stacks: int, seed: int = 1) -> None:
        rng = self.rng = random.Random(seed)
        self.maps = [_mapping(i, rng) for i in range(n_maps)]
        functions = [Frame(0x400000 + 64 * i, f"ns::Component{i % 97}::method_{i:05d}_impl",
                           "/usr/bin/server" if i % 3 else "/usr/lib/libc.so.6", 16, "ab" * 20)
                     for i in range(1500)]
        roots = functions[:6]
        self.samples: list[StackSample] = []
        heap_share = 0.7
        for i in range(n_stacks):
            depth = rng.randint(8, 30)
            frames = tuple(rng.sample(functions[6:], depth - len(roots))) + tuple(roots)
            frames = (Frame(0x500000 + i, f"leaf_{i}", "/usr/bin/server", 8),) + frames[1:]
            mapping = ("[heap]", "heap") if rng.random() < heap_share else \
                (self.maps[i % n_maps]["mapping"], "library")
            held = rng.randint(1, 64) * 128 * 1024
            self.samples.append(StackSample(Stack(frames), mapping[0], mapping[1], held,
                                            held + rng.randint(0, 64) * 128 * 1024, 1))
        self.ts = 1.8e9

    def tick(self, scenario: str) -> tuple[dict[str, Any], StackProfile]:
        frac, sampled, heap_move = SCENARIOS[scenario]
        rng = self.rng
        self.ts += 1.0
        maps = list(self.maps)
        for i in rng.sample(range(len(maps)), int(len(maps) * frac)):
            m = dict(maps[i])
            m["rss_bytes"] = m["file_bytes"] = max(PAGE, m["rss_bytes"] + rng.choice(
                (-1, 1)) * rng.randint(1, 16) * PAGE)
            maps[i] = m
        self.maps = maps
        move = 1 + heap_move if scenario == "growing" else \
            1 + rng.uniform(-heap_move, heap_move)
        samples = []
        chosen = set(range(len(self.samples))) if sampled is None else \
            set(rng.sample(range(len(self.samples)), sampled))
        for i, s in enumerate(self.samples):
            held, brought, k = s.held_bytes, s.brought_bytes, s.samples
            if s.mapping == "[heap]" or sampled is None:
                held = int(held * move)     # byte-exact, as scale() splits them
            if i in chosen:
                brought += 512 * 1024
                k += 1
            samples.append(StackSample(s.stack, s.mapping, s.kind, held, brought, k))
        self.samples = samples
        profile = StackProfile(4242, "server", self.ts, samples, 512 * 1024, 0)
        snap = {"ts": self.ts, "pid": 4242, **HEAD, "mappings": maps,
                "stacks": stacks_summary(profile)}
        snap["rss_bytes"] = sum(m["rss_bytes"] for m in maps)
        return snap, profile


def run(scenario: str, n_maps: int, n_stacks: int, ticks: int, tmp: Path) -> dict[str, Any]:
    path = tmp / f"{scenario}.mtrace"
    proc = Process(n_maps, n_stacks)
    writer = RecordingWriter(open_recording_output(str(path)), make_header(
        "watch", 1.0, pids=[4242], options={"stacks": True, "stacks_period": 512 * 1024}))
    cpu = 0.0
    for _ in range(ticks):
        snap, profile = proc.tick(scenario)
        t0 = time.process_time()
        writer.stack_profile(profile)
        writer.snapshot(snap)
        writer.tick_done()
        cpu += time.process_time() - t0
    writer.close()
    by_kind: Counter[str] = Counter()
    stacks_key = 0
    once = 0            # frames and stacks defined: written once per recording
    lines = open_lines(str(path))        # the JSON text, decompressed
    try:
        header = len(lines.readline())
        raw = header
        for line in lines:
            raw += len(line)
            obj = json.loads(line)
            kind = "snapshot" if "mappings" in obj else next(iter(obj))
            by_kind[kind] += len(line)
            if kind == "stacks":
                once += sum(len(json.dumps(obj["stacks"][k], separators=(",", ":")))
                            for k in ("frames", "new"))
            if kind == "snapshot" and "stacks" in obj:
                stacks_key += len(json.dumps(obj["stacks"], separators=(",", ":")))
    finally:
        lines.close()
    size = path.stat().st_size          # gzip: what the disk holds
    t0 = time.monotonic()
    rec = open_recording(str(path))
    snaps = sum(1 for _ in rec.snapshots())
    read_s = time.monotonic() - t0
    t0 = time.monotonic()
    last = profiles_at(str(path))[4242]
    profile_s = time.monotonic() - t0
    scale = 3600 / ticks
    text_per_hour = once + (raw - header - once) * scale
    return {"scenario": scenario, "ticks": ticks, "bytes": size, "text_bytes": raw,
            "header": header, "defined_once_mb": once / 1e6,
            # on disk: the text per hour at the compression ratio of this run
            "mb_per_hour": text_per_hour * size / raw / 1e6,
            "text_mb_per_hour": text_per_hour / 1e6,
            "by_kind_mb_per_hour": {k: ((v - once) * scale + once if k == "stacks" else
                                        v * scale) / 1e6 for k, v in by_kind.items()},
            "snapshot_stacks_key_mb_per_hour": stacks_key * scale / 1e6,
            "writer_cpu_ms_per_tick": 1000 * cpu / ticks,
            "read_back": {"snapshots": snaps, "problem": rec.problem, "seconds": read_s,
                          "profiles_at_seconds": profile_s, "stacks": len(last.samples)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mappings", type=int, default=1000)
    ap.add_argument("--stacks", type=int, default=10000)
    ap.add_argument("--ticks", type=int, default=1200,
                    help="simulated 1 s ticks (extrapolated to an hour)")
    ap.add_argument("--scenario", default="steady,growing,busy,worst")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="write the recordings (SCENARIO.mtrace) "
                    "into this directory and keep them (e.g. for memtrace report)")
    opts = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        out = opts.keep or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for name in opts.scenario.split(","):
            r = run(name, opts.mappings, opts.stacks, opts.ticks, out)
            results.append(r)
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["by_kind_mb_per_hour"].items()))
            rb = r["read_back"]
            print(f"{name}: {r['mb_per_hour']:.1f} MB/hour on disk (gzip; JSON text "
                  f"{r['text_mb_per_hour']:.1f} MB/hour: {r['defined_once_mb']:.1f} MB of "
                  f"frames and stacks defined once; by kind: {kinds}; of the "
                  f"snapshots, their "
                  f"top-stacks key {r['snapshot_stacks_key_mb_per_hour']:.1f}); writer CPU "
                  f"{r['writer_cpu_ms_per_tick']:.1f} ms/tick; read back {rb['snapshots']} "
                  f"snapshots in {rb['seconds']:.1f}s, the last profile ({rb['stacks']} "
                  f"stacks) in {rb['profiles_at_seconds']:.1f}s, problem: {rb['problem']}",
                  flush=True)
    if opts.json:
        opts.json.write_text(json.dumps({"results": results, "load": os.getloadavg(),
                                         "mappings": opts.mappings, "stacks": opts.stacks},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
