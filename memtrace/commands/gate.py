"""The budget gate on the command line (docs/gate.md): option types for rates
and percentages, `run`'s budget options (one `gate_opts`), the live gate `run`
feeds tick by tick (RunGate), and writing the JUnit and JSON results."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import click

from memtrace.commands.options import Seconds, Size, parse_size
from memtrace.errors import ExitCode, MemtraceError, OutputError
from memtrace.reports.gate import BudgetResult, Budgets, Gate, Snapshots
from memtrace.reports.results import Verdict, budget_verdict, junit_xml, results_document
from memtrace.util.log import log

_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "min": 60.0, "minute": 60.0,
        "h": 3600.0, "hour": 3600.0}


def parse_rate(text: str) -> float:
    """Bytes per second from "20MiB/min", "1M/s", "100MiB/h"; ValueError with the
    reason when it is not a positive size per s, min or h."""
    m = re.fullmatch(r"\s*(.+?)\s*/\s*([a-zA-Z]+)\s*", str(text))
    if m is None or m.group(2).lower() not in _PER:
        raise ValueError(f"{text!r} is not a rate like 20MiB/min (per s, min or h)")
    size = parse_size(m.group(1))
    if size <= 0:
        raise ValueError(f"{text!r}: the rate must be more than 0")
    return size / _PER[m.group(2).lower()]


def parse_percent(text: str) -> float:
    """A fraction from "5%" or "5" (percent), 0 to 1000%."""
    t = str(text).strip().removesuffix("%")
    try:
        value = float(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a percentage like 5%") from None
    if math.isnan(value) or not 0 <= value <= 1000:
        raise ValueError(f"{text!r} is not in the range 0% to 1000%")
    return value / 100


class Rate(click.ParamType):
    """Bytes per second, from "20MiB/min" and the like (parse_rate)."""

    name = "rate"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_rate(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class Percent(click.ParamType):
    """A fraction, from "5%" (parse_percent)."""

    name = "percent"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_percent(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


@dataclass(frozen=True)
class GateOptions:
    budgets: Budgets
    junit: str | None
    results: str | None
    fail_fast: bool = False


def budget_options(f: Any) -> Any:
    """--max-rss, --max-pss, --max-growth, --growth-window, --warm-up, --junit,
    --results (run and check)."""
    options = [
        click.option("--max-rss", type=Size(), default=None, metavar="SIZE",
                     help="Budget: the tree's total RSS (summed over its processes at one "
                     "tick) must stay at most SIZE (512MiB, 2G). Exit 17 if it breaks."),
        click.option("--max-pss", type=Size(), default=None, metavar="SIZE",
                     help="Budget: the same on the tree's total PSS (a page shared by "
                     "the tree's processes counts once); needs PSS figures (run: "
                     "--pss-interval > 0)."),
        click.option("--max-growth", type=Rate(), default=None, metavar="RATE",
                     help="Budget: sustained growth of the tree's total RSS (20MiB/min; "
                     "per s, min or h): the least-squares slope over --growth-window, and "
                     "over each half of it at least half the budget (docs/gate.md)."),
        click.option("--growth-window", type=Seconds(min=1.0), default=60.0,
                     show_default=True, metavar="SECONDS",
                     help="With --max-growth: the sliding window the slope is fitted over. "
                     "A shorter run is judged once, at its end, over all of it."),
        click.option("--warm-up", "warm_up", type=Seconds(), default=10.0,
                     show_default=True, metavar="SECONDS",
                     help="With --max-growth: seconds after the first snapshot that are "
                     "not judged (start-up)."),
        click.option("--junit", type=click.Path(dir_okay=False), default=None,
                     metavar="FILE", help="Write the budgets' verdicts as JUnit XML (one "
                     "testcase per budget) for CI."),
        click.option("--results", type=click.Path(dir_okay=False), default=None,
                     metavar="FILE", help="Write the budgets' verdicts as JSON "
                     "(docs/gate.md)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def pop_budgets(kwargs: dict[str, Any]) -> GateOptions:
    """budget_options' values out of a command's kwargs."""
    budgets = Budgets(kwargs.pop("max_rss"), kwargs.pop("max_pss"), kwargs.pop("max_growth"),
                      kwargs.pop("growth_window"), kwargs.pop("warm_up"))
    return GateOptions(budgets, kwargs.pop("junit"), kwargs.pop("results"))


def gate_options(f: Any) -> Any:
    """run's budget options and --fail-fast: the command gets one `gate_opts`,
    a GateOptions, or None when no budget is set."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        fail_fast = kwargs.pop("fail_fast")
        opts = pop_budgets(kwargs)
        if not opts.budgets.any():
            for flag, value in (("--junit", opts.junit), ("--results", opts.results),
                                ("--fail-fast", fail_fast)):
                if value:
                    raise MemtraceError(f"{flag} needs a budget (--max-rss, --max-pss or "
                                        "--max-growth)", ExitCode.USAGE)
        if opts.budgets.max_pss is not None and kwargs.get("pss_interval") == 0:
            raise MemtraceError("--max-pss needs PSS: --pss-interval must not be 0",
                                ExitCode.USAGE)
        kwargs["gate_opts"] = GateOptions(opts.budgets, opts.junit, opts.results,
                                          fail_fast) if opts.budgets.any() else None
        return f(*args, **kwargs)

    wrapper = click.option("--fail-fast", is_flag=True,
                           help="When a budget breaks, send SIGTERM to the command "
                           "instead of letting it run to its end.")(wrapper)
    return budget_options(wrapper)


