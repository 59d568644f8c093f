"""The text fast path (MemtraceCollector.render_text) and its caches: the same
samples as collect(), never a stale process, bounded caches (no root, no BCC)."""

from __future__ import annotations

import copy
import random
import re
import shutil
import subprocess
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector

from memtrace.exporter import collector as exporter
from memtrace.exporter.collector import MemtraceCollector
from memtrace.exporter.rows import OTHER, group_mappings, sum_mappings
from memtrace.published import StateBox, TickState

from .helpers import (
    PAGE,
    Scrape,
    mapping,
    place,
    realistic_process,
    registry_for,
    scrape,
    snapshot,
    state_of,
)
from .test_collector import (
    CID1,
    HOSTILE,
    POD,
    container_state,
    full_state,
    grouped_state,
    hostile_process,
    many_identities,
    surrogate_process,
)


def with_gen(snap: dict, gen: int) -> dict:
    return {**snap, "generation": gen}


class Counting(MemtraceCollector):
    """Counts the rows rendered (cache misses)."""

    def __init__(self, box: StateBox, max_mapping_series: int = 50) -> None:
        super().__init__(box, max_mapping_series)
        self.rendered_rows = 0

    def _render_row(self, *args):  # type: ignore[no-untyped-def]
        self.rendered_rows += 1
        return super()._render_row(*args)


def text_collector(state: TickState, max_series: int = 50) -> tuple[StateBox, Counting]:
    box = StateBox()
    box.set(state)
    return box, Counting(box, max_series)


def text_scrape(collector: MemtraceCollector) -> Scrape:
    return Scrape(collector.render_text())


def samples(s: Scrape) -> list:
    return [x for x in s.samples if x[0] != "memtrace_scrape_build_seconds"]


STATES = {
    "full": full_state,
    "hostile": lambda: state_of(realistic_process(100), many_identities(200, 120),
                                hostile_process(300, HOSTILE, comm='c"o\\m\nm{}'),
                                surrogate_process(400),
                                attach_seconds={100: 0.1, 300: 0.3}),
    "grouped": lambda: grouped_state(retired={
        ("web", "nginx"): {"syscalls": {"mmap": 100}, "syscall_bytes": {"mmap": 1 << 20},
                           "faults_by_mapping": {"[heap]": 1000, "/gone/lib.so": 5}},
        ("batch", "job"): {"syscalls": {"mmap": 3}, "syscall_bytes": {},
                           "faults_by_mapping": {}}}),
    "empty": TickState,
    "containers": lambda: container_state(retired={}),
    "grouped-containers": lambda: container_state(
        groups={21: "web", 22: "web", 23: "ssh"},
        retired={("web", "nginx", CID1, POD): {"syscalls": {"mmap": 7}, "syscall_bytes": {},
                                                "faults_by_mapping": {"[heap]": 9}}}),
}


@pytest.mark.parametrize("name", list(STATES))
@pytest.mark.parametrize("generation", [False, True])
def test_text_path_has_the_samples_of_collect_in_order(name, generation):
    state = STATES[name]()
    if generation:
        state.snapshots = {p: with_gen(s, 1) for p, s in state.snapshots.items()}
    reg, _, _ = registry_for(state, max_series=50)
    _, collector = text_collector(state, max_series=50)
    for _ in range(3):  # the second and third scrape from the cache when generation
        want, got = scrape(reg), text_scrape(collector)
        assert samples(got) == samples(want)
        assert [(f.name, f.type, f.documentation) for f in got.families.values()] \
            == [(f.name, f.type, f.documentation) for f in want.families.values()]


def test_text_path_passes_promtool():
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed (Debian package prometheus): cannot lint")
    state = STATES["hostile"]()
    _, collector = text_collector(state)
    reg = CollectorRegistry()
    reg.register(ProcessCollector(registry=None))
    # what MetricsServer(fast=collector.render_text) serves
    text = collector.render_text() + generate_latest(reg).decode()
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (
        f"promtool check metrics (exit {r.returncode}):\n{r.stdout}{r.stderr}")


# ---------------------------------------------------------------------------
# the per-process cache


