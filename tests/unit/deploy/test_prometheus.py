"""deploy/prometheus: promtool accepts the configs and rules, the rules' unit tests
pass, the relabeling does what its comments say, and every metric a rule reads is
in the contract."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helpers import CONTRACT_METRICS, DEFAULT_PORT, DEPLOY, metric_names, tool

PROM = DEPLOY / "prometheus"
RULES = PROM / "memtrace-rules.yml"
RULES_TEST = PROM / "memtrace-rules.test.yml"


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    exe = tool("promtool", "Debian package prometheus")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def load(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def test_check_config():
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_kubernetes_config(tmp_path):
    """Debian's promtool is built without Kubernetes service discovery: there the
    kubernetes_sd_configs block is swapped for a static target and the rest (relabeling,
    rule files) is checked as is."""
    r = promtool("check", "config", "prometheus-kubernetes.yml")
    if r.returncode != 0 and "kubernetes_sd_configs not found" in r.stdout + r.stderr:
        cfg = load(PROM / "prometheus-kubernetes.yml")
        for job in cfg["scrape_configs"]:
            del job["kubernetes_sd_configs"]
            job["static_configs"] = [{"targets": [f"10.0.0.1:{DEFAULT_PORT}"]}]
        cfg["rule_files"] = [str(RULES)]
        (tmp_path / "k.yml").write_text(yaml.safe_dump(cfg))
        r = promtool("check", "config", "k.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_rules():
    r = promtool("check", "rules", RULES.name)
    assert r.returncode == 0, r.stdout + r.stderr


def test_rule_unit_tests():
    r = promtool("test", "rules", RULES_TEST.name)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_rule_unit_tests_can_fail(tmp_path):
    """A wrong expectation makes `promtool test rules` fail, so the test above means
    something."""
    tests = load(RULES_TEST)
    tests["rule_files"] = [str(RULES)]
    alert = tests["tests"][0]["alert_rule_test"][-1]
    alert["exp_alerts"][0]["exp_labels"]["pid"] = "43"
    (tmp_path / "t.yml").write_text(yaml.safe_dump(tests))
    r = promtool("test", "rules", "t.yml", cwd=tmp_path)
    assert r.returncode != 0


def test_unit_tests_exercise_alerts():
    tests = load(RULES_TEST)["tests"]
    fired = {t["alertname"] for case in tests for t in case.get("alert_rule_test", [])
             if t.get("exp_alerts")}
    quiet = {t["alertname"] for case in tests for t in case.get("alert_rule_test", [])
             if not t.get("exp_alerts")}
    assert len(fired) >= 2, fired
    # The growth alerts are also shown not to fire too early or on a flat series.
    assert {"MemtraceMappingResidentGrowing", "MemtraceHeapNeverShrinks"} <= fired & quiet


def rules() -> list[dict[str, Any]]:
    return [rule for group in load(RULES)["groups"] for rule in group["rules"]]


def test_rules_cover_growth_and_self_monitoring():
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    for name in ("MemtraceMappingResidentGrowing", "MemtraceHeapNeverShrinks",
                 "MemtraceEventsLost", "MemtraceDriftPersistent", "MemtraceDown",
                 "MemtraceAbsent"):
        assert name in alerts
    assert "deriv(" in " ".join(r["expr"] for r in rules() if "record" in r)
    assert "predict_linear(" in alerts["MemtraceProcessResidentDoubling"]["expr"]
    for rule in alerts.values():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_rules_read_only_contract_metrics():
    recorded = {r["record"] for r in rules() if "record" in r}
    for rule in rules():
        used = metric_names(rule["expr"])
        unknown = used - CONTRACT_METRICS - recorded - {"up"}
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown}"
    # Every recording rule's name follows level:metric:operations.
    for name in recorded:
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name), name


def test_rules_aggregate_without_pid():
    """`by (pid, ...)` would drop the group label of `memtrace agent --group-by group`."""
    for rule in rules():
        assert not re.search(r"\bby\s*\(", rule["expr"]), rule


def relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus relabeling (replace, keep, drop) for these tests: regexes are fully
    anchored, $1 refers to the first group."""
    labels = dict(labels)
    for c in configs:
        action = c.get("action", "replace")
        value = c.get("separator", ";").join(labels.get(s, "") for s in
                                             c.get("source_labels", []))
        m = re.fullmatch(c.get("regex", "(.*)"), value)
        if action == "keep" and not m:
            return None
        if action == "drop" and m:
            return None
        if action == "replace" and m:
            template = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", c.get("replacement", "$1"))
            labels[c["target_label"]] = m.expand(template)
    return labels


def test_static_relabeling_drops_the_port():
    (job,) = load(PROM / "prometheus.yml")["scrape_configs"]
    target = job["static_configs"][0]["targets"][0]
    assert target.endswith(f":{DEFAULT_PORT}")
    out = relabel({"__address__": target}, job["relabel_configs"])
    assert out is not None and out["instance"] == target.rsplit(":", 1)[0]


