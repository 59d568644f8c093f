"""`memtrace doctor`: can memtrace run here, and with which mechanisms."""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from memtrace.commands.oneshot import echo
from memtrace.errors import ExitCode
from memtrace.trace import btf
from memtrace.trace.pagemap import probe_pagemap_scan, scan_mechanism
from memtrace.trace.procfs import statm_is_exact, want_rss_stat_probe

TRACEPOINTS = (
    "exceptions/page_fault_user", "exceptions/page_fault_kernel", "kmem/rss_stat",
    "syscalls/sys_enter_mmap", "syscalls/sys_exit_mmap", "syscalls/sys_enter_munmap",
    "syscalls/sys_enter_mremap", "syscalls/sys_enter_madvise", "syscalls/sys_enter_mprotect",
    "syscalls/sys_enter_brk", "syscalls/sys_enter_mlock", "syscalls/sys_enter_execve",
)
TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
CAP_PERFMON, CAP_BPF = 38, 39


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def check_bcc() -> Check:
    try:
        import bcc  # type: ignore[import-not-found]  # noqa: F401
    except ImportError as e:
        return Check("BCC", False, f"python module bcc not importable ({e})",
                     "sudo scripts/setup.sh (installs Debian's python3-bpfcc; never PyPI's bcc)")
    return Check("BCC", True, "bcc importable")


def headers_release(build: Path) -> str | None:
    """The kernel release a header tree was built for, if it says."""
    # utsrelease.h first: Debian writes the upstream version into kernel.release
    for rel in ("include/generated/utsrelease.h", "include/config/kernel.release"):
        p = build / rel
        if p.is_file():
            text = p.read_text(errors="replace").strip()
            return text.split('"')[1] if '"' in text else text
    name = build.resolve().name
    return name.removeprefix("linux-headers-") if name.startswith("linux-headers-") else None


def check_headers(release: str | None = None) -> Check:
    release = release or os.uname().release
    build = Path(f"/lib/modules/{release}/build")
    if not build.exists():
        return Check("kernel headers", False, f"missing: {build} does not exist",
                     "sudo scripts/setup.sh (installs and links the nearest headers)")
    have = headers_release(build) or "unknown"
    if have == release:
        return Check("kernel headers", True, f"exact ({have})")
    return Check("kernel headers", True,
                 f"mismatched: {build} -> {build.resolve()} ({have}) for kernel {release}; "
                 "fine for memtrace, which reads only tracepoint arguments and BTF offsets")


def check_btf() -> Check:
    try:
        off = btf.member_offset("task_struct", "mm")
    except btf.BtfError as e:
        return Check("BTF", False, str(e) + "; remote RSS changes use the kmem:rss_stat "
                     "tracepoint instead", "a kernel built with CONFIG_DEBUG_INFO_BTF=y",
                     required=False)
    return Check("BTF", True, f"{btf.BTF_PATH}: task_struct.mm at offset {off}")


def tracefs_dir() -> str | None:
    return next((d for d in TRACEFS_DIRS if os.path.isdir(f"{d}/events")), None)


def tracefs_mounts(mounts: str = "/proc/self/mounts") -> list[str]:
    """Mount points of tracefs, from the mount table (readable without root)."""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return []
    return [f[1] for f in (line.split() for line in lines) if len(f) > 2 and f[2] == "tracefs"]


def check_tracepoints(mounts: str = "/proc/self/mounts") -> Check:
    base = tracefs_dir()
    if base is None:
        mounted = tracefs_mounts(mounts)
        if mounted:
            # Mounted, but its events are not visible to us: tracefs is mode
            # 0700 root, so this is a permission problem, not a missing mount.
            return Check("tracepoints", False, f"tracefs is mounted at {mounted[0]} but "
                         "not readable by this user (permission denied)", "run with sudo")
        return Check("tracepoints", False, "tracefs not mounted",
                     "mount -t tracefs nodev /sys/kernel/tracing")
    missing = [tp for tp in TRACEPOINTS if not os.path.isdir(f"{base}/events/{tp}")]
    if missing:
        return Check("tracepoints", False, f"missing: {', '.join(missing)}",
                     "a kernel with CONFIG_FTRACE_SYSCALLS and x86 exception tracepoints")
    return Check("tracepoints", True, f"all {len(TRACEPOINTS)} present under {base}")