def test_without_generation_nothing_is_cached_beyond_its_tick():
    a, b = realistic_process(1), realistic_process(2)
    box, c = text_collector(state_of(a, b))
    for _ in range(3):  # one tick: its text is built once
        text_scrape(c)
    assert c.rendered_rows == 2
    assert not c._rendered
    for _ in range(2):  # every new tick (equal content, new state) renders again
        box.set(state_of(a, b))
        text_scrape(c)
    assert c.rendered_rows == 6


def test_scrapes_of_one_tick_share_its_text_and_a_fresh_tail():
    box, c = text_collector(state_of(with_gen(many_identities(7, 200), 1)))
    head1, tail1 = c.render_scrape()
    head2, tail2 = c.render_scrape()
    assert head1 is head2 and c.rendered_rows == 1
    # the tail is this scrape's own: the folded counter has counted both scrapes
    assert b"memtrace_mapping_series_folded_total 151" in tail1[0]
    assert b"memtrace_mapping_series_folded_total 302" in tail2[0]
    assert b"memtrace_scrape_build_seconds " in tail2[0]
    assert b"memtrace_scrape_build_seconds" not in b"".join(head1.chunks)
    box.set(state_of(with_gen(many_identities(7, 200), 1)))
    head3, _ = c.render_scrape()
    assert head3 is not head1 and b"".join(head3.chunks) == b"".join(head1.chunks)
    assert c.rendered_rows == 1  # the new tick's process came from the row cache


def test_collect_between_scrapes_rebuilds_the_tick_text():
    """collect() (prometheus_client's path) admits fault series and prunes rows
    as the text path does; the text of the tick is not reused after it."""
    box, c = text_collector(state_of(with_gen(realistic_process(1), 1)))
    head1, _ = c.render_scrape()
    list(c.collect())
    head2, _ = c.render_scrape()
    assert head2 is not head1 and b"".join(head2.chunks) == b"".join(head1.chunks)


def test_same_generation_is_served_from_the_cache():
    a, b = realistic_process(1), realistic_process(2)
    box, c = text_collector(state_of(with_gen(a, 5), with_gen(b, 9)))
    first = samples(text_scrape(c))
    # the next tick: new dicts, new ts, same generations
    box.set(state_of({**with_gen(a, 5), "ts": a["ts"] + 1},
                     {**with_gen(b, 9), "ts": b["ts"] + 1}))
    assert samples(text_scrape(c)) == first
    assert c.rendered_rows == 2


def test_a_changed_snapshot_is_never_served_stale():
    a = with_gen(realistic_process(1), 1)
    box, c = text_collector(state_of(a))
    s = text_scrape(c)
    assert s.value("memtrace_process_resident_bytes", pid="1", type="anon") == a["anon_bytes"]
    grown = copy.deepcopy(a)
    grown["generation"] = 2
    heap = next(m for m in grown["mappings"] if m["mapping"] == "[heap]")
    heap["anon_bytes"] += 10 * PAGE
    grown["anon_bytes"] += 10 * PAGE
    grown["syscalls"]["brk"] += 1
    grown["faults_by_mapping"]["[heap]"] += 10
    box.set(state_of(grown))
    s = text_scrape(c)
    assert s.value("memtrace_process_resident_bytes", pid="1", type="anon") \
        == a["anon_bytes"] + 10 * PAGE
    assert s.value("memtrace_mapping_resident_bytes", pid="1", mapping="[heap]", type="anon") \
        == sum(m["anon_bytes"] for m in a["mappings"] if m["mapping"] == "[heap]") + 10 * PAGE
    assert s.value("memtrace_syscalls_total", pid="1", syscall="brk") \
        == a["syscalls"]["brk"] + 1
    assert s.value("memtrace_page_faults_total", pid="1", mapping="[heap]") \
        == a["faults_by_mapping"]["[heap]"] + 10
    assert c.rendered_rows == 2
    # a change that leaves every total alone: pages move between two mappings,
    # one more mmap call; only the generation tells
    moved = copy.deepcopy(grown)
    moved["generation"] = 3
    heap = next(m for m in moved["mappings"] if m["mapping"] == "[heap]")
    stack = next(m for m in moved["mappings"] if m["mapping"] == "[stack]")
    heap["anon_bytes"] -= PAGE
    stack["anon_bytes"] += PAGE
    moved["syscalls"]["mmap"] += 1
    box.set(state_of(moved))
    s = text_scrape(c)
    assert s.value("memtrace_mapping_resident_bytes", pid="1", mapping="[stack]", type="anon") \
        == stack["anon_bytes"]
    assert s.value("memtrace_syscalls_total", pid="1", syscall="mmap") \
        == a["syscalls"]["mmap"] + 1
    assert c.rendered_rows == 3


