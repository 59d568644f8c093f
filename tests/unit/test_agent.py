"""The agent's rules applied to the processes BPF names: children forked
without exec by watched processes (the `forks` ring), execs, and the notices
the rings dropped. Fixture /proc trees; the session is a stand-in that records
what the agent asks of it."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import pytest

from memtrace.commands.agent import Agent, ProcInfo, Rule, rule_from_dict
from memtrace.errors import ExitCode, MemtraceError
from memtrace.trace.events import Drained
from memtrace.trace.procfs import ProcFS

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
    from memtrace.commands.agent import command_line_rules, rule_from_dict

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
    from memtrace.commands.agent import rule_from_dict

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
    from memtrace.exporter.rows import grouped_rows
    from memtrace.published import TickState
    from tests.unit.exporter.helpers import realistic_process

    _proc(world, 600, b"frag")
    _proc(world, 601, b"redis-server")
    session = _Session(world.procfs())
    agent = Agent(session, rules, None, 100, group_by=group_by)  # type: ignore[arg-type]
    agent.initial_scan()
    state = TickState(snapshots={600: realistic_process(600, "frag"),
                                     601: realistic_process(601, "redis-server")},
                          groups=dict(session.group_of))
    return [ids for ids, _ in grouped_rows(state)]


def test_group_of_an_unnamed_rule_is_the_process_name(world):
    from memtrace.commands.agent import command_line_rules, rule_from_dict

    raw = command_line_rules(comm=("^(frag|redis-server)$",))
    rules = [rule_from_dict(r, i) for i, r in enumerate(raw)]
    assert _group_labels(world, rules, "group") == [["frag", "frag"],
                                                    ["redis-server", "redis-server"]]


def test_group_of_a_named_rule_is_its_name_and_group_by_comm_is_the_process_name(world):
    from memtrace.commands.agent import command_line_rules, rule_from_dict

    raw = command_line_rules(comm=("kv=^(frag|redis-server)$",))
    rules = [rule_from_dict(r, i) for i, r in enumerate(raw)]
    assert _group_labels(world, rules, "group") == [["kv", "frag"], ["kv", "redis-server"]]


def test_group_by_comm_ignores_rule_names(world):
    rules = [Rule("kv", comm=re.compile("^(frag|redis-server)$"))]
    assert _group_labels(world, rules, "comm") == [["frag", "frag"],
                                                   ["redis-server", "redis-server"]]


def test_agent_takes_group_by_comm():
    from memtrace.commands.agent import agent

    for value in ("pid", "group", "comm"):
        ctx = agent.make_context("agent", ["--comm", "x", "--group-by", value])
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
    from memtrace.commands.agent import container_labels

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
    from memtrace.reporter import Reporter
    from memtrace.session import Session
    from tests.unit.exporter.helpers import realistic_process

    session = Session(Reporter(), 1.0, 0.0, world.procfs())
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


@pytest.mark.parametrize("keep", [True, False])
def test_stack_profiles_of_exited_processes_are_kept_only_when_asked(world, keep):
    """watch/run keep an exited process's last profile for --stacks-output; the
    agent (keep_exited_profiles off) drops it at detach, processes still watched
    keep theirs."""
    from memtrace.reporter import Reporter
    from memtrace.session import Session
    from memtrace.stacks.profile import StackProfile

    session = Session(Reporter(), 1.0, 0.0, world.procfs())
    session.keep_exited_profiles = keep
    for pid in (1, 2):
        session._profiles[pid] = StackProfile(pid, "app", 1.0)
    session.detach(1, "exited")
    assert set(session.stack_profiles()) == ({1, 2} if keep else {2})


# ---------------------------------------------------------------------------
# rules: fields ANDed, rules ORed, regexes searched, users by name or UID
# (issue 12: the agent's rules, config and sweep on fixture /proc trees)


def _rules(**given: tuple[str, ...]) -> list[Rule]:
    from memtrace.commands.agent import command_line_rules, rule_from_dict

    return [rule_from_dict(r, i) for i, r in enumerate(command_line_rules(**given))]


def _info(comm: str = "x", exe: str = "/usr/bin/x", cgroup: str = "/system.slice/x.service",
          uid: int = 0, pid: int = 1):
    from memtrace.commands.agent import ProcInfo

    return ProcInfo(pid=pid, comm=comm, exe=exe, cgroup=cgroup, uid=uid)


def test_rule_regexes_are_searched_not_anchored():
    rule = _rules(comm=("nginx",))[0]
    assert rule.matches(_info(comm="nginx")) and rule.matches(_info(comm="my-nginx-2"))
    anchored = _rules(comm=("^nginx$",))[0]
    assert not anchored.matches(_info(comm="nginx: worker"))
    exe = _rules(exe=(r"/postgresql/\d+/bin/postgres$",))[0]
    assert exe.matches(_info(exe="/usr/lib/postgresql/15/bin/postgres"))
    assert not exe.matches(_info(exe="/usr/bin/postgres"))
    # a cgroup regex is searched in every path of a cgroup v1 process (read_info
    # joins them, one per line)
    cg = _rules(cgroup=(r"/kubepods/",))[0]
    assert not cg.matches(_info(cgroup="/"))
    assert cg.matches(_info(cgroup="/\n/kubepods/burstable/podX/abc"))


def test_fields_of_one_rule_are_anded():
    from memtrace.commands.agent import rule_from_dict

    rule = rule_from_dict({"name": "pg", "comm": "^postgres$", "exe": "/usr/lib/postgresql/",
                           "cgroup": r"postgresql\.service", "user": 105}, 0)
    good = _info(comm="postgres", exe="/usr/lib/postgresql/15/bin/postgres",
                 cgroup="/system.slice/postgresql.service", uid=105)
    assert rule.matches(good)
    for field_, value in (("comm", "psql"), ("exe", "/usr/bin/postgres"),
                          ("cgroup", "/user.slice"), ("uid", 0)):
        assert not rule.matches(dataclasses.replace(good, **{field_: value})), field_
    assert rule.describe() == "pg"
    unnamed = rule_from_dict({"comm": "^postgres$", "exe": "/usr/lib/", "cgroup": "pg",
                              "user": 105}, 0)
    assert unnamed.describe() == "comm=^postgres$ exe=/usr/lib/ cgroup=pg uid=105"


def test_rules_are_ored_and_the_first_match_names_the_group(world):
    rules = _rules(comm=("web=^nginx$", "any=."), user=("ops=0",))
    agent, _ = _agent(world, rules)
    assert agent.match(_info(comm="nginx")).name == "web"
    assert agent.match(_info(comm="sshd")).name == "any"
    only_user = _agent(world, _rules(user=("ops=33",)))[0]
    assert only_user.match(_info(comm="x", uid=33)).name == "ops"
    assert only_user.match(_info(comm="x", uid=0)) is None
    # in /proc: the first matching rule is the one the process is attached under
    _proc(world, 800, b"nginx")
    _proc(world, 801, b"sshd")
    agent.initial_scan()
    assert agent.session.group_of == {800: "web", 801: "any"}
    assert "attached to pid 800 (nginx, web)" in agent.session.reporter.messages


def test_user_rules_take_names_and_uids():
    import pwd

    from memtrace.commands.agent import resolve_user

    root = pwd.getpwuid(0).pw_name
    assert [r.uid for r in _rules(user=(root, "0", "named=33"))] == [0, 0, 33]
    assert resolve_user(1234) == 1234 and resolve_user("1234") == 1234
    with pytest.raises(MemtraceError) as e:
        _rules(user=("no-such-user-memtrace-test",))
    assert e.value.code == ExitCode.USAGE and "no such user" in e.value.message


def test_rule_errors_are_usage_errors():
    from memtrace.commands.agent import rule_from_dict

    cases = [
        ({"comm": "("}, "bad comm regex"),
        ({"exe": "[a-"}, "bad exe regex"),
        ({"cgroup": "*x"}, "bad cgroup regex"),
        ({"name": "x", "pid": 3}, "rule 4: unknown keys ['pid']"),
        ({"name": "only-a-name"}, "rule 4: needs at least one of comm, exe, cgroup, user"),
        ({}, "rule 4: needs at least one"),
        ({"name": 5, "comm": "x"}, "rule 4: name must be a non-empty string"),
    ]
    for raw, words in cases:
        with pytest.raises(MemtraceError) as e:
            rule_from_dict(raw, 4)
        assert e.value.code == ExitCode.USAGE and words in e.value.message, (raw, e.value)


def test_a_value_that_starts_like_a_regex_is_not_a_name():
    from memtrace.commands.agent import named_value

    assert named_value("web=^nginx$") == ("web", "^nginx$")
    assert named_value("a.b-c_1=x") == ("a.b-c_1", "x")
    for value in ("^a=b", "(a|b)=c", r"\=x", ".*=x", "1abc=x", "=x", "-x=y", "[=]"):
        assert named_value(value) == (None, value), value
    assert named_value("web=") == ("web", "")      # a name with an empty regex: matches all


def test_exe_is_matched_as_shown_escaped(world):
    """A non-UTF-8 executable path is matched in its escaped form (docs/output.md
    "Names"): the regex names the byte as \\xNN."""
    _proc(world, 810, b"tool", exe=b"/opt/caf\xe9/bin/tool")
    agent, session = _agent(world, _rules(exe=(r"caf\\xe9/bin",)))
    agent.initial_scan()
    assert set(session.trackers) == {810}


def test_threads_zombies_kernel_threads_and_memtrace_itself_are_never_attached(world):
    import os

    _proc(world, 820, b"nginx", tgid=819)                   # a thread
    _proc(world, 821, b"nginx")
    world.procs[821].state = "Z"                            # a zombie
    world.procs[821].sync()
    _proc(world, 822, b"nginx")
    world.procs[822].flags |= 0x00200000                    # PF_KTHREAD
    world.procs[822].sync()
    _proc(world, os.getpid(), b"nginx")                     # memtrace itself
    _proc(world, 823, b"nginx")
    agent, session = _agent(world, _rules(comm=("nginx",)))
    agent.initial_scan()
    assert set(session.trackers) == {823}
    assert session.added == [823]
    assert sorted(session.quietly_detached) == [820, 821, 822]


def test_a_process_that_exits_while_attaching_is_detached_quietly(world):
    _proc(world, 830, b"nginx")
    agent, session = _agent(world, _rules(comm=("nginx",)))
    session.attach = lambda pid: (_ for _ in ()).throw(  # type: ignore[method-assign]
        MemtraceError("gone", ExitCode.NO_SUCH_PROCESS))
    agent.initial_scan()
    assert session.trackers == {} and session.quietly_detached == [830]
    assert session.reporter.messages == []


# ---------------------------------------------------------------------------
# --config YAML


def _config(tmp_path, text: str) -> str:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return str(path)


def test_config_rules_and_all_min_rss_are_read(tmp_path):
    from memtrace.commands.agent import load_config, rule_from_dict

    cfg = load_config(_config(tmp_path, """
