"""MemtraceCollector: metrics built fresh from hand-made TickState, rendered
with prometheus_client.generate_latest and parsed back (no root, no BCC)."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import subprocess
import threading

import pytest
from prometheus_client.process_collector import ProcessCollector

from memtrace.exporter.rows import OTHER, TYPES_BY_KIND
from memtrace.published import TickState

from . import helpers
from .helpers import (
    LIBC,
    PAGE,
    Scrape,
    mapping,
    place,
    realistic_process,
    registry_for,
    render,
    scrape,
    snapshot,
    state_of,
)

# The metric contract (docs/metrics.md): family name as the parser reports it
# (counters without _total) -> type.
GAUGES = [
    "memtrace_process_resident_bytes",
    "memtrace_process_virtual_bytes",
    "memtrace_mapping_resident_bytes",
    "memtrace_mapping_virtual_bytes",
    "memtrace_drift_bytes",
    "memtrace_build_info",
    "memtrace_targets",
    "memtrace_tick_duration_seconds",
    "memtrace_attach_duration_seconds",
    "memtrace_scrape_build_seconds",
]
COUNTERS = [
    "memtrace_page_faults",
    "memtrace_syscalls",
    "memtrace_syscall_bytes",
    "memtrace_events_lost",
    "memtrace_full_rescans",
    "memtrace_mapping_series_folded",
    "memtrace_targets_dropped",
]
TYPES = ("anon", "file", "shmem")


@pytest.fixture(autouse=True, params=["collect", "text", "text-cached"])
def path(request, monkeypatch):
    """Every test here runs against collect() and the text fast path, without and
    with the per-process cache (see helpers.MODE)."""
    monkeypatch.setattr(helpers, "MODE", request.param)
    return request.param


def full_state() -> TickState:
    return state_of(realistic_process(100, "server"), realistic_process(200, "worker"),
                    full_rescans={"attach": 2, "statm_mismatch": 1}, events_lost=3,
                    ranges_lost=1, tick_seconds=0.004, attach_seconds={100: 0.2, 200: 0.3},
                    targets_dropped=0)


def many_identities(pid: int, n: int, comm: str = "big") -> dict:
    """A process with n mapping identities; identity i has (i + 1) resident
    pages (file, plus one anon page every 3rd) and i faults."""
    maps = []
    for i in range(n):
        anon = PAGE if i % 3 == 0 else 0
        maps.append(mapping(f"/usr/lib/plugins/libplugin{i:03d}.so", "library",
                            size=(i + 2) * 2 * PAGE, file=(i + 1) * PAGE - anon, anon=anon))
    fbm = {f"/usr/lib/plugins/libplugin{i:03d}.so": i for i in range(n)}
    return snapshot(pid, comm, place(maps), faults_by_mapping=fbm)


# ---------------------------------------------------------------------------
# names, types, help


def test_names_types_and_help():
    reg, _, _ = registry_for(full_state())
    text = render(reg)
    s = Scrape(text)
    for name in GAUGES + COUNTERS:
        assert name in s.families, f"{name} missing from the scrape:\n{text}"
        fam = s.families[name]
        want = "counter" if name in COUNTERS else "gauge"
        assert fam.type == want, f"{name}: type {fam.type}, expected {want}"
        assert fam.documentation.strip(), f"{name} has no HELP text"
        exposed = f"{name}_total" if want == "counter" else name
        assert f"# HELP {exposed} " in text and f"# TYPE {exposed} {want}\n" in text
    for fam in s.families.values():
        if fam.name.startswith("memtrace_"):
            assert fam.documentation.strip(), f"{fam.name} has no HELP text"
            assert fam.type in ("gauge", "counter"), fam


def test_counter_samples_end_in_total():
    s = scrape(registry_for(full_state())[0])
    counters = [f for f in s.families.values() if f.type == "counter"]
    assert {f.name for f in counters} >= set(COUNTERS)
    for fam in counters:
        assert fam.samples, f"{fam.name}: no samples"
        for sample in fam.samples:
            assert sample.name == fam.name + "_total", sample
    # and nothing else carries the suffix
    for fam in s.families.values():
        if fam.type != "counter":
            assert not any(x.name.endswith("_total") for x in fam.samples), fam.name


def test_process_values_and_labels():
    proc = realistic_process(100, "server")
    s = scrape(registry_for(state_of(proc, attach_seconds={100: 0.25}))[0])
    for t in TYPES:
        assert s.value("memtrace_process_resident_bytes", pid="100", type=t) \
            == proc[f"{t}_bytes"]
        assert s.series("memtrace_process_resident_bytes", pid="100", type=t)[0][0]["comm"] \
            == "server"
    assert s.value("memtrace_process_virtual_bytes", pid="100") == proc["virtual_bytes"]
    assert s.value("memtrace_drift_bytes", pid="100") == 0
    assert s.value("memtrace_syscalls_total", pid="100", syscall="mmap") == 20
    assert s.value("memtrace_syscalls_total", pid="100", syscall="mremap") == 0
    assert s.value("memtrace_syscall_bytes_total", pid="100", syscall="brk") == 3 * 135168
    assert s.value("memtrace_targets") == 1
    assert s.value("memtrace_attach_duration_seconds", pid="100") == 0.25
    assert s.value("memtrace_page_faults_total", pid="100", mapping="[heap]") == 250
    assert s.value("memtrace_page_faults_total", pid="100", mapping=LIBC) == 12
    assert s.value("memtrace_build_info") == 1


def test_self_metrics():
    s = scrape(registry_for(full_state())[0])
    assert s.value("memtrace_targets") == 2
    assert s.value("memtrace_events_lost_total", buffer="events") == 3
    assert s.value("memtrace_events_lost_total", buffer="ranges") == 1
    assert s.value("memtrace_full_rescans_total", reason="attach") == 2
    assert s.value("memtrace_full_rescans_total", reason="statm_mismatch") == 1
    assert s.value("memtrace_tick_duration_seconds") == 0.004
    assert s.value("memtrace_targets_dropped_total") == 0
    assert s.value("memtrace_scrape_build_seconds") >= 0


def test_agent_notices_lost_are_events_lost():
    """Agent mode: exec and fork notices the BPF rings dropped."""
    state = dataclasses.replace(full_state(), notices_lost={"execs": 0, "forks": 7})
    s = scrape(registry_for(state)[0])
    assert s.value("memtrace_events_lost_total", buffer="execs") == 0
    assert s.value("memtrace_events_lost_total", buffer="forks") == 7
    assert s.value("memtrace_events_lost_total", buffer="events") == 3


def test_empty_state_renders():
    s = scrape(registry_for(TickState())[0])
    assert s.value("memtrace_targets") == 0
    assert not s.series("memtrace_process_resident_bytes")
    assert not s.series("memtrace_mapping_resident_bytes")


# ---------------------------------------------------------------------------
# grouping by mapping identity


def expected_resident_series(proc: dict) -> int:
    """Series of memtrace_mapping_resident_bytes for a process below the cap: per
    identity, the types its kind can hold, plus any other type that is not 0."""
    n = 0
    for identity, kind in {(m["mapping"], m["kind"]) for m in proc["mappings"]}:
        segs = [m for m in proc["mappings"] if m["mapping"] == identity]
        n += sum(1 for t in TYPES if t in TYPES_BY_KIND.get(kind, TYPES)
                 or sum(m[f"{t}_bytes"] for m in segs))
    return n


def test_no_always_zero_type_series():
    """[heap] holds only anonymous pages: no file or shmem series for it (they
    were always 0); a library's anonymous (CoW) and file pages both have one."""
    proc = realistic_process(100)
    s = scrape(registry_for(state_of(proc))[0])
    heap_types = {lab["type"] for lab, _ in
                  s.series("memtrace_mapping_resident_bytes", pid="100", mapping="[heap]")}
    assert heap_types == {"anon"}
    lib_types = {lab["type"] for lab, _ in
                 s.series("memtrace_mapping_resident_bytes", pid="100", mapping=LIBC)}
    assert lib_types == {"anon", "file"}
    zero = [v for lab, v in s.series("memtrace_mapping_resident_bytes", pid="100")
            if v == 0 and lab["type"] not in TYPES_BY_KIND.get(lab["kind"], TYPES)]
    assert zero == []


