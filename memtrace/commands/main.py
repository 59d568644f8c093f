"""Command line: memtrace watch | run | agent | heap | libs | explain | doctor."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import shutil
import signal
import sys
import threading
import time
from typing import Any

import click

from memtrace import __version__
from memtrace.commands.doctor import render, run_checks
from memtrace.commands.targets import TreeFollower, resolve_targets
from memtrace.errors import ExitCode, MemtraceError, OutputError
from memtrace.exporter.collector import MemtraceCollector, freeze_startup_objects
from memtrace.exporter.web import (
    DEFAULT_LISTEN,
    MetricsServer,
    WebConfig,
    listen_problem,
    load_web_config,
)
from memtrace.reporter import Reporter
from memtrace.session import Session
from memtrace.trace.events import Drained
from memtrace.trace.procfs import ProcFS
from memtrace.util.log import log
from memtrace.views.summary import PeakTracker, build_summary, render_summary

# The codes on each line of the epilog (a `\b` paragraph: click keeps its lines).
EXIT_CODE_LINES = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (10, 11, 12), (13,), (14,))
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


def _heap_interval_option() -> Any:
    from memtrace.heap.sampler import DEFAULT_HEAP_INTERVAL

    return click.option(
        "--heap-interval", type=Seconds(), default=DEFAULT_HEAP_INTERVAL,
        show_default=True, help="Seconds between walks of each process's malloc heap "
        "(as memtrace heap, in a background process, never stopping the target; at "
        "least 20x the last walk's duration). 0 = off. See docs/heap.md.")


def _pss_interval_option() -> Any:
    from memtrace.pss.live import DEFAULT_PSS_INTERVAL

    return click.option(
        "--pss-interval", type=Seconds(), default=DEFAULT_PSS_INTERVAL,
        show_default=True, help="Seconds between refreshes of every mapping's PSS/USS "
        "(shares change when other processes map, unmap or fork), spaced to at least 20x "
        "the last refresh's duration; mappings whose pages "
        "changed, and files another watched process mapped or unmapped, are refreshed "
        "every tick. 0 = off (the fields are null). Needs root. See docs/pss.md.")


def _remember_changed_only(ctx: click.Context, _param: Any, value: bool) -> bool:
    """--changed-only is kept in ctx.meta for _reporter (not a parameter of the
    commands)."""
    ctx.meta["changed_only"] = value
    return value


def _common(f: Any) -> Any:
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
        _heap_interval_option(),
        _pss_interval_option(),
        click.option("--changed-only", is_flag=True, expose_value=False,
                     callback=_remember_changed_only,
                     help="JSON: after a process's first snapshot, list only the mappings "
                     "that changed since its previous one, and the starts of those that "
                     "are gone (docs/output.md, \"Size, and changed mappings only\")."),
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


def _table_options(f: Any) -> Any:
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


def _listen(no_serve: bool, listen: str, web_config: str | WebConfig | None,
            fallback: bool = False) -> MetricsServer | None:
    """Bind the /metrics address (before the probes compile, so a busy port fails
    at once: one line, exit 2); _serve() starts answering. With `fallback` (watch
    and run when --web.listen-address was not given), a default port that is in
    use (another memtrace watch) is replaced by a free port on the same host."""
    if no_serve:
        return None
    cfg = web_config if isinstance(web_config, WebConfig) else load_web_config(web_config)
    return MetricsServer(None, listen, cfg, fallback=fallback)


def _listen_given() -> bool:
    """Whether --web.listen-address was given (not its default)."""
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    return ctx is None or ctx.get_parameter_source("listen") is not ParameterSource.DEFAULT


def _serve(session: Session, server: MetricsServer | None,
           max_mapping_series: int) -> MetricsServer | None:
    """Serve the session's metrics on the address _listen() bound."""
    if server is None:
        return None
    from prometheus_client import CollectorRegistry
    from prometheus_client.process_collector import ProcessCollector

    freeze_startup_objects()     # before any process is watched (see its docstring)
    collector = MemtraceCollector(session.exporter_box, max_mapping_series)
    registry = CollectorRegistry()
    registry.register(ProcessCollector(registry=None))
    server.serve(registry, fast=collector.render_chunks)
    url = f"{'https' if server.tls else 'http'}://{server.address}/metrics"
    if server.busy:
        log(f"{server.busy} is in use (another memtrace?): serving metrics on {url} "
            "instead (--web.listen-address chooses; --no-serve turns it off)")
    else:
        log(f"serving metrics on {url}")
    if server.exposed and not server.protected:
        log(f"warning: {server.address} is reachable beyond loopback without TLS or "
            "authentication (see --web.config.file)")
    return server