rules:
  - name: web
    comm: ^nginx$
    user: 33
  - exe: /usr/lib/postgresql/
    cgroup: postgresql
  - user: root
all_min_rss: 256M
"""))
    assert cfg["all_min_rss"] == "256M"
    rules = [rule_from_dict(r, i) for i, r in enumerate(cfg["rules"])]
    assert [r.name for r in rules] == ["web", None, None]
    assert rules[0].uid == 33 and rules[2].uid == 0
    assert rules[1].exe is not None and rules[1].cgroup is not None and rules[1].comm is None


def test_empty_config_and_config_without_rules_are_accepted(tmp_path):
    from memtrace.commands.agent import load_config

    assert load_config(_config(tmp_path, "")) == {}
    assert load_config(_config(tmp_path, "# nothing\n")) == {}
    assert load_config(_config(tmp_path, "rules:\nall_min_rss: 1G\n")) == {
        "rules": None, "all_min_rss": "1G"}


@pytest.mark.parametrize(("text", "words"), [
    ("rules: []\nmin_rss: 1G\n", "unknown keys min_rss"),
    ("rules: []\nzeta: 1\nalpha: 2\n", "unknown keys alpha, zeta"),
    ("- comm: x\n", "expected a mapping with a list under 'rules'"),
    ("rules:\n  comm: x\n", "expected a mapping with a list under 'rules'"),
    ("rules: nginx\n", "expected a mapping with a list under 'rules'"),
    ("just text\n", "expected a mapping with a list under 'rules'"),
    ("rules:\n  - nginx\n", "rule 0 is not a mapping"),
    ("rules:\n  - comm: x\n  - comm: 5\n", "rule 1: comm must be a string"),
    ("rules:\n  - exe: [a, b]\n", "rule 0: exe must be a string"),
    ("rules:\n  - cgroup: null\n", "rule 0: cgroup must be a string"),
    ("rules:\n  - name: 7\n    comm: x\n", "rule 0: name must be a string"),
    ("rules:\n  - user: true\n", "rule 0: user must be a name or a UID"),
    ("rules:\n  - user: 1.5\n", "rule 0: user must be a name or a UID"),
    ("rules:\n  - comm: x\n\t- comm: y\n", "is not valid YAML at line 3"),
    ("rules: [\n", "is not valid YAML"),
])
def test_bad_config_is_a_usage_error(tmp_path, text, words):
    from memtrace.commands.agent import load_config

    path = _config(tmp_path, text)
    with pytest.raises(MemtraceError) as e:
        load_config(path)
    assert e.value.code == ExitCode.USAGE
    assert words in e.value.message and path in e.value.message, e.value.message


def test_unreadable_config_is_a_usage_error(tmp_path):
    from memtrace.commands.agent import load_config

    for path, words in ((tmp_path / "missing.yaml", "cannot read agent config"),
                        (tmp_path / "binary.yaml", "not UTF-8")):
        if path.name == "binary.yaml":
            path.write_bytes(b"rules: \xff\n")
        with pytest.raises(MemtraceError) as e:
            load_config(str(path))
        assert e.value.code == ExitCode.USAGE and words in e.value.message


# ---------------------------------------------------------------------------
# --all: the sweep of /proc/*/statm against --min-rss


MIB = 1 << 20


def _sized(world: World, pid: int, comm: bytes, rss: int, **kw: Any) -> None:
    """A process whose statm resident size is `rss` bytes (pages statm counts)."""
    _proc(world, pid, comm, **kw)
    p = world.procs[pid]
    p.hidden = (rss // 4096, 0)
    p.sync()


def _all_agent(world: World, min_rss: int | None, rules: list[Rule] | None = None,
               max_processes: int = 100, sweep_interval: float = 10.0,
               group_by: str = "group") -> tuple[Agent, _Session]:
    session = _Session(world.procfs())
    agent = Agent(session, rules or [], min_rss, max_processes,  # type: ignore[arg-type]
                  sweep_interval, group_by=group_by)
    return agent, session


def test_sweep_attaches_processes_at_or_above_min_rss(world):
    _sized(world, 900, b"big", 64 * MIB)
    _sized(world, 901, b"huge", 1024 * MIB)
    _sized(world, 902, b"small", 64 * MIB - 4096)
    _sized(world, 903, b"kworker", 0)
    agent, session = _all_agent(world, 64 * MIB)
    agent.initial_scan()
    assert set(session.trackers) == {900, 901}
    assert "attached to pid 901 (huge, --all)" in session.reporter.messages
    assert session.group_of == {}           # --all: grouped by the process's comm


def test_sweep_with_min_rss_zero_skips_processes_with_nothing_resident(world):
    _sized(world, 910, b"tiny", 4096)
    _sized(world, 911, b"empty", 0)
    agent, session = _all_agent(world, 0)
    agent.sweep()
    assert set(session.trackers) == {910}


def test_sweep_is_off_without_all(world):
    _sized(world, 920, b"big", 512 * MIB)
    agent, session = _all_agent(world, None)
    agent.initial_scan()
    agent.sweep()
    assert session.trackers == {}


def test_rules_and_sweep_together_a_rule_names_its_processes(world):
    _sized(world, 930, b"nginx", 4096)                 # small, but a rule picks it
    _sized(world, 931, b"java", 2048 * MIB)            # big: --all
    _sized(world, 932, b"redis", 2048 * MIB)           # big and a rule: the rule's name
    agent, session = _all_agent(world, 64 * MIB,
                                _rules(comm=("web=^nginx$", "kv=^redis$")))
    agent.initial_scan()
    assert set(session.trackers) == {930, 931, 932}
    assert session.group_of == {930: "web", 932: "kv"}
    assert session.added == [930, 932, 931]        # rules first, then the sweep


def test_sweep_runs_again_after_sweep_interval(world, monkeypatch):
    import memtrace.commands.agent as agent_mod

    now = [1000.0]
    monkeypatch.setattr(agent_mod.time, "monotonic", lambda: now[0])
    _sized(world, 940, b"a", 100 * MIB)
    agent, session = _all_agent(world, 64 * MIB, sweep_interval=10.0)
    agent.initial_scan()
    assert set(session.trackers) == {940}
    _sized(world, 941, b"b", 100 * MIB)         # grows past --min-rss after the scan
    now[0] += 9.9
    agent.on_tick(_drained())
    assert set(session.trackers) == {940}       # not yet: the interval has not passed
    now[0] += 0.1
    agent.on_tick(_drained())
    assert set(session.trackers) == {940, 941}


def test_sweep_reads_statm_at_each_sweep(world):
    """A process below the threshold at one sweep and above it at the next."""
    _sized(world, 950, b"grow", 10 * MIB)
    agent, session = _all_agent(world, 64 * MIB)
    agent.sweep()
    assert session.trackers == {}
    world.procs[950].hidden = (128 * MIB // 4096, 0)
    world.procs[950].sync()
    agent.sweep()
    assert set(session.trackers) == {950}


def test_sweep_skips_vanished_and_unreadable_processes(world):
    _sized(world, 960, b"gone", 100 * MIB)
    _sized(world, 961, b"ok", 100 * MIB)
    (world.root / "960" / "statm").unlink()
    (world.root / "962").mkdir()                        # a pid directory without files
    (world.root / "self").mkdir()                       # not a pid
    agent, session = _all_agent(world, 64 * MIB)
    agent.sweep()
    assert set(session.trackers) == {961}


# ---------------------------------------------------------------------------
# --max-processes


def test_max_processes_caps_the_initial_scan_and_the_sweep(world):
    for pid in (970, 971, 972):
        _proc(world, pid, b"nginx")
    for pid in (973, 974):
        _sized(world, pid, b"java", 512 * MIB)
    agent, session = _all_agent(world, 64 * MIB, _rules(comm=("^nginx$",)), max_processes=2)
    agent.initial_scan()
    assert set(session.trackers) == {970, 971}
    # 972 by its rule, 973 and 974 by the sweep
    assert agent.targets_dropped == session.targets_dropped == 3
    agent.sweep()                                   # each sweep counts them again
    assert agent.targets_dropped == 5


def test_a_tracked_process_is_not_attached_twice(world):
    _proc(world, 980, b"nginx")
    agent, session = _agent(world, _rules(comm=("nginx",)))
    agent.initial_scan()
    agent.on_tick(_drained(execs=[980], forks=[980]))
    agent.initial_scan()
    assert session.added == [980] and agent.targets_dropped == 0


# ---------------------------------------------------------------------------
# group naming: --group-by pid | group | comm


@pytest.mark.parametrize(("group_by", "want"), [
    ("pid", {990: "kv"}),           # kept, but unused: the series carry the pid
    ("group", {990: "kv"}),
    ("comm", {}),
])
def test_group_names_by_group_by(world, group_by, want):
    _proc(world, 990, b"redis-server")
    _proc(world, 991, b"frag")
    _sized(world, 992, b"java", 512 * MIB)
    agent, session = _all_agent(world, 64 * MIB,
                                _rules(comm=("kv=^redis-server$", "^frag$")), group_by=group_by)
    agent.initial_scan()
    assert set(session.trackers) == {990, 991, 992}
    assert session.group_of == want


# ---------------------------------------------------------------------------
# `memtrace agent`: how the command line and --config reach the Agent (the
# session, listener and Agent are stand-ins: nothing is loaded)


class _Stop(Exception):
    pass


class _CliSession:
    instances: list[_CliSession] = []

    def __init__(self, reporter: Any, interval: float, reconcile: float) -> None:
        self.interval, self.reconcile = interval, reconcile
        self.grouping = self.container_labels = None
        self.heap_interval = self.pss_interval = None
        self.loaded: dict[str, Any] | None = None
        self.closed = False
        self.trackers: dict[int, Any] = {}
        self.stack_period: int | None = None
        self.keep_exited_profiles = True
        self.profiles: dict[int, Any] = {}
        _CliSession.instances.append(self)

    def enable_heap(self, interval: float) -> None:
        self.heap_interval = interval

    def enable_stacks(self, period: int) -> None:
        self.stack_period = period

    def stack_profiles(self) -> dict[int, Any]:
        return dict(self.profiles)

    def enable_pss(self, interval: float) -> None:
        self.pss_interval = interval

    def install_signal_handlers(self) -> None: ...

    def load(self, **kw: Any) -> None:
        self.loaded = kw

    def close(self) -> None:
        self.closed = True


def _run_agent(monkeypatch, *args: str, profiles: dict[int, Any] | None = None
               ) -> dict[str, Any]:
    """The arguments `memtrace agent ARGS` gives Agent, and the session's settings."""
    import memtrace.commands.agent as agent_mod

    seen: dict[str, Any] = {}

    def fake_agent(session, rules, all_min_rss, max_processes, sweep_interval,
                   group_by="group"):
        seen.update(session=session, rules=rules, all_min_rss=all_min_rss,
                    max_processes=max_processes, sweep_interval=sweep_interval,
                    group_by=group_by)
        raise _Stop

    _CliSession.instances.clear()
    monkeypatch.setattr(agent_mod, "Session", _CliSession)
    monkeypatch.setattr(agent_mod, "bind_metrics", lambda *a, **k: None)
    monkeypatch.setattr(agent_mod, "serve_metrics",
                        lambda *a, **k: seen.update(serve_args=a[2:], serve_kw=k))
    monkeypatch.setattr(agent_mod, "Agent", fake_agent)
    if profiles:
        monkeypatch.setattr(_CliSession, "stack_profiles", lambda self: dict(profiles))
    with pytest.raises(_Stop):
        agent_mod.agent.main(list(args), prog_name="memtrace agent", standalone_mode=False)
    assert seen["session"].closed and seen["session"].loaded == {"watch_execs": True}
    return seen