def effective_caps() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def check_privileges() -> Check:
    if os.geteuid() == 0:
        return Check("privileges", True, "running as root")
    caps = effective_caps()
    needed = {"CAP_BPF": CAP_BPF, "CAP_PERFMON": CAP_PERFMON}
    lacking = [n for n, bit in needed.items() if not caps >> bit & 1]
    if lacking:
        return Check("privileges", False, f"not root; lacking {', '.join(lacking)}",
                     "run with sudo")
    return Check("privileges", True, "capabilities CAP_BPF, CAP_PERFMON (other users' "
                 "processes also need CAP_DAC_READ_SEARCH)")


def check_pagemap_scan() -> Check:
    ok, why = probe_pagemap_scan()
    if ok:
        return Check("PAGEMAP_SCAN", True, "ioctl works on /proc/self/pagemap")
    return Check("PAGEMAP_SCAN", False, f"{why}; falling back to raw pagemap reads with "
                 "zero-page PFNs (slower, needs root)", "Linux 6.7 or newer", required=False)


def check_mechanisms() -> Check:
    """Which mechanism memtrace will use for each job here."""

    rss_stat = "raw tracepoint rss_stat + BTF task_struct.mm"
    try:
        btf.member_offset("task_struct", "mm")
    except btf.BtfError:
        rss_stat = "tracepoint kmem:rss_stat (curr, mm_id)"
    if not want_rss_stat_probe():
        rss_stat = "statm check every tick (no rss_stat probe)"
    statm = ("totals checked against /proc/PID/statm (exact here)" if statm_is_exact() else
             "statm is approximate on this kernel: mismatches do not trigger rescans; use "
             "--reconcile-interval")
    return Check("mechanisms", True, f"resident pages: {scan_mechanism()}; VMA list: "
                 f"/proc/PID/maps on layout change; remote changes: {rss_stat}; {statm}",
                 required=False)


class _ProcmapQuery(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "query_flags", "query_addr", "vma_start", "vma_end", "vma_flags",
        "vma_page_size", "vma_offset", "inode")] + [
        (n, ctypes.c_uint32) for n in ("dev_major", "dev_minor", "vma_name_size",
                                       "build_id_size")] + [
        ("vma_name_addr", ctypes.c_uint64), ("build_id_addr", ctypes.c_uint64)]


PROCMAP_QUERY = (3 << 30) | (ctypes.sizeof(_ProcmapQuery) << 16) | (ord("f") << 8) | 17


def check_procmap_query() -> Check:
    libc = ctypes.CDLL(None, use_errno=True)
    q = _ProcmapQuery(size=ctypes.sizeof(_ProcmapQuery))
    buf = ctypes.create_string_buffer(16)
    q.query_addr = ctypes.addressof(buf)
    fd = os.open("/proc/self/maps", os.O_RDONLY)
    try:
        rc = libc.ioctl(fd, ctypes.c_ulong(PROCMAP_QUERY), ctypes.byref(q))
        err = ctypes.get_errno()
    finally:
        os.close(fd)
    if rc != 0:
        return Check("PROCMAP_QUERY", False, f"ioctl failed: {os.strerror(err)}; "
                     "memtrace reads /proc/PID/maps instead", "Linux 6.11 or newer",
                     required=False)
    return Check("PROCMAP_QUERY", True, "ioctl works (not needed: memtrace reads "
                 "/proc/PID/maps when the layout changes)", required=False)


def run_checks() -> list[Check]:
    return [check_bcc(), check_headers(), check_btf(), check_tracepoints(),
            check_privileges(), check_pagemap_scan(), check_procmap_query(),
            check_mechanisms()]


def render(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        line = f"{mark}  {c.name}: {c.detail}"
        if not c.ok and c.fix:
            line += f" -- fix: {c.fix}"
        lines.append(line)
    return "\n".join(lines)


@click.command()
def doctor() -> None:
    """Check that memtrace can run here, one line per requirement with the fix."""
    checks = run_checks()
    echo(render(checks))
    failed = [c for c in checks if c.required and not c.ok]
    if failed:
        codes = {"BCC": ExitCode.NO_BCC, "kernel headers": ExitCode.NO_HEADERS,
                 "privileges": ExitCode.NOT_ROOT, "tracepoints": ExitCode.NO_TRACEFS}
        # Without privileges every other failure follows from it: say that first.
        first = next((c for c in failed if c.name == "privileges"), failed[0])
        sys.exit(codes.get(first.name, ExitCode.INTERNAL))
