"""memtrace's per-mapping resident bytes must equal /proc/PID/smaps exactly at
every quiescent point of the workloads (see tests/root/harness.py).

Root + BCC only; run with e.g.
    sudo .venv/bin/python -m pytest tests/root -v
"""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.root]

# scenario name -> extra argument ("{dir}": a scratch directory on a real
# filesystem, "{lib}": the compiled libdummy.so)
SCENARIOS = {
    "heap": [],
    "bigmalloc": [],
    "reserve": [],
    "filemap": ["{dir}"],
    "dlopen": ["{lib}"],
    "madvise": ["{dir}"],
    "mremap": [],
    "mprotect": [],
    "threads": [],
    "thp": [],
    "memfd": [],
    "stack": [],
    "populate": ["{dir}"],
    "mlock": [],
    "readfile": ["{dir}"],
    "zeropage": [],
    "exec": [],
    "manymaps": [],
    "partial": [],
}

# The phases each scenario announces (after "start"), to make sure a run
# really went through all of them.
PHASES = {
    "heap": ["grown", "freed-below-top", "trimmed", "regrown", "freed-all"],
    "bigmalloc": [
        "reserved",
        "partly-touched",
        "fully-touched",
        "freed",
        "calloc-touched",
        "calloc-freed",
    ],
    "reserve": ["reserved", "committed-protnone", "touched-rw", "released"],
    "filemap": [
        "created",
        "mapped-shared",
        "shared-sparse",
        "shared-full",
        "private-sparse",
        "private-full",
        "private-cow",
        "unlinked",
        "unmapped",
    ],
    "dlopen": ["loaded", "touched", "closed"],
    "madvise": [
        "touched",
        "dontneed",
        "free",
        "free-pageout",
        "anon-pageout",
        "refaulted",
        "file-read",
        "file-pageout",
        "file-reread",
        "file-dontneed",
        "unmapped",
    ],
    "mremap": [
        "created",
        "grown-inplace",
        "grown-moved",
        "moved-fixed",
        "shrunk",
        "dontunmap",
        "unmapped",
    ],
    "mprotect": ["touched", "split3", "protnone-middle", "merged", "hole", "unmapped"],
    "threads": ["threads-alive", "threads-joined", "trimmed"],
    "thp": [
        "advised",
        "read-zero",
        "touched",
        "dontneed-aligned",
        "munmap-split",
        "collapsed",
        "unmapped",
    ],
    "memfd": ["mapped", "touched-a", "read-b", "punched", "truncated", "unmapped-a", "unmapped"],
    "stack": ["deep", "returned", "thread-deep", "thread-joined"],
    "populate": [
        "populated-private",
        "populated-shared",
        "populated-file",
        "madv-populate",
        "unmapped",
    ],
    "mlock": ["mlocked", "munlocked", "onfault", "mlockall", "future-mmap", "unlocked"],
    "readfile": ["created", "malloced", "read-malloc", "read-mmap", "freed"],
    "zeropage": ["read-zero", "written", "dontneed", "mixed", "unmapped"],
    "exec": ["allocated", "start", "read-zero", "written", "dontneed", "mixed", "unmapped"],
    "manymaps": ["touched", "fragmented", "dontneed", "merged", "unmapped"],
    "partial": [
        "holes",
        "mprotect-partial",
        "madvise-partial",
        "mlock-partial",
        "mmap-fixed-failed",
        "unmapped",
    ],
    "remote": ["mapped", "remote-truncate", "remote-write", "unmapped"],
    "fork": ["populated", "child-exited", "parent-written", "unmapped"],
    "fork-child": ["child-start", "child-cow", "child-unmapped"],
    "exit": ["allocated"],
}


# The subset CI also runs on the 6.1 guest kernel and, on the host, with the
# PAGEMAP_SCAN fast path forced off (`pytest -m guest`): heap, large mmap,
# file mapping, madvise, mremap, mprotect, threads, zero page, fork, run mode;
# and memfd and stack, whose punch/truncate and stack growth no address-space
# call announces (where statm is approximate, as on 6.1, nothing else finds them).
GUEST_SCENARIOS = {
    "heap",
    "bigmalloc",
    "filemap",
    "madvise",
    "mremap",
    "mprotect",
    "threads",
    "zeropage",
    "memfd",
    "stack",
}