def test_segments_of_one_library_sum_into_one_series_per_type():
    proc = realistic_process(100)
    s = scrape(registry_for(state_of(proc))[0])
    for identity in (LIBC, "/usr/local/bin/server", "[anon]"):
        segs = [m for m in proc["mappings"] if m["mapping"] == identity]
        assert len(segs) >= 2, identity
        for t in TYPES:
            found = s.series("memtrace_mapping_resident_bytes", pid="100", mapping=identity,
                             type=t)
            total = sum(m[f"{t}_bytes"] for m in segs)
            if t not in TYPES_BY_KIND[segs[0]["kind"]] and not total:
                assert found == [], f"{identity} {t}: always 0 for its kind, no series"
                continue
            assert len(found) == 1, f"{identity} {t}: {found}"
            assert found[0][1] == total, (identity, t)
            assert found[0][0]["kind"] == segs[0]["kind"]
        assert s.value("memtrace_mapping_virtual_bytes", pid="100", mapping=identity) \
            == sum(m["virtual_bytes"] for m in segs)
    # one series per identity and type, no more
    identities = {m["mapping"] for m in proc["mappings"]}
    assert s.label_values("memtrace_mapping_resident_bytes", "mapping", pid="100") \
        == identities
    assert len(s.series("memtrace_mapping_resident_bytes", pid="100")) \
        == expected_resident_series(proc)
    assert not s.duplicates()