def test_cli_defaults_reach_the_agent(monkeypatch):
    seen = _run_agent(monkeypatch, "--comm", "nginx")
    s = seen["session"]
    assert [r.comm.pattern for r in seen["rules"]] == ["nginx"]
    assert seen["all_min_rss"] is None
    assert (seen["max_processes"], seen["sweep_interval"], seen["group_by"]) == (100, 10.0, "pid")
    assert (s.interval, s.reconcile, s.grouping, s.container_labels) == (1.0, 300.0, False, True)


def test_cli_without_stacks_samples_no_stacks_and_serves_no_stack_series(monkeypatch):
    seen = _run_agent(monkeypatch, "--comm", "nginx")
    assert seen["session"].stack_period is None
    assert seen["session"].keep_exited_profiles is True
    assert seen["serve_args"] == (50, 0)


def test_cli_stacks_period_and_series_reach_the_session_and_the_exporter(monkeypatch):
    seen = _run_agent(monkeypatch, "--comm", "nginx", "--stacks", "--stacks-period", "64K",
                      "--stacks-series", "5", "--max-mapping-series", "20")
    s = seen["session"]
    assert s.stack_period == 64 * 1024
    assert s.keep_exited_profiles is False     # an agent does not pile up exited ones
    assert seen["serve_args"] == (20, 5)
    # default period, series off
    seen = _run_agent(monkeypatch, "--comm", "nginx", "--stacks")
    assert seen["session"].stack_period == 512 * 1024 and seen["serve_args"] == (50, 0)


