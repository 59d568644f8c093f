"""`run`'s summary (memtrace/views/summary.py): the tree's peak is the largest
sum over one tick, each process keeps its own largest snapshot, the kernel's
figures are judged against the pre-exec copy, and the text fits 80 columns."""

from __future__ import annotations

import os

from memtrace.views.summary import PeakTracker, build_summary, render_summary, top_mappings

MiB = 1 << 20


def snap(pid, ts, comm="job", maps=(), hwm=None):
    mappings = [{"mapping": name, "path": name, "kind": kind, "rss_bytes": rss}
                for name, kind, rss in maps]
    return {"pid": pid, "ts": ts, "comm": comm,
            "rss_bytes": sum(m["rss_bytes"] for m in mappings),
            "peak_rss_bytes": hwm, "mappings": mappings}


def test_top_mappings_sum_the_segments_of_one_file():
    s = snap(1, 1.0, maps=[("/lib/libc.so.6", "library", 1 * MiB),
                           ("/lib/libc.so.6", "library", 2 * MiB),
                           ("[heap]", "heap", 2 * MiB), ("[anon]", "anon", 0)])
    assert top_mappings([s]) == [
        {"pid": 1, "comm": "job", "mapping": "/lib/libc.so.6", "kind": "library",
         "rss_bytes": 3 * MiB},
        {"pid": 1, "comm": "job", "mapping": "[heap]", "kind": "heap", "rss_bytes": 2 * MiB}]


def test_tree_peak_is_the_largest_sum_at_one_tick():
    peaks = PeakTracker()
    # tick 1: parent 10 MiB; tick 2: parent 10 + child 64; tick 3: parent 80 alone
    peaks.observe({1: snap(1, 1.0, "sh", [("[heap]", "heap", 10 * MiB)], hwm=12 * MiB)})
    peaks.observe({1: snap(1, 2.0, "sh", [("[heap]", "heap", 10 * MiB)], hwm=12 * MiB),
                   2: snap(2, 2.0, "py", [("[anon]", "anon", 64 * MiB)], hwm=70 * MiB)})
    peaks.observe({1: snap(1, 3.0, "sh", [("[heap]", "heap", 70 * MiB)], hwm=75 * MiB)})
    assert (peaks.peak_rss_bytes, peaks.peak_ts, peaks.peak_processes) == (74 * MiB, 2.0, 2)
    assert [(m["pid"], m["mapping"]) for m in peaks.peak_top] == [(2, "[anon]"), (1, "[heap]")]
    s = build_summary(peaks, command=["sh", "-c", "x"], pid=1, status=0, duration=3.0,
                      ru_maxrss_bytes=75 * MiB, pre_exec_rss_bytes=40 * MiB)
    assert s["peak_rss_bytes"] == 74 * MiB and s["processes_seen"] == 2 and s["ticks"] == 3
    by_pid = {p["pid"]: p for p in s["processes"]}
    assert by_pid[1]["peak_rss_bytes"] == 70 * MiB and by_pid[1]["peak_ts"] == 3.0
    assert by_pid[1]["kernel_peak_rss_bytes"] == 75 * MiB
    assert by_pid[2]["peak_rss_bytes"] == 64 * MiB and by_pid[2]["last_ts"] == 2.0
    assert [p["pid"] for p in s["processes"]] == [1, 2]          # largest peak first
    assert s["kernel_peak_rss_bytes"] == 75 * MiB
    assert s["kernel"] == {"ru_maxrss_bytes": 75 * MiB, "pre_exec_rss_bytes": 40 * MiB,
                           "vmhwm_bytes": 75 * MiB}
    assert (s["exit_status"], s["signal"]) == (0, None)


def test_a_reused_pid_is_another_process():
    peaks = PeakTracker()
    peaks.observe({5: snap(5, 1.0, "a", [("[heap]", "heap", MiB)])})
    peaks.observe({})                                   # 5 exited (no tick counted)
    peaks.observe({6: snap(6, 2.0, "b", [("[heap]", "heap", MiB)])})
    peaks.observe({5: snap(5, 3.0, "c", [("[heap]", "heap", 3 * MiB)])})
    assert sorted((p.pid, p.comm) for p in peaks.processes.values()) == [
        (5, "a"), (5, "c"), (6, "b")]


