"""memtrace's CPU against polling /proc/PID/smaps, on ~4 GiB in ~60k mappings.

    sudo .venv/bin/python benchmarks/polling.py [--seconds 20] [--parse rss|full]

1. Starts benchmarks/workloads/manymaps.c: 60000 anonymous regions of 18 pages
   (72 KiB; 4.1 GiB in all), alternating rw-/rwx so that they never merge,
   every page written. It then waits.
2. Starts `memtrace watch PID --format json --interval 1 --reconcile-interval 0
   --no-serve` and waits for its first snapshot (time to it: wall clock here and
   memtrace's own log line).
3. Idle window (--idle-seconds, default 5, from --settle 4 s after the first
   snapshot): the workload does nothing; memtrace's
   CPU per second is recorded (the floor of its cost on this address space).
4. Measured window (--seconds, default 20): the workload touches 1% of its
   regions each second (default --mode refault: MADV_DONTNEED then write every
   page, so ~43 MiB/s is freed and faulted in again; --mode rewrite only
   writes). At the same time benchmarks/smaps_poll.py reads and parses
   /proc/PID/smaps once per second. Both CPU times (user+sys from
   /proc/PID/stat; for memtrace including its child processes, e.g. the heap
   walker) are taken at the start and end of the same window. The
   run time of memtrace's BPF programs (charged to the workload, not to
   memtrace) is read from /proc/<memtrace>/fdinfo with kernel.bpf_stats_enabled
   set to 1 for the window (restored afterwards; --no-bpf-stats to skip).
5. Accuracy: SIGSTOP the workload, wait for a memtrace snapshot taken at least
   2 intervals later, and compare its total rss_bytes with /proc/PID/statm and
   each mapping's rss_bytes with /proc/PID/smaps Rss (matched by start address).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import benchcommon as bc
import smaps_poll

BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def bpf_run_ns(pid: int) -> tuple[int, int]:
    """Sum of run_time_ns and run_cnt over the BPF programs pid holds open."""
    ns = cnt = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "bpf-prog" not in os.readlink(f"/proc/{pid}/fd/{fd}"):
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for line in info.splitlines():
            k, _, v = line.partition(":")
            if k == "run_time_ns":
                ns += int(v)
            elif k == "run_cnt":
                cnt += int(v)
    return ns, cnt


def compare(snap: dict[str, Any], smaps: dict[int, dict[str, int]],
            statm_bytes: int) -> dict[str, Any]:
    mt = {m["start"]: m["rss_bytes"] for m in snap["mappings"]}
    only_mt = sorted(set(mt) - set(smaps))
    only_smaps = sorted(set(smaps) - set(mt))
    differ = sorted(s for s in set(mt) & set(smaps) if mt[s] != smaps[s].get("Rss", 0))
    return {
        "memtrace_rss_bytes": snap["rss_bytes"],
        "statm_rss_bytes": statm_bytes,
        "total_diff_bytes": snap["rss_bytes"] - statm_bytes,
        "smaps_rss_sum_bytes": sum(m.get("Rss", 0) for m in smaps.values()),
        "mappings_memtrace": len(mt),
        "mappings_smaps": len(smaps),
        "mismatching_mappings": len(only_mt) + len(only_smaps) + len(differ),
        "only_in_memtrace": [hex(s) for s in only_mt[:10]],
        "only_in_smaps": [hex(s) for s in only_smaps[:10]],
        "rss_differs": [(hex(s), mt[s], smaps[s].get("Rss", 0)) for s in differ[:10]],
        "snapshot_ts": snap["ts"],
        "snapshot_statm_rss_bytes": snap.get("statm_rss_bytes"),
        "snapshot_drift_bytes": snap.get("drift_bytes"),
        "full_rescans": snap.get("full_rescans"),
        "events_lost": snap.get("events_lost"),
        "tick_seconds": snap.get("tick_seconds"),
        "faults": snap.get("faults"),
    }


def scrape(listen: str) -> bytes:
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=30) as resp:
        return bytes(resp.read())


class Scraper:
    """Scrapes /metrics every `interval` seconds on a thread, like Prometheus."""

    def __init__(self, listen: str, interval: float) -> None:
        self.listen, self.interval = listen, interval
        self.count = self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            body = scrape(self.listen)
            self.count += 1
            self.bytes = len(body)
            self._stop.wait(self.interval)

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join(60)
        return self.count, self.bytes


def compare_metrics(body: bytes, smaps: dict[int, dict[str, int]],
                    statm_bytes: int) -> dict[str, Any]:
    """Process totals from /metrics against statm and the smaps sum (the
    per-mapping comparison is the JSON run's: mapping series are capped)."""
    process = mapping = 0
    for line in body.decode().splitlines():
        if line.startswith("memtrace_process_resident_bytes{"):
            process += int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith("memtrace_mapping_resident_bytes{"):
            mapping += int(float(line.rsplit(" ", 1)[1]))
    smaps_sum = sum(m.get("Rss", 0) for m in smaps.values())
    return {
        "memtrace_rss_bytes": process, "statm_rss_bytes": statm_bytes,
        "total_diff_bytes": process - statm_bytes, "smaps_rss_sum_bytes": smaps_sum,
        "mapping_series_sum_bytes": mapping, "mappings_memtrace": None,
        "mappings_smaps": len(smaps), "mismatching_mappings": None,
    }


MAX_MAP_COUNT = Path("/proc/sys/vm/max_map_count")


@contextlib.contextmanager
def map_count_for(regions: int) -> Any:
    """vm.max_map_count raised for the run when the workload needs more mappings
    than it allows (default 65530: --regions 100000 needs more), then restored."""
    old = int(MAX_MAP_COUNT.read_text())
    need = regions + 4096
    if need > old:
        MAX_MAP_COUNT.write_text(str(need))
    try:
        yield
    finally:
        if need > old:
            MAX_MAP_COUNT.write_text(str(old))


def run(opts: argparse.Namespace) -> dict[str, Any]:
    with map_count_for(opts.regions):
        return _run(opts)


def _run(opts: argparse.Namespace) -> dict[str, Any]:
    binary = bc.build("manymaps")
    res: dict[str, Any] = {"regions": opts.regions, "pages_per_region": opts.pages,
                           "seconds": opts.seconds, "mode": opts.mode, "parse": opts.parse}
    wl = bc.spawn([str(binary), str(opts.regions), str(opts.pages), str(int(opts.seconds)),
                   opts.mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert wl.stdin is not None and wl.stdout is not None
    pid = int(bc.read_line(wl.stdout, 30, "workload").split()[1])
    t = time.monotonic()
    if bc.read_line(wl.stdout, 600, "workload") != "ready":
        raise RuntimeError("workload did not get ready")
    res["workload_setup_s"] = time.monotonic() - t
    res["workload_rss_bytes"] = bc.statm_rss_bytes(pid)
    with open(f"/proc/{pid}/maps", "rb") as f:
        res["workload_mappings"] = f.read().count(b"\n")
    print(f"workload pid {pid}: {res['workload_mappings']} mappings, "
          f"{res['workload_rss_bytes'] / 2**30:.2f} GiB resident "
          f"(set up in {res['workload_setup_s']:.1f}s)", file=sys.stderr, flush=True)

    listen = f"127.0.0.1:{opts.port}" if opts.output == "metrics" else None
    res["output"] = opts.output
    changed_only = "--changed-only" in opts.memtrace_args.split()
    mt = bc.Memtrace(opts.memtrace, pid, opts.interval, listen=listen,
                     extra=opts.memtrace_args.split(), keep_lines=changed_only)
    res["memtrace_command"] = mt.command
    res["first_snapshot_wall_s"] = mt.wait_first_snapshot(600)
    t_first = time.monotonic()
    res["cpu_to_first_snapshot_s"] = bc.tree_cpu_seconds(mt.pid)
    res["memtrace_vm_hwm_kib_first"] = bc.status_kb(mt.pid, "VmHWM")
    res["memtrace_vm_rss_kib_first"] = bc.status_kb(mt.pid, "VmRSS")
    print(f"memtrace first snapshot after {res['first_snapshot_wall_s']:.2f}s "
          f"(CPU {res['cpu_to_first_snapshot_s']:.2f}s)", file=sys.stderr, flush=True)

    reader = bc.spawn([sys.executable, str(bc.BENCH_DIR / "smaps_poll.py"), str(pid),
                       "--seconds", str(opts.seconds), "--interval", str(opts.interval),
                       "--parse", opts.parse, "--go-stdin"],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert reader.stdin is not None and reader.stdout is not None
    if bc.read_line(reader.stdout, 60, "smaps reader") != "ready":
        raise RuntimeError("smaps reader did not get ready")

    # Idle window: nothing changes in the workload. It starts --settle seconds
    # after the first snapshot: memtrace's first heap walk and second tick come
    # right after it, and are start-up work, not the idle cost.
    time.sleep(max(0.0, opts.settle - (time.monotonic() - t_first)))
    c0, t0 = bc.tree_cpu_seconds(mt.pid), time.monotonic()
    time.sleep(opts.idle_seconds)
    c1, t1 = bc.tree_cpu_seconds(mt.pid), time.monotonic()
    res["idle_window_s"] = t1 - t0
    res["memtrace_idle_cpu_per_s"] = (c1 - c0) / (t1 - t0)
    print(f"idle window: memtrace {res['memtrace_idle_cpu_per_s']:.3f} CPU-s/s",
          file=sys.stderr, flush=True)

    # Measured window.
    old_stats = None
    if opts.bpf_stats:
        old_stats = BPF_STATS.read_text().strip()
        BPF_STATS.write_text("1")
    try:
        bpf0 = bpf_run_ns(mt.pid)
        watch = bc.Interference([wl.pid, mt.pid, reader.pid])
        m0, r0, t0 = bc.tree_cpu_seconds(mt.pid), bc.cpu_seconds(reader.pid), time.monotonic()
        lines0, bytes0 = mt.lines, mt.bytes
        scraper = Scraper(listen, opts.scrape_interval) if listen else None
        wl.stdin.write(b"g")
        wl.stdin.flush()
        reader.stdin.write(b"g")
        reader.stdin.flush()
        summary = json.loads(bc.read_line(reader.stdout, opts.seconds + 120, "smaps reader"))
        ticks = 0
        while True:
            line = bc.read_line(wl.stdout, opts.seconds + 120, "workload")
            if line == "done":
                break
            ticks += 1
        m1, r1, t1 = bc.tree_cpu_seconds(mt.pid), bc.cpu_seconds(reader.pid), time.monotonic()
        bpf1 = bpf_run_ns(mt.pid)
        if scraper:
            res["scrapes_in_window"], res["scrape_bytes"] = scraper.stop()
        res["foreign_cpu_s"] = watch.stop()
        res["foreign_memtrace_pids"] = sorted(watch.foreign_mt)
    finally:
        if old_stats is not None:
            BPF_STATS.write_text(old_stats)
    if mt.proc.poll() is not None:
        raise RuntimeError(mt.failure("exited during the measured window"))
    window = t1 - t0
    res.update({
        "window_s": window, "workload_ticks": ticks,
        "memtrace_snapshots_in_window": mt.lines - lines0,
        "memtrace_json_bytes_in_window": mt.bytes - bytes0,
        "memtrace_json_bytes_per_hour": (mt.bytes - bytes0) / window * 3600,
        "first_snapshot_bytes": mt.first_line_bytes,
        "memtrace_cpu_s": m1 - m0, "reader_cpu_s": r1 - r0,
        "memtrace_cpu_per_s": (m1 - m0) / window, "reader_cpu_per_s": (r1 - r0) / window,
        "reader_summary": summary,
        "memtrace_vm_hwm_kib": bc.status_kb(mt.pid, "VmHWM"),
        "reader_vm_hwm_kib": bc.status_kb(reader.pid, "VmHWM"),
    })
    if opts.bpf_stats:
        res["bpf_run_s"] = (bpf1[0] - bpf0[0]) / 1e9
        res["bpf_run_cnt"] = bpf1[1] - bpf0[1]
        res["bpf_run_per_s"] = res["bpf_run_s"] / window
    res["ratio_reader_over_memtrace"] = (
        res["reader_cpu_per_s"] / res["memtrace_cpu_per_s"] if m1 > m0 else float("inf"))
    reader.stdin.close()
    reader.wait(30)

    # Accuracy at rest.
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()
    statm = bc.statm_rss_bytes(pid)
    smaps = smaps_poll.parse_smaps(smaps_poll.read_smaps(pid))
    if listen:
        time.sleep(3 * opts.interval)
        res["accuracy"] = compare_metrics(scrape(listen), smaps, statm)
    else:
        raw = mt.wait_snapshot_after(stopped_at + 2 * opts.interval, 60 + 10 * opts.interval)
        if changed_only:        # the whole snapshot, rebuilt from every line up to it
            from memtrace.views.jsonl import full_snapshots

            lines = list(mt.all_lines)
            last = full_snapshots(lines[:lines.index(raw) + 1])
            res["accuracy"] = compare(list(last)[-1], smaps, statm)
        else:
            res["accuracy"] = compare(json.loads(raw), smaps, statm)
    res["accuracy"]["stopped_at"] = stopped_at
    res["memtrace_vm_hwm_kib_end"] = bc.status_kb(mt.pid, "VmHWM")
    res["memtrace_vm_rss_kib_end"] = bc.status_kb(mt.pid, "VmRSS")

    bc.kill(wl)
    res["memtrace_exit"] = mt.wait_exit(3 * opts.interval + 30)
    res["first_snapshot_logged_s"] = mt.logged_first_snapshot()
    res["memtrace_unexpected_stderr"] = mt.unexpected_stderr()
    if res["memtrace_exit"] != 0:
        res["memtrace_stderr_tail"] = mt.stderr[-20:]
    return res


def report(r: dict[str, Any]) -> None:
    a = r["accuracy"]
    s = r["reader_summary"]
    rows = [
        ["workload", f"{r['workload_mappings']} mappings, "
         f"{r['workload_rss_bytes'] / 2**30:.2f} GiB resident, mode {r['mode']}, "
         f"{r['workload_ticks']} ticks of 1% in the window"],
        ["memtrace start -> first snapshot (wall, measured here)",
         f"{r['first_snapshot_wall_s']:.2f} s"],
        ["memtrace start -> first snapshot (memtrace's log)",
         f"{r['first_snapshot_logged_s']} s"],
        ["memtrace CPU from start to first snapshot", f"{r['cpu_to_first_snapshot_s']:.2f} s"],
        ["memtrace CPU per second, idle workload",
         f"{r['memtrace_idle_cpu_per_s']:.3f} s/s over {r['idle_window_s']:.1f} s"],
        ["measured window", f"{r['window_s']:.1f} s"],
        ["memtrace output", r["output"] + (
            f" ({r['scrapes_in_window']} scrapes of /metrics in the window, "
            f"{r['scrape_bytes']} bytes each)" if r["output"] == "metrics" else
            f" ({r['memtrace_snapshots_in_window']} snapshots in the window, "
            f"{r['memtrace_json_bytes_in_window']} bytes: "
            f"{r['memtrace_json_bytes_per_hour'] / 1e9:.3f} GB per hour; first snapshot "
            f"{r['first_snapshot_bytes']} bytes)")],
        ["memtrace CPU per second (user+sys, with child processes)",
         f"{r['memtrace_cpu_per_s']:.3f} s/s ({r['memtrace_cpu_s']:.2f} s)"],
        ["smaps reader CPU per second (user+sys)",
         f"{r['reader_cpu_per_s']:.3f} s/s ({r['reader_cpu_s']:.2f} s; parse={s['parse']}, "
         f"{s['reads']} reads, {s['skipped_slots']} slots skipped, "
         f"read {s['read_wall_s'] / max(1, s['reads']):.2f} s + parse "
         f"{s['parse_wall_s'] / max(1, s['reads']):.2f} s wall per read)"],
        ["ratio reader / memtrace (goal >= 10)",
         f"{r['ratio_reader_over_memtrace']:.2f}x "
         f"{'met' if r['ratio_reader_over_memtrace'] >= 10 else 'MISSED'}"],
    ]
    if "bpf_run_s" in r:
        total = r["memtrace_cpu_per_s"] + r["bpf_run_per_s"]
        rows += [["memtrace BPF programs' run time per second (in the workload)",
                  f"{r['bpf_run_per_s']:.4f} s/s ({r['bpf_run_cnt']} runs)"],
                 ["ratio reader / (memtrace + its BPF)",
                  f"{r['reader_cpu_per_s'] / total:.2f}x"]]
    rows += [
        ["memtrace VmHWM / reader VmHWM",
         f"{r['memtrace_vm_hwm_kib_end'] / 1024:.0f} MiB / "
         f"{r['reader_vm_hwm_kib'] / 1024:.0f} MiB"],
        ["memtrace VmHWM / VmRSS right after the first snapshot; VmRSS at the end",
         f"{r['memtrace_vm_hwm_kib_first'] / 1024:.0f} / "
         f"{r['memtrace_vm_rss_kib_first'] / 1024:.0f} MiB; "
         f"{r['memtrace_vm_rss_kib_end'] / 1024:.0f} MiB"],
        ["other CPU on the machine in the window",
         f"{r['foreign_cpu_s']:.2f} s; other memtrace processes: "
         f"{r['foreign_memtrace_pids'] or 'none'}"],
        ["accuracy: memtrace rss_bytes vs statm",
         f"{a['memtrace_rss_bytes']} vs {a['statm_rss_bytes']} "
         f"(diff {a['total_diff_bytes']})"],
        ["accuracy: mappings memtrace / smaps", f"{a['mappings_memtrace']} / "
         f"{a['mappings_smaps']}"],
        ["accuracy: mismatching mappings", str(a["mismatching_mappings"])],
        ["memtrace exit status", str(r["memtrace_exit"])],
    ]
    if r["output"] == "metrics":
        rows[-3:-1] = [["accuracy: sum of memtrace_mapping_resident_bytes / smaps Rss sum",
                        f"{a['mapping_series_sum_bytes']} / {a['smaps_rss_sum_bytes']}"]]
    print(bc.table(["measure", "value"], rows))
    if r["output"] == "metrics":
        return
    if a["mismatching_mappings"]:
        print(f"only in memtrace: {a['only_in_memtrace']}")
        print(f"only in smaps: {a['only_in_smaps']}")
        print(f"rss differs (start, memtrace, smaps): {a['rss_differs']}")
    print(f"memtrace's snapshot used: ts {a['snapshot_ts']} (workload stopped at "
          f"{a['stopped_at']:.3f}), its statm_rss_bytes {a['snapshot_statm_rss_bytes']}, "
          f"drift {a['snapshot_drift_bytes']}, full_rescans {a['full_rescans']}, "
          f"events_lost {a['events_lost']}, tick_seconds {a['tick_seconds']}, "
          f"faults {a['faults']}")
    if r["memtrace_unexpected_stderr"]:
        print(f"memtrace stderr: {r['memtrace_unexpected_stderr']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regions", type=int, default=60000)
    ap.add_argument("--pages", type=int, default=18, help="pages per region")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured window")
    ap.add_argument("--idle-seconds", type=float, default=5.0)
    ap.add_argument("--settle", type=float, default=4.0,
                    help="seconds after the first snapshot before the idle window starts "
                         "(memtrace's first heap walk and second tick are start-up work)")
    ap.add_argument("--mode", choices=["refault", "rewrite"], default="refault")
    ap.add_argument("--parse", choices=sorted(smaps_poll.PARSERS), default="rss")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--no-bpf-stats", dest="bpf_stats", action="store_false")
    ap.add_argument("--memtrace", type=Path, default=bc.DEFAULT_MEMTRACE)
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--output", choices=["json", "metrics"], default="json",
                    help="json: memtrace writes a JSON snapshot per tick (--no-serve), "
                    "checked per mapping at the end; metrics: --format none, /metrics "
                    "scraped every --scrape-interval s (a long-running exporter), "
                    "process totals checked at the end")
    ap.add_argument("--scrape-interval", type=float, default=15.0)
    ap.add_argument("--memtrace-args", default="",
                    help="more options for memtrace watch, e.g. '--pss-interval 0'")
    ap.add_argument("--port", type=int, default=19877)
    opts = ap.parse_args()
    try:
        r = run(opts)
    except (RuntimeError, TimeoutError, EOFError, OSError, ValueError) as e:
        print(f"ERROR: {e}")
        return 1
    finally:
        bc.cleanup()
    report(r)
    if opts.json:
        opts.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