def test_cli_stacks_output_writes_the_profiles_at_exit(monkeypatch, tmp_path):
    from memtrace.stacks.profile import Frame, Stack, StackProfile, StackSample

    sample = StackSample(Stack((Frame(0x401000, "grow", "/usr/bin/app"),
                                Frame(0x401100, "main", "/usr/bin/app"))),
                         "[heap]", "heap", held_bytes=8192, brought_bytes=12288, samples=3)
    out = tmp_path / "stacks"
    seen = _run_agent(monkeypatch, "--comm", "app", "--stacks", "--stacks-output", str(out),
                      profiles={42: StackProfile(42, "app", 1.0, [sample])})
    assert seen["session"].closed
    assert sorted(p.name for p in out.iterdir()) == [
        "memtrace-42-brought.folded", "memtrace-42-brought.html", "memtrace-42-held.folded",
        "memtrace-42-held.html", "memtrace-42.pb.gz"]
    assert (out / "memtrace-42-held.folded").read_text() == "[heap];main;grow 8192\n"


@pytest.mark.parametrize(("args", "words"), [
    (("--stacks-output", "DIR"), "--stacks-output needs --stacks"),
    (("--stacks-series", "3"), "--stacks-series needs --stacks"),
    (("--stacks", "--stacks-period", "100"), "--stacks-period"),
])
def test_cli_stacks_option_errors_exit_2_before_anything_is_set_up(monkeypatch, tmp_path,
                                                                   args, words):
    import memtrace.commands.agent as agent_mod

    args = tuple(str(tmp_path / "d") if a == "DIR" else a for a in args)
    _CliSession.instances.clear()
    monkeypatch.setattr(agent_mod, "Session", _CliSession)
    with pytest.raises(MemtraceError) as e:
        agent_mod.agent.main(["--comm", "x", *args], prog_name="memtrace agent",
                             standalone_mode=False)
    assert e.value.code == ExitCode.USAGE and words in e.value.message
    assert _CliSession.instances == []


