"""`memtrace libs`: the machine view of shared libraries (like Android's
librank). For each library, all of its segments summed (file-backed
mappings of one file, by device and inode, plus the bss: the anonymous rw-p
mapping that directly follows the library's file-backed rw-p data segment),
the processes that map it with their RSS, PSS and USS, and totals; then the
per-process totals over all mappings. The report, its renderers and the command."""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import click

from memtrace.commands.oneshot import echo
from memtrace.commands.options import EXIT_CODES_HELP
from memtrace.errors import ExitCode, MemtraceError
from memtrace.pss.accounting import Usage
from memtrace.pss.reader import KPageCounts, PssReader
from memtrace.trace.attribution import classify
from memtrace.trace.procfs import PAGE_SIZE, PF_KTHREAD, ProcFS, Vma
from memtrace.util.elf import load_span
from memtrace.util.units import fmt_bytes

SORT_KEYS = ("rss", "pss", "uss", "name")
FORMATS = ("table", "json", "csv")
LibKey = tuple[str, int]   # (device "maj:min", inode)


@dataclass
class Library:
    key: LibKey
    path: str
    per_pid: dict[int, Usage] = field(default_factory=dict)

    @property
    def total(self) -> Usage:
        out = Usage()
        for u in self.per_pid.values():
            out.add(u)
        return out


@dataclass
class ProcessUsage:
    pid: int
    comm: str
    total: Usage


@dataclass
class Report:
    libraries: dict[LibKey, Library] = field(default_factory=dict)
    processes: list[ProcessUsage] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


ElfSpans = dict[LibKey, "tuple[int, int] | None"]


def _read_elf_span(pid: int, proc_root: str, vma: Vma) -> tuple[int, int] | None:
    for path in (os.fsencode(f"{proc_root}/{pid}/map_files/{vma.start:x}-{vma.end:x}"),
                 os.fsencode(f"{proc_root}/{pid}/root") + vma.path):
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError:
            continue
        return load_span(head)
    return None


def library_of(vmas: Sequence[Vma], exe: bytes, all_files: bool = False,
               elf_span: Callable[[Vma], tuple[int, int] | None] | None = None,
               ) -> list[tuple[Vma, LibKey | None]]:
    """The VMAs as pieces, each with the library it belongs to (None: not a
    library segment). Library segments are its file-backed mappings and its
    bss: the part of the anonymous rw-p mapping right after the library's
    last file-backed segment that lies below the end of its last PT_LOAD
    (`elf_span(first segment)` gives the ELF's load span; the kernel may have
    merged the bss with a later anonymous mapping, so the VMA is split there).
    With `all_files`, every file-backed mapping (executables, data files)
    counts."""
    kinds = ("library", "executable", "file") if all_files else ("library",)
    out: list[tuple[Vma, LibKey | None]] = []
    first: dict[LibKey, Vma] = {}
    prev: Vma | None = None
    prev_key: LibKey | None = None
    for vma in vmas:
        key: LibKey | None = None
        if vma.inode and classify(vma, exe) in kinds:
            key = (vma.dev, vma.inode)
            first.setdefault(key, vma)
            out.append((vma, key))
        elif (prev_key is not None and prev is not None and not vma.path and vma.inode == 0
              and vma.perms == "rw-p" and vma.start == prev.end and elf_span is not None):
            bss_end = _bss_end(first[prev_key], elf_span)
            if bss_end is not None and bss_end > vma.start:
                cut = min(bss_end, vma.end)
                out.append((replace(vma, end=cut), prev_key))
                if cut < vma.end:
                    out.append((replace(vma, start=cut, offset=0), None))
            else:
                out.append((vma, None))
        else:
            out.append((vma, None))
        prev, prev_key = vma, key
    return out


def _bss_end(first_seg: Vma, elf_span: Callable[[Vma], tuple[int, int] | None]) -> int | None:
    span = elf_span(first_seg)
    if span is None or first_seg.offset != 0:
        return None
    page = PAGE_SIZE
    bias = first_seg.start - (span[0] & ~(page - 1))
    return (bias + span[1] + page - 1) & ~(page - 1)


def _pids_all(procfs: ProcFS, report: Report) -> list[int]:
    own = os.getpid()
    pids = []
    for name in os.listdir(procfs.root):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == own:
            continue
        try:
            st = procfs.stat(pid)
        except FileNotFoundError:
            report.skipped["exited"] += 1
            continue
        except (OSError, ValueError, IndexError):
            report.skipped["unreadable"] += 1
            continue
        if st.flags & PF_KTHREAD:
            report.skipped["kernel_threads"] += 1
        elif st.state in ("Z", "X"):
            report.skipped["zombies"] += 1
        else:
            pids.append(pid)
    return sorted(pids)


