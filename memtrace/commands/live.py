"""The live pipeline that watch, run and agent share: the view a --format asks
for (table, JSON Lines, none), writing to stdout or -o FILE, and the /metrics
endpoint, bound before the probes compile and served once the session has
loaded them."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import click

from memtrace.errors import ExitCode, MemtraceError, OutputError
from memtrace.exporter.collector import MemtraceCollector, freeze_startup_objects
from memtrace.exporter.web import MetricsServer, WebConfig, load_web_config
from memtrace.reporter import Reporter
from memtrace.session import Session
from memtrace.util.log import log
from memtrace.views.summary import render_summary

if TYPE_CHECKING:
    from memtrace.commands.options import MallocOptions
    from memtrace.stacks.profile import StackProfile


def bind_metrics(no_serve: bool, listen: str, web_config: str | WebConfig | None,
                 fallback: bool = False) -> MetricsServer | None:
    """Bind the /metrics address (before the probes compile, so a busy port fails
    at once: one line, exit 2); serve_metrics() starts answering. With `fallback`
    (watch and run when --web.listen-address was not given), a default port that
    is in use (another memtrace watch) is replaced by a free port on the same host."""
    if no_serve:
        return None
    cfg = web_config if isinstance(web_config, WebConfig) else load_web_config(web_config)
    return MetricsServer(None, listen, cfg, fallback=fallback)


def listen_address_given() -> bool:
    """Whether --web.listen-address was given (not its default)."""
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    return ctx is None or ctx.get_parameter_source("listen") is not ParameterSource.DEFAULT


def serve_metrics(session: Session, server: MetricsServer | None,
                  max_mapping_series: int, stack_series: int = 0) -> MetricsServer | None:
    """Serve the session's metrics on the address bind_metrics() bound, with
    `stack_series` stack series per process and measure (--stacks-series)."""
    if server is None:
        return None
    from prometheus_client import CollectorRegistry
    from prometheus_client.process_collector import ProcessCollector

    freeze_startup_objects()     # before any process is watched (see its docstring)
    collector = MemtraceCollector(session.exporter_box, max_mapping_series, stack_series)
    registry = CollectorRegistry()
    registry.register(ProcessCollector(registry=None))
    server.serve(registry, fast=collector.render_scrape)
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


def make_reporter(fmt: str, output: str | None, table_opts: Any = None,
                  pids: tuple[int, ...] = ()) -> Reporter:
    """The view for --format, writing to stdout or -o FILE through an
    OutputStream (views/output.py: never blocks; OutputError on failure); with
    --record FILE, the view and a recording of watch (`pids`) or run."""
    ctx = click.get_current_context(silent=True)
    record = ctx.meta.get("record") if ctx else None
    if record and output and os.path.realpath(record) == os.path.realpath(output):
        raise MemtraceError(f"--record and -o both name {output}: give two files",
                            ExitCode.USAGE)
    view = _make_view(fmt, output, table_opts, ctx)
    if record is None:
        return view
    assert ctx is not None
    return recording_tee(view, record, "run" if "command" in ctx.params else "watch", pids)


def recording_tee(view: Reporter, path: str, mode: str, pids: tuple[int, ...] = ()) -> Reporter:
    """`view` and a recording to `path` (docs/recording.md), its header from
    the command's options."""
    from memtrace.record.writer import RecordingWriter, Tee, make_header, open_recording_output

    ctx = click.get_current_context(silent=True)
    params = dict(ctx.params) if ctx else {}
    stacks = bool(params.get("stacks"))
    malloc = bool(params.get("malloc_on"))
    options = {
        "stacks": stacks, "stacks_period": params.get("stacks_period") if stacks else None,
        "malloc": malloc, "malloc_period": params.get("malloc_period") if malloc else None,
        "pss_interval": params.get("pss_interval"),
        "heap_interval": params.get("heap_interval"),
        "reconcile_interval": params.get("reconcile_interval"),
    }
    command = params.get("command")
    header = make_header(mode, float(params.get("interval") or 1.0),
                         command=list(command) if command else None, pids=pids,
                         options=options)
    writer = RecordingWriter(open_recording_output(path), header)
    log(f"recording to {path}")
    return Tee(view, writer)