def test_mapping_series_sum_to_process_series():
    proc = realistic_process(100)
    s = scrape(registry_for(state_of(proc))[0])
    for t in TYPES:
        assert s.total("memtrace_mapping_resident_bytes", pid="100", type=t) \
            == s.value("memtrace_process_resident_bytes", pid="100", type=t)
    assert s.total("memtrace_mapping_virtual_bytes", pid="100") \
        == s.value("memtrace_process_virtual_bytes", pid="100")


def test_collect_does_not_modify_the_snapshots():
    state = full_state()
    before = copy.deepcopy(state.snapshots)
    reg, _, _ = registry_for(state, max_series=3)
    render(reg)
    render(reg)
    assert state.snapshots == before


# ---------------------------------------------------------------------------
# the series cap


def test_cap_200_identities_to_50_series_with_other():
    proc = many_identities(7, 200)
    s = scrape(registry_for(state_of(proc), max_series=50)[0])
    names = s.label_values("memtrace_mapping_resident_bytes", "mapping", pid="7")
    assert len(names) == 50, len(names)
    assert OTHER in names
    # libraries hold no shmem: only [other] (kind "other") has a shmem series
    for t, n in (("anon", 50), ("file", 50), ("shmem", 1)):
        assert len(s.series("memtrace_mapping_resident_bytes", pid="7", type=t)) == n, t
    assert len(s.series("memtrace_mapping_virtual_bytes", pid="7")) == 50

    # the 49 largest identities keep their own series; [other] is the sum of the rest
    ranked = sorted(proc["mappings"], key=lambda m: m["rss_bytes"], reverse=True)
    kept, rest = ranked[:49], ranked[49:]
    assert names - {OTHER} == {m["mapping"] for m in kept}
    for t in TYPES:
        assert s.value("memtrace_mapping_resident_bytes", pid="7", mapping=OTHER, type=t) \
            == sum(m[f"{t}_bytes"] for m in rest), t
        assert s.total("memtrace_mapping_resident_bytes", pid="7", type=t) \
            == proc[f"{t}_bytes"]
    assert s.value("memtrace_mapping_virtual_bytes", pid="7", mapping=OTHER) \
        == sum(m["virtual_bytes"] for m in rest)
    # faults of folded identities go to [other] too
    fbm = proc["faults_by_mapping"]
    assert s.value("memtrace_page_faults_total", pid="7", mapping=OTHER) \
        == sum(fbm[m["mapping"]] for m in rest)
    assert s.total("memtrace_page_faults_total", pid="7") == sum(fbm.values())
    assert not s.duplicates()


@pytest.mark.parametrize("n, series, other", [(49, 49, False), (50, 50, False),
                                              (51, 50, True)])
def test_cap_boundary(n, series, other):
    s = scrape(registry_for(state_of(many_identities(7, n)), max_series=50)[0])
    names = s.label_values("memtrace_mapping_resident_bytes", "mapping", pid="7")
    assert len(names) == series
    assert (OTHER in names) == other


def test_cap_is_per_process():
    small = realistic_process(1)
    s = scrape(registry_for(state_of(many_identities(7, 200), small), max_series=50)[0])
    assert len(s.label_values("memtrace_mapping_resident_bytes", "mapping", pid="7")) == 50
    assert OTHER not in s.label_values("memtrace_mapping_resident_bytes", "mapping", pid="1")