UNFINISHED = ("memtrace did not finish: killed, or stopped by an error before its "
              "verdicts (see its log)")


def prepare_outputs(opts: GateOptions, mode: str) -> None:
    """Write the result files now, saying that no verdict was reached yet: one
    that cannot be written fails before anything runs (exit 14), and a memtrace
    killed or stopped by an error leaves a JUnit error, not an empty file, for
    CI to show. write_outputs replaces them at the end."""
    verdict = Verdict(f"memtrace {mode}", "memtrace", "error", UNFINISHED)
    write_outputs(opts, [verdict], mode=mode, exit_code=None, context={}, duration=0.0)


def write_outputs(opts: GateOptions, verdicts: Sequence[Verdict], *, mode: str,
                  exit_code: int | None, context: dict[str, Any], duration: float) -> None:
    import json

    files: list[tuple[str, bytes]] = []
    if opts.results:
        doc = results_document(verdicts, mode=mode, exit_code=exit_code, context=context)
        files.append((opts.results, (json.dumps(doc, indent=1) + "\n").encode()))
    if opts.junit:
        props = {k: v for k, v in context.items() if v is not None}
        files.append((opts.junit, junit_xml(verdicts, suite=f"memtrace.{mode}",
                                            duration=duration, properties=props)))
    for path, data in files:
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


class RunGate:
    """The gate of `run`: fed the tree's snapshots at every tick; a budget that
    breaks is said at once (through `say`: under the table, or on stderr) and,
    with --fail-fast, the command gets SIGTERM. finish() gives the exit code."""

    def __init__(self, opts: GateOptions, command: Sequence[str],
                 say: Callable[[str], None]) -> None:
        self.opts = opts
        self.command = list(command)
        self.gate = Gate(opts.budgets)
        self.say = say
        self.child = 0
        self.stopped = False
        prepare_outputs(opts, "run")

    def observe(self, snapshots: Snapshots) -> None:
        for result in self.gate.observe(snapshots):
            assert result.breach is not None
            self.say(result.breach.message)
            if self.opts.fail_fast and self.child > 0 and not self.stopped:
                self.stopped = True
                self.say(f"--fail-fast: SIGTERM to {self.command[0]} (pid {self.child})")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.child, signal.SIGTERM)

    def finish(self, code: int, status: int | None) -> int:
        """The exit code of `run`: 17 when a budget broke, else the command's
        `code`. Writes the result files; says every verdict on stderr."""
        results: list[BudgetResult] = self.gate.finish()
        verdicts = [budget_verdict(r) for r in results]
        failed = any(v.failed for v in verdicts)
        exit_code = ExitCode.BUDGET_EXCEEDED if failed else code
        for v in verdicts:
            log(v.message)
        sig = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
        g = self.gate
        duration = (g.last_ts - g.start_ts) if g.start_ts is not None and g.last_ts else 0.0
        context = {"command": self.command, "command_exit_status": code,
                   "command_signal": sig, "stopped_by_gate": self.stopped,
                   "ticks": g.ticks, "duration_seconds": round(duration, 3)}
        write_outputs(self.opts, verdicts, mode="run", exit_code=int(exit_code),
                      context=context, duration=duration)
        if failed:
            broke = ", ".join(v.budget for v in verdicts if v.failed)
            log(f"budget exceeded ({broke}): exit {int(exit_code)}; {self.command[0]} "
                f"exited with status {code}")
        return int(exit_code)