def _argv(workloads, tmp_path, name, extra=None):
    data = tmp_path / "data dir"  # a space in the directory name, too
    data.mkdir(exist_ok=True)
    args = SCENARIOS.get(name, []) if extra is None else extra
    return [workloads.scenarios, name] + [a.format(dir=data, lib=workloads.libdummy) for a in args]


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.guest) if n in GUEST_SCENARIOS else n for n in SCENARIOS],
)
def test_watch_scenario(harness, workloads, tmp_path, name):
    result = harness.watch(_argv(workloads, tmp_path, name), label=f"scenario {name}")
    assert result.phases() == ["start"] + PHASES[name], result.failure_report()
    result.assert_accurate()


@pytest.mark.guest
def test_watch_fork(harness, workloads, tmp_path):
    """The parent is watched from its start; the child gets its own
    `memtrace watch CHILDPID`, started at the child's first PAUSE."""
    result = harness.watch(_argv(workloads, tmp_path, "fork"), label="scenario fork")
    parent = result.main_pid
    assert result.phases(parent) == ["start"] + PHASES["fork"], result.failure_report()
    children = {c.pid for c in result.checks} - {parent}
    assert len(children) == 1, (
        f"expected one child checked, got {children}\n{result.failure_report()}"
    )
    child = children.pop()
    assert result.phases(child) == PHASES["fork-child"], result.failure_report()
    result.assert_accurate()


@pytest.mark.parametrize("name", [pytest.param("heap", marks=pytest.mark.guest), "mremap"])
def test_run_scenario(harness, workloads, tmp_path, name):
    """`memtrace run` traces the command from its first instruction."""
    result = harness.run(_argv(workloads, tmp_path, name), label=f"scenario {name}")
    assert result.phases() == ["start"] + PHASES[name], result.failure_report()
    result.assert_accurate()


def test_run_propagates_exit_status(harness, workloads, tmp_path):
    result = harness.run(
        _argv(workloads, tmp_path, "exit", ["3"]), label="scenario exit 3", expect_status=3
    )
    assert result.phases() == ["start"] + PHASES["exit"], result.failure_report()
    result.assert_accurate()


def test_watch_remote_changes(harness, workloads, tmp_path):
    """Another process changes the workload's memory while it is stopped:
    truncating a file it maps shared, and writing through /proc/PID/mem."""
    argv = _argv(workloads, tmp_path, "remote", ["{dir}"])
    path = tmp_path / "data dir" / "remote file.bin"

    def truncate(ev):
        os.truncate(path, 8 * 1024 * 1024)

    def poke(ev):
        addr, length = ev.fields["addr"], ev.fields["len"]
        with open(f"/proc/{ev.pid}/mem", "r+b", buffering=0) as mem:
            for off in range(0, length, 4 * 4096):
                mem.seek(addr + off)
                mem.write(b"\x01")

    result = harness.watch(
        argv, label="scenario remote", hooks={"remote-truncate": truncate, "remote-write": poke}
    )
    assert result.phases() == ["start"] + PHASES["remote"], result.failure_report()
    result.assert_accurate()


PYTHON_WORKLOAD = textwrap.dedent("""
    import gc, os, signal
    fd = int(os.environ.get("MT_SYNC_FD", "2"))

    def pause(name):
        os.write(fd, ("PAUSE %s pid=%d\\n" % (name, os.getpid())).encode())
        os.kill(os.getpid(), signal.SIGSTOP)

    pause("start")
    big = list(range(3_000_000))
    pause("list")
    d = {i: str(i) for i in range(500_000)}
    pause("dict")
    del big
    gc.collect()
    pause("list-freed")
    del d
    gc.collect()
    pause("dict-freed")
    blob = bytearray(64 * 1024 * 1024)
    blob[::4096] = b"x" * len(blob[::4096])
    pause("bytearray")
    strings = [str(i) * 10 for i in range(200_000)]
    del blob
    pause("strings")
    del strings
    gc.collect()
    pause("all-freed")
    os.write(fd, ("DONE pid=%d\\n" % os.getpid()).encode())
""")


def test_watch_python_program(harness, tmp_path):
    """A real program: CPython building and dropping big lists and dicts."""
    result = harness.watch([sys.executable, "-c", PYTHON_WORKLOAD], label="python3 -c workload")
    assert result.phases() == [
        "start",
        "list",
        "dict",
        "list-freed",
        "dict-freed",
        "bytearray",
        "strings",
        "all-freed",
    ], result.failure_report()
    result.assert_accurate()
