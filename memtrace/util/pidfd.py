"""pidfds: a process's exit seen without reading /proc (Linux 5.3+, Python 3.9+)."""

from __future__ import annotations

import contextlib
import os
import select


def pidfd_open(pid: int) -> int | None:
    """A pidfd for pid (None where the kernel or Python has none, or it is gone)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def pidfd_exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited (zombie included).
    An fd number that is not open (POLLNVAL, a bug elsewhere) says nothing of
    the process, so not "exited": the callers' /proc check decides then."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    events = poller.poll(0)
    return bool(events) and not events[0][1] & select.POLLNVAL


def close_fd(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
