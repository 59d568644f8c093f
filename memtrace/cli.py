"""Command line: memtrace watch | run | agent | heap | libs | explain | doctor."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from typing import IO, Any

import click

from memtrace import __version__
from memtrace.doctor import render, run_checks
from memtrace.errors import ExitCode, MemtraceError
from memtrace.exporter import MemtraceCollector, freeze_startup_objects
from memtrace.procfs import ProcFS
from memtrace.session import Reporter, Session, log
from memtrace.web import DEFAULT_LISTEN, MetricsServer, load_web_config

EXIT_CODES_HELP = """\b
Exit codes: 0 ok; 2 usage; 3 not root; 4 BCC missing; 5 kernel headers missing;
6 no such process; 7 kernel thread; 8 zombie; 9 memtrace's own PID;
10 command cannot be executed; 11 BPF load failed; 12 tracefs not mounted;
13 heap: no consistent walk or unverified glibc layout.
`run` otherwise exits with the command's status (128+N if killed by signal N)."""


def _heap_interval_option() -> Any:
    from memtrace.heap import DEFAULT_HEAP_INTERVAL

    return click.option(
        "--heap-interval", type=click.FloatRange(min=0.0), default=DEFAULT_HEAP_INTERVAL,
        show_default=True, help="Seconds between walks of each process's malloc heap "
        "(as memtrace heap, in a background process, never stopping the target; at "
        "least 20x the last walk's duration). 0 = off. See docs/heap.md.")


def _pss_interval_option() -> Any:
    from memtrace.livepss import DEFAULT_PSS_INTERVAL

    return click.option(
        "--pss-interval", type=click.FloatRange(min=0.0), default=DEFAULT_PSS_INTERVAL,
        show_default=True, help="Seconds between refreshes of every mapping's PSS/USS "
        "(shares change when other processes map, unmap or fork), spaced to at least 20x "
        "the last refresh's duration; mappings whose pages "
        "changed, and files another watched process mapped or unmapped, are refreshed "
        "every tick. 0 = off (the fields are null). Needs root. See docs/pss.md.")


def _common(f: Any) -> Any:
    options = [
        click.option("--format", "fmt", type=click.Choice(["table", "json", "none"]),
                     default="table", show_default=True, help="Live table, JSON Lines (one "
                     "object per process per interval), or none (only /metrics and log "
                     "lines: for a long-running exporter)."),
        click.option("--interval", type=click.FloatRange(min=0.01), default=1.0,
                     show_default=True, help="Seconds between snapshots."),
        click.option("--reconcile-interval", type=click.FloatRange(min=0.0), default=300.0,
                     show_default=True, help="Seconds between unconditional full rescans "
                     "(0 = never; a rescan after a detected mismatch still happens)."),
        click.option("--no-serve", is_flag=True, help="Do not serve /metrics."),
        click.option("--web.listen-address", "listen", default=DEFAULT_LISTEN,
                     show_default=True, help="Address of the /metrics endpoint."),
        click.option("--web.config.file", "web_config", default=None,
                     type=click.Path(dir_okay=False),
                     help="exporter-toolkit web config: TLS, client certificates, basic auth."),
        click.option("--max-mapping-series", type=click.IntRange(min=2), default=50,
                     show_default=True, help="Mapping series per process; the smallest "
                     "are summed as mapping=\"[other]\"."),
        click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
                     default=None, help="Write the output to this file instead of stdout."),
        _heap_interval_option(),
        _pss_interval_option(),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _serve(session: Session, no_serve: bool, listen: str, web_config: str | None,
           max_mapping_series: int) -> MetricsServer | None:
    if no_serve:
        return None
    from prometheus_client import CollectorRegistry
    from prometheus_client.process_collector import ProcessCollector

    freeze_startup_objects()     # before any process is watched (see its docstring)
    collector = MemtraceCollector(session.exporter_box, max_mapping_series)
    registry = CollectorRegistry()
    registry.register(ProcessCollector(registry=None))
    server = MetricsServer(registry, listen, load_web_config(web_config),
                           fast=collector.render_chunks)
    log(f"serving metrics on {'https' if server.tls else 'http'}://"
        f"{server.address}/metrics")
    if server.exposed and not server.protected:
        log(f"warning: {server.address} is reachable beyond loopback without TLS or "
            "authentication (see --web.config.file)")
    return server


