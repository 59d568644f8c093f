"""memtrace.exporter.metrics, the one table of metric definitions: what both
exporter paths serve on the golden fixtures agrees with it (name, type, HELP, label
names and their order, family order), every definition is served, and
docs/metrics.md documents exactly the table's metrics with the same type and labels."""

from __future__ import annotations

import re
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from memtrace.exporter.metrics import METRICS
from memtrace.exporter.rows import who_of
from tests.unit.deploy.helpers import REPO

from .test_golden import FIXTURES, collector_for

BY_NAME = {metric.name: metric for metric in METRICS}


def served(name: str, path: str) -> tuple[tuple[str, ...], list[Any]]:
    """(who-labels, the families one scrape of fixture `name` gives by `path`:
    collect()'s prometheus_client families as emitted (label order kept; its
    exposition sorts them), or the text path's, parsed)."""
    state = FIXTURES[name]()
    collector = collector_for(state)
    if path == "collect":
        return who_of(state), list(collector.collect())
    return who_of(state), list(text_string_to_metric_families(collector.render_text()))


@pytest.mark.parametrize("path", ["collect", "text"])
@pytest.mark.parametrize("name", list(FIXTURES))
def test_every_served_family_is_in_the_table_as_defined(name, path):
    who, families = served(name, path)
    memtrace_families = [f for f in families if f.name.startswith("memtrace_")]
    assert memtrace_families, "no memtrace family served"
    for fam in memtrace_families:
        metric = BY_NAME.get(fam.name)
        assert metric is not None, f"{fam.name} is served but not in metrics.METRICS"
        assert fam.type == metric.kind, fam.name
        assert fam.documentation == metric.help, fam.name
        for s in fam.samples:
            assert s.name == metric.sample, (fam.name, s.name)
            assert list(s.labels) == metric.label_names(who), (fam.name, s.labels)
    # served in the table's order
    order = [BY_NAME[f.name] for f in memtrace_families]
    assert order == sorted(order, key=METRICS.index)


@pytest.mark.parametrize("name", list(FIXTURES))
def test_built_families_carry_their_definitions(name):
    state = FIXTURES[name]()
    who = who_of(state)
    for family in collector_for(state).build():
        metric = BY_NAME[family.name]
        assert family.metric is metric
        assert (family.kind, family.help, family.labels) == \
            (metric.kind, metric.help, metric.label_names(who))


def test_every_definition_is_served_with_samples_by_some_fixture():
    seen: set[str] = set()
    for name in FIXTURES:
        for fam in served(name, "text")[1]:
            if fam.samples:
                seen.add(fam.name)
    assert {metric.name for metric in METRICS} - seen == set()
    assert len(BY_NAME) == len(METRICS), "a name defined twice"


def documented() -> dict[str, tuple[str, list[str]]]:
    """docs/metrics.md's "Names" table: sample name -> (type, label names)."""
    text = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")
    rows: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3:
            continue
        m = re.fullmatch(r"`(memtrace_[a-z_]+)`", cells[0])
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} documented twice"
            rows[m.group(1)] = (cells[1], [x.strip() for x in cells[2].split(",") if x.strip()])
    return rows


def test_docs_name_every_metric_of_the_table_with_its_type_and_labels():
    docs = documented()
    assert len(docs) > 20
    for metric in METRICS:
        assert metric.sample in docs, f"{metric.sample} not in docs/metrics.md"
        kind, labels = docs[metric.sample]
        assert kind == metric.kind, metric.sample
        # docs write the process labels of watch: pid, comm
        assert labels == metric.label_names(("pid", "comm")), metric.sample
    assert set(docs) - {metric.sample for metric in METRICS} == set(), \
        "documented but not in metrics.METRICS"
