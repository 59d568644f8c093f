"""What the subcommands share at parse time: option types that check their
value before anything runs (finite seconds, sizes, HOST:PORT, regexes, table
columns), the option groups of the live commands (watch, run; agent takes a
few of them), and the exit-code epilog of every --help, generated from
ExitCode (memtrace/errors.py)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import click

from memtrace.errors import ExitCode, MemtraceError
from memtrace.exporter.web import DEFAULT_LISTEN, listen_problem
from memtrace.stacks.summary import STACKS_TOP

# The codes on each line of the epilog (a `\b` paragraph: click keeps its lines).
EXIT_CODE_LINES = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (10, 11, 12), (13,), (14,), (15,), (16, 17),
                   (18,))
EXIT_CODES_HELP = "\b\nExit codes: " + ";\n".join(
    "; ".join(f"{c} {ExitCode(c).description}" for c in line) for line in EXIT_CODE_LINES
) + """.
`run` otherwise exits with the command's status (128+N if killed by signal N).
SIGINT, SIGTERM, SIGHUP: watch and agent detach and exit 0; run passes them on
to the command and exits with its status."""


SECONDS_MAX = 30 * 86400.0     # longest accepted interval: 30 days
SIZE_MAX = 1 << 50             # largest accepted size: 1 PiB


class Seconds(click.ParamType):
    """A finite number of seconds in [min, SECONDS_MAX] (0 allowed when min is 0)."""

    name = "seconds"

    def __init__(self, min: float = 0.0) -> None:  # noqa: A002
        self.min = min

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if math.isnan(seconds) or math.isinf(seconds):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        if not self.min <= seconds <= SECONDS_MAX:
            self.fail(f"{value!r} is not in the range {self.min:g} to {SECONDS_MAX:.0f} "
                      "seconds (30 days)", param, ctx)
        return seconds


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    """Bytes from "64M", "1.5G", "4096", "2GiB" (binary units); ValueError with
    the reason when it is not a size from 0 to 1 PiB."""
    t = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in _UNITS else (t, "")
    try:
        value = float(num) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a size like 64M") from None
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{text!r} is not a finite size")
    if not 0 <= value <= SIZE_MAX:
        raise ValueError(f"{text!r} is not in the range 0 to 1P")
    return int(value)


class Size(click.ParamType):
    """Bytes, from "64M" and the like (parse_size)."""

    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class ListenAddress(click.ParamType):
    """HOST:PORT with PORT 0-65535 (web.parse_listen), checked before anything runs."""

    name = "host:port"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        problem = listen_problem(str(value))
        if problem:
            self.fail(f"{value!r}: {problem}", param, ctx)
        return str(value)


def heap_interval_option() -> Any:
    from memtrace.heap.sampler import DEFAULT_HEAP_INTERVAL

    return click.option(
        "--heap-interval", type=Seconds(), default=DEFAULT_HEAP_INTERVAL,
        show_default=True, help="Seconds between walks of each process's malloc heap "
        "(as memtrace heap, in a background process, never stopping the target; at "
        "least 20x the last walk's duration). 0 = off. See docs/heap.md.")


def pss_interval_option() -> Any:
    from memtrace.pss.live import DEFAULT_PSS_INTERVAL

    return click.option(
        "--pss-interval", type=Seconds(), default=DEFAULT_PSS_INTERVAL,
        show_default=True, help="Seconds between refreshes of every mapping's PSS/USS "
        "(shares change when other processes map, unmap or fork), spaced to at least 20x "
        "the last refresh's duration; mappings whose pages "
        "changed, and files another watched process mapped or unmapped, are refreshed "
        "every tick. 0 = off (the fields are null). Needs root. See docs/pss.md.")


def _remember_changed_only(ctx: click.Context, _param: Any, value: bool) -> bool:
    """--changed-only is kept in ctx.meta for live.make_reporter (not a
    parameter of the commands)."""
    ctx.meta["changed_only"] = value
    return value


def _remember_full_every(ctx: click.Context, _param: Any, value: int) -> int:
    """--full-every, like --changed-only, for live.make_reporter."""
    ctx.meta["full_every"] = value
    return value


def _remember_record(ctx: click.Context, _param: Any, value: str | None) -> str | None:
    """--record FILE, like --changed-only, for live.make_reporter: the view and
    the recording are one Tee there, so watch and run need no parameter."""
    ctx.meta["record"] = value
    return value


def record_option() -> Any:
    """--record FILE of watch and run (agent has its own: a directory)."""
    return click.option(
        "--record", type=click.Path(dir_okay=False), default=None, expose_value=False,
        callback=_remember_record, metavar="FILE",
        help="Also write a recording to FILE (.mtrace, created or truncated): every "
        "snapshot (changed mappings only between whole ones), messages, the summary, "
        "and with --stacks the stack profile, for memtrace report/diff/check. Safe to "
        "kill at any time; a full disk stops it with one error (exit 14). See "
        "docs/recording.md.")


def live_options(f: Any) -> Any:
    """The options of watch and run: output, intervals, the /metrics endpoint,
    heap and PSS sampling."""
    options = [
        click.option("--format", "fmt", type=click.Choice(["table", "json", "none"]),
                     default="table", show_default=True, help="Live table, JSON Lines (one "
                     "object per process per interval), or none (only /metrics and log "
                     "lines: for a long-running exporter)."),
        click.option("--interval", type=Seconds(min=0.01), default=1.0,
                     show_default=True, help="Seconds between snapshots."),
        click.option("--reconcile-interval", type=Seconds(), default=300.0,
                     show_default=True, help="Seconds between unconditional full rescans "
                     "(0 = never; a rescan after a detected mismatch still happens)."),
        click.option("--no-serve", is_flag=True, help="Do not serve /metrics."),
        click.option("--web.listen-address", "listen", default=DEFAULT_LISTEN,
                     type=ListenAddress(), show_default=True,
                     help="Address of the /metrics endpoint (port 0: any free port). "
                     "Without this option, a default port in use (another memtrace) "
                     "is replaced by a free one, named on stderr."),
        click.option("--web.config.file", "web_config", default=None,
                     type=click.Path(dir_okay=False),
                     help="exporter-toolkit web config: TLS, client certificates, basic auth."),
        click.option("--max-mapping-series", type=click.IntRange(min=2, max=1_000_000),
                     default=50,
                     show_default=True, help="Mapping series per process; the smallest "
                     "are summed as mapping=\"[other]\"."),
        click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
                     help="Write the output to this file instead of stdout (see "
                     "docs/output.md for a reader that stops reading, or a full disk)."),
        heap_interval_option(),
        pss_interval_option(),
        click.option("--changed-only", is_flag=True, expose_value=False,
                     callback=_remember_changed_only,
                     help="JSON: after a process's first snapshot, list only the mappings "
                     "that changed since its previous one, and the starts of those that "
                     "are gone (docs/output.md, \"Size, and changed mappings only\")."),
        click.option("--full-every", type=click.IntRange(min=0, max=1 << 31), default=0,
                     expose_value=False, callback=_remember_full_every, metavar="N",
                     help="With --changed-only: every Nth snapshot of a process is whole "
                     "again, so a reader can start from any whole line (0: only the "
                     "first; default 0)."),
        record_option(),
    ]
    for option in reversed(options):
        f = option(f)
    return f


# ---- options of the live table (watch, run; issue 11). Kept together: they all
# land in one TableOptions (memtrace/views/table.py), passed as `table_opts`.

_TABLE_KEYS = ("sort", "top", "kinds", "path_re", "by_library", "exact", "columns", "wide")


class Regex(click.ParamType):
    """A Python regular expression, compiled (a bad one is a usage error)."""

    name = "regex"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        import re

        if isinstance(value, re.Pattern):
            return value
        try:
            return re.compile(value)
        except re.error as e:
            self.fail(f"{value!r} is not a regular expression: {e}", param, ctx)


class ColumnList(click.ParamType):
    """Comma-separated table columns (views/table.py COLUMNS)."""

    name = "columns"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[str, ...]:
        from memtrace.views.table import COLUMNS

        if isinstance(value, tuple):
            return value
        names = tuple(c.strip() for c in str(value).split(",") if c.strip())
        aliases = {"delta": "Δrss", "drss": "Δrss", "rate": "faults/s"}
        names = tuple(aliases.get(c, c) for c in names)
        bad = [c for c in names if c not in COLUMNS]
        if bad or not names:
            self.fail(f"{value!r}: unknown column {bad[0] if bad else '(none)'!r}; columns: "
                      + ", ".join(COLUMNS), param, ctx)
        return names


def table_options(f: Any) -> Any:
    """--sort, --top, --kind, --path, --by-library, --bytes, --columns, --wide:
    what the table shows (docs/output.md, "The live table"). The command gets
    them as one `table_opts` (a TableOptions)."""
    import functools

    from memtrace.views.table import KINDS, SORTS

    options = [
        click.option("--sort", type=click.Choice(SORTS), default="rss", show_default=True,
                     help="Order of a process's rows (table): a byte column, faults "
                     "(faults/s, then faults since attach), delta (largest |Δrss| "
                     "first), name (path)."),
        click.option("--top", type=click.IntRange(min=1, max=1_000_000), default=None,
                     help="Rows per process (table; default: what fits the terminal; on "
                     "a pipe 20, or what fits $LINES)."),
        click.option("--kind", "kinds", type=click.Choice(KINDS), multiple=True,
                     help="Only mappings of this kind (table; repeatable)."),
        click.option("--path", "path_re", type=Regex(), default=None,
                     help="Only mappings whose path (or library) matches this regex (table)."),
        click.option("--by-library", is_flag=True, help="One row per library or "
                     "executable: its segments (text, rodata, relro, data, bss) summed (table)."),
        click.option("--bytes", "exact", is_flag=True,
                     help="Exact byte counts instead of KiB/MiB/GiB (table)."),
        click.option("--columns", type=ColumnList(), default=None,
                     help="Comma-separated columns to show (table; default every column but "
                     "range). Columns that do not fit the terminal are still left out."),
        click.option("--wide", is_flag=True, help="Every column, the address range too (table)."),
    ]

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from memtrace.views.table import COLUMNS, DEFAULT_COLUMNS, TableOptions

        v = {k: kwargs.pop(k) for k in _TABLE_KEYS}
        columns = COLUMNS if v["wide"] else (v["columns"] or DEFAULT_COLUMNS)
        kwargs["table_opts"] = TableOptions(
            sort=v["sort"], top=v["top"], kinds=frozenset(v["kinds"]), path=v["path_re"],
            by_library=v["by_library"], exact=v["exact"], columns=tuple(columns))
        return f(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


# ---- --stacks (watch, run, agent; issue 13, docs/stacks.md): one `stacks_opts`.

DEFAULT_STACKS_PERIOD = 512 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
# --stacks-series: at most the stacks a snapshot carries per measure, which the
# series are built from.
STACKS_SERIES_MAX = STACKS_TOP


@dataclass(frozen=True)
class StacksOptions:
    period: int                 # mean bytes between sampled faults
    output: str | None          # --stacks-output DIR
    series: int = 0             # --stacks-series N: Prometheus series per process and measure


def stacks_options(f: Any) -> Any:
    """--stacks, --stacks-period, --stacks-output, --stacks-series. The command
    gets them as one `stacks_opts`: a StacksOptions, or None when --stacks is off."""
    import functools

    options = [
        click.option("--stacks", is_flag=True, help="Sample the user stacks of the code "
                     "that makes pages resident (page faults), net of releases: each "
                     "snapshot names the stacks that hold resident memory now and those "
                     "that brought the most in since attach (docs/stacks.md)."),
        click.option("--stacks-period", type=Size(), default=f"{DEFAULT_STACKS_PERIOD // 1024}K",
                     show_default=True, help="With --stacks: mean bytes of faults between "
                     "two samples (exponential gaps; each sample stands for its expected "
                     "bytes). Smaller: closer estimates, more cost."),
        click.option("--stacks-output", type=click.Path(file_okay=False), default=None,
                     help="With --stacks: at exit, write each process's stacks to this "
                     "directory: folded stacks, pprof and an HTML flame graph, for bytes "
                     "held now and bytes brought in."),
        click.option("--stacks-series", type=click.IntRange(min=0, max=STACKS_SERIES_MAX),
                     default=0, show_default=True,
                     help="With --stacks: serve the N stacks holding the most bytes now "
                     "and the N that brought the most in, per process, as the /metrics "
                     "series memtrace_stack_held_bytes and memtrace_stack_brought_bytes "
                     "(docs/metrics.md). 0 = none."),
    ]

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        on, period, output, series = (kwargs.pop(k) for k in (
            "stacks", "stacks_period", "stacks_output", "stacks_series"))
        if not on and output is not None:
            raise MemtraceError("--stacks-output needs --stacks", ExitCode.USAGE)
        if not on and series:
            raise MemtraceError("--stacks-series needs --stacks", ExitCode.USAGE)
        if on and not PAGE <= period <= 1 << 30:
            raise MemtraceError(f"--stacks-period: from {PAGE} bytes (a page) to 1 GiB",
                                ExitCode.USAGE)
        kwargs["stacks_opts"] = StacksOptions(period, output, series) if on else None
        return f(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper



# ---- --malloc (run, watch; docs/malloc.md): one `malloc_opts`.

DEFAULT_MALLOC_PERIOD = 512 * 1024
DEFAULT_MALLOC_MAX_RATE = 1_000      # samples a second per process (docs/malloc.md, the rate cap)


@dataclass(frozen=True)
class MallocOptions:
    period: int                 # mean bytes allocated between samples
    output: str | None          # --malloc-output DIR
    max_rate: int = DEFAULT_MALLOC_MAX_RATE     # samples a second per process; 0: no cap


def malloc_options(f: Any) -> Any:
    """--malloc, --malloc-period, --malloc-max-rate, --malloc-output. The command gets them as one
    `malloc_opts`: a MallocOptions, or None when --malloc is off."""
    import functools

    options = [
        click.option("--malloc", "malloc_on", is_flag=True,
                     help="Sample allocations by bytes (malloc, calloc, realloc, "
                     "memalign...) and net them against their frees: each snapshot names "
                     "the stacks whose allocations are still outstanding, and a leak report "
                     "the stacks whose outstanding bytes keep growing. A sampler (built with "
                     "the C compiler at first use) is preloaded into run's command; watch "
                     "loads it into the running process, one thread stopped for a few "
                     "ms (ptrace), and puts the allocator's functions back at exit "
                     "(docs/malloc.md)."),
        click.option("--malloc-period", type=Size(),
                     default=f"{DEFAULT_MALLOC_PERIOD // 1024}K", show_default=True,
                     help="With --malloc: mean bytes allocated between two samples "
                     "(exponential gaps; each sample stands for its expected bytes)."),
        click.option("--malloc-max-rate", type=click.IntRange(min=0, max=10_000_000),
                     default=DEFAULT_MALLOC_MAX_RATE, show_default=True,
                     help="With --malloc: samples a second per process at most. A program "
                     "that allocates faster has its period raised until it is back under "
                     "the cap, and lowered again after (weights stay unbiased; the "
                     "snapshot says the largest period used); 0: no cap."),
        click.option("--malloc-output", type=click.Path(file_okay=False), default=None,
                     help="With --malloc: at exit, write each process's stacks to this "
                     "directory: folded stacks, HTML flame graphs and pprof "
                     "(outstanding_space, allocated_space)."),
    ]

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        on, period, max_rate, output = (kwargs.pop(k) for k in (
            "malloc_on", "malloc_period", "malloc_max_rate", "malloc_output"))
        if not on and output is not None:
            raise MemtraceError("--malloc-output needs --malloc", ExitCode.USAGE)
        if on and not 1 <= period <= 1 << 30:
            raise MemtraceError("--malloc-period: from 1 byte to 1 GiB", ExitCode.USAGE)
        kwargs["malloc_opts"] = MallocOptions(period, output, max_rate) if on else None
        return f(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
