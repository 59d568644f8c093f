"""The agent's rules applied to the processes BPF names: children forked
without exec by watched processes (the `forks` ring), execs, and the notices
the rings dropped. Fixture /proc trees; the session is a stand-in that records
what the agent asks of it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

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