def _reporter(fmt: str, output: str | None) -> Reporter:
    stream: IO[str] | None = None
    if output:
        try:
            stream = open(output, "w")  # noqa: SIM115
        except OSError as e:
            raise MemtraceError(f"cannot write {output}: {e.strerror}", ExitCode.USAGE) from None
    if fmt == "json":
        from memtrace.views.jsonl import JsonReporter
        return JsonReporter(stream)
    if fmt == "none":
        return _NullReporter()
    from rich.console import Console

    from memtrace.views.table import TableReporter
    return TableReporter(Console(file=stream) if stream else None)


@click.group(epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="memtrace")
def cli() -> None:
    """Exact per-mapping resident memory of processes, from eBPF events."""


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("pids", nargs=-1, required=True, type=int)
@_common
def watch(pids: tuple[int, ...], fmt: str, interval: float, reconcile_interval: float,
          no_serve: bool, listen: str, web_config: str | None, max_mapping_series: int,
          output: str | None, heap_interval: float, pss_interval: float) -> None:
    """Watch running processes: every mapping's resident bytes, faults and calls.

    Exits 0 when every watched process has exited."""
    procfs = ProcFS()
    for pid in dict.fromkeys(pids):
        procfs.check_target(pid)
    session = Session(_reporter(fmt, output), interval, reconcile_interval, procfs)
    session.enable_heap(heap_interval)
    session.enable_pss(pss_interval)
    session.install_signal_handlers()
    server = None
    try:
        session.load()
        server = _serve(session, no_serve, listen, web_config, max_mapping_series)
        for pid in dict.fromkeys(pids):
            session.add_target(pid)
            session.attach(pid)
        session.loop(lambda: bool(session.trackers))
    finally:
        if server:
            server.close()
        session.close()


def _check_executable(command: tuple[str, ...]) -> str:
    prog = command[0]
    path = prog if "/" in prog else shutil.which(prog)
    if not path or not os.path.exists(path):
        raise MemtraceError(f"command not found: {prog}", ExitCode.CANNOT_EXECUTE)
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise MemtraceError(f"cannot execute {prog}: not an executable file",
                            ExitCode.CANNOT_EXECUTE)
    return path


def _spawn_stopped(path: str, command: tuple[str, ...]) -> tuple[int, int, int]:
    """Fork a child that waits for a go byte before exec. Returns (pid, go_fd, err_fd)."""
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child: wait until the parent traces us, then exec
        try:
            os.close(go_w)
            os.close(err_r)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.read(go_r, 1)
            os.close(go_r)
            os.execv(path, list(command))
        except OSError as e:
            os.write(err_w, str(e.errno).encode())
        finally:
            os._exit(127)
    os.close(go_r)
    os.close(err_w)
    return pid, go_w, err_r