def collect(pids: Iterable[int] | None, procfs: ProcFS | None = None,
            all_files: bool = False, counts: KPageCounts | None = None,
            strict: bool = False) -> Report:
    """Walk the processes (`pids`, or every process when None). A process that
    exits during the walk is skipped and counted; one whose files cannot be
    read is skipped and counted, or, with `strict` (PIDs named by the user),
    an error."""
    procfs = procfs or ProcFS()
    report = Report()
    targets = list(pids) if pids is not None else _pids_all(procfs, report)
    own_counts = counts is None
    kpc = counts if counts is not None else _open_counts(str(procfs.root))
    spans: ElfSpans = {}
    try:
        for pid in targets:
            try:
                _one(pid, procfs, kpc, all_files, report, spans)
            except (ProcessLookupError, FileNotFoundError):
                report.skipped["exited"] += 1
            except PermissionError as e:
                if strict:
                    raise MemtraceError(f"cannot read /proc/{pid}: {e.strerror}",
                                        ExitCode.NOT_ROOT) from None
                report.skipped["unreadable"] += 1
            except OSError as e:
                if not procfs.alive(pid):
                    report.skipped["exited"] += 1
                elif strict:
                    raise MemtraceError(f"cannot read /proc/{pid}: {e.strerror}",
                                        ExitCode.NO_SUCH_PROCESS) from None
                else:
                    report.skipped["unreadable"] += 1
    finally:
        if own_counts:
            kpc.close()
    return report


def _open_counts(proc_root: str) -> KPageCounts:
    try:
        return KPageCounts(proc_root)
    except PermissionError:
        raise MemtraceError(f"cannot read {proc_root}/kpagecount: PSS needs root "
                            "(CAP_SYS_ADMIN)", ExitCode.NOT_ROOT) from None


def _cached_span(spans: ElfSpans, pid: int, proc_root: str, vma: Vma) -> tuple[int, int] | None:
    key = (vma.dev, vma.inode)
    if key not in spans:
        spans[key] = _read_elf_span(pid, proc_root, vma)
    return spans[key]


def _one(pid: int, procfs: ProcFS, kpc: KPageCounts, all_files: bool, report: Report,
         spans: ElfSpans) -> None:
    stat = procfs.stat(pid)
    vmas = procfs.maps(pid)
    if not vmas:    # exited between stat and maps (or a kernel thread)
        raise ProcessLookupError(pid)
    exe = procfs.exe(pid)
    root = str(procfs.root)
    pieces = library_of(vmas, exe, all_files,
                        lambda v: _cached_span(spans, pid, root, v))
    with PssReader(pid, root, kpc) as reader:
        usages = reader.usage([v for v, _ in pieces])
    # The same start time: still the process whose maps we read.
    if procfs.stat(pid).start_time != stat.start_time:
        raise ProcessLookupError(pid)
    total = Usage()
    for u in usages:
        total.add(u)
    report.processes.append(ProcessUsage(pid, stat.comm, total))
    for (vma, key), u in zip(pieces, usages, strict=True):
        if key is None:
            continue
        lib = report.libraries.get(key)
        if lib is None:
            lib = report.libraries[key] = Library(key, vma.display_path)
        mine = lib.per_pid.get(pid)
        if mine is None:
            lib.per_pid[pid] = Usage(u.rss, u.pss_fixed, u.uss, u.swap)
        else:
            mine.add(u)


# -- output ------------------------------------------------------------------
def _sort_key(sort: str, name: str, u: Usage) -> tuple[int, str]:
    value = {"rss": u.rss, "pss": u.pss_fixed, "uss": u.uss}.get(sort, 0)
    return (-value, name)


def sorted_libraries(report: Report, sort: str) -> list[Library]:
    return sorted(report.libraries.values(), key=lambda lib: _sort_key(sort, lib.path, lib.total))


def _comms(report: Report) -> dict[int, str]:
    return {p.pid: p.comm for p in report.processes}


def _usage_dict(u: Usage) -> dict[str, int]:
    return {"rss_bytes": u.rss, "pss_bytes": u.pss, "uss_bytes": u.uss, "swap_bytes": u.swap}


def _grand_total(report: Report) -> Usage:
    out = Usage()
    for p in report.processes:
        out.add(p.total)
    return out


def render_json(report: Report, sort: str) -> str:
    comms = _comms(report)
    libs = []
    for lib in sorted_libraries(report, sort):
        procs = sorted(lib.per_pid.items(), key=lambda kv: _sort_key(sort, comms[kv[0]], kv[1]))
        libs.append({"path": lib.path, "dev": lib.key[0], "inode": lib.key[1],
                     **_usage_dict(lib.total), "process_count": len(procs),
                     "processes": [{"pid": pid, "comm": comms[pid], **_usage_dict(u)}
                                   for pid, u in procs]})
    processes = sorted(report.processes, key=lambda p: _sort_key(sort, p.comm, p.total))
    return json.dumps({
        "libraries": libs,
        "processes": [{"pid": p.pid, "comm": p.comm, **_usage_dict(p.total)} for p in processes],
        "totals": {**_usage_dict(_grand_total(report)), "process_count": len(processes),
                   "library_count": len(libs)},
        "skipped": dict(sorted(report.skipped.items())),
    }, indent=2)