def test_folded_counter_increments_per_scrape():
    reg, box, _ = registry_for(state_of(many_identities(7, 200)), max_series=50)
    assert scrape(reg).value("memtrace_mapping_series_folded_total") == 151
    assert scrape(reg).value("memtrace_mapping_series_folded_total") == 302
    box.set(state_of(many_identities(7, 200), many_identities(8, 60)))
    assert scrape(reg).value("memtrace_mapping_series_folded_total") == 302 + 151 + 11
    box.set(state_of(realistic_process(1)))  # nothing folded: the counter stays
    assert scrape(reg).value("memtrace_mapping_series_folded_total") == 464


def test_other_faults_counter_never_decreases():
    proc = many_identities(7, 60)
    lib = "/usr/lib/plugins/libplugin005.so"  # small: folded into [other] at first
    proc["faults_by_mapping"][lib] = 1000
    reg, box, _ = registry_for(state_of(proc), max_series=50)
    before = scrape(reg).value("memtrace_page_faults_total", pid="7", mapping=OTHER)
    # lib's pages grow (e.g. read() by another process filled its page cache)
    # without a single new fault: it now outranks the others and gets its own
    # series. No fault counter of this process went down.
    grown = copy.deepcopy(proc)
    m = next(m for m in grown["mappings"] if m["mapping"] == lib)
    m["file_bytes"] += 1000 * PAGE
    m["rss_bytes"] += 1000 * PAGE
    box.set(state_of(grown))
    s = scrape(reg)
    assert s.value("memtrace_page_faults_total", pid="7", mapping=lib) == 1000
    after = s.value("memtrace_page_faults_total", pid="7", mapping=OTHER)
    assert after >= before, f"[other] faults went from {before} to {after}"


# ---------------------------------------------------------------------------
# hostile label values


HOSTILE = {
    "quotes": '/srv/data/"quoted".bin',
    "backslashes": "/srv/data/back\\slash\\\\double\\",
    "newline": "/srv/data/line1\nline2\n",
    "braces": "/srv/{data}/x{}y}{.bin",
    "all": '/tmp/a"b\\c\nd{e}f=g,h="i"',
    "backslashreplace": b"/opt/\xff\xfe\xc3(lib.so".decode("utf-8", "backslashreplace"),
    "spaces": "/srv/data/name with spaces (deleted)",
    "unicode": "/srv/données/日本語.so",
    "escaped-newline-as-in-maps": "/srv/line1\\012line2",
}


def hostile_process(pid: int, paths: dict[str, str], comm: str = "hostile") -> dict:
    maps = [mapping(p, "file", size=4 * PAGE, file=(i + 1) * PAGE)
            for i, p in enumerate(paths.values())]
    return snapshot(pid, comm, place(maps), faults_by_mapping={p: 1 for p in paths.values()})


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_label_round_trips(case):
    path = HOSTILE[case]
    s = scrape(registry_for(state_of(hostile_process(5, {case: path})))[0])
    assert s.value("memtrace_mapping_resident_bytes", pid="5", mapping=path, type="file") \
        == PAGE
    assert s.value("memtrace_page_faults_total", pid="5", mapping=path) == 1


def test_all_hostile_labels_in_one_scrape():
    s = scrape(registry_for(state_of(hostile_process(5, HOSTILE, comm='c"o\\m\nm{}')))[0])
    assert s.label_values("memtrace_mapping_resident_bytes", "mapping", pid="5") \
        == set(HOSTILE.values())
    assert s.label_values("memtrace_process_resident_bytes", "comm") == {'c"o\\m\nm{}'}
    assert not s.duplicates()


def surrogate_process(pid: int) -> dict:
    """Names decoded with errors="surrogateescape": lone surrogates everywhere a
    string reaches a label (comm, mapping identity, faults_by_mapping keys)."""
    raw = [b"/opt/\xff\xfeapp/lib.so", b"/tmp/\x80\x81.bin", b"[anon:\xff]", b"/x/\xed\xa0\x80"]
    paths = [r.decode("utf-8", "surrogateescape") for r in raw]
    assert all(any(0xDC80 <= ord(c) <= 0xDCFF for c in p) for p in paths)
    maps = [mapping(p, "anon" if p.startswith("[anon:") else "library", size=8 * PAGE,
                    file=0 if p.startswith("[anon:") else 2 * PAGE, anon=PAGE, identity=p)
            for p in paths]
    comm = b"w\xffrker".decode("utf-8", "surrogateescape")
    return snapshot(pid, comm, place(maps), faults_by_mapping={p: 3 for p in paths})


