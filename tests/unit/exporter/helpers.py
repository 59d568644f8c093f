"""Building exporter state by hand and reading scrapes back (no root, no BCC).

Snapshots have the shape of memtrace.snapshot.snapshot(); only the keys
the exporter reads need to be meaningful, the others are filled in."""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import ssl
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from memtrace.exporter.collector import MemtraceCollector
from memtrace.published import StateBox, TickState

PAGE = 4096
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"


def mapping(path: str, kind: str, *, start: int = 0, size: int = 16 * PAGE, anon: int = 0,
            file: int = 0, shmem: int = 0, perms: str = "r--p", identity: str | None = None,
            faults: int = 0) -> dict[str, Any]:
    if identity is None:
        identity = {"anon": "[anon]", "stack": "[stack]"}.get(kind, path)
    return {
        "start": start, "end": start + size, "perms": perms, "offset": 0, "path": path,
        "kind": kind, "mapping": identity, "rss_bytes": anon + file + shmem,
        "anon_bytes": anon, "file_bytes": file, "shmem_bytes": shmem,
        "virtual_bytes": size, "faults": faults,
    }


def place(maps: list[dict[str, Any]], base: int = 0x5555_0000_0000) -> list[dict[str, Any]]:
    """Give the mappings consecutive, non-overlapping addresses (in list order)."""
    addr = base
    for m in maps:
        size = m["virtual_bytes"]
        m["start"], m["end"] = addr, addr + size
        addr += size + PAGE
    return maps


def snapshot(pid: int, comm: str, maps: list[dict[str, Any]], *,
             faults_by_mapping: dict[str, int] | None = None,
             syscalls: dict[str, int] | None = None,
             syscall_bytes: dict[str, int] | None = None,
             drift: int = 0) -> dict[str, Any]:
    anon = sum(m["anon_bytes"] for m in maps)
    file = sum(m["file_bytes"] for m in maps)
    shmem = sum(m["shmem_bytes"] for m in maps)
    fbm = dict(faults_by_mapping or {})
    return {
        "ts": 1_700_000_000.0, "pid": pid, "comm": comm,
        "rss_bytes": anon + file + shmem, "anon_bytes": anon, "file_bytes": file,
        "shmem_bytes": shmem, "virtual_bytes": sum(m["virtual_bytes"] for m in maps),
        "statm_rss_bytes": anon + file + shmem - drift, "drift_bytes": drift,
        "peak_rss_bytes": anon + file + shmem + 2 * PAGE,
        "minor_faults": 1000 + sum(fbm.values()), "major_faults": 3,
        "faults": sum(fbm.values()), "faults_by_mapping": fbm,
        "syscalls": dict(syscalls or {}), "syscall_bytes": dict(syscall_bytes or {}),
        "full_rescans": {"attach": 1}, "events_lost": 0, "events_sampled_out": 0,
        "tick_seconds": 0.001, "mappings": maps,
    }