def render_csv(report: Report, sort: str) -> str:
    """One row per library total (pid empty) followed by its processes; then
    one row per process total (library "[total]")."""
    comms = _comms(report)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["library", "pid", "comm", "rss_bytes", "pss_bytes", "uss_bytes", "swap_bytes"])
    for lib in sorted_libraries(report, sort):
        t = lib.total
        w.writerow([lib.path, "", "", t.rss, t.pss, t.uss, t.swap])
        for pid, u in sorted(lib.per_pid.items(),
                             key=lambda kv: _sort_key(sort, comms[kv[0]], kv[1])):
            w.writerow([lib.path, pid, comms[pid], u.rss, u.pss, u.uss, u.swap])
    for p in sorted(report.processes, key=lambda p: _sort_key(sort, p.comm, p.total)):
        t = p.total
        w.writerow(["[total]", p.pid, p.comm, t.rss, t.pss, t.uss, t.swap])
    return buf.getvalue().rstrip("\n")


def _row(u: Usage, rest: str, exact: bool) -> str:
    w = 12 if exact else 10
    return (f"{fmt_bytes(u.rss, exact):>{w}} {fmt_bytes(u.pss, exact):>{w}} "
            f"{fmt_bytes(u.uss, exact):>{w}} {fmt_bytes(u.swap, exact):>{w}}  {rest}")


def render_table(report: Report, sort: str, exact: bool = False) -> str:
    """The table of `memtrace libs`: IEC units (memtrace.util.units), or exact
    bytes (--bytes)."""
    comms = _comms(report)
    w = 12 if exact else 10

    def head(what: str) -> str:
        return f"{'RSS':>{w}} {'PSS':>{w}} {'USS':>{w}} {'Swap':>{w}}  {what}"

    lines = [head("LIBRARY / PROCESS [PID]")]
    for lib in sorted_libraries(report, sort):
        lines.append(_row(lib.total, f"{lib.path} ({len(lib.per_pid)} processes)", exact))
        for pid, u in sorted(lib.per_pid.items(),
                             key=lambda kv: _sort_key(sort, comms[kv[0]], kv[1])):
            lines.append(_row(u, f"    {comms[pid]} [{pid}]", exact))
    lines.append("")
    lines.append(head("PROCESS TOTALS (all mappings)"))
    for p in sorted(report.processes, key=lambda p: _sort_key(sort, p.comm, p.total)):
        lines.append(_row(p.total, f"{p.comm} [{p.pid}]", exact))
    lines.append(_row(_grand_total(report), f"TOTAL ({len(report.processes)} processes, "
                      f"{len(report.libraries)} libraries)", exact))
    if report.skipped:
        lines.append("skipped: " + ", ".join(f"{n} {what.replace('_', ' ')}"
                                             for what, n in sorted(report.skipped.items())))
    return "\n".join(lines)


RENDERERS = {"table": render_table, "json": render_json, "csv": render_csv}


def libs_command(pids: Sequence[int], all_: bool, sort: str, fmt: str,
                 all_files: bool = False, procfs: ProcFS | None = None,
                 exact: bool = False) -> str:
    """What `memtrace libs` prints; MemtraceError for bad input."""
    procfs = procfs or ProcFS()
    if bool(pids) == all_:
        raise MemtraceError("give PIDs or --all (one of them)", ExitCode.USAGE)
    if os.geteuid() != 0:
        raise MemtraceError("memtrace libs needs root: PSS reads page frame numbers "
                            "and /proc/kpagecount", ExitCode.NOT_ROOT)
    targets: list[int] | None = None
    if pids:
        targets = list(dict.fromkeys(pids))
        for pid in targets:
            procfs.check_target(pid)
    report = collect(targets, procfs, all_files, strict=bool(pids))
    if fmt == "table":
        return render_table(report, sort, exact)
    return RENDERERS[fmt](report, sort)


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("pids", nargs=-1, type=int)
@click.option("--all", "all_", is_flag=True, help="Every process (kernel threads, zombies "
              "and memtrace itself left out; processes that exit during the walk or "
              "cannot be read are skipped and counted).")
@click.option("--sort", type=click.Choice(["rss", "pss", "uss", "name"]), default="pss",
              show_default=True, help="Order of libraries, and of processes within each.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True)
@click.option("--all-files", is_flag=True, help="Count every file-backed mapping "
              "(executables, data files), not only shared libraries.")
@click.option("--bytes", "exact", is_flag=True,
              help="Exact byte counts in the table instead of KiB/MiB/GiB.")
def libs(pids: tuple[int, ...], all_: bool, sort: str, fmt: str, all_files: bool,
         exact: bool) -> None:
    """Shared libraries and who pays for them (like Android's librank): per
    library (all segments: text, rodata/relro, data, bss) the processes mapping
    it with their RSS, PSS (each page divided by its map count) and USS (pages
    mapped only once), and totals; then per-process totals. Figures equal
    smaps Rss, Pss and Private_Clean + Private_Dirty. Needs root.

    memtrace libs PID [PID ...] | memtrace libs --all"""
    echo(libs_command(pids, all_, sort, fmt, all_files, exact=exact))
