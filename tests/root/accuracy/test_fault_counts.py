"""Fault counts are exact once the process is quiet: every first-touch fault
of a known region is counted, including those that only bumped a per-CPU
cache in BPF and were never followed by another fault on that CPU.

Root + BCC only."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.guest]

PAGES_PER_THREAD = 8192          # 32 MiB per thread, 4 KiB pages (THP off)
THREADS = 2

SOURCE = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

static char *region;
static long pages;

static void *touch(void *arg)
{
    long first = (long)arg * pages;
    for (long i = 0; i < pages; i++)
        region[(first + i) * 4096] = 1;
    return NULL;
}

int main(int argc, char **argv)
{
    int threads = atoi(argv[1]);
    pages = atol(argv[2]);
    size_t len = (size_t)threads * pages * 4096;
    /* A 2 MiB-aligned region between PROT_NONE guards of at least 2 MiB: it
     * never merges with a neighbour, and no other mapping shares its 2 MiB
     * chunks (memtrace attributes the faults of a chunk to the mapping of its
     * latest fault). */
    size_t chunk = 2UL << 20;
    char *all = mmap(NULL, len + 3 * chunk, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (all == MAP_FAILED)
        return 2;
    region = (char *)((((unsigned long)all + chunk) + chunk - 1) & ~(chunk - 1));
    if (mprotect(region, len, PROT_READ | PROT_WRITE) != 0 ||
        madvise(region, len, MADV_NOHUGEPAGE) != 0)
        return 2;
    printf("%d %lu\n", (int)getpid(), (unsigned long)region);
    fflush(stdout);
    char c;
    if (read(0, &c, 1) != 1)
        return 3;
    pthread_t t[64];
    for (long i = 0; i < threads; i++)
        pthread_create(&t[i], NULL, touch, (void *)i);
    for (int i = 0; i < threads; i++)
        pthread_join(t[i], NULL);
    printf("done\n");
    fflush(stdout);
    while (read(0, &c, 1) == 1)
        ;
    return 0;
}
"""


def _build(tmp_path: Path) -> Path:
    src = tmp_path / "faults.c"
    src.write_text(SOURCE)
    exe = tmp_path / "faults"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(src)], check=True)
    return exe


def _snapshots_until(proc: subprocess.Popen, pred, timeout: float) -> dict:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = proc.stdout.readline()
        if not line:
            break
        snap = json.loads(line)
        if snap.get("pid") and pred(snap):
            return snap
    raise AssertionError("no matching memtrace snapshot before the deadline")


def test_first_touch_faults_counted_exactly(tmp_path: Path) -> None:
    exe = _build(tmp_path)
    work = subprocess.Popen([str(exe), str(THREADS), str(PAGES_PER_THREAD)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    mt = None
    try:
        assert work.stdout is not None and work.stdin is not None
        pid_text, addr_text = work.stdout.readline().split()
        pid, region = int(pid_text), int(addr_text)
        mt = subprocess.Popen(
            [sys.executable, "-m", "memtrace", "watch", str(pid), "--format", "json",
             "--interval", "0.2", "--reconcile-interval", "0", "--no-serve"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            cwd=Path(__file__).resolve().parents[3], env=dict(os.environ))
        _snapshots_until(mt, lambda s: True, timeout=120)
        work.stdin.write("g")
        work.stdin.flush()
        assert work.stdout.readline().strip() == "done"
        done_at = time.time()

        def settled(snap: dict) -> bool:
            return snap["ts"] >= done_at + 0.5

        snap = _snapshots_until(mt, settled, timeout=60)
        mapping = next(m for m in snap["mappings"] if m["start"] == region)
        expected = THREADS * PAGES_PER_THREAD
        assert mapping["rss_bytes"] == expected * 4096
        # A write to a fresh private anonymous page is exactly one fault.
        assert mapping["faults"] == expected, (mapping["faults"], expected)
        assert snap["faults"] >= expected
    finally:
        if mt is not None:
            mt.terminate()
            mt.wait(timeout=30)
        work.kill()
        work.wait()


EXEC_PAGES = 16384               # 64 MiB, 4 KiB pages (THP off)

EXEC_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    if (strcmp(argv[1], "exec") == 0) {
        /* the first image: let memtrace attach and tick, then exec ourselves */
        usleep(1000000);
        char *args[] = {argv[0], "touch", argv[2], argv[3], NULL};
        execv("/proc/self/exe", args);
        return 2;
    }
    /* the new image touches its region at once, in the tick of the exec */
    long pages = atol(argv[2]);
    size_t len = (size_t)pages * 4096, chunk = 2UL << 20;
    char *all = mmap(NULL, len + 3 * chunk, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (all == MAP_FAILED)
        return 2;
    char *region = (char *)((((unsigned long)all + chunk) + chunk - 1) & ~(chunk - 1));
    if (mprotect(region, len, PROT_READ | PROT_WRITE) != 0 ||
        madvise(region, len, MADV_NOHUGEPAGE) != 0)
        return 2;
    for (long i = 0; i < pages; i++)
        region[i * 4096] = 1;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", argv[3]);
    FILE *f = fopen(tmp, "w");
    if (!f || fprintf(f, "%lu\n", (unsigned long)region) < 0 || fclose(f) != 0 ||
        rename(tmp, argv[3]) != 0)
        return 2;
    char c;
    while (read(0, &c, 1) == 1)
        ;
    return 0;
}
"""


def test_faults_right_after_exec_counted_exactly(tmp_path: Path) -> None:
    """`memtrace run` of a program that execs itself and at once touches 64 MiB:
    the faults of the new image made in the tick of the exec count, exactly."""
    src = tmp_path / "exectouch.c"
    src.write_text(EXEC_SOURCE)
    exe = tmp_path / "exectouch"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True)
    addr_file = tmp_path / "region"
    mt = subprocess.Popen(
        [sys.executable, "-m", "memtrace", "run", "--format", "json", "--interval", "0.2",
         "--reconcile-interval", "0", "--no-serve", "--",
         str(exe), "exec", str(EXEC_PAGES), str(addr_file)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        cwd=Path(__file__).resolve().parents[3], env=dict(os.environ))
    try:
        assert mt.stdin is not None
        deadline = time.monotonic() + 120
        while not addr_file.exists():
            assert mt.poll() is None, f"memtrace run exited with {mt.returncode}"
            assert time.monotonic() < deadline, "the program never touched its region"
            time.sleep(0.05)
        region = int(addr_file.read_text())
        done_at = time.time()
        snap = _snapshots_until(mt, lambda s: s["ts"] >= done_at + 0.5, timeout=60)
        mapping = next(m for m in snap["mappings"] if m["start"] == region)
        assert mapping["rss_bytes"] == EXEC_PAGES * 4096
        # a write to a fresh private anonymous page is exactly one fault
        assert mapping["faults"] == EXEC_PAGES, (mapping["faults"], EXEC_PAGES)
        assert snap["faults_by_mapping"]["[anon]"] >= EXEC_PAGES
        assert snap["faults"] >= EXEC_PAGES
        mt.stdin.close()
        assert mt.wait(timeout=30) == 0
    finally:
        if mt.poll() is None:
            mt.terminate()
            mt.wait(timeout=30)