def _reporter(fmt: str, output: str | None, table_opts: Any = None) -> Reporter:
    """The view for --format, writing to stdout or -o FILE through an
    OutputStream (views/output.py: never blocks; OutputError on failure)."""
    ctx = click.get_current_context(silent=True)
    changed_only = bool(ctx and ctx.meta.get("changed_only"))
    if changed_only and fmt != "json":
        raise MemtraceError("--changed-only needs --format json", ExitCode.USAGE)
    if fmt == "none":
        return _NullReporter()
    if output == "":
        raise MemtraceError("-o: empty file name", ExitCode.USAGE)
    from memtrace.views.output import open_output

    stream = open_output(output)
    if fmt == "json":
        from memtrace.views.jsonl import JsonReporter
        return JsonReporter(stream, changed_only=changed_only)
    from rich.console import Console

    from memtrace.views.output import TextOutput
    from memtrace.views.table import TableReporter
    return TableReporter(Console(file=TextOutput(stream).as_io()), options=table_opts)


def _echo(text: str) -> None:
    """Print a one-shot command's output (heap, libs, explain, doctor); a write
    error is an OutputError (exit 14; quiet for a closed pipe)."""
    from memtrace.views.output import output_error

    try:
        click.echo(text)
        sys.stdout.flush()
    except OSError as e:
        raise output_error(e, "stdout") from None


@click.group(epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="memtrace")
def cli() -> None:
    """Exact per-mapping resident memory of processes, from eBPF events."""


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("targets", metavar="PID|NAME...", nargs=-1, required=True)
@click.option("--once", is_flag=True, help="One snapshot of each process, then exit 0.")
@click.option("--count", type=click.IntRange(min=1, max=1 << 31), default=None,
              help="N snapshots of each process (the first at attach, then one per "
                   "interval), then exit 0.")
@_common
@_table_options
def watch(targets: tuple[str, ...], once: bool, count: int | None, fmt: str, interval: float,
          reconcile_interval: float, no_serve: bool, listen: str, web_config: str | None,
          max_mapping_series: int, output: str | None, heap_interval: float,
          pss_interval: float, table_opts: Any) -> None:
    """Watch running processes: every mapping's resident bytes, faults and calls.

    Each argument is a PID or a process name: a name is matched as pgrep does,
    first exactly against the process name (comm, 15 bytes at most), else as a
    regular expression anywhere in it; every process matching at start is
    watched (memtrace itself excluded). A name that matches nothing exits 6.

    A PID that exits (or exits while being attached) is reported and the others
    are still watched. Exits 0 when every watched process has exited, or after
    --once / --count snapshots; 6 when none of the processes could be attached."""
    if once and count is not None and count != 1:
        raise MemtraceError("--once and --count N disagree: give one of them", ExitCode.USAGE)
    snapshots = 1 if once else count
    web_cfg = None if no_serve else load_web_config(web_config)
    procfs = ProcFS()
    pids = _existing_targets(procfs, resolve_targets(procfs, targets))
    server = _listen(no_serve, listen, web_cfg, fallback=not _listen_given())
    session = Session(_reporter(fmt, output, table_opts), interval, reconcile_interval, procfs)
    session.enable_heap(heap_interval)
    session.enable_pss(pss_interval)
    session.install_signal_handlers()
    ticks = 0

    def keep_going() -> bool:
        return bool(session.trackers) and (snapshots is None or ticks < snapshots - 1)

    def on_tick(_drained: Drained) -> None:
        nonlocal ticks
        ticks += 1

    try:
        session.load()
        _serve(session, server, max_mapping_series)
        for pid in dict.fromkeys(pids):
            session.add_target(pid)
            try:
                session.attach(pid)
            except MemtraceError as e:
                if e.code != ExitCode.NO_SUCH_PROCESS:
                    raise
                session.reporter.message(f"pid {pid} exited while attaching")
        if not session.trackers:
            raise MemtraceError("no process could be attached: every given PID exited",
                                ExitCode.NO_SUCH_PROCESS)
        session.loop(keep_going, on_tick)
    finally:
        if server:
            server.close()
        session.close()


