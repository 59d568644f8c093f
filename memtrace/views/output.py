"""Where `watch`, `run` and `agent` write their output (stdout or `-o FILE`).

Writes never hold the loop or shutdown: records are queued (whole JSON lines,
whole table frames) and written to the file descriptor by one background
thread. A reader that does not keep up costs records, never time:

- more than MAX_QUEUED_BYTES waiting: new records are dropped and counted
  (said once on stderr when it starts, and in total at the end);
- at shutdown the queue is drained as long as the reader takes bytes; after
  STALL_SECONDS without a byte taken, what is left is abandoned and counted,
  the last line possibly cut short (said on stderr).

A write error (disk full, I/O error, the reader closed the pipe) stops the
output: the next write, or close(), raises OutputError (exit code 14,
OUTPUT_FAILED; quiet for a closed pipe). See docs/output.md.
"""

from __future__ import annotations

import array
import collections
import contextlib
import errno
import fcntl
import os
import select
import stat
import sys
import termios
import threading
import time
from collections.abc import Iterable
from typing import IO, cast

from memtrace.errors import OutputError
from memtrace.util.log import log

MAX_QUEUED_BYTES = 64 << 20
STALL_SECONDS = 2.0
IOV_MAX = 1024  # pieces per writev(2) (the kernel's UIO_MAXIOV)
WRITE_MAX = 64 << 10  # bytes per write(2): a blocking write to a pipe returns only
# when all of it is taken, so progress (last_progress) is seen at this grain
PIPE_SIZE = 1 << 20   # a pipe we write to is grown to this (F_SETPIPE_SZ), never shrunk
PIPE_WAIT = 0.002     # seconds between looks at a pipe with too little room
_F_SETPIPE_SZ, _F_GETPIPE_SZ = 1031, 1032