def test_lone_surrogates_do_not_break_the_scrape():
    proc = surrogate_process(9)
    reg, _, _ = registry_for(state_of(proc, realistic_process(10)))
    text = render(reg)  # strict UTF-8 decode inside
    s = Scrape(text)
    names = s.label_values("memtrace_mapping_resident_bytes", "mapping", pid="9")
    assert len(names) == 4, names
    for n in names:
        n.encode("utf-8")  # no surrogates left
    for t in TYPES:
        assert s.total("memtrace_mapping_resident_bytes", pid="9", type=t) == proc[f"{t}_bytes"]
    assert s.total("memtrace_page_faults_total", pid="9") == 12
    (comm,) = s.label_values("memtrace_process_resident_bytes", "comm", pid="9")
    comm.encode("utf-8")
    assert comm.startswith("w") and comm.endswith("rker")
    # the other process is unaffected
    assert s.value("memtrace_process_resident_bytes", pid="10", type="anon") \
        == realistic_process(10)["anon_bytes"]


def test_surrogateescape_and_backslashreplace_names_stay_distinct():
    raw = b"/opt/lib\xff.so"
    a, b = raw.decode("utf-8", "surrogateescape"), raw.decode("utf-8", "backslashreplace")
    maps = place([mapping(a, "library", file=PAGE, identity=a),
                  mapping(b, "library", file=2 * PAGE, identity=b)])
    s = scrape(registry_for(state_of(snapshot(3, "x", maps)))[0])
    assert s.total("memtrace_mapping_resident_bytes", pid="3", type="file") == 3 * PAGE
    assert not s.duplicates()


def test_10kB_names_render_and_parse():
    long_path = "/srv/" + "/".join(["d" * 99] * 100) + "/lib.so"  # ~10 kB
    assert len(long_path) > 10_000
    maps = place([mapping(long_path, "library", file=5 * PAGE, anon=PAGE)])
    proc = snapshot(4, "c" * 10_000, maps, faults_by_mapping={long_path: 2})
    s = scrape(registry_for(state_of(proc))[0])
    (name,) = s.label_values("memtrace_mapping_resident_bytes", "mapping", pid="4")
    assert name[:100] == long_path[:100]
    assert s.value("memtrace_mapping_resident_bytes", pid="4", type="file") == 5 * PAGE
    assert s.value("memtrace_page_faults_total", pid="4") == 2
    # a scrape line stays bounded: a label is not 10 kB
    assert max(len(line) for line in s.text.splitlines()) < 4096


def test_long_names_with_a_common_prefix_stay_distinct():
    prefix = "/srv/" + "p" * 10_000
    maps = place([mapping(prefix + "/a.so", "library", file=PAGE),
                  mapping(prefix + "/b.so", "library", file=2 * PAGE)])
    s = scrape(registry_for(state_of(snapshot(4, "x", maps)))[0])
    assert not s.duplicates(), "duplicate series in the scrape"
    assert len(s.label_values("memtrace_mapping_resident_bytes", "mapping", pid="4")) == 2


# ---------------------------------------------------------------------------
# freshness and concurrency


def test_removed_process_is_gone_from_the_next_scrape():
    a, b = realistic_process(100, "a"), realistic_process(200, "b")
    reg, box, _ = registry_for(state_of(a, b, attach_seconds={100: 0.1, 200: 0.2}))
    s = scrape(reg)
    assert {lab["pid"] for _, lab, _ in s.samples if "pid" in lab} == {"100", "200"}
    box.set(state_of(b, attach_seconds={100: 0.1, 200: 0.2}))  # 100 exited
    s = scrape(reg)
    pids = {lab["pid"] for _, lab, _ in s.samples if "pid" in lab}
    assert pids == {"200"}, f"series of pid 100 left behind: {pids}"
    assert s.value("memtrace_targets") == 1
    box.set(TickState())
    s = scrape(reg)
    assert not [x for x in s.samples if "pid" in x[1]]