def _existing_targets(procfs: ProcFS, pids: tuple[int, ...]) -> tuple[int, ...]:
    """The given PIDs that can be watched. One that is gone (no such process,
    a zombie) is said on stderr and skipped while another one is left; any
    other refusal, or none left, is the error."""
    ok: list[int] = []
    gone: list[MemtraceError] = []
    for pid in dict.fromkeys(pids):
        try:
            procfs.check_target(pid)
        except MemtraceError as e:
            if e.code not in (ExitCode.NO_SUCH_PROCESS, ExitCode.ZOMBIE):
                raise
            gone.append(e)
            continue
        ok.append(pid)
    if not ok:
        raise gone[0]
    for err in gone:
        log(f"{err.message}: not watched")
    return tuple(ok)


def _check_executable(command: tuple[str, ...]) -> str:
    prog = command[0]
    path = prog if "/" in prog else shutil.which(prog)
    if not path or not os.path.exists(path):
        raise MemtraceError(f"command not found: {prog}", ExitCode.CANNOT_EXECUTE)
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise MemtraceError(f"cannot execute {prog}: not an executable file",
                            ExitCode.CANNOT_EXECUTE)
    return path


# Signals `run` passes on to the command. A signal sent to memtrace alone
# (kill, systemd, a supervisor: si_code SI_USER) is forwarded once; one the
# terminal sent (Ctrl-C, Ctrl-\\, hangup: si_code SI_KERNEL) already went to the
# whole foreground process group, the command included, and is not sent again.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
SI_KERNEL = 0x80