def test_a_reused_pid_with_a_repeated_generation_is_not_served_stale():
    """A generation that starts over (a new process with the same PID) still
    differs in comm or in totals, which are part of what the cache checks."""
    box, c = text_collector(state_of(with_gen(realistic_process(1, "old"), 1)))
    text_scrape(c)
    box.set(state_of(with_gen(realistic_process(1, "new"), 1)))
    s = text_scrape(c)
    assert s.label_values("memtrace_process_resident_bytes", "comm", pid="1") == {"new"}
    other = snapshot(1, "new", place([mapping("[heap]", "heap", anon=3 * PAGE)]))
    box.set(state_of(with_gen(other, 1)))
    s = text_scrape(c)
    assert s.value("memtrace_process_resident_bytes", pid="1", type="anon") == 3 * PAGE
    assert s.label_values("memtrace_mapping_resident_bytes", "mapping", pid="1") == {"[heap]"}
    assert c.rendered_rows == 3


def test_an_exited_process_is_gone_and_its_cache_entry_too():
    a, b = with_gen(realistic_process(1), 1), with_gen(realistic_process(2), 1)
    box, c = text_collector(state_of(a, b))
    text_scrape(c)
    assert len(c._rendered) == 2
    box.set(state_of(b))
    s = text_scrape(c)
    assert s.label_values("memtrace_process_resident_bytes", "pid") == {"2"}
    assert set(c._rendered) == {("2", b["comm"])}
    box.set(TickState())
    s = text_scrape(c)
    assert not s.series("memtrace_process_resident_bytes")
    assert not c._rendered and not c._fault_names


def test_folded_counter_counts_cached_scrapes_too():
    box, c = text_collector(state_of(with_gen(many_identities(7, 200), 1)))
    assert text_scrape(c).value("memtrace_mapping_series_folded_total") == 151
    assert text_scrape(c).value("memtrace_mapping_series_folded_total") == 302
    assert c.rendered_rows == 1


def test_grouped_rows_are_cached_by_all_their_members():
    state = STATES["grouped"]()
    state.snapshots = {p: with_gen(s, 1) for p, s in state.snapshots.items()}
    box, c = text_collector(state)
    reg, want_box, _ = registry_for(state)
    assert samples(text_scrape(c)) == samples(scrape(reg))
    rows = c.rendered_rows  # web/nginx, db/postgres, batch/job
    assert rows == 3
    assert samples(text_scrape(c)) == samples(scrape(reg))
    assert c.rendered_rows == rows
    # one member of web/nginx changes: that group only is rendered again
    changed = copy.deepcopy(state)
    changed.snapshots[12] = with_gen({**state.snapshots[12], "drift_bytes": 4096}, 2)
    box.set(changed)
    want_box.set(changed)
    s = text_scrape(c)
    assert samples(s) == samples(scrape(reg))
    assert s.value("memtrace_drift_bytes", group="web", comm="nginx") == 4096
    assert c.rendered_rows == rows + 1
    # the counters of exited processes change: rendered again
    more = copy.deepcopy(changed)
    more.retired[("web", "nginx")]["syscalls"]["mmap"] += 1
    box.set(more)
    want_box.set(more)
    s = text_scrape(c)
    assert samples(s) == samples(scrape(reg))
    assert c.rendered_rows == rows + 2
    # a member without a generation: that group is rendered again every tick
    # (a second scrape of one tick serves that tick's text)
    for _ in range(2):
        box.set(dataclasses_replace_snapshot(more, 11, realistic_process(11, "nginx")))
        text_scrape(c)
        text_scrape(c)
    assert c.rendered_rows == rows + 4


