"""`memtrace explain`: what /proc/PID/statm, /proc/PID/status and /proc/meminfo
say, in plain words, next to memtrace's own figures.

Pure apart from reading files under an injectable /proc root: the parsers and
the renderers run on fixture trees in tests. memtrace's figures (a one-shot
exact scan of the process, `memtrace.snapshot`) are passed in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memtrace.trace.procfs import PAGE_SIZE, escape_name
from memtrace.util.units import fmt_bytes

STATM_FIELDS = ("size", "resident", "shared", "text", "lib", "data", "dt")

# statm field -> (the /proc/PID/status line that says the same, plain words)
STATM_MEANING: dict[str, tuple[str, str]] = {
    "size": ("VmSize", "virtual size: every mapping, touched or not (reservations, "
             "guard pages and untouched malloc arenas included); costs no memory by itself"),
    "resident": ("VmRSS", "pages in RAM mapped by this process (RssAnon + RssFile + "
                 "RssShmem); pages shared with other processes count in full in each"),
    "shared": ("RssFile+RssShmem", "resident pages backed by a file or by shared memory: "
               "they *can* be shared (libraries, page cache, tmpfs), whether or not another "
               "process maps them; resident minus shared is the anonymous memory"),
    "text": ("VmExe", "virtual size of the executable's own code (not libraries, not "
             "resident bytes)"),
    "lib": ("VmLib", "always 0 since Linux 2.6; status VmLib has the virtual size of the "
            "other executable mappings (library code)"),
    "data": ("VmData+VmStk", "virtual size of private writable memory (heap, anonymous "
             "mappings, data segments) plus the stack: a promise, not a use; RssAnon is "
             "what is really resident"),
    "dt": ("", "always 0 since Linux 2.6 (it counted dirty pages once)"),
}

STATUS_FIELDS = ("VmPeak", "VmSize", "VmLck", "VmPin", "VmHWM", "VmRSS", "RssAnon",
                 "RssFile", "RssShmem", "VmData", "VmStk", "VmExe", "VmLib", "VmPTE",
                 "VmSwap")
STATUS_MEANING = {
    "VmPeak": "largest virtual size so far",
    "VmHWM": "largest resident size so far (high-water mark)",
    "VmLck": "locked in RAM (mlock)",
    "VmPin": "pinned (by drivers, RDMA, io_uring buffers)",
    "RssAnon": "resident anonymous pages (heap, stacks, private copies): only this "
               "process (or its forked relatives) uses them",
    "RssFile": "resident pages of mapped files (code, data files); the kernel can drop "
               "clean ones and read them again",
    "RssShmem": "resident shared memory (tmpfs, memfd, SysV, shared anonymous)",
    "VmPTE": "page tables of this process (kernel memory, not in RSS)",
    "VmSwap": "anonymous pages swapped out (not in RSS)",
}

MEMINFO_FIELDS = ("MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached", "SwapCached",
                  "Shmem", "Active(file)", "Inactive(file)", "AnonPages", "Mapped", "Dirty",
                  "SReclaimable", "SUnreclaim", "SwapTotal", "SwapFree")
MEMINFO_MEANING = {
    "MemTotal": "RAM the kernel manages (physical RAM minus firmware and kernel image)",
    "MemFree": "pages nobody uses at all; small on a healthy machine, because Linux fills "
               "spare RAM with page cache",
    "MemAvailable": "the kernel's estimate of what new work can get without swapping: free "
                    "pages plus the page cache and slab it can reclaim, minus reserves",
    "Buffers": "cache of block-device blocks (filesystem metadata); reclaimable",
    "Cached": "page cache: file contents kept in RAM, plus Shmem; clean file pages are "
              "reclaimable",
    "SwapCached": "swapped-out pages that are also still in RAM",
    "Shmem": "tmpfs, /dev/shm, memfd, SysV and shared anonymous memory: counted in Cached, "
             "but cannot be dropped, only swapped",
    "Active(file)": "page cache used recently",
    "Inactive(file)": "page cache not used recently: reclaimed first",
    "AnonPages": "anonymous memory of all processes (what RssAnon sums to)",
    "Mapped": "page cache mapped into some process (libraries, mmap'd files)",
    "Dirty": "file pages waiting to be written back",
    "SReclaimable": "kernel slab caches that can be freed (dentries, inodes)",
    "SUnreclaim": "kernel slab that cannot be freed",
    "SwapTotal": "swap space",
    "SwapFree": "unused swap space",
}


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def parse_kb_fields(data: bytes) -> dict[str, int]:
    """`Name:   1234 kB` lines (meminfo, status) to bytes; other lines skipped."""
    out: dict[str, int] = {}
    for line in data.decode("ascii", "replace").splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * 1024
    return out


def machine_view(proc_root: str | Path = "/proc") -> dict[str, Any]:
    """/proc/meminfo explained, with the figures free(1) derives from it."""
    mi = parse_kb_fields(_read(Path(proc_root) / "meminfo"))
    g = mi.get
    available = g("MemAvailable")
    derived = {      # as procps-ng 4 free(1) computes them
        "used_bytes": g("MemTotal", 0) - available if available is not None else None,
        "buff_cache_bytes": g("Buffers", 0) + g("Cached", 0) + g("SReclaimable", 0),
        "page_cache_without_shmem_bytes": max(0, g("Cached", 0) - g("Shmem", 0)),
    }
    fields = [{"name": k, "bytes": mi[k], "meaning": MEMINFO_MEANING[k]}
              for k in MEMINFO_FIELDS if k in mi]
    return {"meminfo": {k: mi[k] for k in MEMINFO_FIELDS if k in mi}, "derived": derived,
            "fields": fields, "summary": machine_summary(mi)}


def machine_summary(mi: dict[str, int]) -> str:
    """One line: why "free" looks small."""
    total, free = mi.get("MemTotal", 0), mi.get("MemFree", 0)
    avail = mi.get("MemAvailable")
    shmem = mi.get("Shmem", 0)
    cache = mi.get("Cached", 0) - shmem + mi.get("Buffers", 0)
    return (f"machine: RAM {fmt_bytes(total)}, free {fmt_bytes(free)} (unused), "
            f"available {fmt_bytes(avail)} "
            f"(free + what the kernel can reclaim); page cache + buffers {fmt_bytes(cache)}, "
            f"shmem {fmt_bytes(shmem)} (cannot be dropped)")


def meminfo_summary(proc_root: str | Path = "/proc") -> str | None:
    """machine_summary of the current /proc/meminfo, None when unreadable."""
    try:
        return machine_summary(parse_kb_fields(_read(Path(proc_root) / "meminfo")))
    except OSError:
        return None


def process_view(pid: int, proc_root: str | Path = "/proc",
                 snap: dict[str, Any] | None = None,
                 page_size: int = PAGE_SIZE) -> dict[str, Any]:
    """statm and status of one process explained, next to memtrace's figures
    (`snap`: a snapshot of the process, or None)."""
    d = Path(proc_root) / str(pid)
    statm_pages = [int(x) for x in _read(d / "statm").split()]
    statm = dict(zip(STATM_FIELDS, statm_pages))
    status = parse_kb_fields(_read(d / "status"))
    # the kernel ends comm with one newline; a comm may hold others (escaped)
    comm = escape_name(_read(d / "comm").removesuffix(b"\n")) if (d / "comm").exists() else ""
    ours = memtrace_figures(snap) if snap is not None else {}
    rows = []
    for name in STATM_FIELDS:
        src, meaning = STATM_MEANING[name]
        status_bytes = None
        if src and all(p in status for p in src.split("+")):
            status_bytes = sum(status[p] for p in src.split("+"))
        rows.append({"field": f"statm {name}", "status": src or None,
                     "bytes": statm.get(name, 0) * page_size, "status_bytes": status_bytes,
                     "memtrace_bytes": ours.get(name), "memtrace": MEMTRACE_SAYS.get(name),
                     "meaning": meaning})
    extra = [{"field": k, "bytes": status[k], "meaning": STATUS_MEANING[k]}
             for k in STATUS_FIELDS if k in status and k in STATUS_MEANING]
    return {"pid": pid, "comm": comm, "page_size": page_size,
            "statm_pages": statm, "status": {k: status[k] for k in STATUS_FIELDS if k in status},
            "rows": rows, "status_rows": extra, "memtrace": ours or None}


# What memtrace's column holds for each statm row.
MEMTRACE_SAYS = {
    "size": "sum of its mapping sizes, less [vsyscall] (a gate the kernel shows in maps "
            "but does not count)",
    "resident": "resident bytes summed over mappings (exact per page table)",
    "shared": "file + shmem resident bytes",
    "text": "resident bytes of the executable's text segment (of its virtual size)",
    "lib": "virtual size of library text segments",
    "data": "anonymous resident bytes (of the virtual size statm counts)",
    "dt": None,
}


def memtrace_figures(snap: dict[str, Any]) -> dict[str, int]:
    """The figures memtrace's snapshot gives for each statm row."""
    maps = snap["mappings"]
    exe_text = [m for m in maps if m["kind"] == "executable" and m.get("segment") == "text"]
    lib_text = [m for m in maps if m["kind"] == "library" and m.get("segment") == "text"]
    return {
        "size": snap["virtual_bytes"] - sum(m["virtual_bytes"] for m in maps
                                            if m.get("path") == "[vsyscall]"),
        "resident": snap["rss_bytes"],
        "shared": snap["file_bytes"] + snap["shmem_bytes"],
        "text": sum(m["rss_bytes"] for m in exe_text),
        "text_virtual": sum(m["virtual_bytes"] for m in exe_text),
        "lib": sum(m["virtual_bytes"] for m in lib_text),
        "lib_resident": sum(m["rss_bytes"] for m in lib_text),
        "data": snap["anon_bytes"],
    }


