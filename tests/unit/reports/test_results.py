"""JUnit XML and JSON results of a gate: the XML parses (xml.etree) in the
shape GitLab and Jenkins read (testsuites > testsuite > testcase, failure and
skipped children, counts that match), the JSON names every budget."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from memtrace.reports.gate import Budgets, Gate
from memtrace.reports.results import budget_verdict, junit_xml, results_document

from .synth import MiB, series


def _verdicts():  # type: ignore[no-untyped-def]
    gate = Gate(Budgets(max_rss=60 * MiB, max_pss=1 << 30, max_growth=20 * MiB / 60))
    for tick in series((1000.0 + t, {"[heap]": 50 * MiB + t * MiB, "/x/lib<&>.so": MiB})
                       for t in range(80)):
        gate.observe(tick)
    return [budget_verdict(r) for r in gate.finish()]


def test_junit_parses_with_one_testcase_per_budget():
    verdicts = _verdicts()
    xml = junit_xml(verdicts, suite="memtrace.run", duration=79.0,
                    properties={"command": ["prog", "a&b"], "command_exit_status": 3})
    root = ET.fromstring(xml)
    assert root.tag == "testsuites"
    [suite] = root
    assert suite.tag == "testsuite" and suite.get("name") == "memtrace.run"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [
        "max-rss 60.0 MiB (tree RSS)", "max-pss 1.0 GiB (tree PSS)",
        "max-growth 20.0 MiB/min (tree RSS growth)"]
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped"),
            suite.get("errors")) == ("3", "2", "1", "0")
    assert root.get("failures") == "2"
    rss, pss, growth = cases
    fail = rss.find("failure")
    assert fail is not None and "[heap]" in fail.get("message", "")
    assert fail.get("message", "").startswith("budget: rss 61.0 MiB > 60.0 MiB at ")
    assert pss.find("skipped") is not None and pss.find("failure") is None
    assert growth.find("failure") is not None
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props == {"command": '["prog", "a&b"]', "command_exit_status": "3"}
    assert float(suite.get("time", "0")) == 79.0 and suite.get("timestamp")


def test_a_passing_gate_has_no_failure_element():
    gate = Gate(Budgets(max_rss=1 << 30))
    for tick in series((1000.0 + t, {"[heap]": MiB}) for t in range(3)):
        gate.observe(tick)
    [v] = [budget_verdict(r) for r in gate.finish()]
    root = ET.fromstring(junit_xml([v], suite="s", duration=1.0, properties={}))
    [case] = root.iter("testcase")
    assert case.find("failure") is None and case.find("skipped") is None
    assert "passed: peak 1.0 MiB <= 1.0 GiB" in (case.findtext("system-out") or "")


def test_json_results_carry_every_budget_and_the_command_status():
    verdicts = _verdicts()
    doc = results_document(verdicts, mode="run", exit_code=17,
                           context={"command": ["prog"], "command_exit_status": 0})
    doc = json.loads(json.dumps(doc))
    assert doc["memtrace_gate"] == 1 and doc["passed"] is False and doc["exit_code"] == 17
    assert doc["command_exit_status"] == 0
    by = {b["budget"]: b for b in doc["budgets"]}
    assert by["max-rss"]["status"] == "failed"      # 50 + 10 + 1 MiB at the 10th tick
    assert by["max-rss"]["breach"]["grew"][0] == {"mapping": "[heap]", "kind": "heap",
                                                  "bytes": 10 * MiB}
    assert by["max-pss"]["status"] == "unchecked" and by["max-pss"]["breach"] is None
    assert by["max-growth"]["breach"]["value"] > 20 * MiB / 60


def test_result_files_say_unfinished_until_the_verdicts_replace_them(tmp_path):
    from memtrace.commands.gate import GateOptions, prepare_outputs

    j, res = tmp_path / "j.xml", tmp_path / "r.json"
    prepare_outputs(GateOptions(Budgets(max_rss=1), str(j), str(res)), "run")
    suite = ET.parse(j).getroot().find("testsuite")
    assert suite is not None and suite.get("errors") == "1" and suite.get("failures") == "0"
    [case] = suite.findall("testcase")
    err = case.find("error")
    assert err is not None and "did not finish" in err.get("message", "")
    doc = json.loads(res.read_text())
    assert doc["passed"] is False and doc["exit_code"] is None
    assert doc["budgets"][0]["status"] == "error"
