"""The metric names the deploy files rely on are the ones memtrace serves and
documents, and the label values they filter on exist."""

from __future__ import annotations

import json
import re

import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector

from memtrace.exporter.collector import MemtraceCollector
from memtrace.published import StateBox, TickState

from .helpers import CONTRACT_METRICS, DEPLOY, KINDS, REPO


def served_names() -> set[str]:
    registry = CollectorRegistry()
    box = StateBox()
    box.set(TickState(heap_walks={}))   # heap families: served with --heap-interval > 0
    registry.register(MemtraceCollector(box))
    registry.register(ProcessCollector(registry=None))
    names = set()
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "counter" and not name.endswith("_total"):
                name += "_total"
            names.add(name)
    return names


def test_memtrace_serves_every_contract_metric():
    missing = CONTRACT_METRICS - served_names()
    assert not missing, f"the exporter no longer serves {sorted(missing)}"


def test_docs_list_every_contract_metric():
    doc = (REPO / "docs" / "metrics.md").read_text()
    missing = {n for n in CONTRACT_METRICS if f"`{n}`" not in doc}
    assert not missing, f"docs/metrics.md does not list {sorted(missing)}"


def test_kind_values_used_exist():
    texts = [(DEPLOY / "grafana" / "memtrace-dashboard.json").read_text(),
             (DEPLOY / "prometheus" / "memtrace-rules.yml").read_text(),
             (DEPLOY / "prometheus" / "prometheus.yml").read_text()]
    used = set()
    for text in texts:
        used |= set(re.findall(r'kind=\\?"(\w+)\\?"', text))
        used |= set(re.findall(r";(\w+)'\s*$", text, re.M))  # relabel regex 'name;kind'
    assert used and used <= KINDS, used - KINDS
    # The dashboard and the rules parse (JSON, YAML) as a whole too.
    json.loads(texts[0])
    yaml.safe_load(texts[1])
