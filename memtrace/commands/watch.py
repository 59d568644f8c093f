"""`memtrace watch`: running processes, given by PID or name, until they exit
or --once / --count snapshots are taken."""

from __future__ import annotations

from typing import Any

import click

from memtrace.commands.live import (
    bind_metrics,
    close_live,
    listen_address_given,
    make_reporter,
    serve_metrics,
)
from memtrace.commands.options import (
    EXIT_CODES_HELP,
    MallocOptions,
    StacksOptions,
    live_options,
    malloc_options,
    stacks_options,
    table_options,
)
from memtrace.commands.targets import resolve_targets
from memtrace.errors import ExitCode, MemtraceError
from memtrace.exporter.web import load_web_config
from memtrace.session import Session
from memtrace.trace.events import Drained
from memtrace.trace.procfs import ProcFS
from memtrace.util.log import log


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("targets", metavar="PID|NAME...", nargs=-1, required=True)
@click.option("--once", is_flag=True, help="One snapshot of each process, then exit 0.")
@click.option("--count", type=click.IntRange(min=1, max=1 << 31), default=None,
              help="N snapshots of each process (the first at attach, then one per "
                   "interval), then exit 0.")
@live_options
@table_options
@stacks_options
@malloc_options
def watch(targets: tuple[str, ...], once: bool, count: int | None, fmt: str, interval: float,
          reconcile_interval: float, no_serve: bool, listen: str, web_config: str | None,
          max_mapping_series: int, output: str | None, heap_interval: float,
          pss_interval: float, table_opts: Any, stacks_opts: StacksOptions | None,
          malloc_opts: MallocOptions | None) -> None:
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
    server = bind_metrics(no_serve, listen, web_cfg, fallback=not listen_address_given())
    reporter = make_reporter(fmt, output, table_opts, pids)
    session = Session(reporter, interval, reconcile_interval, procfs)
    session.enable_heap(heap_interval)
    session.enable_pss(pss_interval)
    if stacks_opts is not None:
        session.enable_stacks(stacks_opts.period)
    if malloc_opts is not None:
        _enable_malloc(session, malloc_opts)
    session.install_signal_handlers()
    ticks = 0

    def keep_going() -> bool:
        return bool(session.trackers) and (snapshots is None or ticks < snapshots - 1)

    def on_tick(_drained: Drained) -> None:
        nonlocal ticks
        ticks += 1

    try:
        session.load()
        serve_metrics(session, server, max_mapping_series,
                      stacks_opts.series if stacks_opts is not None else 0)
        for pid in dict.fromkeys(pids):
            session.add_target(pid)
            try:
                session.attach(pid)
                if session.malloc is not None and session.malloc.interposer is not None:
                    session.malloc.interpose(pid)
            except MemtraceError as e:
                if e.code != ExitCode.NO_SUCH_PROCESS:
                    raise
                session.reporter.message(f"pid {pid} exited while attaching")
        if not session.trackers:
            raise MemtraceError("no process could be attached: every given PID exited",
                                ExitCode.NO_SUCH_PROCESS)
        session.loop(keep_going, on_tick)
    finally:
        close_live(session, server, stacks_opts.output if stacks_opts else None, malloc_opts)


def _enable_malloc(session: Session, opts: MallocOptions) -> None:
    """watch --malloc: the sampler, built before anything is loaded (as a user,
    loading the probes refuses first, exit 3, rather than the cache
    directory), and put into each process once it is attached."""
    import os

    from memtrace.malloc.inject import Interposer
    from memtrace.malloc.shim import build_shim

    shim = str(build_shim()) if os.geteuid() == 0 else ""
    session.enable_malloc(opts.period, shim)
    assert session.malloc is not None
    session.malloc.interposer = Interposer(session.procfs, shim, opts.period, opts.max_rate)


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
