"""`memtrace agent`: pick processes by rule, attach to new ones as they exec or
as watched processes fork them, detach from the ones that exit, keep serving
metrics while targets come and go. The rules, the Agent that applies them each
tick, and the command that builds both from its options."""

from __future__ import annotations

import os
import pwd
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from memtrace.commands.live import (
    NullReporter,
    bind_metrics,
    close_live,
    make_reporter,
    recording_tee,
    serve_metrics,
)
from memtrace.commands.options import (
    EXIT_CODES_HELP,
    ListenAddress,
    Seconds,
    Size,
    StacksOptions,
    heap_interval_option,
    parse_size,
    pss_interval_option,
    stacks_options,
)
from memtrace.errors import ExitCode, MemtraceError
from memtrace.exporter.web import DEFAULT_LISTEN, load_web_config
from memtrace.reporter import Reporter
from memtrace.session import Session
from memtrace.trace.events import Drained
from memtrace.trace.procfs import ProcFS, escape_name
from memtrace.util.log import log


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    comm: str
    exe: str
    cgroup: str
    uid: int


@dataclass(frozen=True)
class Rule:
    """All given fields must match (AND); an agent's rules are alternatives (OR).
    `name` is the group label of the processes it picks (`--group-by group`);
    a rule without one groups them by their own comm."""

    name: str | None
    comm: re.Pattern[str] | None = None
    exe: re.Pattern[str] | None = None
    cgroup: re.Pattern[str] | None = None
    uid: int | None = None

    def matches(self, info: ProcInfo) -> bool:
        return ((self.comm is None or bool(self.comm.search(info.comm)))
                and (self.exe is None or bool(self.exe.search(info.exe)))
                and (self.cgroup is None or bool(self.cgroup.search(info.cgroup)))
                and (self.uid is None or self.uid == info.uid))

    def describe(self) -> str:
        """The rule as log lines show it: its name, else its fields."""
        if self.name is not None:
            return self.name
        fields = [f"{k}={p.pattern}" for k, p in (("comm", self.comm), ("exe", self.exe),
                                                  ("cgroup", self.cgroup)) if p is not None]
        if self.uid is not None:
            fields.append(f"uid={self.uid}")
        return " ".join(fields)


# NAME=VALUE in --comm/--exe/--cgroup/--user: a rule with a name. NAME is a word
# (letters, digits, _ . -, not starting with a digit or punctuation), so a regex
# that starts with "(", "^", a backslash, "[", "." ... is never taken for one; to
# match a literal "=" in an unnamed rule, escape it: "\=".
_NAMED = re.compile(r"([A-Za-z_][A-Za-z0-9_.-]*)=(.*)", re.DOTALL)


def named_value(value: str) -> tuple[str | None, str]:
    """(name, value) of a command-line rule given as NAME=VALUE, else (None, value)."""
    m = _NAMED.fullmatch(value)
    return (m.group(1), m.group(2)) if m else (None, value)


def _regex(value: str, what: str, flags: int = 0) -> re.Pattern[str]:
    try:
        return re.compile(value, flags)
    except re.error as e:
        raise MemtraceError(f"bad {what} regex {value!r}: {e}", ExitCode.USAGE) from None


def resolve_user(user: str | int) -> int:
    if isinstance(user, int) or str(user).isdigit():
        return int(user)
    try:
        return pwd.getpwnam(str(user)).pw_uid
    except KeyError:
        raise MemtraceError(f"no such user: {user}", ExitCode.USAGE) from None


