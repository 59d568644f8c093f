"""The sampler `run --malloc` preloads into its command (shim.c, shipped in the
package): built at first use with the system's C compiler into a cache
directory keyed by the source's hash, and the environment that loads it in the
command, and only there (docs/malloc.md)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from memtrace.errors import ExitCode, MemtraceError

SOURCE = Path(__file__).with_name("shim.c")
PERIOD_ENV = "MEMTRACE_MALLOC_PERIOD"    # read by shim.c: mean bytes between samples
MAX_RATE_ENV = "MEMTRACE_MALLOC_MAX_RATE"  # read by shim.c: samples a second at most (0: no cap)
CACHE_ENV = "MEMTRACE_CACHE_DIR"         # where built shims go (default below)
DEFAULT_CACHE = "/var/cache/memtrace"
# -fcf-protection=none: no endbr64 before the probed functions' first `nop` (an
# instruction the kernel emulates; a single-stepped one costs ~35x more per hit)
# -fno-plt: glibc's functions called through the GOT, one jump less per call
CFLAGS = ("-O2", "-shared", "-fPIC", "-fcf-protection=none", "-fvisibility=hidden", "-fno-plt")


def source_hash(source: bytes, cflags: tuple[str, ...] = CFLAGS) -> str:
    """The cache key: the source and the flags it is built with."""
    return hashlib.sha256(source + b"\0" + " ".join(cflags).encode()).hexdigest()[:16]


def cache_dir(env: Mapping[str, str]) -> Path:
    return Path(env.get(CACHE_ENV) or DEFAULT_CACHE)


def find_compiler(env: Mapping[str, str]) -> str | None:
    """$CC if it is found, else cc, gcc or clang on env's PATH."""
    path = env.get("PATH", os.defpath)
    for cc in (env.get("CC"), "cc", "gcc", "clang"):
        found = shutil.which(cc, path=path) if cc else None
        if found:
            return found
    return None


def build_shim(env: Mapping[str, str] | None = None) -> Path:
    """The built shim for this source, compiled now if the cache has none.
    MemtraceError NO_COMPILER when there is no C compiler, BUILD failures too."""
    env = os.environ if env is None else env
    source = SOURCE.read_bytes()
    target = cache_dir(env) / f"libmemtrace-malloc-{source_hash(source)}.so"
    if target.is_file():
        return target
    cc = find_compiler(env)
    if cc is None:
        raise MemtraceError("--malloc needs a C compiler to build its sampler (install gcc: "
                            "apt-get install gcc), or use --stacks", ExitCode.NO_COMPILER)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # built aside and renamed: a concurrent memtrace never loads half a file
        fd, tmp = tempfile.mkstemp(prefix=".shim-", suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise MemtraceError(f"--malloc: cannot write the sampler to {target.parent}: "
                            f"{e.strerror or e} (set {CACHE_ENV})", ExitCode.NO_COMPILER) from None
    try:
        r = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no message"])[-1]
            raise MemtraceError(f"--malloc: {cc} could not build the sampler: {last}",
                                ExitCode.NO_COMPILER)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except OSError as e:
        raise MemtraceError(f"--malloc: building the sampler failed: {e.strerror or e}",
                            ExitCode.NO_COMPILER) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def child_env(env: Mapping[str, str], shim: str, period: int,
              max_rate: int = 0) -> dict[str, str]:
    """The command's environment: the shim first in LD_PRELOAD, an existing
    preload kept after it (a preloaded allocator stays the program's: the shim
    calls the next definition of each function), the period and the rate cap. memtrace's
    own environment is left alone."""
    out = dict(env)
    rest = [p for p in out.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p and p != shim]
    out["LD_PRELOAD"] = ":".join([shim, *rest])
    out[PERIOD_ENV] = str(period)
    out[MAX_RATE_ENV] = str(max_rate)
    return out
