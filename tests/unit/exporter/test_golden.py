"""Golden /metrics files (node_exporter's e2e style): fixed ExporterStates,
rendered by both exporter paths, compared with tests/unit/exporter/golden/*.prom.

Each fixture (pid.prom: `memtrace watch`; group.prom: agent --group-by group;
agent.prom: agent with container labels; agent-group.prom: both; empty.prom: no
targets; stacks.prom: watch --stacks --stacks-series 4; stacks-agent-group.prom:
agent --group-by group --stacks --stacks-series 4) is built by hand from
tests/unit/exporter/helpers.py and covers every metric family memtrace serves:
resident and virtual bytes, per mapping with [other] folding, PSS/USS/swap, heap
figures and walks, library loads, page faults (per mapping and the kernel's),
syscalls, self-monitoring, stacks; label values that need escaping or cutting; a
group with exited processes' counters.

- The fast text path (MemtraceCollector.render_text(), what /metrics serves, also
  as render_chunks()) must equal the golden file byte for byte, also when served
  from its per-process cache.
- The collector path (collect(), rendered by prometheus_client) must give the same
  families, in the same order, with the same HELP, TYPE, samples, labels and
  values (its number formatting is prometheus_client's: compared parsed).
- promtool check metrics must accept every golden file.

The only sample normalised is memtrace_scrape_build_seconds (a measured time:
written as 0); every other timing comes from the fixed state.

After an intended change to what /metrics shows, regenerate the files with

    .venv/bin/python -m pytest -q tests/unit/exporter/test_golden.py --update-golden

(or MEMTRACE_UPDATE_GOLDEN=1) and review `git diff tests/unit/exporter/golden/`."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from memtrace.exporter.collector import MemtraceCollector
from memtrace.published import StateBox, TickState
from tests.golden import check_golden, updating
from tests.unit.deploy.helpers import REPO, tool

from .helpers import (
    LIBC,
    PAGE,
    content_generation,
    mapping,
    place,
    realistic_process,
    snapshot,
    state_of,
    with_stacks,
)
from .test_collector import CID1, CID2, HEAP, POD, many_identities
from .test_pss_metrics import with_pss

GOLDEN = Path(__file__).parent / "golden"
MAX_SERIES = 50
# A measured time, not a figure of the state: its value is replaced by 0.
_TIMED = re.compile(r"^(memtrace_scrape_build_seconds(?:\{[^}]*\})?) \S+$", re.MULTILINE)


def normalise(text: str) -> str:
    return _TIMED.sub(r"\1 0", text)


def odd_names(pid: int) -> dict[str, Any]:
    """A process whose comm and mapping identities need escaping ("\\", '"',
    newline), are not ASCII, or are too long for one label (cut with a digest)."""
    long_path = "/opt/" + "x" * 600 + "/lib.so"
    maps = [
        mapping('/srv/we"ird\\dir/new\nline.so', "library", size=8 * PAGE, file=3 * PAGE),
        mapping("/usr/share/caf\u00e9/\u65e5\u672c.dat", "file", size=4 * PAGE, file=2 * PAGE),
        mapping("/tmp/bad\\xff.bin", "file", size=2 * PAGE, file=PAGE, anon=PAGE),
        mapping(long_path, "library", size=16 * PAGE, file=5 * PAGE),
        mapping("[heap]", "heap", size=32 * PAGE, anon=30 * PAGE, perms="rw-p"),
    ]
    snap = snapshot(pid, 'we"ird\\comm', place(maps),
                    faults_by_mapping={long_path: 4, "[heap]": 30},
                    syscalls={"mremap": 2}, syscall_bytes={"mremap": 8 * PAGE}, drift=PAGE)
    return snap


def heap_of(snap: dict[str, Any], main: int, thread: int) -> dict[str, Any]:
    snap["heap"] = {"status": "ok", "by_kind": {
        "main": {"in_use_bytes": main, "free_resident_bytes": main // 5,
                 "trimmable_bytes": main // 16},
        "thread": {"in_use_bytes": thread, "free_resident_bytes": thread // 4,
                   "trimmable_bytes": 0}}}
    return snap


def pid_state() -> TickState:
    """`memtrace watch`: a server with PSS, heap and library figures, a worker
    without PSS, a process with 60 identities (10 folded into [other]), one with
    odd names."""
    server = heap_of(with_pss(realistic_process(100, "server")), 3 << 20, 1 << 20)
    worker = realistic_process(200, "worker")
    worker["minor_faults"], worker["major_faults"] = 123_456, 78
    big = with_pss(many_identities(300, 60))
    odd = odd_names(400)
    return state_of(server, worker, big, odd,
                    full_rescans={"attach": 4, "statm_mismatch": 1, "layout": 2},
                    events_lost=3, ranges_lost=1, tick_seconds=0.004,
                    attach_seconds={100: 0.25, 200: 0.5, 300: 0.125, 400: 0.0625,
                                    999: 1.0},          # 999: not a target any more
                    targets_dropped=2, heap_walks={"ok": 7, "unsupported": 1})


def group_state() -> TickState:
    """agent --group-by group: two nginx in group web (one with PSS, so the group
    has no PSS series), postgres in db, and the counters of exited processes
    (one group with live processes, one without)."""
    a = heap_of(with_pss(realistic_process(11, "nginx")), 2 << 20, 0)
    b = realistic_process(12, "nginx")
    c = heap_of(with_pss(realistic_process(13, "postgres")), 8 << 20, 1 << 20)
    d = with_pss(realistic_process(14, "postgres"))
    retired = {
        ("web", "nginx"): {"syscalls": {"mmap": 5, "brk": 1}, "syscall_bytes": {"mmap": 5 << 16},
                           "faults_by_mapping": {"[heap]": 40, "/gone/libold.so": 9},
                           "kernel_faults": {"minor": 500, "major": 2}},
        ("batch", "cron"): {"syscalls": {"mmap": 3}, "syscall_bytes": {"mmap": 3 << 16},
                            "faults_by_mapping": {"[anon]": 17},
                            "kernel_faults": {"minor": 90, "major": 0}},
    }
    return state_of(a, b, c, d, groups={11: "web", 12: "web", 13: "db", 14: "db"},
                    retired=retired, full_rescans={"attach": 4}, events_lost=0,
                    tick_seconds=0.002, attach_seconds={11: 0.1, 12: 0.2, 13: 0.3, 14: 0.4},
                    notices_lost={"execs": 0, "forks": 5}, heap_walks={"ok": 2, "failed": 1})


def agent_state(groups: dict[int, str] | None = None) -> TickState:
    """agent (container_id, pod_uid labels): nginx in two containers of one pod,
    sshd outside any."""
    snaps = [with_pss(realistic_process(21, "nginx")), with_pss(realistic_process(22, "nginx")),
             realistic_process(23, "sshd")]
    for s in snaps[:2]:
        s["heap"] = copy.deepcopy(HEAP)
    return state_of(*snaps, containers={21: (CID1, POD), 22: (CID2, POD), 23: ("", "")},
                    groups=groups, heap_walks={"ok": 3}, full_rescans={"attach": 3},
                    tick_seconds=0.003, attach_seconds={21: 0.1, 22: 0.1, 23: 0.1},
                    notices_lost={"execs": 1, "forks": 0})


def stacks_state() -> TickState:
    """watch --stacks --stacks-series 4: a process with more stacks than that,
    names to escape and cut, two stacks that give one label; a process without
    the stacks key (attached before --stacks figures, or a test's other)."""
    a = with_stacks(realistic_process(500, "server"), 1)
    b = with_stacks(realistic_process(501, 'we"ird'), 2)
    c = realistic_process(502, "plain")
    return state_of(a, b, c, full_rescans={"attach": 3}, tick_seconds=0.002,
                    attach_seconds={500: 0.1, 501: 0.2, 502: 0.3})


def stacks_agent_group_state() -> TickState:
    """agent --group-by group --stacks --stacks-series 4: two processes of one
    group in one container (their stacks summed), one outside containers."""
    snaps = [with_stacks(realistic_process(31, "nginx"), 1),
             with_stacks(realistic_process(32, "nginx"), 3),
             with_stacks(realistic_process(33, "sshd"), 2)]
    return state_of(*snaps, groups={31: "web", 32: "web", 33: "ssh"},
                    containers={31: (CID1, POD), 32: (CID1, POD), 33: ("", "")},
                    full_rescans={"attach": 3}, tick_seconds=0.003,
                    attach_seconds={31: 0.1, 32: 0.1, 33: 0.1})


FIXTURES: dict[str, Callable[[], TickState]] = {
    "pid": pid_state,
    "group": group_state,
    "agent": agent_state,
    "agent-group": lambda: agent_state(groups={21: "web", 22: "web", 23: "ssh"}),
    "empty": TickState,
    "stacks": stacks_state,
    "stacks-agent-group": stacks_agent_group_state,
}
STACK_SERIES = 4


def collector_for(state: TickState) -> MemtraceCollector:
    """The collector of a fixture: with --stacks-series STACK_SERIES where its
    snapshots carry stacks (the stacks fixtures), else as without --stacks."""
    box = StateBox()
    box.set(state)
    with_stacks = any("stacks" in s for s in state.snapshots.values())
    return MemtraceCollector(box, MAX_SERIES, STACK_SERIES if with_stacks else 0)


def text_path(state: TickState) -> str:
    return normalise(collector_for(state).render_text())


def collect_path(state: TickState) -> str:
    reg = CollectorRegistry()
    reg.register(collector_for(state))
    return normalise(generate_latest(reg).decode("utf-8"))


def parsed(text: str) -> list[tuple[str, str, str, list[tuple[str, tuple[Any, ...], float]]]]:
    """Families as (name, type, help, samples (name, sorted labels, value)), in order."""
    return [(f.name, f.type, f.documentation,
             [(s.name, tuple(sorted(s.labels.items())), s.value) for s in f.samples])
            for f in text_string_to_metric_families(text)]


@pytest.mark.parametrize("name", list(FIXTURES))
def test_text_path_matches_the_golden_file(name):
    check_golden(GOLDEN / f"{name}.prom", text_path(FIXTURES[name]()))


@pytest.mark.parametrize("name", list(FIXTURES))
def test_collect_path_gives_the_same_families_samples_and_values(name):
    golden = (GOLDEN / f"{name}.prom").read_text(encoding="utf-8")
    got = parsed(collect_path(FIXTURES[name]()))
    want = parsed(golden)
    assert [f[:3] for f in got] == [f[:3] for f in want]
    for g, w in zip(got, want):
        assert g[3] == w[3], g[0]


@pytest.mark.parametrize("name", list(FIXTURES))
def test_chunks_and_the_cached_text_are_the_golden_text(name):
    """render_chunks() joined, and a second scrape of snapshots that carry a
    generation (served from the per-process cache), give the same bytes."""
    state = FIXTURES[name]()
    golden = (GOLDEN / f"{name}.prom").read_text(encoding="utf-8")
    assert normalise(b"".join(collector_for(state).render_chunks()).decode("utf-8")) == golden
    stamped = TickState(**{**state.__dict__, "snapshots": {
        pid: {**s, "generation": content_generation(s)} for pid, s in state.snapshots.items()}})
    collector = collector_for(stamped)
    first = normalise(collector.render_text())
    second = normalise(collector.render_text())
    # memtrace_mapping_series_folded_total counts over scrapes: it doubles
    folded = "memtrace_mapping_series_folded_total "
    strip = lambda t: [x for x in t.splitlines() if not x.startswith(folded)]  # noqa: E731
    assert first == golden
    assert strip(second) == strip(golden)


def test_every_family_and_label_set_is_in_a_golden_file():
    """Every family the exporter builds has samples in some golden file, every
    metric docs/metrics.md names is served there and every one served is named
    there; and the files have every who-label set (pid, group, with container
    labels)."""
    families: set[str] = set()
    for make in FIXTURES.values():
        families |= {f.sample for f in collector_for(make()).build()}
    seen: set[str] = set()
    label_sets: set[frozenset[str]] = set()
    for name in FIXTURES:
        for fam in text_string_to_metric_families(
                (GOLDEN / f"{name}.prom").read_text(encoding="utf-8")):
            for s in fam.samples:
                seen.add(s.name)
                if "comm" in s.labels:
                    label_sets.add(frozenset(k for k in s.labels
                                             if k in ("pid", "group", "comm", "container_id",
                                                      "pod_uid")))
    assert families - seen == set()
    documented = set(re.findall(r"\bmemtrace_[a-z_]*[a-z]\b",
                                (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")))
    assert documented - seen == set(), "documented but in no golden file"
    assert seen - documented == set(), "served but not in docs/metrics.md"
    assert {frozenset(x) for x in (("pid", "comm"), ("group", "comm"),
                                   ("pid", "comm", "container_id", "pod_uid"),
                                   ("group", "comm", "container_id", "pod_uid"))} <= label_sets


def test_golden_files_have_no_duplicate_series_and_fold_into_other():
    text = (GOLDEN / "pid.prom").read_text(encoding="utf-8")
    samples = [(s.name, tuple(sorted(s.labels.items())))
               for f in text_string_to_metric_families(text) for s in f.samples]
    assert len(samples) == len(set(samples))
    assert 'memtrace_mapping_resident_bytes{pid="300",comm="big",mapping="[other]",' in text
    assert f'mapping="{LIBC}"' in text
    assert "…~" in text                                     # a label cut with a digest


@pytest.mark.parametrize("name", list(FIXTURES))
def test_promtool_accepts_the_golden_file(name):
    if updating():
        pytest.skip("golden files being rewritten")
    exe = tool("promtool", "Debian package prometheus")
    path = GOLDEN / f"{name}.prom"
    r = subprocess.run([exe, "check", "metrics"], input=path.read_bytes(),
                       capture_output=True, timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode("utf-8", "replace")