def realistic_process(pid: int, comm: str = "server") -> dict[str, Any]:
    """An ordinary process: an executable and libc in several segments each,
    heap, anonymous regions, a stack, a shared memfd, vdso."""
    exe = f"/usr/local/bin/{comm}"
    maps = [
        mapping(exe, "executable", size=4 * PAGE, file=4 * PAGE),
        mapping(exe, "executable", size=64 * PAGE, file=40 * PAGE, perms="r-xp"),
        mapping(exe, "executable", size=8 * PAGE, file=2 * PAGE, anon=6 * PAGE, perms="rw-p"),
        mapping("[heap]", "heap", size=300 * PAGE, anon=250 * PAGE, perms="rw-p"),
        mapping("", "anon", size=1024 * PAGE, anon=700 * PAGE, perms="rw-p"),
        mapping(LIBC, "library", size=40 * PAGE, file=40 * PAGE),
        mapping(LIBC, "library", size=380 * PAGE, file=200 * PAGE, perms="r-xp"),
        mapping(LIBC, "library", size=90 * PAGE, file=30 * PAGE),
        mapping(LIBC, "library", size=4 * PAGE, file=1 * PAGE, anon=3 * PAGE),
        mapping(LIBC, "library", size=2 * PAGE, anon=2 * PAGE, perms="rw-p"),
        mapping("", "anon", size=10 * PAGE, anon=10 * PAGE, perms="rw-p"),
        mapping("/memfd:cache (deleted)", "shmem", size=256 * PAGE, shmem=128 * PAGE,
                perms="rw-s"),
        mapping("[anon:jemalloc]", "anon", size=512 * PAGE, anon=100 * PAGE, perms="rw-p",
                identity="[anon:jemalloc]"),
        mapping("[stack]", "stack", size=33 * PAGE, anon=12 * PAGE, perms="rw-p"),
        mapping("[vvar]", "special", size=4 * PAGE),
        mapping("[vdso]", "special", size=2 * PAGE, file=PAGE, perms="r-xp"),
    ]
    snap = snapshot(pid, comm, place(maps),
                    faults_by_mapping={"[heap]": 250, "[anon]": 710, LIBC: 12},
                    syscalls={"brk": 3, "mmap": 20, "munmap": 4, "madvise": 1, "mprotect": 7},
                    syscall_bytes={"brk": 3 * 135168, "mmap": 20 * 65536, "munmap": 4 * 65536})
    # a plugin dlopen'ed twice and dlclose'd once (memtrace/libevents.py)
    snap["library_totals"] = {"/opt/plugins/libx.so": {
        "loads": 2, "unloads": 1, "loaded_bytes": 2 * 40 * PAGE, "unloaded_bytes": 40 * PAGE,
        "unloaded_rss_bytes": 12 * PAGE}}
    return snap


def stack_entry(nbytes: int, mapping: str, frames: list[str], kind: str = "heap",
                samples: int = 4) -> dict[str, Any]:
    """One stack of a snapshot's `stacks` lists (memtrace.stacks.summary)."""
    return {"bytes": nbytes, "mapping": mapping, "kind": kind, "samples": samples,
            "truncated": frames[-1:] == ["[truncated]"], "frames": frames}


def with_stacks(snap: dict[str, Any], seed: int) -> dict[str, Any]:
    """Give a snapshot a `stacks` object (--stacks) whose lists hold more stacks
    than the fixtures serve, sorted as the summary sorts them: names to escape
    and cut, a function without a symbol, a `;` in a name, two stacks that
    differ only beyond the kept innermost frames, [unsampled], a zero."""
    exe = snap["comm"]
    base = [f"main ({exe})", "__libc_start_call_main (libc.so.6)", f"_start ({exe})"]
    deep = [f"level{i} (app)" for i in range(10)]
    memset = "__memset_avx2_unaligned_erms (libc.so.6)"
    cpp = ("std::vector<std::pair<std::string, std::map<int, std::string>>>::"
           "_M_realloc_insert(iterator, value_type&&)") * 2 + " (libapp.so)"
    unknown = ["[unknown] (libc.so.6)", "parse;line (app)", 'say "hi"\\n (app)', *base]
    held = [
        stack_entry(seed * 64 * PAGE * 256, "[heap]", [memset, "fill_cache (app)", *base]),
        stack_entry(seed * 16 * PAGE * 256, "[anon]", [memset, *deep, "path_a (app)", *base],
                    kind="anon"),
        stack_entry(seed * 8 * PAGE * 256, "[anon]", [memset, *deep, "path_b (app)", *base],
                    kind="anon"),
        stack_entry(seed * 5 * PAGE * 256, "[heap]", [cpp, *base]),
        stack_entry(seed * 4 * PAGE * 256, LIBC, unknown, kind="library"),
        stack_entry(seed * PAGE, "[stack]", ["[unsampled]"], kind="stack", samples=0),
        stack_entry(0, "[heap]", ["idle (app)", *base]),
    ]
    brought = [
        stack_entry(seed * 80 * PAGE * 256, "[anon]", [memset, "load_all (app)", *base],
                    kind="anon"),
        stack_entry(seed * 64 * PAGE * 256, "[heap]", [memset, "fill_cache (app)", *base]),
        stack_entry(seed * 5 * PAGE * 256, "[heap]", [cpp, *base]),
        stack_entry(seed * 4 * PAGE * 256, LIBC, unknown, kind="library"),
        stack_entry(PAGE, "[anon]", ["tiny (app)", *base], kind="anon"),
    ]
    snap["stacks"] = {"period_bytes": 524288, "samples": 1000 * seed, "lost": 0,
                      "held_bytes": snap["rss_bytes"],
                      "brought_bytes": sum(e["bytes"] for e in brought),
                      "held": held, "brought": brought}
    return snap