def _status_to_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_common
def run(command: tuple[str, ...], fmt: str, interval: float, reconcile_interval: float,
        no_serve: bool, listen: str, web_config: str | None, max_mapping_series: int,
        output: str | None, heap_interval: float, pss_interval: float) -> None:
    """Run COMMAND traced from its first instruction; exit with its status.

    Put -- before the command: memtrace run -- ./server --port 8080"""
    path = _check_executable(command)
    session = Session(_reporter(fmt, output), interval, reconcile_interval)
    session.enable_heap(heap_interval)
    session.enable_pss(pss_interval)
    child = 0
    status: int | None = None

    def forward(signum: int) -> None:
        if child and signum == signal.SIGTERM:
            os.kill(child, signum)

    session.install_signal_handlers(forward)
    server = None
    try:
        session.load()
        server = _serve(session, no_serve, listen, web_config, max_mapping_series)
        child, go_w, err_r = _spawn_stopped(path, command)
        session.add_target(child)
        os.write(go_w, b"x")
        os.close(go_w)
        err = os.read(err_r, 64)
        os.close(err_r)
        if err:
            os.waitpid(child, 0)
            raise MemtraceError(f"cannot execute {command[0]}: {os.strerror(int(err))}",
                                ExitCode.CANNOT_EXECUTE)
        # If it exits before we read it, its status still counts.
        with contextlib.suppress(MemtraceError):
            session.attach(child)

        def child_running() -> bool:
            nonlocal status
            pid, st = os.waitpid(child, os.WNOHANG)
            if pid == child:
                status = st
                return False
            return True

        session.loop(child_running)
        if status is None:  # interrupted: let the command finish on its own signal
            _, status = os.waitpid(child, 0)
    finally:
        if server:
            server.close()
        session.close()
    code = _status_to_code(status)
    log(f"{command[0]} exited with status {code}")
    sys.exit(code)


class _NullReporter:
    """Agent mode without --format: serve metrics, log attach/detach lines."""

    def snapshot(self, snap: dict[str, Any]) -> None:
        pass

    def events(self, events: list[Any]) -> None:
        pass

    def tick_done(self) -> None:
        pass

    def message(self, text: str) -> None:
        log(text)

    def close(self) -> None:
        pass


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        return int(float(num) * units[unit])
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size like 64M") from None


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--comm", multiple=True, help="Watch processes whose name matches this regex.")
@click.option("--exe", multiple=True, help="... whose executable path matches this regex.")
@click.option("--cgroup", multiple=True, help="... whose cgroup path matches this regex.")
@click.option("--user", multiple=True, help="... owned by this user (name or UID).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML file: rules (list of {name, comm, exe, cgroup, user}, fields "
              "ANDed, rules ORed), all_min_rss.")
@click.option("--all", "all_", is_flag=True, help="Also watch every process whose resident "
              "size reaches --min-rss (checked from statm every --sweep-interval).")
@click.option("--min-rss", default="64M", show_default=True, help="Threshold for --all.")
@click.option("--sweep-interval", type=click.FloatRange(min=0.1), default=10.0,
              show_default=True, help="Seconds between --all sweeps of /proc/*/statm.")
@click.option("--max-processes", type=click.IntRange(min=1), default=100, show_default=True,
              help="Cap on watched processes; the rest are counted as dropped.")
@click.option("--group-by", type=click.Choice(["pid", "group"]), default="pid",
              show_default=True, help="Label series by pid, or by group (the matching "
              "rule's name; the process name for --all) so restarts keep their series.")
@click.option("--format", "fmt", type=click.Choice(["none", "json"]), default="none",
              show_default=True, help="Also write JSON Lines snapshots.")
@click.option("--interval", type=click.FloatRange(min=0.01), default=1.0, show_default=True)
@click.option("--reconcile-interval", type=click.FloatRange(min=0.0), default=300.0,
              show_default=True)