def test_two_concurrent_scrapes():
    """Two scrapes at the same time while the watch loop replaces the state:
    both succeed and each is one consistent tick."""
    states = [state_of(*(many_identities(p, 80) for p in range(1, n + 1))) for n in (3, 5)]
    reg, box, _ = registry_for(states[0], max_series=50)
    errors: list[BaseException] = []
    results: list[Scrape] = []
    stop = threading.Event()
    barrier = threading.Barrier(2)

    def scraper() -> None:
        try:
            barrier.wait(timeout=10)
            for _ in range(15):
                results.append(scrape(reg))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def publisher() -> None:
        i = 0
        while not stop.is_set():
            box.set(states[i % 2])
            i += 1

    threads = [threading.Thread(target=scraper) for _ in range(2)]
    pub = threading.Thread(target=publisher)
    pub.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    pub.join(timeout=10)
    assert not errors, errors
    assert len(results) == 30
    for s in results:
        n = int(s.value("memtrace_targets"))
        assert n in (3, 5)
        assert len(s.label_values("memtrace_process_resident_bytes", "pid")) == n
        # 49 libraries (anon, file) and [other] (anon, file, shmem) per process
        assert len(s.series("memtrace_mapping_resident_bytes")) == n * (49 * 2 + 3)
        assert not s.duplicates()


# ---------------------------------------------------------------------------
# promtool


def test_promtool_check_metrics_on_a_full_scrape():
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed (Debian package prometheus): cannot lint")
    state = state_of(realistic_process(100), many_identities(200, 120),
                     hostile_process(300, HOSTILE), surrogate_process(400),
                     full_rescans={"attach": 4}, events_lost=1, tick_seconds=0.01,
                     attach_seconds={100: 0.1, 200: 0.2, 300: 0.3, 400: 0.4})
    reg, _, _ = registry_for(state)
    reg.register(ProcessCollector(registry=None))  # as `memtrace watch` serves it
    text = render(reg)
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (
        f"promtool check metrics (exit {r.returncode}):\n{r.stdout}{r.stderr}")


# ---------------------------------------------------------------------------
# grouped labels (memtrace agent --group-by group)


def grouped_state(**kw) -> TickState:
    a, b = realistic_process(11, "nginx"), realistic_process(12, "nginx")
    c = realistic_process(13, "postgres")
    return state_of(a, b, c, groups={11: "web", 12: "web", 13: 'db "main"\n'}, **kw)


def test_grouped_series_carry_group_not_pid():
    state = grouped_state()
    s = scrape(registry_for(state)[0])
    a, b = state.snapshots[11], state.snapshots[12]
    for t in TYPES:
        assert s.value("memtrace_process_resident_bytes", group="web", comm="nginx", type=t) \
            == a[f"{t}_bytes"] + b[f"{t}_bytes"]
        assert s.total("memtrace_mapping_resident_bytes", group="web", type=t) \
            == a[f"{t}_bytes"] + b[f"{t}_bytes"]
    libc = [m for p in (a, b) for m in p["mappings"] if m["mapping"] == LIBC]
    assert s.value("memtrace_mapping_resident_bytes", group="web", mapping=LIBC, type="file") \
        == sum(m["file_bytes"] for m in libc)
    assert s.value("memtrace_syscalls_total", group="web", syscall="mmap") == 40
    assert s.label_values("memtrace_process_resident_bytes", "group") == {"web", 'db "main"\n'}
    for name in ("memtrace_process_resident_bytes", "memtrace_mapping_resident_bytes",
                 "memtrace_page_faults_total", "memtrace_syscalls_total",
                 "memtrace_drift_bytes"):
        assert not [lab for lab, _ in s.series(name) if "pid" in lab], name
    assert not s.duplicates()


def test_grouped_counters_keep_the_counts_of_exited_processes():
    retired = {("web", "nginx"): {"syscalls": {"mmap": 100, "brk": 1},
                                  "syscall_bytes": {"mmap": 1 << 20},
                                  "faults_by_mapping": {"[heap]": 1000, "/gone/lib.so": 5}}}
    s = scrape(registry_for(grouped_state(retired=retired))[0])
    assert s.value("memtrace_syscalls_total", group="web", syscall="mmap") == 140
    assert s.value("memtrace_syscalls_total", group="web", syscall="brk") == 7
    assert s.value("memtrace_page_faults_total", group="web", mapping="[heap]") == 1500
    assert s.value("memtrace_page_faults_total", group="web", mapping="/gone/lib.so") == 5
    # a group whose processes have all exited keeps its counters, with zero gauges
    retired[("batch", "job")] = {"syscalls": {"mmap": 3}, "syscall_bytes": {},
                                 "faults_by_mapping": {}}
    s = scrape(registry_for(grouped_state(retired=retired))[0])
    assert s.value("memtrace_syscalls_total", group="batch", syscall="mmap") == 3
    assert s.value("memtrace_process_resident_bytes", group="batch", type="anon") == 0