def dataclasses_replace_snapshot(state: TickState, pid: int, snap: dict) -> TickState:
    out = copy.deepcopy(state)
    out.snapshots[pid] = snap
    return out


def test_label_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(exporter, "LABEL_CACHE_MAX", 10)
    state = state_of(many_identities(7, 60), hostile_process(8, HOSTILE))
    box, c = text_collector(state, max_series=100)
    reg, _, _ = registry_for(state, max_series=100)
    for _ in range(3):
        assert samples(text_scrape(c)) == samples(scrape(reg))
        assert len(c._labels) + len(c._fragments) <= 10


def test_label_cache_is_bounded_in_characters(monkeypatch):
    monkeypatch.setattr(exporter, "LABEL_CACHE_MAX_CHARS", 50_000)
    paths = {f"p{i}": f"/srv/{i:03d}/" + "d" * 4000 for i in range(40)}  # 160 kB of names
    state = state_of(hostile_process(8, paths))
    box, c = text_collector(state, max_series=100)
    reg, _, _ = registry_for(state, max_series=100)
    for _ in range(3):
        assert samples(text_scrape(c)) == samples(scrape(reg))
        held = sum(len(k) + len(v) for k, v in c._labels.items()) \
            + sum(len(k[0]) + len(v) for k, v in c._fragments.items())
        assert held <= 50_000 + 2 * 4100, held


def test_concurrent_scrapes_with_the_cache_each_see_one_tick():
    """Two scrapes at a time while the watch loop flips every process between two
    contents (with their generations): each scrape is one tick, never a mix of a
    cached old text and a new one."""
    procs = [many_identities(p, 80) for p in range(1, 6)]
    grown = []
    for p in procs:
        g = copy.deepcopy(p)
        g["mappings"][79]["anon_bytes"] += PAGE
        g["anon_bytes"] += PAGE
        grown.append(g)
    states = [state_of(*(with_gen(p, 1) for p in procs)),
              state_of(*(with_gen(p, 2) for p in grown))]
    box, c = text_collector(states[0])
    errors: list[BaseException] = []
    results: list[Scrape] = []
    stop = threading.Event()
    barrier = threading.Barrier(2)

    def scraper() -> None:
        try:
            barrier.wait(timeout=10)
            for _ in range(20):
                results.append(text_scrape(c))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def publisher() -> None:
        i = 0
        while not stop.is_set():
            box.set(states[i % 2])
            i += 1
            stop.wait(0.001)

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
    assert len(results) == 40
    for s in results:
        anon = [s.value("memtrace_process_resident_bytes", pid=str(p), type="anon")
                for p in range(1, 6)]
        first = [s.value("memtrace_mapping_resident_bytes", pid=str(p), type="anon",
                         mapping="/usr/lib/plugins/libplugin079.so") for p in range(1, 6)]
        old = [p["anon_bytes"] for p in procs]
        assert anon in (old, [a + PAGE for a in old]), anon
        assert first in ([0] * 5, [PAGE] * 5), first
        assert (anon == old) == (first == [0] * 5)
        assert not s.duplicates()


def test_build_seconds_is_reported():
    box, c = text_collector(full_state())
    text = c.render_text()
    assert re.search(r"^memtrace_scrape_build_seconds \d", text, re.M)


def reference_group_mappings(snap: dict, max_series: int) -> tuple[dict, int]:
    """group_mappings as it was first written (dicts, a stable sort by resident
    bytes): the optimised one must give the same groups, order and ties."""
    groups: dict = {}
    for m in snap["mappings"]:
        g = groups.setdefault((m["mapping"], m["kind"]),
                              {"anon": 0, "file": 0, "shmem": 0, "virtual": 0, "faults": 0})
        g["anon"] += m["anon_bytes"]
        g["file"] += m["file_bytes"]
        g["shmem"] += m["shmem_bytes"]
        g["virtual"] += m["virtual_bytes"]
    if len(groups) <= max_series:
        return groups, 0
    ranked = sorted(groups.items(), key=lambda kv: kv[1]["anon"] + kv[1]["file"]
                    + kv[1]["shmem"], reverse=True)
    kept = dict(ranked[: max_series - 1])
    other = {"anon": 0, "file": 0, "shmem": 0, "virtual": 0, "faults": 0}
    for _, g in ranked[max_series - 1:]:
        for k in other:
            other[k] += g[k]
    kept[(OTHER, "other")] = other
    return kept, len(ranked) - (max_series - 1)