def test_metric_relabeling_drops_only_what_it_says():
    (job,) = load(PROM / "prometheus.yml")["scrape_configs"]
    rules_ = job["metric_relabel_configs"]
    kept = {"__name__": "memtrace_mapping_resident_bytes", "kind": "library"}
    assert relabel(kept, rules_) == kept
    assert relabel({"__name__": "memtrace_mapping_resident_bytes", "kind": "special"},
                   rules_) is None
    assert relabel({"__name__": "memtrace_mapping_virtual_bytes", "kind": "heap"},
                   rules_) is None
    assert relabel({"__name__": "memtrace_process_resident_bytes"}, rules_) is not None


def test_kubernetes_relabeling_follows_the_pod_annotations():
    (job,) = load(PROM / "prometheus-kubernetes.yml")["scrape_configs"]
    daemonset = next(d for d in yaml.safe_load_all((DEPLOY / "kubernetes" /
                                                    "daemonset.yaml").read_text())
                     if d["kind"] == "DaemonSet")
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    pod = {
        "__address__": "10.1.2.3",
        "__metrics_path__": "/metrics",
        "__meta_kubernetes_namespace": daemonset["metadata"]["namespace"],
        "__meta_kubernetes_pod_name": "memtrace-x7k2p",
        "__meta_kubernetes_pod_node_name": "node-a",
        "__meta_kubernetes_pod_label_app_kubernetes_io_name":
            daemonset["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"],
    }
    for key, value in annotations.items():
        name = re.sub(r"[^a-zA-Z0-9_]", "_", key)
        pod[f"__meta_kubernetes_pod_annotation_{name}"] = value
    out = relabel(pod, job["relabel_configs"])
    assert out is not None
    assert out["__address__"] == f"10.1.2.3:{DEFAULT_PORT}"
    assert out["__metrics_path__"] == "/metrics"
    assert out["instance"] == "node-a"
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [
        daemonset["metadata"]["namespace"]]
    # Another pod (no annotation) is not scraped.
    other = {k: v for k, v in pod.items() if "annotation" not in k}
    assert relabel(other, job["relabel_configs"]) is None


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-kubernetes.yml"])
def test_configs_load_the_rules_and_name_the_job(config):
    cfg = load(PROM / config)
    assert cfg["rule_files"] == [RULES.name]
    assert [j["job_name"] for j in cfg["scrape_configs"]] == ["memtrace"]
    # The alerts select up{job="memtrace"}.
    assert 'job="memtrace"' in RULES.read_text()


def _docs_pod_join() -> str:
    """The PromQL docs/metrics.md gives to join memtrace with kube_pod_info."""
    text = (DEPLOY.parent / "docs" / "metrics.md").read_text()
    after = text.split("Join with kube-state-metrics", 1)[1]
    return after.split("```", 2)[1].strip()


def test_documented_pod_join_works_on_the_agents_series(tmp_path):
    """The agent's series (rendered by the exporter, empty labels dropped as
    Prometheus does) joined with kube_pod_info by the documented query: PSS per pod."""
    from prometheus_client.parser import text_string_to_metric_families

    from memtrace.exporter.collector import MemtraceCollector
    from memtrace.published import StateBox
    from tests.unit.exporter.test_collector import POD, container_state

    state = container_state()
    box = StateBox()
    box.set(state)
    series = []
    for family in text_string_to_metric_families(MemtraceCollector(box).render_text()):
        for s in family.samples:
            if s.name == "memtrace_process_pss_bytes":
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if v)
                series.append({"series": f"{s.name}{{{labels}}}", "values": f"{int(s.value)}x2"})
    assert len(series) == 3
    series.append({"series": f'kube_pod_info{{namespace="shop",pod="web-0",uid="{POD}",'
                             'node="n1"}', "values": "1x2"})
    series.append({"series": 'kube_pod_info{namespace="shop",pod="other",'
                             'uid="99999999-0000-0000-0000-000000000000",node="n1"}',
                   "values": "1x2"})
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "join", "rules": [
        {"record": "namespace_pod:memtrace_pss_bytes:sum", "expr": _docs_pod_join()}]}]}))
    want = sum(state.snapshots[p]["pss_bytes"] for p in (21, 22))
    (tmp_path / "t.yml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": [{
            "expr": "namespace_pod:memtrace_pss_bytes:sum", "eval_time": "1m",
            "exp_samples": [{"labels": 'namespace_pod:memtrace_pss_bytes:sum{namespace="shop",'
                                       'pod="web-0"}', "value": want}]}]}]}))
    r = promtool("test", "rules", "t.yml", cwd=tmp_path)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