def test_cli_stacks_series_is_bounded_by_what_a_snapshot_carries():
    import click

    import memtrace.commands.agent as agent_mod
    from memtrace.stacks.summary import STACKS_TOP

    with pytest.raises(click.BadParameter):
        agent_mod.agent.main(["--comm", "x", "--stacks", "--stacks-series",
                              str(STACKS_TOP + 1)], prog_name="memtrace agent",
                             standalone_mode=False)


def test_cli_all_min_rss_sweep_interval_and_max_processes(monkeypatch):
    seen = _run_agent(monkeypatch, "--all", "--min-rss", "1.5G", "--sweep-interval", "2",
                      "--max-processes", "7")
    assert seen["rules"] == []
    assert (seen["all_min_rss"], seen["sweep_interval"], seen["max_processes"]) == (
        int(1.5 * (1 << 30)), 2.0, 7)
    # --min-rss without --all: no sweep
    assert _run_agent(monkeypatch, "--comm", "x", "--min-rss", "1G")["all_min_rss"] is None


@pytest.mark.parametrize(("group_by", "grouping"), [("pid", False), ("group", True),
                                                    ("comm", True)])
def test_cli_group_by_sets_grouping(monkeypatch, group_by, grouping):
    seen = _run_agent(monkeypatch, "--comm", "x", "--group-by", group_by)
    assert seen["group_by"] == group_by and seen["session"].grouping is grouping