def command_line_rules(**given: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rules as dicts (like a --config file's) from --comm, --exe, --cgroup and
    --user values, each a rule of its own, named when given as NAME=VALUE."""
    rules: list[dict[str, Any]] = []
    for key, values in given.items():
        for value in values:
            name, value = named_value(value)
            rules.append({key: value} if name is None else {"name": name, key: value})
    return rules


def rule_from_dict(raw: dict[str, Any], index: int, where: str = "") -> Rule:
    """A Rule from a rule dict; `where` names its origin in error messages
    ("FILE: " for a --config file's rules; index counts within that origin)."""
    at = f"{where}rule {index}"
    unknown = set(raw) - {"name", "comm", "exe", "cgroup", "user"}
    if unknown:
        raise MemtraceError(f"{at}: unknown keys {sorted(unknown)}", ExitCode.USAGE)
    if not set(raw) - {"name"}:
        raise MemtraceError(f"{at}: needs at least one of comm, exe, cgroup, user",
                            ExitCode.USAGE)
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise MemtraceError(f"{at}: name must be a non-empty string", ExitCode.USAGE)
    try:
        return Rule(
            name=name,
            comm=_regex(raw["comm"], "comm") if "comm" in raw else None,
            exe=_regex(raw["exe"], "exe") if "exe" in raw else None,
            # one line per cgroup v1 hierarchy (ProcInfo.cgroup): ^ and $ anchor
            # each path, as on cgroup v2's single line
            cgroup=_regex(raw["cgroup"], "cgroup", re.MULTILINE) if "cgroup" in raw else None,
            uid=resolve_user(raw["user"]) if "user" in raw else None,
        )
    except MemtraceError as e:
        raise MemtraceError(f"{at}: {e.message}", e.code) from None


def load_config(path: str) -> dict[str, Any]:
    from memtrace.exporter.web import read_yaml_config

    raw = read_yaml_config(path, "agent config")
    if not isinstance(raw, dict) or not isinstance(raw.get("rules") or [], list):
        raise MemtraceError(f"{path}: expected a mapping with a list under 'rules'",
                            ExitCode.USAGE)
    unknown = set(raw) - {"rules", "all_min_rss"}
    if unknown:
        raise MemtraceError(f"{path}: unknown keys {', '.join(sorted(map(str, unknown)))}",
                            ExitCode.USAGE)
    for i, rule in enumerate(raw.get("rules") or []):
        if not isinstance(rule, dict):
            raise MemtraceError(f"{path}: rule {i} is not a mapping", ExitCode.USAGE)
        for key in ("name", "comm", "exe", "cgroup"):
            if key in rule and not isinstance(rule[key], str):
                raise MemtraceError(f"{path}: rule {i}: {key} must be a string",
                                    ExitCode.USAGE)
        if "user" in rule and (isinstance(rule["user"], bool)
                               or not isinstance(rule["user"], (str, int))):
            raise MemtraceError(f"{path}: rule {i}: user must be a name or a UID",
                                ExitCode.USAGE)
    return raw


# Container and pod of a process, from its cgroup path (what kubelet, containerd,
# CRI-O, Docker and podman name their cgroups after; cAdvisor reads the same):
#   systemd driver  /kubepods.slice/kubepods-burstable.slice/
#                     kubepods-burstable-pod<uid, "_" for "-">.slice/cri-containerd-<id>.scope
#                   (crio-<id>.scope, docker-<id>.scope, libpod-<id>.scope; Guaranteed
#                    pods: /kubepods.slice/kubepods-pod<uid>.slice/...)
#   cgroupfs driver /kubepods/burstable/pod<uid>/<id>, /docker/<id>
# <id> is the runtime's 64-hex-digit container ID; <uid> the pod's metadata.uid
# (a UUID; a static pod's is 32 hex digits). crio-conmon-<id> (CRI-O's monitor
# process) is not the container: it gets the pod but no container_id.
_CONTAINER = re.compile(r"(?:(?:docker|cri-containerd|crio|libpod|containerd)-)?"
                        r"([0-9a-f]{64})(?:\.scope)?")
_POD = re.compile(r"(?:[A-Za-z0-9_]+-)*pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}"
                  r"[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32})(?:\.slice)?")


def container_labels(cgroup: str) -> tuple[str, str]:
    """(container_id, pod_uid) of a process from its cgroup path(s) (one per line,
    as ProcInfo.cgroup), "" for each it is not in. pod_uid is written with dashes,
    as Kubernetes (kube_pod_info's uid label) writes it. The innermost container
    segment wins; the first line that names either is used."""
    for path in cgroup.splitlines():
        container = pod = ""
        for segment in path.split("/"):
            m = _POD.fullmatch(segment)
            if m:
                pod = m.group(1).replace("_", "-")
                continue
            m = _CONTAINER.fullmatch(segment)
            if m:
                container = m.group(1)
        if container or pod:
            return container, pod
    return "", ""


def read_info(procfs: ProcFS, pid: int) -> ProcInfo | None:
    try:
        st = procfs.stat(pid)
        status = procfs.status(pid)
        cgroup = (procfs.root / str(pid) / "cgroup").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    # cgroup v2 line "0::/path"; with v1 hierarchies, all paths joined
    paths = [line.split(b":", 2)[2].decode("utf-8", "backslashreplace")
             for line in cgroup.splitlines() if line.count(b":") >= 2]
    uid = int(status.get("Uid", "0").split()[0])
    exe = escape_name(procfs.exe(pid))   # shown and matched as every name (docs/output.md)
    return ProcInfo(pid=pid, comm=st.comm, exe=exe, cgroup="\n".join(paths), uid=uid)


class Agent:
    def __init__(self, session: Session, rules: list[Rule], all_min_rss: int | None,
                 max_processes: int, sweep_interval: float = 10.0,
                 group_by: str = "group") -> None:
        """`group_by` "comm": every process's group is its own comm; otherwise
        it is the name of the rule that picked it, or its comm for a rule without
        a name and for --all."""
        self.session = session
        self.group_by = group_by
        self.rules = rules
        self.all_min_rss = all_min_rss
        self.max_processes = max_processes
        self.sweep_interval = sweep_interval
        self.own_pid = os.getpid()
        self._last_sweep = 0.0
        self.targets_dropped = 0

    def match(self, info: ProcInfo) -> Rule | None:
        """The first rule that matches, else None."""
        return next((r for r in self.rules if r.matches(info)), None)

    def _try_attach(self, pid: int, rule: Rule | None, info: ProcInfo) -> None:
        """Attach to pid, picked by `rule` (None: by --all)."""
        session = self.session
        if pid in session.trackers or pid == self.own_pid:
            return
        if len(session.trackers) >= self.max_processes:
            self.targets_dropped += 1
            session.targets_dropped = self.targets_dropped
            return
        try:
            session.procfs.check_target(pid, self.own_pid)
            session.add_target(pid)
            session.attach(pid)
        except MemtraceError:
            session.detach_quietly(pid)
            return
        # The group label: the rule's name; without one (and with --group-by
        # comm) none is kept, and the exporter labels the process with its
        # comm as it is at each scrape (an exec may change it).
        if rule is not None and rule.name is not None and self.group_by != "comm":
            session.group_of[pid] = rule.name
        session.container_of[pid] = container_labels(info.cgroup)
        why = rule.describe() if rule is not None else "--all"
        session.reporter.message(f"attached to pid {pid} ({session.trackers[pid].comm}, "
                                 f"{why})")

    def consider(self, pid: int) -> None:
        info = read_info(self.session.procfs, pid)
        if info is None:
            return
        rule = self.match(info)
        if rule is not None:
            self._try_attach(pid, rule, info)

    def initial_scan(self) -> None:
        for pid in all_pids(self.session.procfs):
            self.consider(pid)
        self.sweep()

    def sweep(self) -> None:
        """--all: processes above the resident threshold (statm: no page walk)."""
        self._last_sweep = time.monotonic()
        if self.all_min_rss is None:
            return
        procfs = self.session.procfs
        for pid in all_pids(procfs):
            if pid in self.session.trackers:
                continue
            try:
                rss = procfs.statm(pid).resident_bytes
            except (OSError, ValueError, IndexError):
                continue
            if rss >= self.all_min_rss and rss > 0:
                info = read_info(procfs, pid)
                if info is not None:
                    self._try_attach(pid, None, info)

    def on_tick(self, drained: Drained) -> None:
        # execs anywhere, and children forked (without exec) by watched
        # processes: postgres backends, nginx workers. Rules are applied to the
        # new process as /proc shows it now (its own comm, exe, cgroup, user).
        for pid in dict.fromkeys(drained.execs + drained.forks):
            self.consider(pid)
        self._count_lost(drained.notices_lost)
        if self.all_min_rss is not None and (
                time.monotonic() - self._last_sweep >= self.sweep_interval):
            self.sweep()


    def _count_lost(self, lost: dict[str, int]) -> None:
        """Notices the BPF rings dropped (a burst of execs or forks between two
        ticks): the processes they named may match and are then missed until
        they exec again; counted in memtrace_events_lost_total and said once
        per tick on stderr."""
        session = self.session
        for ring, total in lost.items():
            new = total - session.notices_lost.get(ring, 0)
            if new > 0:
                session.reporter.message(f"{new} {ring[:-1]} notice(s) lost (ring full): "
                                         "those processes are not considered")
        if lost:
            session.notices_lost = dict(lost)


def agent_recording_path(directory: str, now: float | None = None) -> str:
    """DIR/memtrace-HOST-YYYYmmdd-HHMMSS.mtrace for --record DIR (DIR created;
    a name taken in the same second gets -2, -3, ...)."""
    import socket

    from memtrace.errors import OutputError

    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--record {directory}: {e.strerror or e}") from None
    host = re.sub(r"[^A-Za-z0-9_.-]+", "_", socket.gethostname()) or "host"
    base = os.path.join(directory, f"memtrace-{host}-"
                        f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}")
    path, n = f"{base}.mtrace", 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}.mtrace"
    return path


def all_pids(procfs: ProcFS) -> list[int]:
    try:
        return sorted(int(p.name) for p in Path(procfs.root).iterdir() if p.name.isdigit())
    except OSError:
        return []


@click.command(epilog=EXIT_CODES_HELP)
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
@click.option("--record", "record_dir", type=click.Path(file_okay=False), default=None,
              metavar="DIR", help="Also write a recording of this agent run to "
              "DIR/memtrace-HOST-YYYYmmdd-HHMMSS.mtrace (named on stderr; DIR is created): "
              "every watched process's snapshots, attach and exit messages, and with "
              "--stacks the stack profiles (docs/recording.md).")
@heap_interval_option()
@pss_interval_option()
@stacks_options
def agent(comm: tuple[str, ...], exe: tuple[str, ...], cgroup: tuple[str, ...],
          user: tuple[str, ...], config_file: str | None, all_: bool, min_rss: int,
          sweep_interval: float, max_processes: int, group_by: str, fmt: str,
          interval: float, reconcile_interval: float, listen: str, web_config: str | None,
          max_mapping_series: int, output: str | None, record_dir: str | None,
          heap_interval: float, pss_interval: float,
          stacks_opts: StacksOptions | None) -> None:
    """Run as a node agent: watch processes picked by rules, attach to new ones on
    exec, serve /metrics. SIGTERM, SIGINT or SIGHUP detaches every probe and exits 0."""
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
    reporter: Reporter = make_reporter("json", output) if fmt == "json" else NullReporter()
    if record_dir is not None:
        reporter = recording_tee(reporter, agent_recording_path(record_dir), "agent")
    session = Session(reporter, interval, reconcile_interval)
    session.grouping = group_by != "pid"
    session.container_labels = True    # container_id, pod_uid from the cgroup path
    session.enable_heap(heap_interval)
    session.enable_pss(pss_interval)
    if stacks_opts is not None:
        session.enable_stacks(stacks_opts.period)
        # --stacks-output: the processes watched at exit (an agent's exited
        # processes are not kept: they would pile up for as long as it runs)
        session.keep_exited_profiles = False
    session.install_signal_handlers()
    server = bind_metrics(False, listen, web_cfg)   # a fixed port for Prometheus: never another
    try:
        session.load(watch_execs=True)
        serve_metrics(session, server, max_mapping_series,
                      stacks_opts.series if stacks_opts is not None else 0)
        agent_ = Agent(session, rules, all_min_rss, max_processes, sweep_interval,
                       group_by=group_by)
        agent_.initial_scan()
        log(f"agent: {len(rules)} rule(s){', --all' if all_min_rss is not None else ''}; "
            f"watching {len(session.trackers)} process(es)")
        session.publish()
        session.loop(lambda: True, agent_.on_tick)
    finally:
        close_live(session, server, stacks_opts.output if stacks_opts else None)
    log("agent: stopped, probes detached")