def state_of(*snaps: dict[str, Any], **kw: Any) -> TickState:
    return TickState(snapshots={s["pid"]: s for s in snaps}, **kw)


# How registry_for exposes the collector (test_collector runs every test in each):
#   "collect"      prometheus_client renders MemtraceCollector.collect();
#   "text"         MemtraceCollector.render_text(), the text fast path `memtrace
#                  watch` serves, parsed back (so every assertion checks it too);
#   "text-cached"  the same, with every snapshot carrying a generation derived from
#                  its content (as the watch loop's generation: it changes exactly
#                  when the content other than ts/tick_seconds does), so unchanged
#                  snapshots are served from the collector's per-process cache.
MODE = "collect"


def content_generation(snap: dict[str, Any]) -> int:
    body = repr([(k, v) for k, v in snap.items()
                 if k not in ("ts", "tick_seconds", "generation")])
    return int.from_bytes(hashlib.sha256(body.encode("utf-8", "surrogatepass")).digest()[:8],
                          "big")


class GenerationBox(StateBox):
    """A StateBox whose snapshots carry content_generation() (new dicts each get,
    as each tick of the watch loop makes new ones)."""

    def get(self) -> TickState:
        state = super().get()
        return dataclasses.replace(state, snapshots={
            pid: {**snap, "generation": content_generation(snap)}
            for pid, snap in state.snapshots.items()})


class TextPath(Collector):
    """The collector's text fast path, parsed back into metric families."""

    def __init__(self, collector: MemtraceCollector) -> None:
        self.collector = collector

    def collect(self) -> Iterator[Metric]:
        yield from text_string_to_metric_families(self.collector.render_text())


def registry_for(state: TickState, max_series: int = 50) -> tuple[
        CollectorRegistry, StateBox, MemtraceCollector]:
    box = GenerationBox() if MODE == "text-cached" else StateBox()
    box.set(state)
    collector = MemtraceCollector(box, max_series)
    reg = CollectorRegistry()
    reg.register(collector if MODE == "collect" else TextPath(collector))
    return reg, box, collector


def render(reg: CollectorRegistry) -> str:
    """One scrape as text; the bytes must be strict UTF-8."""
    return generate_latest(reg).decode("utf-8")


class Scrape:
    """A parsed scrape: families by name and samples by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (s.name, dict(s.labels), s.value)
            for f in self.families.values() for s in f.samples]

    def series(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [(lab, v) for n, lab, v in self.samples
                if n == name and all(lab.get(k) == w for k, w in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        found = self.series(name, **labels)
        assert len(found) == 1, f"expected one {name}{labels}, got {found}"
        return found[0][1]

    def total(self, name: str, **labels: str) -> float:
        return sum(v for _, v in self.series(name, **labels))

    def label_values(self, name: str, label: str, **labels: str) -> set[str]:
        return {lab[label] for lab, _ in self.series(name, **labels)}

    def duplicates(self) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
        keys = Counter((n, tuple(sorted(lab.items()))) for n, lab, _ in self.samples)
        return [k for k, c in keys.items() if c > 1]


def scrape(reg: CollectorRegistry) -> Scrape:
    return Scrape(render(reg))


# ---------------------------------------------------------------------------
# HTTP(S) client


def get(port: int, path: str = "/metrics", *, tls: ssl.SSLContext | None = None,
        headers: dict[str, str] | None = None, timeout: float = 5.0,
        host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    conn: http.client.HTTPConnection
    if tls is not None:
        conn = http.client.HTTPSConnection(host, port, context=tls, timeout=timeout)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()
