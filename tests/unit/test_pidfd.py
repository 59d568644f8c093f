"""util/pidfd.pidfd_exited: an exit, a live process, and an fd number that is
not open (which must not pass for an exit)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from memtrace.util.pidfd import pidfd_exited, pidfd_open


def test_exited_alive_and_closed_fd() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    pidfd = pidfd_open(child.pid)
    if pidfd is None:
        child.kill()
        child.wait()
        pytest.skip("no pidfd_open here")
    try:
        assert not pidfd_exited(pidfd)
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
        assert pidfd_exited(pidfd)
    finally:
        os.close(pidfd)
    assert not pidfd_exited(pidfd)      # POLLNVAL: not open, not an exit
