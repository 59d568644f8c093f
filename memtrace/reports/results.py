"""What a gate (`run --max-*`, `check`) leaves for CI: verdicts, one per budget,
as a JSON results file and as JUnit XML (one testcase per budget; a broken one
carries a <failure> whose message is the line memtrace printed). Shapes in
docs/gate.md."""

from __future__ import annotations

import json
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from memtrace.reports.gate import BudgetResult, fmt_rate
from memtrace.util.units import fmt_bytes

RESULTS_VERSION = 1


@dataclass
class Verdict:
    """One budget checked: `status` "passed", "failed" or "unchecked" ("error":
    no verdict, memtrace did not finish); `message`
    one line (the breach, or what was seen); `details` its figures (JSON)."""

    name: str                       # the testcase name
    budget: str                     # the option: "max-rss", "max-increase", ...
    status: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def _rows(rows: Sequence[tuple[str, str, int]]) -> list[dict[str, Any]]:
    return [{"mapping": m, "kind": k, "bytes": v} for m, k, v in rows]


def _limit_text(r: BudgetResult) -> str:
    return fmt_rate(r.limit) if r.unit == "bytes_per_second" else fmt_bytes(r.limit)


def budget_verdict(r: BudgetResult) -> Verdict:
    """A gate budget's result as a verdict."""
    what = {"max-rss": "tree RSS", "max-pss": "tree PSS",
            "max-growth": "tree RSS growth"}[r.name]
    name = f"{r.name} {_limit_text(r)} ({what})"
    details: dict[str, Any] = {"limit": r.limit, "unit": r.unit, "worst": r.worst,
                               "worst_ts": r.worst_ts, "note": r.note or None,
                               "breach": None}
    b = r.breach
    if b is not None:
        details["breach"] = {"ts": b.ts, "elapsed_seconds": round(b.elapsed, 3),
                             "value": b.value, "since_ts": b.since_ts,
                             "held": _rows(b.held), "grew": _rows(b.grew)}
        return Verdict(name, r.name, "failed", b.message, details)
    if r.status == "unchecked":
        return Verdict(name, r.name, "unchecked", f"{r.name}: not checked: {r.note}", details)
    worst = "-" if r.worst is None else (
        fmt_rate(r.worst) if r.unit == "bytes_per_second" else fmt_bytes(r.worst))
    seen = "largest sustained-window slope" if r.name == "max-growth" else "peak"
    note = f" ({r.note})" if r.note else ""
    return Verdict(name, r.name, "passed",
                   f"{r.name}: passed: {seen} {worst} <= {_limit_text(r)}{note}", details)


def results_document(verdicts: Sequence[Verdict], *, mode: str, exit_code: int | None,
                     context: dict[str, Any]) -> dict[str, Any]:
    """The JSON results: the verdicts and what was gated (`context`: command,
    command_exit_status, recording, baseline, ...)."""
    return {
        "memtrace_gate": RESULTS_VERSION,
        "mode": mode,
        "passed": not any(v.status in ("failed", "error") for v in verdicts),
        "exit_code": exit_code,
        **context,
        "budgets": [{"name": v.name, "budget": v.budget, "status": v.status,
                     "message": v.message, **v.details} for v in verdicts],
    }


def junit_xml(verdicts: Sequence[Verdict], *, suite: str, duration: float,
              properties: dict[str, Any], timestamp: float | None = None) -> bytes:
    """JUnit XML as GitLab and Jenkins read it: <testsuites><testsuite> with one
    <testcase> per verdict; <failure message=...> for a broken budget,
    <skipped> for one that could not be checked, <error> for no verdict."""
    when = time.time() if timestamp is None else timestamp
    failures = sum(v.failed for v in verdicts)
    skipped = sum(v.status == "unchecked" for v in verdicts)
    errors = sum(v.status == "error" for v in verdicts)
    counts = {"tests": str(len(verdicts)), "failures": str(failures), "errors": str(errors),
              "skipped": str(skipped), "time": f"{duration:.3f}"}
    root = ET.Element("testsuites", {"name": "memtrace", **counts})
    ts = ET.SubElement(root, "testsuite", {
        "name": suite, **counts,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)),
        "hostname": socket.gethostname()})
    props = ET.SubElement(ts, "properties")
    for key, value in properties.items():
        text = value if isinstance(value, str) else json.dumps(value)
        ET.SubElement(props, "property", {"name": key, "value": text})
    for v in verdicts:
        case = ET.SubElement(ts, "testcase", {"classname": suite, "name": v.name,
                                              "time": f"{duration:.3f}"})
        if v.failed:
            fail = ET.SubElement(case, "failure", {"message": v.message,
                                                   "type": "MemoryBudgetExceeded"})
            fail.text = v.message + "\n" + json.dumps(v.details, indent=1, sort_keys=True)
        elif v.status == "error":
            ET.SubElement(case, "error", {"message": v.message, "type": "NoVerdict"})
        elif v.status == "unchecked":
            ET.SubElement(case, "skipped", {"message": v.message})
        else:
            ET.SubElement(case, "system-out").text = v.message
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