def pipe_capacity(fd: int) -> int | None:
    """The size of the pipe `fd` writes to, grown to PIPE_SIZE when the kernel
    lets us; None when fd is not a pipe."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return None
        size = fcntl.fcntl(fd, _F_GETPIPE_SZ)
        if size < PIPE_SIZE:
            # refused above fs.pipe-max-size without CAP_SYS_RESOURCE
            with contextlib.suppress(OSError):
                size = fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
        return int(size)
    except OSError:
        return None


class _Abandoned(Exception):
    """close() gave up waiting for the reader: the writer thread stops."""


def _unread(fd: int) -> int:
    """Bytes in the pipe not read yet (FIONREAD works on either end)."""
    got = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, got, True)
    return got[0]


def output_error(err: OSError, name: str) -> OutputError:
    """The OutputError for a failed write of `name` (quiet for a closed pipe)."""
    if err.errno == errno.EPIPE:
        return OutputError(f"{name}: closed by its reader", quiet=True)
    return OutputError(f"cannot write {name}: {err.strerror or err}")


class OutputStream:
    """A byte stream on `fd`, written by a background thread (see the module)."""

    def __init__(self, fd: int, name: str, max_queued: int = MAX_QUEUED_BYTES,
                 stall_seconds: float = STALL_SECONDS, owns_fd: bool = False) -> None:
        self.fd = fd
        self.name = name
        self.max_queued = max_queued
        self.stall_seconds = stall_seconds
        self._owns_fd = owns_fd
        # A pipe is written only where it has room (see _room): a large record
        # to a reader that takes 8 KiB a read (Python's readline) would
        # otherwise wake this thread once per read: ~2,000 times per 17 MB line.
        self._pipe_size = pipe_capacity(fd)
        # its own descriptor of the pipe: between two looks, `fd` may be closed
        # and its number given to another file (tests do)
        self._write_fd = os.dup(fd) if self._pipe_size else fd
        self._abandoned = False       # close() gave up on the rest: stop writing
        self._queue: collections.deque[list[bytes]] = collections.deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._busy = False            # the writer holds a record it has not finished
        self.error: OSError | None = None
        self._raised = False
        self.written_bytes = 0
        self.last_progress = time.monotonic()
        self.dropped_records = 0
        self.dropped_bytes = 0
        self._said_dropping = False
        self._thread = threading.Thread(target=self._run, name=f"memtrace-output-{fd}",
                                        daemon=True)
        self._thread.start()

    # ---- the caller's side

    def write_record(self, parts: Iterable[bytes]) -> bool:
        """Queue one record (written whole or not at all, unless abandoned at
        shutdown). False when it was dropped because the reader is behind."""
        self.check()
        record = [p for p in parts if p]
        size = sum(map(len, record))
        with self._cond:
            if self._queue and self._queued_bytes + size > self.max_queued:
                self.dropped_records += 1
                self.dropped_bytes += size
                if not self._said_dropping:
                    self._said_dropping = True
                    log(f"{self.name} is not being read fast enough: dropping output "
                         f"(more than {self.max_queued >> 20} MiB waiting; counted at exit)")
                return False
            self._queue.append(record)
            self._queued_bytes += size
            self._cond.notify_all()
        return True

    def check(self) -> None:
        """Raise the write error, if the writer met one (once)."""
        if self.error is not None and not self._raised:
            self._raised = True
            raise output_error(self.error, self.name)

    def close(self) -> None:
        """Drain (while the reader takes bytes), then stop. Says on stderr what
        was not written; raises OutputError for a write error not raised yet."""
        started = time.monotonic()
        with self._cond:
            self._cond.notify_all()
            while (self._queue or self._busy) and self.error is None:
                waited = time.monotonic() - max(self.last_progress, started)
                if waited >= self.stall_seconds:
                    break
                self._cond.wait(min(0.1, self.stall_seconds - waited))
            left = list(self._queue)
            self._queue.clear()
            in_flight = self._busy
            self._abandoned = True
            self._cond.notify_all()
        lost_records = len(left) + (1 if in_flight and self.error is None else 0)
        lost_bytes = sum(len(p) for r in left for p in r)
        if lost_records and self.error is None:
            log(f"{self.name} not read for {self.stall_seconds:g}s at exit: "
                 f"{lost_records} record(s) ({lost_bytes} bytes queued) not written"
                 + ("; the last line written may be incomplete" if in_flight else ""))
        if self.dropped_records:
            log(f"{self.name}: {self.dropped_records} record(s) ({self.dropped_bytes} "
                 "bytes) dropped while the reader was behind")
        if self._write_fd != self.fd and not in_flight:
            os.close(self._write_fd)
        if self._owns_fd and not in_flight:
            try:
                os.close(self.fd)
            except OSError as e:   # NFS and friends report write errors at close
                if self.error is None:
                    self.error = e
        self.check()

    # ---- the writer thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    if self._abandoned:     # closed with nothing left: the thread ends
                        return
                    self._cond.wait()
                record = self._queue.popleft()
                self._queued_bytes -= sum(map(len, record))
                self._busy = True
            try:
                self._write(record)
            except _Abandoned:
                if self._write_fd != self.fd:
                    os.close(self._write_fd)     # close() left it to this thread
                return
            except OSError as e:
                with self._cond:
                    self.error = e
                    self._busy = False
                    self._queue.clear()
                    self._cond.notify_all()
                return
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _write(self, record: list[bytes]) -> None:
        """The record's parts as they are, gathered by writev(2) up to WRITE_MAX
        bytes a call: a whole JSON snapshot of 60k mappings (17 MB) is never
        copied into one buffer, nor into 1 MB ones."""
        views = [memoryview(p) for p in record if p]
        left = sum(map(len, views))
        i = 0
        while i < len(views):
            limit = self._room(left) if self._pipe_size else WRITE_MAX
            batch: list[memoryview] = []
            size = 0
            j = i
            while j < len(views) and size < limit and len(batch) < IOV_MAX:
                piece = views[j][:limit - size]
                batch.append(piece)
                size += len(piece)
                j += 1
            n = os.writev(self._write_fd, batch)
            left -= n
            self.written_bytes += n
            self.last_progress = time.monotonic()
            while n:            # drop what was written, part of a piece maybe
                if n >= len(views[i]):
                    n -= len(views[i])
                    i += 1
                else:
                    views[i] = views[i][n:]
                    n = 0

    def _room(self, left: int) -> int:
        """Bytes to write next to the pipe: once it has room for the rest of
        the record or for half its size, all of that room (a write that does
        not block). Until then, looks again every PIPE_WAIT seconds; a reader
        that went away ends the wait (the write then fails with EPIPE)."""
        assert self._pipe_size is not None
        want = min(left, self._pipe_size // 2)
        poller = select.poll()
        poller.register(self._write_fd, 0)  # POLLERR (no reader left) is always reported
        while True:
            if self._abandoned:
                raise _Abandoned
            try:
                room = self._pipe_size - _unread(self._write_fd)
            except OSError:
                return WRITE_MAX              # not a pipe we can measure: block as before
            if room >= want:
                return room
            if poller.poll(PIPE_WAIT * 1000):
                return max(room, 1)


class TextOutput:
    """A text file for rich's Console on an OutputStream: what is written up to
    a flush() is one record (one frame of the live table)."""

    def __init__(self, stream: OutputStream, encoding: str = "utf-8") -> None:
        self.stream = stream
        self.encoding = encoding
        self._pending: list[str] = []

    def write(self, text: str) -> int:
        self._pending.append(text)
        return len(text)

    def flush(self) -> None:
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            self.stream.write_record([text.encode(self.encoding, "replace")])
        else:
            self.stream.check()

    def isatty(self) -> bool:
        try:
            return os.isatty(self.stream.fd)
        except OSError:
            return False

    def fileno(self) -> int:
        return self.stream.fd

    def close(self) -> None:
        self.flush()
        self.stream.close()

    def as_io(self) -> IO[str]:
        """This, typed as the text file rich expects (it uses write, flush,
        isatty and fileno)."""
        return cast("IO[str]", self)


def open_output(path: str | None) -> OutputStream:
    """stdout, or `path` created/truncated; OutputError when it cannot be opened."""
    if path is None:
        return OutputStream(sys.stdout.fileno(), "stdout")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    return OutputStream(fd, path, owns_fd=True)
