"""`watch P...`: PIDs that are gone before attach are said and skipped while
another one is left (memtrace/commands/watch.py _existing_targets)."""

from __future__ import annotations

import pytest

from memtrace.commands.watch import _existing_targets
from memtrace.errors import ExitCode, MemtraceError


def test_gone_pids_are_skipped_while_one_is_left(world, capsys):
    world.process(10)
    zombie = world.process(12)
    zombie.state = "Z"
    zombie.sync()
    assert _existing_targets(world.procfs(), (10, 11, 12, 10)) == (10,)
    err = capsys.readouterr().err
    assert "no such process: 11: not watched" in err
    assert "12 (fake) is a zombie" in err


def test_no_pid_left_is_the_first_error(world):
    with pytest.raises(MemtraceError) as e:
        _existing_targets(world.procfs(), (11, 13))
    assert e.value.code == ExitCode.NO_SUCH_PROCESS
    assert e.value.message == "no such process: 11"


def test_other_refusals_still_stop_watch(world):
    world.process(10)
    kthread = world.process(14)
    kthread.flags |= 0x00200000      # PF_KTHREAD
    kthread.sync()
    with pytest.raises(MemtraceError) as e:
        _existing_targets(world.procfs(), (10, 14))
    assert e.value.code == ExitCode.KERNEL_THREAD