class _Forwarder:
    """Takes FORWARDED signals for `run` (blocked, and read with sigwaitinfo in a
    thread, which tells who sent them) and passes them to the command. Before
    the command is started, the first one stops memtrace (stop event)."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.child = 0
        self.early: int | None = None      # a signal that came before the command
        self.rusage: Any = None            # the command's, once reaped (os.wait4)
        self._lock = threading.Lock()
        # a signal ignored when memtrace started (nohup; a background job of a
        # script) stays ignored, for memtrace and the command alike
        self.signals = tuple(s for s in FORWARDED if signal.getsignal(s) != signal.SIG_IGN)
        self.old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        for s in self.signals:  # in case a thread was started before the mask
            signal.signal(s, lambda signum, _frame: self.deliver(signum, False))
        if self.signals:
            threading.Thread(target=self._wait, name="memtrace-signals", daemon=True).start()

    def _wait(self) -> None:
        while True:
            info = signal.sigwaitinfo(self.signals)
            self.deliver(info.si_signo, info.si_code == SI_KERNEL)

    def deliver(self, signum: int, from_terminal: bool) -> None:
        with self._lock:
            if not self.child:
                if self.early is None:
                    self.early = signum
                self.stop.set()
                return
            if from_terminal or self.child < 0:   # < 0: reaped, its pid may be reused
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signum)

    def reap(self, pid: int, options: int) -> int | None:
        """wait4(pid, options): its status once it has exited (and no signal is
        sent to that pid any more), else None. Its resource usage (ru_maxrss)
        is kept in self.rusage."""
        with self._lock:
            got, status, rusage = os.wait4(pid, options)
            if got != pid:
                return None
            self.child = -1
            self.rusage = rusage
            return status

    def set_child(self, pid: int) -> None:
        """From now on signals go to pid, unless one came before (self.early)."""
        with self._lock:
            if self.early is None:
                self.child = pid

    def in_child(self) -> None:
        """In the forked child, before exec: memtrace's mask and handlers undone
        (an ignored signal stays ignored, as nohup expects)."""
        for s in (*self.signals, signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores the last two
            signal.signal(s, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.old_mask)


def _spawn_stopped(path: str, command: tuple[str, ...],
                   forwarder: _Forwarder) -> tuple[int, int, int]:
    """Fork a child that waits for a go byte before exec. Returns (pid, go_fd, err_fd)."""
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child: wait until the parent traces us, then exec
        try:
            os.close(go_w)
            os.close(err_r)
            forwarder.in_child()
            os.read(go_r, 1)
            os.close(go_r)
            os.execv(path, list(command))
        except OSError as e:
            os.write(err_w, str(e.errno).encode())
        finally:
            os._exit(127)
    forwarder.set_child(pid)
    os.close(go_r)
    os.close(err_w)
    return pid, go_w, err_r


def _wake_on_exit(pid: int, stop: threading.Event) -> list[float]:
    """Set stop as soon as pid exits (its pidfd polls readable), so that `run`
    ends and summarises without waiting for the next tick. The list gets the
    monotonic time of the exit. Nothing happens without pidfd_open (< 5.3)."""
    exited: list[float] = []
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return exited

    def wait() -> None:
        try:
            select.select([pidfd], [], [])
            exited.append(time.monotonic())
            stop.set()
        finally:
            os.close(pidfd)

    threading.Thread(target=wait, name="memtrace-command-exit", daemon=True).start()
    return exited


def _status_to_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_common
@_table_options
def run(command: tuple[str, ...], fmt: str, interval: float, reconcile_interval: float,
        no_serve: bool, listen: str, web_config: str | None, max_mapping_series: int,
        output: str | None, heap_interval: float, pss_interval: float,
        table_opts: Any) -> None:
    """Run COMMAND traced from its first instruction; exit with its status.

    Put -- before the command: memtrace run -- ./server --port 8080

    The whole process tree is traced: children the command (or a traced child)
    forks, and what they exec. When the command exits, descendants still
    running get a final snapshot, and a summary follows (the last JSON line,
    or text after the table): the tree's peak RSS as memtrace saw it, with its
    top mappings and each process's peak, and the kernel's (ru_maxrss, VmHWM).

    SIGINT, SIGTERM, SIGHUP and SIGQUIT are passed on to the command (once: not
    again when the terminal already sent them to it); tracing goes on until it
    exits."""
    path = _check_executable(command)
    web_cfg = None if no_serve else load_web_config(web_config)
    stop = threading.Event()
    forwarder = _Forwarder(stop)      # before any thread: they inherit its mask
    session = Session(_reporter(fmt, output, table_opts), interval, reconcile_interval)
    session.stop = stop
    session.enable_heap(heap_interval)
    session.enable_pss(pss_interval)
    child = 0
    status: int | None = None
    failure: OutputError | None = None
    server = _listen(no_serve, listen, web_cfg, fallback=not _listen_given())
    try:
        session.load(watch_execs=True)    # fork and exec notices: the command's tree
        _serve(session, server, max_mapping_series)
        child, go_w, err_r = _spawn_stopped(path, command, forwarder)
        if forwarder.early is not None:   # a signal before the command started
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            log(f"{signal.Signals(forwarder.early).name} before {command[0]} started: "
                "not run")
            raise SystemExit(128 + forwarder.early)
        session.add_target(child)
        # ru_maxrss counts the waiting child (a forked copy of memtrace) too
        pre_exec = None
        with contextlib.suppress(OSError, ValueError, IndexError):
            pre_exec = session.procfs.peak_rss_bytes(child)
        os.write(go_w, b"x")
        os.close(go_w)
        err = os.read(err_r, 64)
        os.close(err_r)
        if err:
            forwarder.reap(child, 0)
            raise MemtraceError(f"cannot execute {command[0]}: {os.strerror(int(err))}",
                                ExitCode.CANNOT_EXECUTE)

        started = time.monotonic()
        exited = _wake_on_exit(child, stop)
        peaks = PeakTracker()
        tree = TreeFollower(session, child)

        def child_running() -> bool:
            nonlocal status
            status = forwarder.reap(child, os.WNOHANG)
            return status is None

        def on_tick(drained: Drained) -> None:
            tree.on_tick(drained)
            peaks.observe(session.latest_snapshots())

        try:
            try:
                session.attach(child)
            except OutputError:
                raise
            except MemtraceError:
                pass  # it exited before we read it: its status still counts
            peaks.observe(session.latest_snapshots())
            session.loop(child_running, on_tick, quick_start=True)
            if status is None and exited:
                status = forwarder.reap(child, 0)      # woken by its exit (a zombie now)
            if status is not None:
                duration = (exited[0] if exited else time.monotonic()) - started
                if session.trackers:    # descendants still running: a final snapshot
                    session.tick()
                    peaks.observe(session.latest_snapshots())
                rusage = forwarder.rusage
                summary = build_summary(
                    peaks, command=command, pid=child, status=status, duration=duration,
                    ru_maxrss_bytes=rusage.ru_maxrss * 1024 if rusage is not None else None,
                    pre_exec_rss_bytes=pre_exec)
                session.reporter.summary(summary)
        except OutputError as e:
            failure = e   # tracing stops; the command goes on (it may write there too)
            if not e.quiet:
                log(f"{e.message}: tracing stopped; waiting for {command[0]} to exit")
    finally:
        if server:
            server.close()
        try:
            session.close()
        except OutputError as e:
            failure = failure or e
    while status is None:  # output failed: wait for the command (signals still forwarded)
        status = forwarder.reap(child, os.WNOHANG)
        if status is None:
            time.sleep(0.05)
    code = _status_to_code(status)
    log(f"{command[0]} exited with status {code}")
    if failure is not None:
        raise failure
    sys.exit(code)


class _NullReporter(Reporter):
    """Agent mode without --format: serve metrics, log attach/detach lines."""

    def snapshot(self, snap: dict[str, Any]) -> None:
        pass

    def events(self, events: list[Any]) -> None:
        pass

    def tick_done(self) -> None:
        pass

    def message(self, text: str) -> None:
        log(text)

    def summary(self, summary: dict[str, Any]) -> None:
        for line in render_summary(summary).splitlines():
            log(line)

    def close(self) -> None:
        pass


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--comm", multiple=True, help="Watch processes whose name matches this regex. "
              "NAME=REGEX names the rule (its group with --group-by group); this holds "
              "for --exe, --cgroup and --user too.")
@click.option("--exe", multiple=True, help="... whose executable path matches this regex.")
@click.option("--cgroup", multiple=True, help="... whose cgroup path matches this regex.")
@click.option("--user", multiple=True, help="... owned by this user (name or UID).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML file: rules (list of {name, comm, exe, cgroup, user}, fields "
              "ANDed, rules ORed), all_min_rss.")
@click.option("--all", "all_", is_flag=True, help="Also watch every process whose resident "
              "size reaches --min-rss (checked from statm every --sweep-interval).")
@click.option("--min-rss", type=Size(), default="64M", show_default=True,
              help="Threshold for --all (bytes; K, M, G, T suffixes).")
@click.option("--sweep-interval", type=Seconds(min=0.1), default=10.0,
              show_default=True, help="Seconds between --all sweeps of /proc/*/statm.")
@click.option("--max-processes", type=click.IntRange(min=1, max=1 << 22), default=100,
              show_default=True,
              help="Cap on watched processes; the rest are counted as dropped.")
@click.option("--group-by", type=click.Choice(["pid", "group", "comm"]), default="pid",
              show_default=True, help="Label series by pid; or by group, summed over "
              "its processes so restarts keep their series: group = the matching rule's "
              "name (NAME=REGEX, or name: in --config), else the process name (comm); "
              "comm = always the process name.")
@click.option("--format", "fmt", type=click.Choice(["none", "json"]), default="none",
              show_default=True, help="Also write JSON Lines snapshots.")
@click.option("--interval", type=Seconds(min=0.01), default=1.0, show_default=True)
@click.option("--reconcile-interval", type=Seconds(), default=300.0, show_default=True)
@click.option("--web.listen-address", "listen", default=DEFAULT_LISTEN, type=ListenAddress(),
              show_default=True, help="Address of the /metrics endpoint; one in use is an "
              "error (exit 2), never replaced.")
@click.option("--web.config.file", "web_config", default=None, type=click.Path(dir_okay=False))
@click.option("--max-mapping-series", type=click.IntRange(min=2, max=1_000_000), default=50,
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None)
@_heap_interval_option()
@_pss_interval_option()
def agent(comm: tuple[str, ...], exe: tuple[str, ...], cgroup: tuple[str, ...],
          user: tuple[str, ...], config_file: str | None, all_: bool, min_rss: int,
          sweep_interval: float, max_processes: int, group_by: str, fmt: str,
          interval: float, reconcile_interval: float, listen: str, web_config: str | None,
          max_mapping_series: int, output: str | None, heap_interval: float,
          pss_interval: float) -> None:
    """Run as a node agent: watch processes picked by rules, attach to new ones on
    exec, serve /metrics. SIGTERM, SIGINT or SIGHUP detaches every probe and exits 0."""
    from memtrace.commands.agent import Agent, command_line_rules, load_config, rule_from_dict

    raw_rules = command_line_rules(comm=comm, exe=exe, cgroup=cgroup, user=user)
    rules = [rule_from_dict(r, i) for i, r in enumerate(raw_rules)]
    all_min_rss = min_rss if all_ else None
    if config_file:
        config = load_config(config_file)
        rules += [rule_from_dict(r, i, f"{config_file}: ")
                  for i, r in enumerate(config.get("rules") or [])]
        if config.get("all_min_rss") is not None:
            try:
                all_min_rss = parse_size(str(config["all_min_rss"]))
            except ValueError as e:
                raise MemtraceError(f"{config_file}: all_min_rss: {e}",
                                    ExitCode.USAGE) from None
    if not rules and all_min_rss is None:
        raise MemtraceError("agent needs at least one rule (--comm, --exe, --cgroup, --user, "
                            "--config) or --all", ExitCode.USAGE)
    web_cfg = load_web_config(web_config)
    reporter: Reporter = _reporter("json", output) if fmt == "json" else _NullReporter()
    session = Session(reporter, interval, reconcile_interval)
    session.grouping = group_by != "pid"
    session.container_labels = True    # container_id, pod_uid from the cgroup path
    session.enable_heap(heap_interval)
    session.enable_pss(pss_interval)
    session.install_signal_handlers()
    server = _listen(False, listen, web_cfg)   # a fixed port for Prometheus: never another
    try:
        session.load(watch_execs=True)
        _serve(session, server, max_mapping_series)
        agent_ = Agent(session, rules, all_min_rss, max_processes, sweep_interval,
                       group_by=group_by)
        agent_.initial_scan()
        log(f"agent: {len(rules)} rule(s){', --all' if all_min_rss is not None else ''}; "
            f"watching {len(session.trackers)} process(es)")
        session.publish()
        session.loop(lambda: True, agent_.on_tick)
    finally:
        if server:
            server.close()
        session.close()
    log("agent: stopped, probes detached")


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("pid", type=int)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Table, or one JSON object (see docs/heap.md).")
@click.option("--stop", is_flag=True, help="SIGSTOP the process for an exact snapshot "
              "(SIGCONT always follows; the pause is reported).")
@click.option("--retries", type=click.IntRange(min=0, max=1000), default=5, show_default=True,
              help="Walks to retry when the heap changes under the walk (with --stop: "
              "snapshots to take again when a thread was stopped inside malloc).")
@click.option("--bytes", "exact", is_flag=True,
              help="Exact byte counts in the table instead of KiB/MiB/GiB.")
def heap(pid: int, fmt: str, stop: bool, retries: int, exact: bool) -> None:
    """Why memory is not given back: anatomy of a process's glibc malloc heap
    (in use, free, resident holes, what malloc_trim(0) would return)."""
    from memtrace.commands.heap import heap_command

    _echo(heap_command(pid, fmt, stop, retries, exact))


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("pid", type=int, required=False)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Plain text, or one JSON object (docs/explain.md).")
def explain(pid: int | None, fmt: str) -> None:
    """What /proc/PID/statm and status, and /proc/meminfo, say, in plain words, next
    to memtrace's exact figures (a one-shot scan of PID's page tables, as root).
    Without PID: the machine view only."""
    from memtrace.explain import explain as build
    from memtrace.explain import render_json, render_text

    snap = None
    if pid is not None:
        procfs = ProcFS()
        procfs.check_target(pid)
        snap = _one_shot_snapshot(procfs, pid)
    try:
        report = build(pid, procfs.root if pid is not None else "/proc", snap)
    except FileNotFoundError:
        raise MemtraceError(f"no such process: {pid}", ExitCode.NO_SUCH_PROCESS) from None
    _echo(render_json(report) if fmt == "json" else render_text(report))


def _one_shot_snapshot(procfs: ProcFS, pid: int) -> dict[str, Any] | None:
    """memtrace's figures without probes: one full scan of the page tables.
    None where that is not allowed (not root) or the process went away."""
    from memtrace.snapshot import snapshot
    from memtrace.trace.tracker import ProcessGone, ProcessTracker

    tracker = ProcessTracker(pid, procfs)
    try:
        tracker.start()
        return snapshot(tracker, time.time())
    except (ProcessGone, OSError):
        return None
    finally:
        tracker.close()


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("pids", nargs=-1, type=int)
@click.option("--all", "all_", is_flag=True, help="Every process (kernel threads, zombies "
              "and memtrace itself left out; processes that exit during the walk or "
              "cannot be read are skipped and counted).")
@click.option("--sort", type=click.Choice(["rss", "pss", "uss", "name"]), default="pss",
              show_default=True, help="Order of libraries, and of processes within each.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True)
@click.option("--all-files", is_flag=True, help="Count every file-backed mapping "
              "(executables, data files), not only shared libraries.")
@click.option("--bytes", "exact", is_flag=True,
              help="Exact byte counts in the table instead of KiB/MiB/GiB.")
def libs(pids: tuple[int, ...], all_: bool, sort: str, fmt: str, all_files: bool,
         exact: bool) -> None:
    """Shared libraries and who pays for them (like Android's librank): per
    library (all segments: text, rodata/relro, data, bss) the processes mapping
    it with their RSS, PSS (each page divided by its map count) and USS (pages
    mapped only once), and totals; then per-process totals. Figures equal
    smaps Rss, Pss and Private_Clean + Private_Dirty. Needs root.

    memtrace libs PID [PID ...] | memtrace libs --all"""
    from memtrace.commands.libs import libs_command

    _echo(libs_command(pids, all_, sort, fmt, all_files, exact=exact))


@cli.command()
def doctor() -> None:
    """Check that memtrace can run here, one line per requirement with the fix."""
    checks = run_checks()
    _echo(render(checks))
    failed = [c for c in checks if c.required and not c.ok]
    if failed:
        codes = {"BCC": ExitCode.NO_BCC, "kernel headers": ExitCode.NO_HEADERS,
                 "privileges": ExitCode.NOT_ROOT, "tracepoints": ExitCode.NO_TRACEFS}
        # Without privileges every other failure follows from it: say that first.
        first = next((c for c in failed if c.name == "privileges"), failed[0])
        sys.exit(codes.get(first.name, ExitCode.INTERNAL))


def _silence_stdout() -> None:
    """After an output failure: nothing more reaches fd 1 (Python's flush at
    exit would fail again and turn the exit code into 120)."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)


def _usage_line(e: click.ClickException) -> str:
    """A click error as one line: the message and where to find help."""
    message = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"memtrace: error: {message}{where}"


_OUTPUT_ERRNOS = {errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def main() -> None:
    try:
        cli.main(prog_name="memtrace", standalone_mode=False)
        sys.stdout.flush()
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        print(_usage_line(e), file=sys.stderr)
        sys.exit(ExitCode.USAGE)
    except OutputError as e:
        _silence_stdout()
        if not e.quiet:
            log(f"error: {e.message}")
        sys.exit(e.code)
    except MemtraceError as e:
        log(f"error: {e.message}")
        sys.exit(e.code)
    except OSError as e:
        # click's own output (--help, --version) to a closed pipe or full disk
        if e.errno not in _OUTPUT_ERRNOS or not _from_click_echo(e):
            raise
        _silence_stdout()
        if e.errno != errno.EPIPE:
            log(f"error: cannot write stdout: {e.strerror}")
        sys.exit(ExitCode.OUTPUT_FAILED)
    except KeyboardInterrupt:
        sys.exit(130)


def _from_click_echo(e: BaseException) -> bool:
    """Whether e was raised writing click's own output (help, version)."""
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "echo" and "click" in code.co_filename:
            return True
        tb = tb.tb_next
    return False
