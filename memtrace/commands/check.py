"""`memtrace check RECORDING`: the budget gate offline, on a recording
(docs/gate.md): its peaks against a baseline recording (--baseline,
--max-increase) and the same absolute budgets as `run` (--max-rss, --max-pss,
--max-growth). Exit 17 naming what broke; 16 when a recording is cut short or
corrupt (after checking what was read)."""

from __future__ import annotations

from typing import Any

import click

from memtrace.commands.gate import (
    Percent,
    budget_options,
    pop_budgets,
    prepare_outputs,
    write_outputs,
)
from memtrace.commands.options import EXIT_CODES_HELP, Size
from memtrace.errors import ExitCode, MemtraceError
from memtrace.reports.baseline import compare_to_baseline
from memtrace.reports.gate import Gate
from memtrace.reports.profile import RunProfile, build_profile
from memtrace.reports.results import Verdict, budget_verdict
from memtrace.util.log import log


def _read(path: str, gate: Gate | None, problems: list[str]) -> RunProfile:
    """The profile of one recording; a cut or corrupt one is noted in `problems`
    (exit 16 at the end), one without its end line is a warning."""
    profile = build_profile(path, gate)
    if profile.cut:
        assert profile.problem is not None
        problems.append(profile.problem)
    elif profile.problem:
        log(f"warning: {profile.problem}; checking what was recorded")
    if not profile.ticks:
        log(f"warning: {path}: no snapshot in the recording")
    return profile


def _context(run: RunProfile, baseline: str | None) -> dict[str, Any]:
    s = run.info.summary or {}
    return {"recording": run.path, "baseline": baseline,
            "command": run.header.get("command"),
            "command_exit_status": s.get("exit_status"), "command_signal": s.get("signal"),
            "ticks": run.ticks, "duration_seconds": round(run.duration, 3),
            "recording_complete": run.ended}


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("recording", type=click.Path(dir_okay=False))
@click.option("--baseline", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="A recording of the same test before the change: the recording's tree "
              "peak RSS and PSS, each process name's and each library's peak may be at "
              "most --max-increase above it.")
@click.option("--max-increase", type=Percent(), default="5%", show_default=True,
              metavar="PERCENT", help="With --baseline: how much above the baseline's "
              "peak a peak may be (5%, 0.5%).")
@click.option("--ignore-below", type=Size(), default="1M", show_default=True,
              metavar="SIZE", help="With --baseline: increases smaller than SIZE never "
              "break (a library going from 8 KiB to 12 KiB is +50%).")
@budget_options
def check(recording: str, baseline: str | None, max_increase: float, ignore_below: int,
          **kwargs: Any) -> None:
    """Check RECORDING (.mtrace) against budgets: exit 17 naming what broke.

    memtrace check run.mtrace --baseline base.mtrace --max-increase 5%

    With --baseline: peaks compared (the tree's RSS and PSS, per process name,
    per library). --max-rss, --max-pss, --max-growth: the budgets of `run`,
    judged on the recorded snapshots. A recording without its end line (the
    recorder was killed) is checked with a warning; one cut short or corrupt is
    checked up to there and exits 16."""
    opts = pop_budgets(kwargs)
    if baseline is None and not opts.budgets.any():
        raise MemtraceError("check needs --baseline or a budget (--max-rss, --max-pss, "
                            "--max-growth)", ExitCode.USAGE)
    prepare_outputs(opts, "check")
    problems: list[str] = []
    gate = Gate(opts.budgets) if opts.budgets.any() else None
    run = _read(recording, gate, problems)
    verdicts: list[Verdict] = []
    if gate is not None:
        verdicts += [budget_verdict(r) for r in gate.finish()]
    if baseline is not None:
        base = _read(baseline, None, problems)
        verdicts += compare_to_baseline(run, base, max_increase, ignore_below)
    failed = any(v.failed for v in verdicts)
    code = (ExitCode.RECORDING_UNREADABLE if problems
            else ExitCode.BUDGET_EXCEEDED if failed else ExitCode.OK)
    for v in verdicts:
        log(v.message)
    write_outputs(opts, verdicts, mode="check", exit_code=int(code),
                  context=_context(run, baseline), duration=run.duration)
    for problem in problems:
        log(f"error: {problem}")
    if code != ExitCode.OK:
        raise SystemExit(int(code))
