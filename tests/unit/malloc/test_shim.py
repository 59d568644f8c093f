"""The --malloc sampler (memtrace/malloc/shim.c) without root or BPF: a test
program (hooks.c) defines the two probed functions itself, so the preloaded
shim's samples and frees land there; and the environment and build helpers."""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from memtrace.errors import ExitCode, MemtraceError
from memtrace.malloc.shim import MAX_RATE_ENV, PERIOD_ENV, build_shim, child_env, source_hash
from memtrace.trace.sampling import sample_weight

HOOKS = Path(__file__).with_name("hooks.c")
TOYALLOC = Path(__file__).parents[2] / "workloads" / "toyalloc.c"
CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if CC is None:
        pytest.skip("no C compiler")
    cache = tmp_path_factory.mktemp("shim-cache")
    shim = build_shim({"PATH": os.environ.get("PATH", os.defpath),
                       "MEMTRACE_CACHE_DIR": str(cache)})
    prog = cache / "hooks"
    subprocess.run([CC, "-O2", "-rdynamic", "-o", str(prog), str(HOOKS)], check=True)
    return shim, prog


def _run(built: tuple[Path, Path], period: int, n: int = 20000, size: int = 0,
         max_rate: int = 0, preexec: Callable[[], None] | None = None) -> list[float]:
    shim, prog = built
    env = child_env({"PATH": os.defpath}, str(shim), period, max_rate)
    argv = [str(prog), str(n), *([str(size)] if size else [])]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True,
                         timeout=60, preexec_fn=preexec).stdout
    return [float(x) for x in out.split()]


@needs_cc
def test_sampled_weights_estimate_allocated_and_outstanding_bytes(built):
    allocated, kept, weight, outstanding, samples, frees, untracked, *_ = _run(built, 16 * 1024)
    # ~1.2 GB in ~73k samples of 16 KiB: the relative standard deviation of
    # the sum is under 1 %; 5 % is far outside chance
    assert samples > 1000
    assert weight == pytest.approx(allocated, rel=0.05)
    assert outstanding == pytest.approx(kept, rel=0.05)
    assert 0 < frees < samples
    assert untracked == 0


@needs_cc
def test_samples_beyond_the_table_are_handed_over_marked_untracked(built):
    """Every allocation sampled (period 1) and 300,000 held at once: the
    sampler's table of live samples (131,072 slots) overflows. The samples it
    cannot remember still reach the probe, flagged, so their bytes count as
    allocated and their number is known; none is lost silently. Blocks of 64
    bytes: a gap of mean 1 is at most 36.7 bytes (-ln 2^-53), so every block is
    sampled (of 16-byte blocks, one in 9 million is not: e^-16; in 300,000, one
    was missed in about 3 % of runs, as in a CI run of 2026-12-06)."""
    n = 300_000
    allocated, kept, weight, outstanding, samples, frees, untracked, *_ = _run(built, 1, n, 64)
    assert untracked > 0
    assert samples + untracked == n + 1         # and hooks.c's array of pointers
    assert weight == pytest.approx(allocated, rel=1e-3)
    assert outstanding < kept


SIZES = (24, 100, 512, 4000, 20000, 70000, 300000)     # hooks.c's, in turn
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


@needs_cc
def test_malloc_and_free_jump_directly_to_the_real_allocator(built):
    """Once the real functions are known, the slots at the end of malloc and
    free are rewritten into direct jumps (docs/malloc.md, "What it costs")."""
    assert _run(built, 16 * 1024)[9] == 2


