"""`watch --malloc PID` end to end (issue 13, item 4; docs/malloc.md, "watch
--malloc"): the sampler put into a process that is already running, through
the GOT slots of its loaded objects, and of the libraries it loads after.

tests/workloads/lateload.c, -O2 without frame pointers, dlopens its library
after memtrace attached; then the library leaks 1 MiB/s in 4 KiB blocks
(late_leak) and frees the 64 KiB blocks the program mallocs
(churn_in_program). Were the library's slots left to glibc, late_leak would
have no samples and churn_in_program's blocks would never be seen freed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.root.harness import (
    MEMTRACE,
    REPO_ROOT,
    TIMEOUT_SCALE,
    build_without_frame_pointers,
    skip_reason,
)

_SKIP = skip_reason()
pytestmark = [pytest.mark.root, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

WORKLOADS = REPO_ROOT / "tests" / "workloads"
QUIET = ["--no-serve", "--pss-interval", "0", "--heap-interval", "0"]
# The tests pick a small --malloc-period for precision; the default cap (1,000
# samples a second) would raise it while a program allocates fast.
CAP = ("--malloc-max-rate", "10000")


def _watch_malloc(pid: int, *options: str) -> subprocess.CompletedProcess[str]:
    """memtrace watch --malloc PID, JSON on stdout, PSS and heap walks off."""
    return subprocess.run([*MEMTRACE, "watch", "--format", "json", *QUIET, "--malloc",
                           *options, str(pid)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120 * TIMEOUT_SCALE, stdin=subprocess.DEVNULL)


def _bytes_of(entries: list[dict[str, Any]], function: str) -> int:
    return sum(e["bytes"] for e in entries
               if any(f.split(" (")[0] == function for f in e["frames"]))


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("lateload")
    prog = build_without_frame_pointers(WORKLOADS / "lateload.c", out / "lateload")
    lib = build_without_frame_pointers(WORKLOADS / "lateload.c", out / "liblate.so",
                                       "-DLATE_LIB", "-shared", "-fPIC")
    wait = 6 * TIMEOUT_SCALE      # memtrace loads its probes and the sampler meanwhile
    target = subprocess.Popen([str(prog), str(lib), str(wait), "4", "8", "3"],
                              stdout=subprocess.PIPE, text=True)
    try:
        r = _watch_malloc(target.pid, "--interval", "0.5", "--malloc-period", "16K", *CAP)
        printed, _ = target.communicate(timeout=60 * TIMEOUT_SCALE)
    finally:
        target.kill()
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"leaked (\d+) churned (\d+)", printed)
    assert m and target.returncode == 0, printed
    snaps = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    reports = [s["malloc"] for s in snaps if "malloc" in s]
    return {"last": reports[-1], "reports": reports, "stderr": r.stderr,
            "leaked": int(m.group(1)), "churned": int(m.group(2))}


def test_a_library_loaded_after_attach_is_sampled(watched):
    last = watched["last"]
    assert "GOT slots of libraries loaded since attach point at the sampler" in \
        watched["stderr"], watched["stderr"][-2000:]
    # every one of late_leak's blocks was allocated after its slots were taken
    assert _bytes_of(last["outstanding"], "late_leak") == pytest.approx(
        watched["leaked"], rel=0.10), last["outstanding"]
    # reported while it grows (the last snapshots are in the pause after it)
    leaks = [r["leaks"] for r in watched["reports"]]
    assert any(_bytes_of(x, "late_leak") > 0 for x in leaks), leaks
    assert not any(_bytes_of(x, "churn_in_program") > 0 for x in leaks), leaks


def test_frees_through_the_late_library_are_seen(watched):
    last = watched["last"]
    assert _bytes_of(last["outstanding"], "churn_in_program") == 0, last["outstanding"]
    assert _bytes_of(last["allocated"], "churn_in_program") == pytest.approx(
        watched["churned"], rel=0.10), last["allocated"]
    assert last["lost"] == 0 and last["untracked"] == 0


def _libc_range(pid: int) -> tuple[int, int]:
    spans = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5].endswith("/libc.so.6"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            spans.append((lo, hi))
    return min(s for s, _ in spans), max(e for _, e in spans)


def _exe_malloc_slot(pid: int, exe: Path) -> int:
    """The value of the program's GOT slot for malloc, read from its memory
    (the slot's offset from readelf, not from memtrace's own ELF code)."""
    rel = subprocess.run(["readelf", "-rW", str(exe)], capture_output=True, text=True,
                         check=True).stdout
    offset = next(int(line.split()[0], 16) for line in rel.splitlines()
                  if re.search(r"\smalloc@", line))
    base = min(int(line.split("-")[0], 16) for line in
               Path(f"/proc/{pid}/maps").read_text().splitlines() if line.endswith(str(exe)))
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(base + offset)
        return int(struct.unpack("<Q", mem.read(8))[0])


def test_glibc_is_put_back_when_watch_ends_and_the_process_goes_on(tmp_path: Path):
    prog = build_without_frame_pointers(WORKLOADS / "mallocleak.c", tmp_path / "mallocleak")
    target = subprocess.Popen([str(prog), str(30 * TIMEOUT_SCALE), "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        lo, hi = _libc_range(target.pid)
        assert lo <= _exe_malloc_slot(target.pid, prog) < hi
        r = _watch_malloc(target.pid, "--interval", "0.5", "--malloc-period", "16K",
                          *CAP, "--count", "6")
        assert r.returncode == 0, r.stderr[-2000:]
        assert "sampler loaded into pid" in r.stderr
        last = [json.loads(x) for x in r.stdout.splitlines() if '"malloc"' in x][-1]["malloc"]
        assert _bytes_of(last["allocated"], "churn_blocks") > 0, last
        assert target.poll() is None
        # the program's calls go straight to glibc again
        assert lo <= _exe_malloc_slot(target.pid, prog) < hi
        target.terminate()
        target.wait(timeout=10)
    finally:
        target.kill()


def test_a_process_without_glibc_is_refused_with_one_line(tmp_path: Path):
    """A static program has no dlopen to load the sampler with: exit 18."""
    prog = tmp_path / "static"
    src = tmp_path / "static.c"
    src.write_text("#include <unistd.h>\nint main(void) { sleep(30); return 0; }\n")
    built = subprocess.run(["cc", "-static", "-O1", "-o", str(prog), str(src)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"no static libc to build with: {built.stderr[-200:]}")
    target = subprocess.Popen([str(prog)])
    try:
        r = _watch_malloc(target.pid, "--count", "2")
        assert r.returncode == 18, r.stderr[-2000:]
        errors = [x for x in r.stderr.splitlines() if "--malloc:" in x]
        assert len(errors) == 1 and "no glibc" in errors[0], r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        assert target.poll() is None
    finally:
        target.kill()


@pytest.mark.skipif(shutil.which("strace") is None, reason="no strace")
def test_a_process_another_tracer_holds_is_refused_with_one_line(tmp_path: Path):
    prog = build_without_frame_pointers(WORKLOADS / "mallocleak.c", tmp_path / "mallocleak")
    tracer = subprocess.Popen(["strace", "-f", "-o", "/dev/null", str(prog), "30", "0"],
                              stdout=subprocess.DEVNULL)
    pid = None
    try:
        deadline = time.monotonic() + 10
        while pid is None and time.monotonic() < deadline:
            kids = Path(f"/proc/{tracer.pid}/task/{tracer.pid}/children")
            pid = next(iter(kids.read_text().split()), None)
            time.sleep(0.05)
        assert pid is not None
        r = _watch_malloc(int(pid), "--count", "2")
        assert r.returncode == 18, r.stderr[-2000:]
        lines = [x for x in r.stderr.splitlines() if "--malloc" in x]
        assert len(lines) == 1 and "another tracer" in lines[0], r.stderr[-2000:]
    finally:
        tracer.kill()
        tracer.wait()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def test_the_borrowed_thread_keeps_its_vector_registers(tmp_path: Path):
    """The program's only thread, borrowed to call dlopen and to store the
    slots (and again at detach), holds known values in xmm0..xmm15 all along;
    dlopen's code uses those registers, so memtrace saves and restores them
    (ptrace's XSTATE register set) besides the general ones. Without that the
    program sees a register changed and exits 1."""
    prog = build_without_frame_pointers(WORKLOADS / "vecregs.c", tmp_path / "vecregs",
                                        "-mgeneral-regs-only",
                                        "-fno-tree-loop-distribute-patterns")
    target = subprocess.Popen([str(prog), str(int(15 * TIMEOUT_SCALE))],
                              stdout=subprocess.PIPE, text=True)
    try:
        r = _watch_malloc(target.pid, "--interval", "0.5", "--count", "3")
        assert r.returncode == 0, r.stderr[-2000:]
        assert "sampler loaded into pid" in r.stderr
        printed, _ = target.communicate(timeout=60 * TIMEOUT_SCALE)
        assert (printed.strip(), target.returncode) == ("vector registers unchanged", 0)
    finally:
        target.kill()


def test_the_rate_cap_reaches_a_running_process(tmp_path: Path):
    """watch --malloc hands the cap to the sampler it loads (the fourth
    argument of memtrace_malloc_interpose): mallocfast, tens of GB a second,
    would take ~500,000 samples a second at 64 KiB; under a cap of 1,000 its
    period is raised and its samples stay under the cap over the watch."""
    prog = build_without_frame_pointers(WORKLOADS / "mallocfast.c", tmp_path / "mallocfast")
    target = subprocess.Popen([str(prog), str(60 * TIMEOUT_SCALE)], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        started = time.monotonic()
        r = _watch_malloc(target.pid, "--interval", "1", "--count", "4", "--malloc-period",
                          "64K", "--malloc-max-rate", "1000")
        elapsed = time.monotonic() - started
    finally:
        target.kill()
        target.wait()
    assert r.returncode == 0, r.stderr[-2000:]
    snaps = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    last = [s["malloc"] for s in snaps if "malloc" in s][-1]
    assert last["period_max_bytes"] > 16 * last["period_bytes"], last
    assert 100 < last["samples"] < 1.5 * 1000 * elapsed + 200, (last, elapsed)
    assert last["lost"] == 0, last


def test_a_process_whose_malloc_is_another_library_keeps_it(tmp_path: Path):
    """Debian's redis-server links jemalloc: its malloc is not glibc's. The
    sampler must call that allocator, and take the slots that hold its
    functions and the lazily bound ones (which would bind to it): the first
    version took the lazy slots and called glibc's, and a block glibc handed
    out was later freed by the other allocator (toyalloc aborts there, as
    jemalloc crashes)."""
    cc = shutil.which("cc") or "gcc"
    toy = tmp_path / "libtoyalloc.so"
    prog = tmp_path / "otheralloc"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(toy),
                    str(WORKLOADS / "toyalloc.c")], check=True)
    subprocess.run([cc, "-O2", "-fomit-frame-pointer", "-Wl,-z,lazy", "-o", str(prog),
                    str(WORKLOADS / "otheralloc.c"), f"-L{tmp_path}", "-ltoyalloc",
                    f"-Wl,-rpath,{tmp_path}"], check=True)
    target = subprocess.Popen([str(prog), str(5 * TIMEOUT_SCALE), "4"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert target.stdout is not None and target.stdout.readline() == "ready\n"
        r = _watch_malloc(target.pid, "--interval", "0.5", "--malloc-period", "16K", *CAP)
        printed, errors = target.communicate(timeout=60 * TIMEOUT_SCALE)
    finally:
        target.kill()
    assert target.returncode == 0, errors[-2000:]        # toyalloc never saw a foreign pointer
    assert "steps" in printed and "toyalloc" in errors
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"it calls {toy}'s malloc" in r.stderr, r.stderr[-2000:]
    last = [json.loads(x) for x in r.stdout.splitlines() if '"malloc"' in x][-1]["malloc"]
    assert last["samples"] > 100 and last["frees"] > 0, last
    for function in ("malloc", "calloc", "realloc"):     # calloc, realloc: lazy slots
        assert _bytes_of(last["allocated"], function) > 0, (function, last["allocated"])
