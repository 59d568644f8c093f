"""Mapping names follow unlinks and renames done by other processes (no
address-space call in the target): `memtrace watch` checks its file mappings'
names through /proc/PID/map_files and re-reads maps only when one changed."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time

from tests.root.harness import Memtrace

CODE = """
import mmap, sys
maps = []
for path in sys.argv[1:]:
    f = open(path, "rb")
    m = mmap.mmap(f.fileno(), 8192, prot=mmap.PROT_READ)
    m[0]
    maps.append(m)
print("READY", flush=True)
sys.stdin.readline()
"""


def _paths(snap: dict) -> set[str]:
    return {m["path"] for m in snap["mappings"]}


def test_unlink_and_rename_elsewhere_rename_mappings(tmp_path):
    d = tempfile.mkdtemp(prefix="mt-names-")      # not under pytest's tmp_path: fixed names
    gone, moved = os.path.join(d, "gone.dat"), os.path.join(d, "moved.dat")
    for p in (gone, moved):
        with open(p, "wb") as f:
            f.write(b"x" * 8192)
    proc = subprocess.Popen(["/usr/bin/python3", "-c", CODE, gone, moved],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    mt = None
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == b"READY"
        mt = Memtrace(["watch", "--format", "json", "--interval", "0.25", "--no-serve",
                       "--pss-interval", "0", "--heap-interval", "0", str(proc.pid)],
                      tmp_path / "watch.log")
        first = mt.stream.wait_snapshot(proc.pid, 0, timeout=60, context=mt.stderr_tail)
        assert {gone, moved} <= _paths(first)
        os.unlink(gone)
        os.rename(moved, moved + ".new")
        want = {gone + " (deleted)", moved + ".new"}
        deadline = time.monotonic() + 20
        while True:
            snap = mt.stream.wait_snapshot(proc.pid, time.time(), timeout=30,
                                           context=mt.stderr_tail)
            if want <= _paths(snap) or time.monotonic() > deadline:
                break
        assert want <= _paths(snap), sorted(p for p in _paths(snap) if d in p)
        assert not {gone, moved} & _paths(snap)
    finally:
        if mt is not None:
            mt.stop()
        proc.kill()
        proc.wait()
        for p in (moved + ".new",):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        os.rmdir(d)
