"""The stack series (--stacks --stacks-series N, memtrace/exporter/stackseries.py):
bounded labels, label collisions summed, top N per process and measure, nothing at
all when off, and fresh on every scrape, by both exporter paths."""

from __future__ import annotations

import copy

import pytest

from memtrace.exporter.collector import MemtraceCollector
from memtrace.exporter.stackseries import (
    STACK_LABEL_CHARS,
    STACK_LABEL_FRAMES,
    frame_name,
    stack_label,
)
from memtrace.published import StateBox, TickState

from . import helpers
from .helpers import PAGE, Scrape, realistic_process, stack_entry, state_of, with_stacks
from .test_golden import normalise, stacks_state

HELD = "memtrace_stack_held_bytes"
BROUGHT = "memtrace_stack_brought_bytes"


def render(state: TickState, n: int, path: str = "text") -> Scrape:
    box = StateBox()
    box.set(state)
    collector = MemtraceCollector(box, 50, n)
    if path == "text":
        return Scrape(collector.render_text())
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    reg.register(collector)
    return Scrape(generate_latest(reg).decode("utf-8"))


def test_frame_names_are_functions_or_their_module_and_never_split_a_label():
    assert frame_name("fill_cache (app)") == "fill_cache"
    assert frame_name("f(int) const (libx.so.1)") == "f(int) const"
    assert frame_name("[unknown] (libc.so.6)") == "[libc.so.6]"
    assert frame_name("[unsampled]") == "[unsampled]"
    assert frame_name("a;b (app)") == "a\\x3bb"


def test_a_label_keeps_the_innermost_frames_outermost_first():
    frames = [f"f{i} (app)" for i in range(3)]
    assert stack_label(frames) == "f2;f1;f0"
    deep = [f"f{i} (app)" for i in range(20)]
    label = stack_label(deep)
    assert label == "[...];" + ";".join(f"f{i}" for i in reversed(range(STACK_LABEL_FRAMES)))
    assert stack_label([]) == "[unknown]"


@pytest.mark.parametrize("width", [10, 40, 150, 199, 200, 201, 1000])
def test_a_label_is_bounded_in_characters(width):
    frames = [("x" * width) + f"{i} (app)" for i in range(12)]
    label = stack_label(frames)
    assert len(label) <= STACK_LABEL_CHARS
    assert label.endswith("x" * min(width, 50) + "0") or label.endswith("…")
    assert label.count(";") <= STACK_LABEL_FRAMES


@pytest.mark.parametrize("path", ["text", "collect"])
def test_off_by_default_no_family_even_with_stacks_in_the_snapshots(path):
    with_keys = stacks_state()
    without = copy.deepcopy(with_keys)
    for snap in without.snapshots.values():
        snap.pop("stacks", None)
    got = render(with_keys, 0, path).text
    assert HELD not in got and BROUGHT not in got
    assert normalise(got) == normalise(render(without, 0, path).text)


@pytest.mark.parametrize("path", ["text", "collect"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 10])
def test_top_n_per_process_and_measure_largest_first(path, n):
    scrape = render(stacks_state(), n, path)
    for pid in ("500", "501"):
        held = scrape.series(HELD, pid=pid)
        brought = scrape.series(BROUGHT, pid=pid)
        # fixture: 7 held stacks (one label collision, one zero) -> 5 labels;
        # 5 brought stacks
        assert len(held) == min(n, 5) and len(brought) == min(n, 5)
        values = [v for _, v in held]
        assert values == sorted(values, reverse=True)
    assert scrape.series(HELD, pid="502") == []       # no stacks key: no series
    assert scrape.duplicates() == []


def test_stacks_with_the_same_label_are_summed_into_one_series():
    scrape = render(stacks_state(), 10)
    cut = [(lab, v) for lab, v in scrape.series(HELD, pid="500", mapping="[anon]")
           if lab["stack"].startswith("[...];level6;")]
    assert len(cut) == 1
    assert cut[0][1] == (16 + 8) * PAGE * 256        # path_a + path_b of the fixture


def test_groups_sum_their_processes_stacks():
    a = with_stacks(realistic_process(1, "nginx"), 1)
    b = with_stacks(realistic_process(2, "nginx"), 2)
    state = state_of(a, b, groups={1: "web", 2: "web"})
    scrape = render(state, 2)
    top = scrape.series(HELD, group="web")
    assert [v for _, v in top] == [3 * 64 * PAGE * 256, 3 * 24 * PAGE * 256]


def test_series_are_fresh_every_scrape_and_both_paths_agree():
    box = StateBox()
    snap = with_stacks(realistic_process(7, "app"), 1)
    snap["generation"] = 1       # the rest of the process's text is then cached
    box.set(state_of(snap))
    collector = MemtraceCollector(box, 50, 2)
    first = Scrape(collector.render_text())
    assert first.value(HELD, pid="7", mapping="[heap]",
                       stack="_start;__libc_start_call_main;main;fill_cache;"
                             "__memset_avx2_unaligned_erms") == 64 * PAGE * 256
    # the next tick: fill_cache gave its memory back, another stack holds the most
    later = copy.deepcopy(snap)    # same generation: only the stack series change
    later["stacks"]["held"] = [stack_entry(5 * PAGE, "[anon]", ["grow (app)", "main (app)"],
                                           kind="anon")]
    box.set(state_of(later))
    second = Scrape(collector.render_text())
    assert second.series(HELD, pid="7") == [(
        {"pid": "7", "comm": "app", "mapping": "[anon]", "stack": "main;grow"}, 5 * PAGE)]
    want = [(n, sorted(lab.items()), v) for n, lab, v in second.samples
            if n in (HELD, BROUGHT)]
    reg_scrape = render(box.get(), 2, "collect")
    got = [(n, sorted(lab.items()), v) for n, lab, v in reg_scrape.samples
           if n in (HELD, BROUGHT)]
    assert got == want


def test_helpers_fixture_is_sorted_like_the_summary():
    """The fixture's lists are largest first, as memtrace.stacks.summary gives them
    (top N of the series relies on the sums, not on this order, but a fixture
    unlike real snapshots would test less)."""
    snap = with_stacks(helpers.realistic_process(9), 1)
    for measure in ("held", "brought"):
        values = [e["bytes"] for e in snap["stacks"][measure]]
        assert values == sorted(values, reverse=True)


@pytest.mark.parametrize("n", [0, 2])
def test_the_served_endpoint_has_the_stack_series_asked_for(n):
    """serve_metrics (what watch, run and agent call with --stacks-series) hands
    the number to the collector that /metrics serves."""
    import types

    from memtrace.commands import live

    box = StateBox()
    box.set(stacks_state())
    server = live.serve_metrics(types.SimpleNamespace(exporter_box=box),  # type: ignore[arg-type]
                                live.bind_metrics(False, "127.0.0.1:0", None), 50, n)
    assert server is not None
    try:
        status, _, body = helpers.get(server.httpd.server_port)
    finally:
        server.close()
    assert status == 200
    scrape = Scrape(body.decode("utf-8"))
    assert len(scrape.series(HELD, pid="500")) == n
    assert len(scrape.series(BROUGHT, pid="501")) == n