def test_ru_maxrss_not_above_the_pre_exec_copy_says_nothing():
    """`run -- true`: ru_maxrss is the forked copy of memtrace that waited to
    exec; the kernel's peak then comes from VmHWM alone."""
    peaks = PeakTracker()
    peaks.observe({1: snap(1, 1.0, "true", [("[stack]", "stack", MiB // 4)], hwm=MiB)})
    # the child touched a few pages more after its VmHWM was read (seen: 64 KiB)
    s = build_summary(peaks, command=["true"], pid=1, status=0, duration=0.01,
                      ru_maxrss_bytes=44 * MiB + 65536, pre_exec_rss_bytes=44 * MiB)
    assert s["kernel_peak_rss_bytes"] == MiB
    assert s["kernel"]["ru_maxrss_bytes"] == 44 * MiB + 65536
    no_snapshot = build_summary(PeakTracker(), command=["true"], pid=1, status=0,
                                duration=0.0, ru_maxrss_bytes=44 * MiB,
                                pre_exec_rss_bytes=44 * MiB)
    assert no_snapshot["kernel_peak_rss_bytes"] is None
    assert "peak RSS (kernel): at most 44.0 MiB" in render_summary(no_snapshot)
    s = build_summary(peaks, command=["true"], pid=1, status=0, duration=0.01,
                      ru_maxrss_bytes=46 * MiB, pre_exec_rss_bytes=44 * MiB)
    assert s["kernel_peak_rss_bytes"] == 46 * MiB


def test_no_snapshot_and_a_signal():
    s = build_summary(PeakTracker(), command=["x"], pid=7, status=9, duration=0.5,
                      ru_maxrss_bytes=None, pre_exec_rss_bytes=None)
    assert os.WIFSIGNALED(9)
    assert (s["exit_status"], s["signal"]) == (137, 9)
    assert s["peak_rss_bytes"] is None and s["kernel_peak_rss_bytes"] is None
    text = render_summary(s)
    assert "killed by signal 9" in text and "no snapshot" in text


def test_text_fits_80_columns_with_long_names():
    peaks = PeakTracker()
    long = "/opt/" + "very-long-directory-name/" * 8 + "libsomething.so.1.2.3"
    for pid in range(100, 115):
        peaks.observe({pid: snap(pid, float(pid), "a-process-name-x" * 2,
                                 [(long, "library", 123456789 + pid), ("[heap]", "heap", 5)],
                                 hwm=987654321)})
    s = build_summary(peaks, command=["python3", "-c", "x" * 300], pid=100, status=0,
                      duration=12.5, ru_maxrss_bytes=999 * MiB, pre_exec_rss_bytes=44 * MiB)
    text = render_summary(s, 80)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), [ln for ln in lines if len(ln) > 80]
    assert lines[0].startswith("summary: python") and "…" in lines[0]
    assert lines[0].endswith("exited with status 0 after 12.50s; 15 processes")
    assert "peak RSS (kernel): 999.0 MiB" in text
    assert "more processes" in lines[-1]


def test_the_command_is_escaped_like_every_name():
    """An argument with a newline or a byte that is not UTF-8 (argv arrives
    surrogate-escaped) is shown as names are (docs/output.md, Names)."""
    arg = os.fsdecode(b"a\nb\xff")
    s = build_summary(PeakTracker(), command=["echo", arg], pid=1, status=0, duration=0.0,
                      ru_maxrss_bytes=None, pre_exec_rss_bytes=None)
    assert s["command"] == ["echo", "a\\nb\\xff"]
    assert render_summary(s).splitlines()[0].startswith("summary: echo a\\nb\\xff exited")


def test_table_keeps_the_last_frame_and_prints_the_summary_under_it():
    """Table mode: the process that exited stays in the last frame (its last
    snapshot), and the summary follows as plain text within 80 columns."""
    import io

    from rich.console import Console

    from memtrace.views.table import TableReporter

    out = io.StringIO()
    table = TableReporter(Console(file=out, width=80, height=40, force_terminal=False),
                          max_rows=5)
    m = {"start": 0x1000, "end": 0x2000, "perms": "rw-p", "offset": 0, "path": "",
         "kind": "anon", "mapping": "[anon]", "segment": None, "virtual_bytes": 100 * MiB,
         "rss_bytes": 100 * MiB, "anon_bytes": 100 * MiB, "file_bytes": 0,
         "shmem_bytes": 0, "faults": 25600}
    s = {"ts": 5.0, "pid": 4242, "comm": "shortjob", "mappings": [m],
         "rss_bytes": 100 * MiB, "anon_bytes": 100 * MiB, "file_bytes": 0, "shmem_bytes": 0,
         "virtual_bytes": 100 * MiB, "statm_rss_bytes": 100 * MiB, "drift_bytes": 0,
         "faults": 25600, "syscalls": {}, "full_rescans": {}, "events_lost": 0,
         "peak_rss_bytes": 100 * MiB}
    table.snapshot(s)
    peaks = PeakTracker()
    peaks.observe({4242: s})
    table.detached(4242, "exited")
    assert 4242 not in table.snaps          # the live view drops it at once
    summary = build_summary(peaks, command=["shortjob"], pid=4242, status=0, duration=0.6,
                            ru_maxrss_bytes=101 * MiB, pre_exec_rss_bytes=44 * MiB)
    table.summary(summary)
    table.close()
    text = out.getvalue()
    summary_at = text.rindex("\nsummary: shortjob exited with status 0") + 1
    last_frame = text[:summary_at]
    assert "4242 shortjob" in last_frame[last_frame.rindex("pid 4242 exited") - 4000:]
    tail = text[summary_at:].splitlines()
    assert all(len(line) <= 80 for line in tail), tail
    assert "peak RSS (memtrace, tree sum): 100.0 MiB at " in text[summary_at:]
    assert "peak RSS (kernel): 101.0 MiB" in text[summary_at:]