def test_cli_rules_come_before_config_rules_and_config_all_min_rss_wins(monkeypatch, tmp_path):
    path = _config(tmp_path, "rules:\n  - name: db\n    comm: ^postgres$\nall_min_rss: 128M\n")
    seen = _run_agent(monkeypatch, "--comm", "web=^nginx$", "--user", "0", "--config", path,
                      "--all", "--min-rss", "1G")
    assert [r.describe() for r in seen["rules"]] == ["web", "uid=0", "db"]
    assert seen["all_min_rss"] == 128 * MIB
    # all_min_rss in the config turns the sweep on without --all
    path = _config(tmp_path, "all_min_rss: 1024\n")
    assert _run_agent(monkeypatch, "--config", path)["all_min_rss"] == 1024
    path = _config(tmp_path, "rules: [{comm: x}]\nall_min_rss: null\n")
    assert _run_agent(monkeypatch, "--config", path)["all_min_rss"] is None


@pytest.mark.parametrize(("args", "config", "words"), [
    ((), None, "agent needs at least one rule"),
    (("--config", "CFG"), "rules: []\n", "agent needs at least one rule"),
    (("--config", "CFG"), "all_min_rss: lots\n", "all_min_rss: 'lots' is not a size"),
    (("--config", "CFG"), "all_min_rss: -1\n", "all_min_rss"),
    (("--comm", "("), None, "bad comm regex"),
    (("--user", "no-such-user-memtrace-test"), None, "no such user"),
])
def test_cli_rule_and_config_errors_exit_2_before_loading(monkeypatch, tmp_path, args,
                                                          config, words):
    import memtrace.commands.agent as agent_mod

    if config is not None:
        path = _config(tmp_path, config)
        args = tuple(path if a == "CFG" else a for a in args)
    _CliSession.instances.clear()
    monkeypatch.setattr(agent_mod, "Session", _CliSession)
    with pytest.raises(MemtraceError) as e:
        agent_mod.agent.main(list(args), prog_name="memtrace agent", standalone_mode=False)
    assert e.value.code == ExitCode.USAGE and words in e.value.message, e.value.message
    assert _CliSession.instances == []          # nothing was set up


