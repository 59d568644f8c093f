"""`memtrace report`: build time and size for a one-hour recording (issue 14,
item 2: <= 10 s, <= 5 MB).

Writes a synthetic recording through the real RecordingWriter
(tests/synthrec.py: changed-only lines, a whole snapshot every 600): TICKS
snapshots at 1 s of one process with about MAPPINGS mappings (a growing heap
and anon mapping, 12 libraries of 5 segments, quiet anon mappings that change
every 10 minutes, a heap walk every 10 ticks, stacks), then times
`memtrace report` (html and json, as subprocesses, best of --reps) and gives
the sizes. --churn N: every Nth tick every mapping's PSS changes (the worst
case of a PSS refresh: every line N lists all mappings). With --recording FILE,
times that recording instead.

    .venv/bin/python benchmarks/report_bench.py --ticks 3600 --mappings 1000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import synthrec  # noqa: E402


def make(path: Path, ticks: int, mappings: int, churn: int) -> None:
    extra = max(0, mappings - (3 + 12 * 5 + 3))
    gen = (synthrec.snapshot(100, t, libraries=12, extra_anon=extra, churn_every=churn)
           for t in range(ticks))
    synthrec.write(str(path), gen, pids=[100])


def timed(args: list[str]) -> tuple[float, int]:
    """Seconds and peak RSS (KiB, from wait4) of `python -m memtrace ARGS`."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "memtrace", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    took = time.monotonic() - t0
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read() if proc.stderr else ""
    return took, usage.ru_maxrss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ticks", type=int, default=3600)
    ap.add_argument("--mappings", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--churn", type=int, default=0, help="every N ticks, every quiet "
                    "mapping's PSS changes (all listed in that line, as a PSS refresh can)")
    ap.add_argument("--recording", type=Path, help="time this recording instead")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rec = a.recording
        if rec is None:
            rec = Path(tmp) / "hour.mtrace"
            t0 = time.monotonic()
            make(rec, a.ticks, a.mappings, a.churn)
            print(f"recording: {a.ticks} ticks, ~{a.mappings} mappings, "
                  f"{rec.stat().st_size / 1e6:.1f} MB, written in {time.monotonic() - t0:.1f} s")
        synthetic = a.recording is None
        results: dict[str, object] = {"recording_bytes": rec.stat().st_size,
                                      "ticks": a.ticks if synthetic else None,
                                      "mappings": a.mappings if synthetic else None,
                                      "churn": a.churn if synthetic else None,
                                      "recording": str(a.recording or ""),
                                      "load_before": os.getloadavg()}
        for fmt in ("html", "json"):
            out = Path(tmp) / f"report.{fmt}"
            runs = [timed(["report", str(rec), "--format", fmt, "-o", str(out)])
                    for _ in range(a.reps)]
            best = min(r[0] for r in runs)
            size = out.stat().st_size
            results[fmt] = {"seconds": [round(r[0], 2) for r in runs], "best_seconds":
                            round(best, 2), "bytes": size, "max_rss_kib": max(r[1] for r in runs)}
            print(f"{fmt}: {', '.join(f'{r[0]:.2f}' for r in runs)} s (best {best:.2f} s), "
                  f"{size / 1e6:.2f} MB, peak RSS {max(r[1] for r in runs) / 1024:.0f} MiB")
        results["load_after"] = os.getloadavg()
        print(f"load average before/after: {results['load_before']} / {results['load_after']}")
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
