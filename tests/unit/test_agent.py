"""The agent's rules applied to the processes BPF names: children forked
without exec by watched processes (the `forks` ring), execs, and the notices
the rings dropped. Fixture /proc trees; the session is a stand-in that records
what the agent asks of it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pytest

from memtrace.agent import Agent, Rule
from memtrace.errors import ExitCode, MemtraceError
from memtrace.events import Drained
from memtrace.procfs import ProcFS

from .fakes import World, status_text


@dataclass
class _Tracker:
    comm: str


@dataclass
class _Reporter:
    messages: list[str] = field(default_factory=list)

    def message(self, text: str) -> None:
        self.messages.append(text)


class _Session:
    """What Agent uses of memtrace.session.Session."""

    def __init__(self, procfs: ProcFS) -> None:
        self.procfs = procfs
        self.trackers: dict[int, _Tracker] = {}
        self.reporter = _Reporter()
        self.group_of: dict[int, str] = {}
        self.container_of: dict[int, tuple[str, str]] = {}
        self.targets_dropped = 0
        self.notices_lost: dict[str, int] = {}
        self.added: list[int] = []
        self.quietly_detached: list[int] = []

    def add_target(self, pid: int) -> None:
        self.added.append(pid)

    def attach(self, pid: int) -> None:
        try:
            comm = self.procfs.stat(pid).comm
        except OSError:
            raise MemtraceError(f"process {pid} exited while attaching",
                                ExitCode.NO_SUCH_PROCESS) from None
        self.trackers[pid] = _Tracker(comm)

    def detach_quietly(self, pid: int) -> None:
        self.quietly_detached.append(pid)


def _proc(world: World, pid: int, comm: bytes, *, exe: bytes = b"/usr/bin/x",
          uid: int = 0, cgroup: bytes = b"0::/system.slice/x.service\n",
          tgid: int | None = None) -> None:
    p = world.process(pid, comm=comm, exe=exe)
    p.tgid = pid if tgid is None else tgid
    p.sync()
    status = status_text(pid, p.tgid, comm.decode()).replace(
        b"PPid:", f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\nPPid:".encode())
    (p.dir / "status").write_bytes(status)
    (p.dir / "cgroup").write_bytes(cgroup)


def _agent(world: World, rules: list[Rule], max_processes: int = 100) -> tuple[Agent, _Session]:
    session = _Session(world.procfs())
    agent = Agent(session, rules, None, max_processes)  # type: ignore[arg-type]
    return agent, session


def _drained(**kw: Any) -> Drained:
    return Drained(chunks={}, ranges={}, events=[], stats={}, **kw)


def test_forked_child_of_a_watched_process_is_attached_under_its_rule(world):
    _proc(world, 100, b"postgres", exe=b"/usr/lib/postgresql/15/bin/postgres")
    rules = [Rule("pg", comm=re.compile("^(nginx|postgres)$"))]
    agent, session = _agent(world, rules)
    agent.initial_scan()
    assert set(session.trackers) == {100}
    # postmaster forks 4 backends, no exec: only the forks ring names them
    for pid in (101, 102, 103, 104):
        _proc(world, pid, b"postgres", exe=b"/usr/lib/postgresql/15/bin/postgres")
    agent.on_tick(_drained(forks=[101, 102, 103, 104]))
    assert set(session.trackers) == {100, 101, 102, 103, 104}
    assert session.group_of == dict.fromkeys((100, 101, 102, 103, 104), "pg")
    assert "attached to pid 103 (postgres, pg)" in session.reporter.messages


def test_rules_apply_to_the_childs_own_comm_exe_cgroup_and_user(world):
    rules = [Rule("web", comm=re.compile("^nginx$"), uid=33),
             Rule("jobs", cgroup=re.compile(r"/jobs\.slice/"))]
    agent, session = _agent(world, rules)
    _proc(world, 201, b"nginx", uid=33)                       # worker, www-data: matches
    _proc(world, 202, b"nginx", uid=0)                        # root child: no rule
    _proc(world, 203, b"helper")                              # renamed child: no rule
    _proc(world, 204, b"helper", cgroup=b"0::/jobs.slice/a.scope\n")   # moved: jobs
    agent.on_tick(_drained(forks=[201, 202, 203, 204]))
    assert session.group_of == {201: "web", 204: "jobs"}


def test_fork_then_exec_in_one_tick_attaches_once(world):
    _proc(world, 300, b"nginx")
    agent, session = _agent(world, [Rule("n", comm=re.compile("nginx"))])
    agent.on_tick(_drained(forks=[300], execs=[300]))
    assert session.added == [300]
    assert session.reporter.messages == ["attached to pid 300 (nginx, n)"]


def test_children_that_are_gone_or_threads_are_skipped(world):
    agent, session = _agent(world, [Rule("n", comm=re.compile("nginx"))])
    _proc(world, 401, b"nginx", tgid=400)                      # a thread id
    agent.on_tick(_drained(forks=[401, 402]))                  # 402: already exited
    assert session.trackers == {}
    assert session.added == []


def test_children_over_max_processes_are_counted_as_dropped(world):
    _proc(world, 500, b"postgres")
    agent, session = _agent(world, [Rule("pg", comm=re.compile("postgres"))], max_processes=2)
    agent.initial_scan()
    for pid in (501, 502, 503):
        _proc(world, pid, b"postgres")
    agent.on_tick(_drained(forks=[501, 502, 503]))
    assert set(session.trackers) == {500, 501}
    assert agent.targets_dropped == session.targets_dropped == 2


def test_notices_the_rings_dropped_are_said_and_counted(world):
    agent, session = _agent(world, [Rule("n", comm=re.compile("nginx"))])
    agent.on_tick(_drained(notices_lost={"execs": 0, "forks": 3}))
    assert session.notices_lost == {"execs": 0, "forks": 3}
    assert session.reporter.messages == [
        "3 fork notice(s) lost (ring full): those processes are not considered"]
    agent.on_tick(_drained(notices_lost={"execs": 0, "forks": 3}))   # no new loss
    assert len(session.reporter.messages) == 1


# ---------------------------------------------------------------------------
# group labels: named by the rule (issue 11)


def test_command_line_rules_are_named_by_name_equals_value():
    from memtrace.agent import command_line_rules, rule_from_dict

    raw = command_line_rules(comm=("^(frag|redis-server)$", "kv=^redis-server$", r"a\=b"),
                             exe=("/usr/bin/x",), user=("web=33",))
    assert raw == [{"comm": "^(frag|redis-server)$"}, {"name": "kv", "comm": "^redis-server$"},
                   {"comm": r"a\=b"}, {"exe": "/usr/bin/x"}, {"name": "web", "user": "33"}]
    rules = [rule_from_dict(r, i) for i, r in enumerate(raw)]
    assert [r.name for r in rules] == [None, "kv", None, None, "web"]
    assert rules[2].comm is not None and rules[2].comm.search("a=b")
    assert [r.describe() for r in rules] == ["comm=^(frag|redis-server)$", "kv",
                                             r"comm=a\=b", "exe=/usr/bin/x", "web"]


def test_config_rule_without_a_name_has_none_and_an_empty_name_is_refused():
    from memtrace.agent import rule_from_dict

    assert rule_from_dict({"comm": "x"}, 0).name is None
    assert rule_from_dict({"name": "db", "comm": "x"}, 0).name == "db"
    try:
        rule_from_dict({"name": "", "comm": "x"}, 3)
    except MemtraceError as e:
        assert e.code == ExitCode.USAGE and "rule 3: name" in e.message
    else:
        raise AssertionError("an empty name was accepted")


def _group_labels(world, rules: list[Rule], group_by: str) -> list[list[str]]:
    """The (group, comm) labels the exporter gives frag (pid 600) and redis-server
    (pid 601) picked by `rules`."""
    from memtrace.exporter import ExporterState, grouped_rows
    from tests.exporter.helpers import realistic_process

    _proc(world, 600, b"frag")
    _proc(world, 601, b"redis-server")
    session = _Session(world.procfs())
    agent = Agent(session, rules, None, 100, group_by=group_by)  # type: ignore[arg-type]
    agent.initial_scan()
    state = ExporterState(snapshots={600: realistic_process(600, "frag"),
                                     601: realistic_process(601, "redis-server")},
                          groups=dict(session.group_of))
    return [ids for ids, _ in grouped_rows(state)]


def test_group_of_an_unnamed_rule_is_the_process_name(world):
    from memtrace.agent import command_line_rules, rule_from_dict

    raw = command_line_rules(comm=("^(frag|redis-server)$",))
    rules = [rule_from_dict(r, i) for i, r in enumerate(raw)]
    assert _group_labels(world, rules, "group") == [["frag", "frag"],
                                                    ["redis-server", "redis-server"]]


def test_group_of_a_named_rule_is_its_name_and_group_by_comm_is_the_process_name(world):
    from memtrace.agent import command_line_rules, rule_from_dict

    raw = command_line_rules(comm=("kv=^(frag|redis-server)$",))
    rules = [rule_from_dict(r, i) for i, r in enumerate(raw)]
    assert _group_labels(world, rules, "group") == [["kv", "frag"], ["kv", "redis-server"]]


def test_group_by_comm_ignores_rule_names(world):
    rules = [Rule("kv", comm=re.compile("^(frag|redis-server)$"))]
    assert _group_labels(world, rules, "comm") == [["frag", "frag"],
                                                   ["redis-server", "redis-server"]]


def test_agent_takes_group_by_comm():
    from memtrace import cli

    for value in ("pid", "group", "comm"):
        ctx = cli.agent.make_context("agent", ["--comm", "x", "--group-by", value])
        assert ctx.params["group_by"] == value


# ---------------------------------------------------------------------------
# container_id and pod_uid from the cgroup path (issue 11)

CID = "3f1a" * 16
UID = "0d1c2b3a-4f5e-6d7c-8b9a-0123456789ab"
UID_ = UID.replace("-", "_")

CGROUPS = {
    # cgroup v2, systemd driver: containerd (kubelet), Burstable, BestEffort, Guaranteed
    "containerd": (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}"
                   f".slice/cri-containerd-{CID}.scope\n", (CID, UID)),
    "besteffort": (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}"
                   f".slice/cri-containerd-{CID}.scope\n", (CID, UID)),
    "guaranteed": (f"0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
                   (CID, UID)),
    "cri-o": (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
              f"crio-{CID}.scope\n", (CID, UID)),
    "cri-o conmon": (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}"
                     f".slice/crio-conmon-{CID}.scope\n", ("", UID)),
    "docker systemd": (f"0::/system.slice/docker-{CID}.scope\n", (CID, "")),
    "docker cgroupfs": (f"0::/docker/{CID}\n", (CID, "")),
    "podman": (f"0::/machine.slice/libpod-{CID}.scope/container\n", (CID, "")),
    # cgroupfs driver: the pod UID keeps its dashes; Guaranteed pods have no class
    "cgroupfs kubepods": (f"0::/kubepods/burstable/pod{UID}/{CID}\n", (CID, UID)),
    "cgroupfs guaranteed": (f"0::/kubepods/pod{UID}/{CID}\n", (CID, UID)),
    # a static pod's UID is a 32-hex-digit hash
    "static pod": (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
                   f"{'5e' * 16}.slice/cri-containerd-{CID}.scope\n", (CID, "5e" * 16)),
    # read from inside a container with its own cgroup namespace (the DaemonSet):
    # paths outside it are relative
    "cgroup namespace": (f"0::/../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}"
                         f".slice/cri-containerd-{CID}.scope\n", (CID, UID)),
    # cgroup v1 (and hybrid: the v2 line is "/"), one line per hierarchy
    "v1": (f"12:memory:/kubepods/burstable/pod{UID}/{CID}\n"
           f"11:cpu,cpuacct:/kubepods/burstable/pod{UID}/{CID}\n0::/\n", (CID, UID)),
    # not in a container
    "service": ("0::/system.slice/sshd.service\n", ("", "")),
    "user": ("0::/user.slice/user-1000.slice/session-3.scope\n", ("", "")),
    "kubelet itself": ("0::/system.slice/kubelet.service\n", ("", "")),
    "pod slice, no container": (f"0::/kubepods.slice/kubepods-pod{UID_}.slice\n", ("", UID)),
    "root": ("0::/\n", ("", "")),
    "empty": ("", ("", "")),
}


@pytest.mark.parametrize("case", list(CGROUPS))
def test_container_labels_from_cgroup_paths(case):
    from memtrace.agent import container_labels

    text, want = CGROUPS[case]
    lines = [line.split(":", 2)[2] for line in text.splitlines()]   # as read_info joins them
    assert container_labels("\n".join(lines)) == want


def test_agent_reads_container_labels_at_attach(world):
    _proc(world, 700, b"nginx", cgroup=CGROUPS["containerd"][0].encode())
    _proc(world, 701, b"nginx", cgroup=CGROUPS["service"][0].encode())
    agent, session = _agent(world, [Rule("web", comm=re.compile("^nginx$"))])
    agent.initial_scan()
    assert session.container_of == {700: (CID, UID), 701: ("", "")}


def test_group_counters_of_a_container_end_with_its_last_process(world):
    """Counters of exited processes are kept per group (rate() stays continuous
    across restarts), but not for a container none of whose processes is left."""
    from memtrace.session import Session
    from tests.exporter.helpers import realistic_process

    class _Quiet:
        def message(self, text: str) -> None: ...

    session = Session(_Quiet(), 1.0, 0.0, world.procfs())  # type: ignore[arg-type]
    session.grouping = session.container_labels = True
    for pid, labels in ((1, (CID, UID)), (2, (CID, UID)), (3, ("", ""))):
        session._snapshots[pid] = realistic_process(pid, "nginx")
        session.container_of[pid] = labels
        session.group_of[pid] = "web"
    session.detach(1, "exited")      # pid 2 still runs in that container: kept
    assert set(session._retired) == {("web", "nginx", CID, UID)}
    session.detach(3, "exited")      # not in a container: kept, as before
    session.detach(2, "exited")      # the container's last process: its series end
    assert set(session._retired) == {("web", "nginx", "", "")}
    session.publish()
    state = session.exporter_box.get()
    assert state.containers == {} and state.groups == {}