def _make_view(fmt: str, output: str | None, table_opts: Any,
               ctx: click.Context | None) -> Reporter:
    changed_only = bool(ctx and ctx.meta.get("changed_only"))
    if changed_only and fmt != "json":
        raise MemtraceError("--changed-only needs --format json", ExitCode.USAGE)
    full_every = int(ctx.meta.get("full_every") or 0) if ctx else 0
    if full_every and not changed_only:
        raise MemtraceError("--full-every needs --changed-only", ExitCode.USAGE)
    if fmt == "none":
        return NullReporter()
    if output == "":
        raise MemtraceError("-o: empty file name", ExitCode.USAGE)
    from memtrace.views.output import open_output

    stream = open_output(output)
    if fmt == "json":
        from memtrace.views.jsonl import JsonReporter
        return JsonReporter(stream, changed_only=changed_only, full_every=full_every)
    from rich.console import Console

    from memtrace.views.output import TextOutput
    from memtrace.views.table import TableReporter
    return TableReporter(Console(file=TextOutput(stream).as_io()), options=table_opts)


class NullReporter(Reporter):
    """--format none, and agent without --format: serve metrics, log
    attach/detach lines."""

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



def write_stack_outputs(profiles: dict[int, StackProfile], directory: str | None) -> list[str]:
    """--stacks-output DIR: per process, folded stacks and an HTML flame graph
    for bytes held now and bytes brought in, and one pprof profile with both;
    the paths written. OutputError (exit 14) when the directory cannot take them."""
    if directory is None:
        return []
    from memtrace.views.flamegraph import render_flamegraph
    from memtrace.views.folded import render_folded
    from memtrace.views.pprof import render_pprof

    written: list[str] = []
    try:
        os.makedirs(directory, exist_ok=True)
        for pid, profile in sorted(profiles.items()):
            base = os.path.join(directory, f"memtrace-{pid}")
            for measure in ("held", "brought"):
                written.append(_write(f"{base}-{measure}.folded",
                                      render_folded(profile, measure).encode()))
                written.append(_write(f"{base}-{measure}.html",
                                      render_flamegraph(profile, measure).encode()))
            written.append(_write(f"{base}.pb.gz", render_pprof(profile)))
    except OSError as e:
        raise OutputError(f"--stacks-output {directory}: {e.strerror or e}") from None
    log(f"stacks of {len(profiles)} process(es) written to {directory}")
    return written


def write_malloc_outputs(profiles: dict[int, StackProfile], directory: str | None) -> list[str]:
    """--malloc-output DIR: per process, folded stacks and an HTML flame graph
    of the bytes outstanding and allocated, and one pprof profile with both
    (outstanding_space, allocated_space); the paths written. OutputError
    (exit 14) as above."""
    if directory is None:
        return []
    from memtrace.views.flamegraph import render_flamegraph
    from memtrace.views.folded import render_folded
    from memtrace.views.pprof import MALLOC_SAMPLE_TYPES, render_pprof

    written: list[str] = []
    try:
        os.makedirs(directory, exist_ok=True)
        for pid, profile in sorted(profiles.items()):
            base = os.path.join(directory, f"memtrace-{pid}-malloc")
            for measure, name in (("held", "outstanding"), ("brought", "allocated")):
                written.append(_write(f"{base}-{name}.folded", render_folded(
                    profile, measure, by_mapping=False).encode()))
                written.append(_write(f"{base}-{name}.html", render_flamegraph(
                    profile, measure, by_mapping=False, kind="malloc").encode()))
            written.append(_write(f"{base}.pb.gz", render_pprof(
                profile, "held", MALLOC_SAMPLE_TYPES, "--malloc")))
    except OSError as e:
        raise OutputError(f"--malloc-output {directory}: {e.strerror or e}") from None
    log(f"--malloc stacks of {len(profiles)} process(es) written to {directory}")
    return written


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def close_live(session: Session, server: MetricsServer | None,
               stacks_output: str | None, malloc_opts: MallocOptions | None = None) -> None:
    """The end of watch and agent: stop serving, detach, then write the stack
    profiles if --stacks-output asked for them, and --malloc's report."""
    if server:
        server.close()
    session.close()
    if stacks_output is not None:
        write_stack_outputs(session.stack_profiles(), stacks_output)
    if malloc_opts is not None and session.malloc is not None:
        report_malloc(session, malloc_opts)


def report_malloc(session: Session, opts: MallocOptions) -> None:
    """--malloc at the end of run and watch: the leak report on stderr, the files."""
    from memtrace.malloc.state import leak_report

    assert session.malloc is not None
    for line in leak_report(session.malloc.summaries):
        log(line)
    write_malloc_outputs(session.malloc.profiles, opts.output)