# ---------------------------------------------------------------------------
# container_id and pod_uid (agent mode: from the cgroup path, memtrace.commands.agent)

CID1, CID2 = "1" * 64, "ab" * 32
POD = "0d1c2b3a-4f5e-6d7c-8b9a-0123456789ab"
HEAP = {"status": "ok", "by_kind": {
    "main": {"in_use_bytes": 100, "free_resident_bytes": 20, "trimmable_bytes": 8},
    "thread": {"in_use_bytes": 0, "free_resident_bytes": 0, "trimmable_bytes": 0}}}


def container_state(groups: dict[int, str] | None = None, **kw) -> TickState:
    """nginx in two containers of one pod (pids 21, 22), sshd outside any (23)."""
    from tests.unit.exporter.test_pss_metrics import with_pss

    snaps = [with_pss(realistic_process(21, "nginx")), with_pss(realistic_process(22, "nginx")),
             with_pss(realistic_process(23, "sshd"))]
    for s in snaps:
        s["heap"] = copy.deepcopy(HEAP)
    return state_of(*snaps, containers={21: (CID1, POD), 22: (CID2, POD), 23: ("", "")},
                    groups=groups, heap_walks={"ok": 3}, **kw)


def _process_samples(s):
    return [(n, lab) for n, lab, _ in s.samples
            if ("pid" in lab or "group" in lab) and n != "memtrace_attach_duration_seconds"]


def test_agent_series_carry_container_id_and_pod_uid():
    state = container_state()
    s = scrape(registry_for(state)[0])
    samples = _process_samples(s)
    names = {n for n, _ in samples}
    assert {"memtrace_process_resident_bytes", "memtrace_mapping_resident_bytes",
            "memtrace_page_faults_total", "memtrace_process_pss_bytes",
            "memtrace_mapping_uss_bytes", "memtrace_heap_in_use_bytes",
            "memtrace_process_page_faults_total", "memtrace_library_loads_total"} <= names
    for name, lab in samples:
        assert "container_id" in lab and "pod_uid" in lab, (name, lab)
    a = state.snapshots[21]
    assert s.value("memtrace_process_virtual_bytes", pid="21", comm="nginx",
                   container_id=CID1, pod_uid=POD) == a["virtual_bytes"]
    assert s.value("memtrace_process_pss_bytes", pid="22", container_id=CID2,
                   pod_uid=POD) == state.snapshots[22]["pss_bytes"]
    assert s.value("memtrace_heap_in_use_bytes", pid="21", container_id=CID1,
                   arena="main") == 100
    # not in a container: empty values, which Prometheus stores as no label
    assert s.value("memtrace_process_virtual_bytes", pid="23", container_id="",
                   pod_uid="") == state.snapshots[23]["virtual_bytes"]
    assert not s.duplicates()


def test_watch_series_have_no_container_labels():
    state = container_state()
    state.containers = None
    s = scrape(registry_for(state)[0])
    for name, lab in _process_samples(s):
        assert "container_id" not in lab and "pod_uid" not in lab, (name, lab)


def test_groups_are_split_by_container():
    state = container_state(groups={21: "web", 22: "web", 23: "ssh"})
    s = scrape(registry_for(state)[0])
    a, b = state.snapshots[21], state.snapshots[22]
    assert s.value("memtrace_process_virtual_bytes", group="web", container_id=CID1) \
        == a["virtual_bytes"]
    assert s.value("memtrace_process_virtual_bytes", group="web", container_id=CID2) \
        == b["virtual_bytes"]
    assert s.value("memtrace_process_pss_bytes", group="web", container_id=CID2,
                   pod_uid=POD) == b["pss_bytes"]
    assert s.value("memtrace_heap_in_use_bytes", group="ssh", container_id="", pod_uid="",
                   arena="main") == 100
    for name, lab in _process_samples(s):
        assert "pid" not in lab and "container_id" in lab and "pod_uid" in lab, (name, lab)
    assert not s.duplicates()
