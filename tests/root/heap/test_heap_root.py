"""memtrace heap on real processes (root): C programs that shape their heap
(tests/root/heap/heapprog.c), python3 against its own mallinfo2(), and processes
that do not use glibc malloc."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from memtrace.heap.layout import HeapError
from memtrace.heap.process import analyse_process

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="memtrace heap tests need root")]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")


class Prog:
    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  env=env)
        assert self.p.stdout is not None
        self.ready = self.p.stdout.readline().decode()
        assert self.ready.startswith("READY"), self.ready
        self.pid = self.p.pid

    def cmd(self, c: bytes) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(c)
        self.p.stdin.flush()
        return self.p.stdout.readline().decode()

    def mallinfo(self) -> dict[str, int]:
        line = self.cmd(b"m").split()
        if line[0] == "MALLINFO":
            names = ["arena", "ordblks", "uordblks", "fordblks", "hblks", "hblkhd",
                     "keepcost", "fsmblks"]
            return dict(zip(names, map(int, line[1:])))
        return {k: int(v) for k, v in (f.split("=") for f in line)}

    def heap_rss(self) -> int:
        """smaps Rss of [heap], in bytes."""
        cur = None
        with open(f"/proc/{self.pid}/smaps") as f:
            for line in f:
                fields = line.split()
                if "-" in fields[0] and len(fields) >= 5:
                    cur = fields[5] if len(fields) > 5 else ""
                elif fields[0] == "Rss:" and cur == "[heap]":
                    return int(fields[1]) * 1024
        return 0

    def close(self) -> None:
        self.p.kill()
        self.p.wait()


@pytest.fixture
def prog(build: Path) -> Iterator[object]:
    progs: list[Prog] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Prog:
        progs.append(Prog([str(build / "heapprog"), *args], env))
        return progs[-1]

    yield start
    for p in progs:
        p.close()


def main_arena(r: dict) -> dict:
    return next(a for a in r["arenas"] if a["kind"] == "main")


@pytest.mark.parametrize("stop", [False, True])
def test_hole_below_a_live_chunk_and_trim_prediction(prog, stop: bool) -> None:
    p = prog("hole", "200000")
    r = analyse_process(p.pid, stop=stop)
    a = main_arena(r)
    assert r["supported"] and r["allocator"] == "glibc"
    assert a["top_pinned"] and a["pin_chunks"] == 1 and a["pin_bytes"] == 208
    assert a["hole_resident_bytes"] > 30 << 20
    assert a["in_use_bytes"] < 4096  # the pin and the tcache struct
    assert "free but resident below a live 208-byte chunk at the heap top" in r["verdict"]
    if stop:
        assert r["stopped"] and 0 < r["pause_seconds"] < 5
    before = p.heap_rss()
    assert a["resident_bytes"] == before
    assert p.cmd(b"t").strip() == "TRIM 1"
    returned = before - p.heap_rss()
    assert abs(a["trimmable_bytes"] - returned) <= 0.01 * returned, (a["trimmable_bytes"],
                                                                     returned)
    # after the trim the hole is still free but no longer resident (the walk reads
    # only resident pages: the headers stayed, the interiors were discarded)
    after = main_arena(analyse_process(p.pid, stop=stop))
    assert after["hole_bytes"] == a["hole_bytes"] and after["top_pinned"]
    assert after["hole_resident_bytes"] < 64 << 10
    assert after["trimmable_bytes"] < 64 << 10
    assert after["resident_bytes"] == p.heap_rss()


def test_a_heap_the_kernel_split_in_two_vmas_is_walked_whole(prog) -> None:
    """A forked child that grows its heap has [heap] in two VMAs (so have
    Debian's nginx workers): the main arena runs across both. memtrace heap
    said "main arena top is not in [heap]" and gave no figures."""
    p = prog("forked", "4000")
    child = int(p.ready.split()[1])
    with open(f"/proc/{child}/maps") as f:
        heaps = [line for line in f if line.rstrip().endswith("[heap]")]
    assert len(heaps) == 2, heaps            # the case this test is about
    p.pid = child
    mi = p.mallinfo()
    r = analyse_process(child, stop=True)
    assert r["supported"], r.get("reason")
    t = r["totals"]
    assert t["malloc_in_use_bytes"] == mi["uordblks"]
    assert t["in_use_bytes"] + t["tcache_bytes"] + t["arena_overhead_bytes"] == mi["uordblks"]
    assert t["size_bytes"] == mi["arena"]
    assert t["in_use_bytes"] > 3000 * 1024      # 3,000 of the child's chunks and the parent's 64


def test_process_runs_again_after_stop(prog) -> None:
    p = prog("hole", "1000")
    analyse_process(p.pid, stop=True)
    with open(f"/proc/{p.pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    assert state in ("S", "R")
    assert p.cmd(b"m").startswith("MALLINFO")


def test_top_freed_heap_shrinks_and_hole_is_gone(prog) -> None:
    p = prog("hole", "200000")
    before = main_arena(analyse_process(p.pid))
    assert p.cmd(b"f").strip() == "FREED"
    r = analyse_process(p.pid)
    a = main_arena(r)
    assert a["size_bytes"] < before["size_bytes"] // 10
    assert not a["top_pinned"] and a["hole_bytes"] == 0
    assert a["binned_free_bytes"] < 64 << 10
    rss = p.heap_rss()
    assert a["resident_bytes"] == rss
    p.cmd(b"t")
    returned = rss - p.heap_rss()
    assert abs(a["trimmable_bytes"] - returned) <= max(0.01 * returned, 0)


def test_top_freed_mode_trim_matches(prog) -> None:
    p = prog("topfree", "200000")
    a = main_arena(analyse_process(p.pid))
    assert not a["top_pinned"]
    before = p.heap_rss()
    p.cmd(b"t")
    assert a["trimmable_bytes"] == before - p.heap_rss()


def test_large_allocation_has_its_own_mmap(prog) -> None:
    p = prog("big")
    r = analyse_process(p.pid)
    mi = p.mallinfo()
    mm = r["mmapped"]
    assert mm["count"] == 2 == mi["hblks"]
    assert mm["bytes"] == mi["hblkhd"]
    assert mm["located_count"] == 2 and mm["located_bytes"] == mi["hblkhd"]
    assert mm["threshold_bytes"] == 128 << 10 and mm["threshold_dynamic"] is True
    # 32 MiB of the 64 MiB chunk and all 300 KiB of the other were touched
    assert (32 << 20) <= mm["resident_bytes"] <= (32 << 20) + (300 << 10) + 2 * 4096
    assert main_arena(r)["size_bytes"] < 1 << 20  # not in the heap


def test_a_walk_with_the_last_walks_memo_is_the_same_and_reads_less(prog, monkeypatch) -> None:
    """The background walker's memo: the same report, mmapped chunks found at
    last walk's addresses, the mapped files not read again while unchanged."""
    import memtrace.heap.process as hp
    from memtrace.heap.analysis import WalkMemo

    p = prog("big")
    memo = WalkMemo()
    detects = []
    real_detect = hp.detect_allocator
    monkeypatch.setattr(hp, "detect_allocator", lambda *a: detects.append(1) or real_detect(*a))
    first = analyse_process(p.pid, memo=memo)
    assert len(memo.mmapped_at) == 2 and memo.maps
    memo.mmapped_at.append(memo.maps[0].start)      # a stale hint is read and dropped
    again = analyse_process(p.pid, memo=memo)
    plain = analyse_process(p.pid)
    assert len(detects) == 2                        # the memo's walk did not detect again
    for r in (again, plain):
        assert r["mmapped"] == first["mmapped"] and r["totals"] == first["totals"]
    assert sorted(memo.mmapped_at) == sorted(c["address"] for c in first["mmapped"]["largest"])
    assert again["bytes_read"] < plain["bytes_read"]


def test_threads_have_arenas(prog) -> None:
    p = prog("threads", "4")
    r = analyse_process(p.pid, stop=True)
    threads = [a for a in r["arenas"] if a["kind"] == "thread"]
    assert len(threads) == 4
    mi = p.mallinfo()
    t = r["totals"]
    assert t["size_bytes"] == mi["arena"]
    assert t["in_use_bytes"] + t["tcache_bytes"] + t["arena_overhead_bytes"] == mi["uordblks"]
    assert t["malloc_in_use_bytes"] == mi["uordblks"]
    assert t["fastbin_bytes"] == mi["fsmblks"]
    for a in threads:
        assert a["start"] % (64 << 20) == 0
        assert a["in_use_chunks"] >= 10000  # 10000 live 100..196-byte chunks each
        assert a["free_chunks"] >= 9000


def test_tcache_chunks_count_as_free(prog) -> None:
    p = prog("tcache")
    r = analyse_process(p.pid)
    mi = p.mallinfo()
    a = main_arena(r)
    # 32 size classes (even indexes) x 7 cached chunks of 32+16*b bytes
    assert a["tcache_bytes"] == 7 * sum(32 + 16 * b for b in range(0, 64, 2))
    assert a["fastbin_bytes"] == mi["fsmblks"] == 13 * (32 + 64 + 96 + 128)
    # mallinfo2 counts tcache chunks as in use: they are free to the program
    assert a["in_use_bytes"] + a["tcache_bytes"] == mi["uordblks"] == a["malloc_in_use_bytes"]
    assert a["free_bytes"] - a["tcache_bytes"] == mi["fordblks"]


def _path_python3() -> str | None:
    """The python3 first on PATH (e.g. a pyenv build), resolved through shims."""
    exe = shutil.which("python3")
    if not exe:
        return None
    r = subprocess.run([exe, "-c", "import sys; print(sys.executable)"], capture_output=True,
                       text=True, timeout=60)
    found = r.stdout.strip()
    if r.returncode or not found or os.path.realpath(found) == os.path.realpath(sys.executable):
        return None
    return found


@pytest.mark.parametrize("python,pymalloc", [("this", "pymalloc"), ("this", "malloc"),
                                             ("path", "pymalloc")])
def test_python_in_use_matches_mallinfo2(python: str, pymalloc: str) -> None:
    """python3 (nobody here wrote it) after building and dropping a dict of a million
    strings. With pymalloc (the default) small objects live in pymalloc's own mmapped
    arenas and the malloc heap is small; with PYTHONMALLOC=malloc every object is a
    malloc chunk (2 million of them freed into fastbins). `this` is the interpreter
    running the tests (Debian's 3.11.2 here), `path` another python3 on PATH (pyenv's
    3.11.7 here)."""
    exe = sys.executable if python == "this" else _path_python3()
    if exe is None:
        pytest.skip("no other python3 on PATH")
    env = dict(os.environ)
    if pymalloc == "malloc":
        env["PYTHONMALLOC"] = "malloc"
    p = Prog([exe, str(HERE / "py_target.py"), "1000000"], env=env)
    try:
        mi = p.mallinfo()
        r = analyse_process(p.pid, stop=True)
        assert p.mallinfo() == mi  # quiescent: nothing moved while we looked
        t = r["totals"]
        # malloc_in_use_bytes is malloc's own count, as mallinfo2().uordblks: exact
        assert t["malloc_in_use_bytes"] == mi["uordblks"]
        # in_use_bytes counts chunks cached in tcaches as free (they are free to the
        # program); uordblks counts them, and thread-heap headers, as allocated. The
        # difference is exactly those, and nothing else.
        assert t["in_use_bytes"] + t["tcache_bytes"] + t["arena_overhead_bytes"] == mi["uordblks"]
        assert 0 < t["tcache_bytes"] < 7 * 64 * 1040  # at most 7 chunks in 64 bins
        assert t["fastbin_bytes"] == mi["fsmblks"]
        assert t["free_bytes"] - t["tcache_bytes"] == mi["fordblks"]
        assert r["mmapped"]["bytes"] == mi["hblkhd"]
        assert t["size_bytes"] == mi["arena"]
    finally:
        p.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memtrace", "heap", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_cli_table_and_json(prog) -> None:
    p = prog("hole", "100000")
    r = _cli(str(p.pid))
    assert r.returncode == 0, r.stderr
    assert "verdict: " in r.stdout and "malloc_trim(0) would return" in r.stdout
    r = _cli(str(p.pid), "--format", "json", "--stop")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for key in ("kind", "start", "end", "resident_bytes", "in_use_bytes", "free_bytes",
                "free_resident_bytes", "top_chunk_bytes", "trimmable_bytes", "top_pinned"):
        assert key in d["arenas"][0]
    assert isinstance(d["arenas"][0]["top_pinned"], bool)
    assert d["stopped"] is True and d["pause_seconds"] > 0


def test_cli_no_such_process() -> None:
    r = _cli("999999999")
    assert r.returncode == 6 and "no such process" in r.stderr


def _unsupported(pid: int) -> dict:
    r = _cli(str(pid), "--format", "json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["supported"] is False
    t = _cli(str(pid))
    assert t.returncode == 0 and d["reason"] in t.stdout
    return d


def test_preloaded_malloc_is_not_glibc(prog, build: Path) -> None:
    p = prog("hole", "1000", env=dict(os.environ, LD_PRELOAD=str(build / "libmyalloc.so")))
    d = _unsupported(p.pid)
    assert d["allocator"] == "unknown" and "libmyalloc.so" in d["reason"]


@pytest.mark.skipif(not JEMALLOC.exists(), reason="libjemalloc2 is not installed")
def test_jemalloc_is_detected(prog) -> None:
    p = prog("hole", "1000", env=dict(os.environ, LD_PRELOAD=str(JEMALLOC)))
    d = _unsupported(p.pid)
    assert d["allocator"] == "jemalloc"


def test_static_binary_is_detected(tmp_path: Path) -> None:
    exe = tmp_path / "static"
    r = subprocess.run(["gcc", "-O1", "-static", "-pthread", "-o", str(exe),
                        str(HERE / "heapprog.c")], capture_output=True)
    if r.returncode:
        pytest.skip("no static glibc (libc.a) to link with")
    p = Prog([str(exe), "hole", "1000"])
    try:
        d = _unsupported(p.pid)
        assert "statically linked" in d["reason"]
    finally:
        p.close()


@pytest.mark.skipif(not shutil.which("musl-gcc"), reason="musl-gcc is not installed")
def test_musl_is_detected(tmp_path: Path) -> None:
    exe = tmp_path / "musl"
    subprocess.run(["musl-gcc", "-O1", "-o", str(exe), str(HERE / "heapprog.c")], check=True)
    p = Prog([str(exe), "hole", "1000"])
    try:
        d = _unsupported(p.pid)
        assert d["allocator"] == "musl"
    finally:
        p.close()


def test_changing_heap_retries_or_says_so_and_stop_is_exact(prog) -> None:
    # two threads allocating and freeing all the time; READY once both have their
    # arena and tcache (heapprog.c), so the count below holds however loaded
    p = prog("churn", "2")
    for _ in range(3):
        try:
            r = analyse_process(p.pid, retries=2)
            assert r["supported"] and r["attempts"] >= 1
        except HeapError as e:  # the plain statement, never wrong figures
            assert "kept changing" in e.message and "--stop" in e.message
        # a stop that catches a thread inside malloc (a bin head half-linked, a
        # tcache between its list and its count) is taken again, never
        # "unsupported" and never a tcache missed
        r = analyse_process(p.pid, stop=True)
        assert r["supported"] and len(r["arenas"]) >= 2
        assert sorted(a["kind"] for a in r["arenas"]) == ["main", "thread", "thread"]
        assert r["tcaches"] == 3
        for a in r["arenas"]:
            assert a["in_use_bytes"] + a["free_bytes"] + a["arena_overhead_bytes"] \
                == a["size_bytes"]
        assert 0 < r["pause_seconds"] < 2
        with open(f"/proc/{p.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] in ("R", "S")


def test_thread_arena_with_several_heaps(prog) -> None:
    p = prog("bigthread", "150000")  # 150,000 x 1000 bytes in one thread: > 64 MiB
    r = analyse_process(p.pid, stop=True)
    (t,) = [a for a in r["arenas"] if a["kind"] == "thread"]
    assert len(t["heaps"]) >= 3
    assert t["in_use_chunks"] >= 112500 and t["free_chunks"] >= 37500
    mi = p.mallinfo()
    tot = r["totals"]
    assert tot["size_bytes"] == mi["arena"]
    assert tot["in_use_bytes"] + tot["tcache_bytes"] + tot["arena_overhead_bytes"] == \
        mi["uordblks"] == tot["malloc_in_use_bytes"]
    assert t["in_use_bytes"] + t["free_bytes"] + t["arena_overhead_bytes"] == t["size_bytes"]
