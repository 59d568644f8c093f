"""deploy/grafana: the dashboard is valid JSON, takes its data source from a variable
(no data source uid anywhere), queries only contract metrics with valid PromQL, and
has the panels it promises."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from .helpers import CONTRACT_METRICS, DEPLOY, metric_names, tool

DASHBOARD = DEPLOY / "grafana" / "memtrace-dashboard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def dash() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


def queries(dash: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for p in all_panels(dash["panels"]):
        for t in p.get("targets", []):
            yield p["title"], t


def walk(node: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def variables(dash: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dash["templating"]["list"]}


def test_datasource_is_a_variable(dash):
    v = variables(dash)["datasource"]
    assert v["type"] == "datasource" and v["query"] == "prometheus"
    # Nothing pinned: Grafana picks the default Prometheus data source.
    assert not v.get("current")


def test_no_fixed_uid_anywhere(dash):
    for path, key, value in walk(dash):
        if key == "uid":
            assert value == "${datasource}", f"{path}.uid = {value!r}"
    assert "__inputs" not in dash  # import-time data source placeholders (DS_...)
    assert "DS_" not in DASHBOARD.read_text()


def test_every_panel_and_query_uses_the_datasource_variable(dash):
    panels = [p for p in all_panels(dash["panels"]) if p["type"] != "row"]
    assert panels
    for p in panels:
        assert p.get("datasource") == DS, p["title"]
        assert p.get("targets"), p["title"]
        for t in p["targets"]:
            assert t.get("datasource") == DS, p["title"]
    for name in ("job", "instance", "pid", "comm", "group"):
        assert variables(dash)[name]["datasource"] == DS, name


def test_variables(dash):
    v = variables(dash)
    assert list(v)[:2] == ["datasource", "job"]
    assert {"instance", "pid", "comm", "group"} <= set(v)
    for name in ("job", "instance", "pid", "comm", "group"):
        assert v[name]["type"] == "query"
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", v[name]["query"]["query"])
        assert m and m.group(2) == name, v[name]["query"]
        assert metric_names(m.group(1)) <= CONTRACT_METRICS
    # instance and pid depend on the variables before them.
    assert "$job" in v["instance"]["query"]["query"]
    assert "$job" in v["pid"]["query"]["query"] and "$instance" in v["pid"]["query"]["query"]
    for name in ("pid", "comm", "group"):
        q = v[name]["query"]["query"]
        assert "$job" in q and "$instance" in q, name
        # "All" must also match series without the label (pid in group mode,
        # group in pid mode).
        assert v[name]["includeAll"] and v[name]["allValue"] == ".*", name


def test_queries_use_only_contract_metrics_and_the_variables(dash):
    seen: set[str] = set()
    for title, t in queries(dash):
        names = metric_names(t["expr"])
        assert names, f"{title}: no metric in {t['expr']!r}"
        assert names <= CONTRACT_METRICS, f"{title}: {names - CONTRACT_METRICS}"
        seen |= names
        assert 'job=~"$job"' in t["expr"] and 'instance=~"$instance"' in t["expr"], title
        if any(n.startswith(("memtrace_process_", "memtrace_mapping_resident",
                             "memtrace_page_faults", "memtrace_syscall",
                             "memtrace_mapping_pss", "memtrace_mapping_uss",
                             "memtrace_heap_"))
               for n in names):
            for sel in ('pid=~"$pid"', 'comm=~"$comm"', 'group=~"$group"'):
                assert sel in t["expr"], (title, sel)
    # Every per-process metric and every health metric has a panel.
    assert CONTRACT_METRICS - seen == set(), CONTRACT_METRICS - seen


def test_panels_promised(dash):
    exprs = {title: [] for title, _ in queries(dash)}
    for title, t in queries(dash):
        exprs[title].append(t["expr"])

    def panel(pattern: str) -> list[str]:
        found = [e for title, es in exprs.items() if re.search(pattern, title, re.I)
                 for e in es]
        assert found, f"no panel titled like {pattern!r}"
        return found

    (by_kind,) = panel(r"by mapping kind")
    assert "memtrace_mapping_resident_bytes" in by_kind and "kind)" in by_kind
    by_kind_panel = next(p for p in all_panels(dash["panels"])
                         if re.search("by mapping kind", p["title"]))
    assert by_kind_panel["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    (libs,) = panel(r"top libraries by resident")
    assert 'kind="library"' in libs and "topk(" in libs
    (heap,) = panel(r"^heap over time")
    assert 'kind="heap"' in heap
    assert "rate(memtrace_page_faults_total" in panel(r"faults")[0]
    assert "rate(memtrace_syscalls_total" in panel(r"system calls per second")[0]
    assert "memtrace_events_lost_total" in panel(r"lost")[0]
    assert "by (instance, reason)" in panel(r"rescans")[0]
    assert any("memtrace_tick_duration_seconds" in e for e in panel(r"tick"))
    assert "process_cpu_seconds_total" in panel(r"cpu")[0]
    assert "process_resident_memory_bytes" in panel(r"memtrace resident")[0]
    pss = panel(r"PSS and USS per process")
    assert any("memtrace_process_pss_bytes" in e for e in pss)
    assert any("memtrace_process_uss_bytes" in e for e in pss)
    assert any('kind="library"' in e and "memtrace_mapping_pss_bytes" in e
               for e in panel(r"libraries by PSS"))
    glibc = " ".join(panel(r"glibc heap"))
    for name in ("in_use", "free_resident", "trimmable"):
        assert f"memtrace_heap_{name}_bytes" in glibc, name


def test_per_process_queries_keep_the_group_label(dash):
    """`by (instance, pid, comm)` would merge the groups of agent --group-by group
    (or comm) that share a comm; every aggregation that keeps pid keeps group."""
    for title, t in queries(dash):
        for by in re.findall(r"by \(([^)]*)\)", t["expr"]):
            labels = [x.strip() for x in by.split(",")]
            if "pid" in labels and "memtrace_attach_duration_seconds" not in t["expr"]:
                assert "group" in labels, (title, t["expr"])
                assert "{{group}}" in (t.get("legendFormat") or "{{group}}"), (title, t)


def test_resident_sums_over_processes_say_pss_is_the_sum(dash):
    """A sum of resident bytes over processes (or a group) counts shared pages once per
    process: the panels that show one say so and point at PSS."""
    for p in all_panels(dash["panels"]):
        exprs = [t["expr"] for t in p.get("targets", [])]
        if any("memtrace_process_resident_bytes" in e for e in exprs):
            assert "PSS" in p.get("description", ""), p["title"]


def test_layout(dash):
    ids = [p["id"] for p in all_panels(dash["panels"])]
    assert len(ids) == len(set(ids))
    taken: dict[tuple[int, int], str] = {}
    for p in all_panels(dash["panels"]):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, f"{p['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = p["title"]
    # A panel repeated horizontally per pid gets the whole width, shared out by Grafana.
    for p in all_panels(dash["panels"]):
        if p.get("repeat"):
            assert p["repeatDirection"] == "h" and p["gridPos"]["w"] == 24, p["title"]


def test_queries_are_valid_promql(dash, tmp_path):
    """Each query, with the dashboard's variables filled in, as a recording rule that
    `promtool check rules` must accept."""
    exe = tool("promtool", "Debian package prometheus")
    fill = {"$__rate_interval": "1m", "$job": ".+", "$instance": ".+", "$pid": ".*", "$comm": ".*",
            "$group": ".*"}
    rules = []
    for i, (_, t) in enumerate(queries(dash)):
        expr = t["expr"]
        for var, value in fill.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query:{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([exe, "check", "rules", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
