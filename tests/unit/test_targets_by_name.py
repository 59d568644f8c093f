"""`watch PID|NAME ...`: names matched like pgrep on a fixture /proc tree
(memtrace/commands/targets.py), and the parent chain `run` follows its tree by."""

from __future__ import annotations

import pytest

from memtrace.commands.targets import in_tree, pids_named, resolve_targets
from memtrace.errors import ExitCode, MemtraceError

OWN = 999


@pytest.fixture
def tree(world):
    """redis-server x2, a redis-sentinel, bash, a long-named process (comm cut
    to 15 bytes), memtrace itself (999) and its child, a kernel thread, a zombie."""
    def proc(pid, comm, ppid=1, state="S", flags=0x400000):
        p = world.process(pid, comm=comm)
        p.ppid, p.state, p.flags = ppid, state, flags
        p.sync()
        return p

    proc(100, b"redis-server")
    proc(101, b"redis-server")
    proc(102, b"redis-sentinel")
    proc(200, b"bash")
    proc(201, b"python3", ppid=200)
    proc(202, b"sh", ppid=201)
    proc(301, b"postgres: check")            # "postgres: checkpointer" cut to 15 bytes
    proc(OWN, b"redis-server")               # memtrace, whatever its name
    proc(1000, b"redis-server", ppid=OWN)    # a child of memtrace (heap walker)
    proc(400, b"redis-server", flags=0x00200000)   # a kernel thread
    proc(401, b"redis-server", state="Z")          # a zombie
    return world.procfs()


def test_exact_name_first(tree):
    assert pids_named(tree, "redis-server", OWN) == [100, 101]


def test_regex_when_no_exact_name(tree):
    assert pids_named(tree, "redis", OWN) == [100, 101, 102]
    assert pids_named(tree, "^redis-s(erver|entinel)$", OWN) == [100, 101, 102]
    assert pids_named(tree, "^b", OWN) == [200]


def test_a_name_longer_than_the_kernel_keeps(tree):
    assert pids_named(tree, "postgres: checkpointer", OWN) == [301]


def test_nothing_matches(tree):
    assert pids_named(tree, "nginx", OWN) == []


def test_resolve_mixes_pids_and_names_in_order_once(tree):
    assert resolve_targets(tree, ["200", "redis-server", "100", "sh"], OWN) == (
        200, 100, 101, 202)


def test_a_name_that_matches_nothing_is_exit_6(tree):
    with pytest.raises(MemtraceError) as e:
        resolve_targets(tree, ["bash", "nginx"], OWN)
    assert e.value.code == ExitCode.NO_SUCH_PROCESS
    assert e.value.message == "no process named 'nginx'"


def test_a_bad_pattern_is_a_usage_error(tree):
    with pytest.raises(MemtraceError) as e:
        resolve_targets(tree, ["redis(["], OWN)
    assert e.value.code == ExitCode.USAGE
    assert "neither a PID nor a valid process-name pattern" in e.value.message


def test_in_tree_follows_the_parent_chain(tree):
    assert in_tree(tree, 202, {200})
    assert in_tree(tree, 201, {200})
    assert in_tree(tree, 200, {200})
    assert not in_tree(tree, 100, {200})
    assert not in_tree(tree, 12345, {200})      # gone


class FakeSession:
    """What TreeFollower uses of a Session: procfs, trackers, attach, messages."""

    def __init__(self, procfs, tracked):
        self.procfs = procfs
        self.trackers = dict.fromkeys(tracked, object())
        self.attached: list[int] = []
        self.messages: list[str] = []
        self.reporter = self

    def add_target(self, pid):
        pass

    def attach(self, pid):
        self.attached.append(pid)
        self.trackers[pid] = object()

    def detach_quietly(self, pid):
        pass

    def message(self, text):
        self.messages.append(text)


def drained(forks=(), execs=(), lost=None):
    from memtrace.trace.events import Drained
    return Drained(chunks={}, ranges={}, events=[], stats={}, names_gen=0,
                   execs=list(execs), forks=list(forks), notices_lost=lost or {})


def test_run_follows_descendants_only(tree):
    from memtrace.commands.targets import TreeFollower

    session = FakeSession(tree, [200])
    follower = TreeFollower(session, 200)   # type: ignore[arg-type]
    # 201 forked by bash, 202 exec'd by its child; 100 exec'd elsewhere;
    # 12345 gone already; 200 already watched
    follower.on_tick(drained(forks=[201, 12345], execs=[202, 100, 200]))
    assert session.attached == [201, 202]
    assert session.messages == ["following pid 201 (python3), child of 200",
                                "following pid 202 (sh), child of 201"]


def test_run_tree_limit(tree):
    from memtrace.commands.targets import TreeFollower

    session = FakeSession(tree, [200])
    follower = TreeFollower(session, 200, limit=2)   # type: ignore[arg-type]
    follower.on_tick(drained(forks=[201, 202]))
    assert session.attached == [201] and follower.skipped == 1
    assert "more are not followed" in session.messages[-1]


def test_run_says_when_notices_were_lost(tree):
    from memtrace.commands.targets import TreeFollower

    session = FakeSession(tree, [200])
    follower = TreeFollower(session, 200)   # type: ignore[arg-type]
    follower.on_tick(drained(lost={"execs": 3, "forks": 0}))
    follower.on_tick(drained(lost={"execs": 3, "forks": 0}))
    follower.on_tick(drained(lost={"execs": 5, "forks": 1}))
    assert session.messages == [
        "3 exec notice(s) lost (ring full): processes of the tree may be missed",
        "2 exec notice(s) lost (ring full): processes of the tree may be missed",
        "1 fork notice(s) lost (ring full): processes of the tree may be missed"]