def test_group_mappings_matches_the_reference_with_ties():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randrange(1, 120)
        maps = [{"mapping": f"/x/{rng.randrange(n)}", "kind": rng.choice(["library", "file"]),
                 "anon_bytes": rng.choice([0, PAGE, 2 * PAGE]), "file_bytes": rng.choice([0, PAGE]),
                 "shmem_bytes": rng.choice([0, PAGE]),
                 "virtual_bytes": rng.choice([PAGE, 2 * PAGE, 1.5])}
                for _ in range(rng.randrange(200))]
        cap = rng.randrange(1, 60)
        want = reference_group_mappings({"mappings": maps}, cap)
        got = group_mappings({"mappings": maps}, cap)
        assert got == want and list(got[0]) == list(want[0])


def test_pss_sums_come_with_the_same_groups_as_the_resident_sums():
    """sum_mappings(pss=True): the resident part is group_mappings' (same groups,
    order, ties, [other]); the PSS and USS parts are the sums of the same mappings."""
    rng = random.Random(1)
    for _ in range(300):
        n = rng.randrange(1, 120)
        same_kind = rng.random() < 0.5   # else one identity can come with two kinds
        maps = []
        for _ in range(rng.randrange(1, 200)):
            i = rng.randrange(n)
            maps.append({"mapping": f"/x/{i}",
                         "kind": ("library", "file")[i % 2] if same_kind
                         else rng.choice(["library", "file"]),
                         "anon_bytes": rng.choice([0, PAGE, 2 * PAGE]),
                         "file_bytes": rng.choice([0, PAGE]), "shmem_bytes": rng.choice([0, PAGE]),
                         "virtual_bytes": rng.choice([PAGE, 2 * PAGE]),
                         "pss_bytes": rng.randrange(3 * PAGE), "uss_bytes": rng.randrange(PAGE)})
        cap = rng.randrange(1, 60)
        want, want_folded = reference_group_mappings({"mappings": maps}, cap)
        rows, folded = sum_mappings({"mappings": maps}, cap, pss=True)
        assert folded == want_folded
        assert [key for key, _ in rows] == list(want)
        assert [g[:4] for _, g in rows] == [[w["anon"], w["file"], w["shmem"], w["virtual"]]
                                            for w in want.values()]
        kept = {key for key, _ in rows} - {(OTHER, "other")}
        for key, g in rows:
            members = [m for m in maps if (m["mapping"], m["kind"]) == key] \
                if key in kept else [m for m in maps if (m["mapping"], m["kind"]) not in kept]
            assert g[4] == sum(m["pss_bytes"] for m in members)
            assert g[5] == sum(m["uss_bytes"] for m in members)


def test_scrapes_leave_no_garbage_collected_objects_behind():
    """Every scrape of a state whose processes all changed (new generations) keeps
    nothing but each live process's text: the number of objects the cyclic GC
    tracks does not grow scrape after scrape (a module-level cache of PSS sums by
    generation used to add ~50 per process per scrape, and the full collections
    over them made the scrape latency's tail)."""
    import gc

    from .test_pss_metrics import with_pss

    procs = [with_pss(many_identities(p, 80)) for p in range(1, 21)]
    box, c = text_collector(state_of(*(with_gen(p, 1) for p in procs)))
    gc.collect()
    counts = []
    for gen in range(2, 42):
        box.set(state_of(*(with_gen(p, gen) for p in procs)))
        c.render_text()
        if gen in (11, 41):
            gc.collect()
            counts.append(len(gc.get_objects()))
    assert c.rendered_rows == 40 * 20
    assert counts[1] - counts[0] < 200, counts