@click.option("--web.listen-address", "listen", default=DEFAULT_LISTEN, show_default=True)
@click.option("--web.config.file", "web_config", default=None, type=click.Path(dir_okay=False))
@click.option("--max-mapping-series", type=click.IntRange(min=2), default=50, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None)
@_heap_interval_option()
@_pss_interval_option()
def agent(comm: tuple[str, ...], exe: tuple[str, ...], cgroup: tuple[str, ...],
          user: tuple[str, ...], config_file: str | None, all_: bool, min_rss: str,
          sweep_interval: float, max_processes: int, group_by: str, fmt: str,
          interval: float, reconcile_interval: float, listen: str, web_config: str | None,
          max_mapping_series: int, output: str | None, heap_interval: float,
          pss_interval: float) -> None:
    """Run as a node agent: watch processes picked by rules, attach to new ones on
    exec, serve /metrics. SIGTERM detaches every probe and exits 0."""
    from memtrace.agent import Agent, load_config, rule_from_dict

    raw_rules: list[dict[str, Any]] = [{"name": f"comm={v}", "comm": v} for v in comm]
    raw_rules += [{"name": f"exe={v}", "exe": v} for v in exe]
    raw_rules += [{"name": f"cgroup={v}", "cgroup": v} for v in cgroup]
    raw_rules += [{"name": f"user={v}", "user": v} for v in user]
    all_min_rss = _size(min_rss) if all_ else None
    if config_file:
        config = load_config(config_file)
        raw_rules += list(config.get("rules") or [])
        if config.get("all_min_rss") is not None:
            all_min_rss = _size(str(config["all_min_rss"]))
    rules = [rule_from_dict(r, i) for i, r in enumerate(raw_rules)]
    if not rules and all_min_rss is None:
        raise MemtraceError("agent needs at least one rule (--comm, --exe, --cgroup, --user, "
                            "--config) or --all", ExitCode.USAGE)
    reporter: Reporter = _reporter("json", output) if fmt == "json" else _NullReporter()
    session = Session(reporter, interval, reconcile_interval)
    session.grouping = group_by == "group"
    session.enable_heap(heap_interval)
    session.enable_pss(pss_interval)
    session.install_signal_handlers()
    server = None
    try:
        session.load(watch_execs=True)
        server = _serve(session, False, listen, web_config, max_mapping_series)
        agent_ = Agent(session, rules, all_min_rss, max_processes, sweep_interval)
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
@click.option("--retries", type=click.IntRange(min=0), default=5, show_default=True,
              help="Walks to retry when the heap changes under the walk (with --stop: "
              "snapshots to take again when a thread was stopped inside malloc).")
def heap(pid: int, fmt: str, stop: bool, retries: int) -> None:
    """Why memory is not given back: anatomy of a process's glibc malloc heap
    (in use, free, resident holes, what malloc_trim(0) would return)."""
    from memtrace.heap import heap_command

    click.echo(heap_command(pid, fmt, stop, retries))


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
    click.echo(render_json(report) if fmt == "json" else render_text(report))


def _one_shot_snapshot(procfs: ProcFS, pid: int) -> dict[str, Any] | None:
    """memtrace's figures without probes: one full scan of the page tables.
    None where that is not allowed (not root) or the process went away."""
    import time

    from memtrace.tracker import ProcessGone, ProcessTracker
    from memtrace.views.snapshot import snapshot

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
def libs(pids: tuple[int, ...], all_: bool, sort: str, fmt: str, all_files: bool) -> None:
    """Shared libraries and who pays for them (like Android's librank): per
    library (all segments: text, rodata/relro, data, bss) the processes mapping
    it with their RSS, PSS (each page divided by its map count) and USS (pages
    mapped only once), and totals; then per-process totals. Figures equal
    smaps Rss, Pss and Private_Clean + Private_Dirty. Needs root.

    memtrace libs PID [PID ...] | memtrace libs --all"""
    from memtrace.libs import libs_command

    click.echo(libs_command(pids, all_, sort, fmt, all_files))


@cli.command()
def doctor() -> None:
    """Check that memtrace can run here, one line per requirement with the fix."""
    checks = run_checks()
    click.echo(render(checks))
    failed = [c for c in checks if c.required and not c.ok]
    if failed:
        codes = {"BCC": ExitCode.NO_BCC, "kernel headers": ExitCode.NO_HEADERS,
                 "privileges": ExitCode.NOT_ROOT, "tracepoints": ExitCode.NO_TRACEFS}
        sys.exit(codes.get(failed[0].name, ExitCode.INTERNAL))


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(ExitCode.USAGE)
    except MemtraceError as e:
        print(f"memtrace: error: {e.message}", file=sys.stderr)
        sys.exit(e.code)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(0)
    except KeyboardInterrupt:
        sys.exit(130)