def test_config_rule_errors_name_the_file_and_its_own_rule_number(tmp_path):
    """A bad rule in --config is named by its file and its index there, not by its
    position after the command-line rules."""
    from click.testing import CliRunner

    from memtrace.commands.main import cli as memtrace_cli

    cfg = tmp_path / "agent.yaml"
    cfg.write_text("rules: [{comm: x, pid: 3}]\n")
    r = CliRunner().invoke(memtrace_cli, ["agent", "--comm", "a", "--exe", "b",
                                          "--config", str(cfg)], standalone_mode=False)
    assert isinstance(r.exception, MemtraceError), r.output
    assert r.exception.message == f"{cfg}: rule 0: unknown keys ['pid']"
    assert r.exception.code == ExitCode.USAGE


def test_cgroup_regex_anchors_each_v1_hierarchy():
    """With cgroup v1 a process has one path per hierarchy, one per line: ^ and $
    anchor each path, as on cgroup v2."""
    rule = rule_from_dict({"cgroup": r"^/system\.slice/postgresql\.service$"}, 0)
    v1 = "/system.slice/postgresql.service\n/system.slice/postgresql.service\n/"
    assert rule.matches(ProcInfo(pid=1, comm="postgres", exe="", cgroup=v1, uid=0))
    other = "/user.slice\n/system.slice/postgresql.service.d\n/"
    assert not rule.matches(ProcInfo(pid=1, comm="postgres", exe="", cgroup=other, uid=0))
