"""`memtrace run`: start a command traced from its first instruction, follow
its process tree, pass signals on to it, summarise its peaks when it exits,
and exit with its status."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import sys
import threading
import time
from typing import Any

import click

from memtrace.commands.gate import GateOptions, RunGate, gate_options
from memtrace.commands.live import (
    bind_metrics,
    listen_address_given,
    make_reporter,
    report_malloc,
    serve_metrics,
    write_stack_outputs,
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
from memtrace.commands.targets import TreeFollower
from memtrace.errors import ExitCode, MemtraceError, OutputError
from memtrace.exporter.web import load_web_config
from memtrace.session import Session
from memtrace.trace.events import Drained
from memtrace.util.log import log
from memtrace.views.summary import PeakTracker, build_summary


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


def _spawn_stopped(path: str, command: tuple[str, ...], forwarder: _Forwarder,
                   env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """Fork a child that waits for a go byte before exec (with `env`, else
    memtrace's environment). Returns (pid, go_fd, err_fd)."""
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
            if env is None:
                os.execv(path, list(command))
            os.execve(path, list(command), env)
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


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@live_options
@table_options
@stacks_options
@malloc_options
@gate_options
def run(command: tuple[str, ...], fmt: str, interval: float, reconcile_interval: float,
        no_serve: bool, listen: str, web_config: str | None, max_mapping_series: int,
        output: str | None, heap_interval: float, pss_interval: float,
        table_opts: Any, stacks_opts: StacksOptions | None,
        malloc_opts: MallocOptions | None, gate_opts: GateOptions | None) -> None:
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
    spawn_env = None
    shim = ""
    # the sampler, built before anything is loaded (not as a user: loading the
    # probes refuses them first, exit 3, rather than the cache directory)
    if malloc_opts is not None and os.geteuid() == 0:
        from memtrace.malloc.shim import build_shim, child_env

        shim = str(build_shim())
        spawn_env = child_env(os.environ, shim, malloc_opts.period, malloc_opts.max_rate)
    web_cfg = None if no_serve else load_web_config(web_config)
    stop = threading.Event()
    forwarder = _Forwarder(stop)      # before any thread: they inherit its mask
    session = Session(make_reporter(fmt, output, table_opts), interval, reconcile_interval)
    session.stop = stop
    gate = RunGate(gate_opts, command, session.reporter.message) if gate_opts else None
    session.enable_heap(heap_interval)
    session.enable_pss(pss_interval)
    if stacks_opts is not None:
        session.enable_stacks(stacks_opts.period)
    if malloc_opts is not None:
        session.enable_malloc(malloc_opts.period, shim)
    child = 0
    status: int | None = None
    failure: OutputError | None = None
    server = bind_metrics(no_serve, listen, web_cfg, fallback=not listen_address_given())
    try:
        session.load(watch_execs=True)    # fork and exec notices: the command's tree
        serve_metrics(session, server, max_mapping_series,
                      stacks_opts.series if stacks_opts is not None else 0)
        child, go_w, err_r = _spawn_stopped(path, command, forwarder, spawn_env)
        if forwarder.early is not None:   # a signal before the command started
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            log(f"{signal.Signals(forwarder.early).name} before {command[0]} started: "
                "not run")
            raise SystemExit(128 + forwarder.early)
        session.add_target(child)
        if gate is not None:
            gate.child = child
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

        session.python_at_exec(child)
        started = time.monotonic()
        exited = _wake_on_exit(child, stop)
        peaks = PeakTracker()
        tree = TreeFollower(session, child)

        def child_running() -> bool:
            nonlocal status
            status = forwarder.reap(child, os.WNOHANG)
            return status is None

        def observe(snapshots: dict[int, dict[str, Any]]) -> None:
            peaks.observe(snapshots)
            if gate is not None:
                gate.observe(snapshots)

        def on_tick(drained: Drained) -> None:
            tree.on_tick(drained)
            observe(session.latest_snapshots())

        try:
            try:
                session.attach(child)
            except OutputError:
                raise
            except MemtraceError:
                pass  # it exited before we read it: its status still counts
            observe(session.latest_snapshots())
            session.loop(child_running, on_tick, quick_start=True)
            if status is None and exited:
                status = forwarder.reap(child, 0)      # woken by its exit (a zombie now)
            if status is not None:
                duration = (exited[0] if exited else time.monotonic()) - started
                if session.trackers:    # descendants still running: a final snapshot
                    session.tick()
                    observe(session.latest_snapshots())
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
            if stacks_opts is not None:
                write_stack_outputs(session.stack_profiles(), stacks_opts.output)
            if malloc_opts is not None and session.malloc is not None:
                report_malloc(session, malloc_opts)
        except OutputError as e:
            failure = failure or e
    while status is None:  # output failed: wait for the command (signals still forwarded)
        status = forwarder.reap(child, os.WNOHANG)
        if status is None:
            time.sleep(0.05)
    code = _status_to_code(status)
    log(f"{command[0]} exited with status {code}")
    if gate is not None:
        code = gate.finish(code, status)
    if failure is not None:
        raise failure
    sys.exit(code)