def explain(pid: int | None, proc_root: str | Path = "/proc",
            snap: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if pid is not None:
        out["process"] = process_view(pid, proc_root, snap)
    out["machine"] = machine_view(proc_root)
    return out


def render_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)


def render_text(report: dict[str, Any], width: int = 100) -> str:
    """Plain text (no colours): one block per view."""
    import textwrap

    lines: list[str] = []

    def wrap(text: str, indent: int) -> list[str]:
        return textwrap.wrap(text, width=width, initial_indent=" " * indent,
                             subsequent_indent=" " * indent)

    proc = report.get("process")
    if proc:
        lines.append(f"process {proc['pid']} ({proc['comm']}): /proc/{proc['pid']}/statm "
                     f"(pages of {proc['page_size']} B) and status, with memtrace's figures")
        lines.append(f"  {'field':<16} {'/proc says':>11} {'status':>26} {'memtrace':>11}")
        for r in proc["rows"]:
            status = f"{r['status']} {fmt_bytes(r['status_bytes'])}" if r["status"] else ""
            ours = fmt_bytes(r["memtrace_bytes"]) if r["memtrace_bytes"] is not None else ""
            lines.append(f"  {r['field']:<16} {fmt_bytes(r['bytes']):>11} {status:>26} {ours:>11}")
            lines += wrap(r["meaning"], 6)
            if r["memtrace"] and r["memtrace_bytes"] is not None:
                lines += wrap(f"memtrace: {r['memtrace']}", 6)
        lines.append("  status only:")
        for r in proc["status_rows"]:
            lines.append(f"  {r['field']:<16} {fmt_bytes(r['bytes']):>11}")
            lines += wrap(r["meaning"], 6)
        if proc["memtrace"] is None:
            lines.append("  (memtrace's figures need root: an exact scan of the page tables)")
        lines.append("")
    m = report["machine"]
    lines.append("machine: /proc/meminfo")
    for f in m["fields"]:
        lines.append(f"  {f['name']:<16} {fmt_bytes(f['bytes']):>11}")
        lines += wrap(f["meaning"], 6)
    d = m["derived"]
    lines.append(f"  free(1) 'used' = MemTotal - MemAvailable = {fmt_bytes(d['used_bytes'])}; "
                 "'buff/cache' = Buffers + Cached + SReclaimable = "
                 f"{fmt_bytes(d['buff_cache_bytes'])}")
    lines.append(f"  page cache without shmem (Cached - Shmem) = "
                 f"{fmt_bytes(d['page_cache_without_shmem_bytes'])}")
    lines.append(m["summary"])
    return "\n".join(lines)