def _deny_write_execute() -> None:
    """In the child before exec: no mapping may become writable and executable
    (prctl PR_SET_MDWE, Linux 6.3+; kept across execve), as systemd's
    MemoryDenyWriteExecute= asks of a service."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        os._exit(97)


@needs_cc
def test_where_write_execute_is_denied_the_jumps_stay_indirect_and_sampling_holds(built):
    try:
        allocated, kept, weight, outstanding, samples, frees, _, _, _, direct = _run(
            built, 16 * 1024, preexec=_deny_write_execute)
    except subprocess.CalledProcessError as e:
        if e.returncode == 97:
            pytest.skip("this kernel has no PR_SET_MDWE")
        raise
    assert direct == 0
    assert samples > 1000 and 0 < frees < samples
    assert weight == pytest.approx(allocated, rel=0.05)
    assert outstanding == pytest.approx(kept, rel=0.05)


@needs_cc
def test_a_program_linked_with_another_allocator_keeps_it(built, tmp_path):
    """A program linked with its own allocator (as Debian's redis-server with
    jemalloc) gets its blocks from that allocator through the sampler, which
    looks up the next definition of each function (RTLD_NEXT), not glibc's:
    toyalloc.c aborts on a pointer it did not hand out (the first sampler,
    calling glibc's, crashed redis-server at its first free). The samples
    still estimate the bytes."""
    assert CC is not None
    shim, _ = built
    toy = tmp_path / "libtoyalloc.so"
    prog = tmp_path / "hooks-toy"
    subprocess.run([CC, "-O2", "-shared", "-fPIC", "-o", str(toy), str(TOYALLOC)], check=True)
    subprocess.run([CC, "-O2", "-rdynamic", "-o", str(prog), str(HOOKS),
                    f"-L{tmp_path}", "-ltoyalloc", f"-Wl,-rpath,{tmp_path}"], check=True)
    env = child_env({"PATH": os.defpath}, str(shim), 16 * 1024)
    r = subprocess.run([str(prog), "20000"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    handed_out = int(r.stderr.split("toyalloc ")[-1])
    assert handed_out >= 20000             # every block of hooks.c came from toyalloc
    allocated, kept, weight, outstanding, samples, frees, *_ = map(float, r.stdout.split())
    assert samples > 1000 and 0 < frees < samples
    assert weight == pytest.approx(allocated, rel=0.05)
    assert outstanding == pytest.approx(kept, rel=0.05)


@needs_cc
def test_the_period_comes_from_the_environment(built):
    """Samples taken match the chance 1 - exp(-size/period) of each block
    (plus hooks.c's one array), for the period given in the environment."""
    n = 20000
    for period in (16 * 1024, 256 * 1024):
        want = sum(-math.expm1(-SIZES[i % len(SIZES)] / period) for i in range(n))
        assert _run(built, period, n)[4] == pytest.approx(want, rel=0.1), period


@needs_cc
def test_the_rate_cap_raises_the_period_and_the_estimates_stay_unbiased(built):
    """3,000,000 blocks of 64 B at a period of 1 KiB would be ~190,000 samples
    in a fraction of a second; a cap of 50,000 a second raises the period
    while the loop runs (measured: 35,000-44,000 a second). Each sample is
    weighed with the mean of its own gap, so the sums still estimate the bytes
    (~7,000 samples: a relative standard deviation under 2 %, 8 % is four
    deviations; measured within 3 %); with no cap nothing is raised."""
    n, size, period, cap = 3_000_000, 64, 1024, 50_000
    allocated, kept, weight, outstanding, samples, _, _, largest, seconds, _ = _run(
        built, period, n, size, max_rate=cap)
    assert largest > 8 * period
    assert samples < 1.5 * cap * seconds + 500      # the first few samples come uncapped
    assert samples > 1000
    assert weight == pytest.approx(allocated, rel=0.08)
    assert outstanding == pytest.approx(kept, rel=0.08)
    uncapped = _run(built, period, 200_000, size)
    assert uncapped[7] == period and uncapped[4] > 10_000


@needs_cc
def test_the_cache_is_keyed_by_the_source(built):
    shim, _ = built
    assert source_hash(Path(__file__).parents[3].joinpath(
        "memtrace/malloc/shim.c").read_bytes()) in shim.name
    again = build_shim({"PATH": "/nonexistent", "MEMTRACE_CACHE_DIR": str(shim.parent)})
    assert again == shim      # found in the cache: no compiler needed


def test_no_compiler_is_one_error_with_its_exit_code(tmp_path):
    with pytest.raises(MemtraceError) as e:
        build_shim({"PATH": str(tmp_path), "MEMTRACE_CACHE_DIR": str(tmp_path / "c")})
    assert e.value.code == ExitCode.NO_COMPILER == 15
    assert "C compiler" in e.value.message and "\n" not in e.value.message


def test_child_env_preloads_the_shim_first_and_keeps_an_existing_preload():
    parent = {"LD_PRELOAD": "/lib/a.so /lib/b.so", "HOME": "/root"}
    env = child_env(parent, "/c/shim.so", 4096)
    assert env["LD_PRELOAD"] == "/c/shim.so:/lib/a.so:/lib/b.so"
    assert env[PERIOD_ENV] == "4096" and env["HOME"] == "/root"
    assert env[MAX_RATE_ENV] == "0"         # no cap unless asked
    assert child_env({}, "/c/shim.so", 4096, 2000)[MAX_RATE_ENV] == "2000"
    assert parent == {"LD_PRELOAD": "/lib/a.so /lib/b.so", "HOME": "/root"}   # untouched
    assert child_env({}, "/c/shim.so", 1)["LD_PRELOAD"] == "/c/shim.so"
    assert child_env(env, "/c/shim.so", 1)["LD_PRELOAD"].count("shim.so") == 1


def test_weight_is_the_expected_bytes_of_a_sampled_allocation():
    """shim.c weighs a sample size / (1 - exp(-size/period)), as sample_weight:
    the sum of the weights of sampled allocations of a size, over many
    countdowns, is the bytes allocated (a Poisson process of rate 1/period
    samples an allocation with at least one point in it)."""
    import random

    rng = random.Random(1)
    for size, period in ((16, 1024), (4096, 64 * 1024), (100_000, 64 * 1024),
                         (1 << 20, 64 * 1024)):
        # at least ~3,000 samples each: a relative standard deviation under 2 %
        n, left, total = 200_000, rng.expovariate(1 / period), 0.0
        for _ in range(n):
            left -= size
            if left <= 0:
                total += sample_weight(period, size)
                left = rng.expovariate(1 / period)
        assert total == pytest.approx(n * size, rel=0.06), size
    period = 64 * 1024
    assert sample_weight(period, 1 << 30) == 1 << 30        # a huge block: always sampled
    assert sample_weight(period, 16) == pytest.approx(period + 8, abs=1)
    assert math.isclose(sample_weight(period, 4096), 4096 / -math.expm1(-4096 / period),
                        abs_tol=0.5)
