"""Names of JIT-compiled code from perf maps (`/tmp/perf-PID.map`), the file
runtimes write for profilers: Node.js with `--perf-basic-prof`, a JVM after
`jcmd PID Compiler.perfmap` (or `-XX:+DumpPerfMapAtExit`), CPython 3.12+
with `-X perf`, LuaJIT, .NET with `DOTNET_PerfMapEnabled=1`.

Each line is `START SIZE NAME` (hexadecimal, with or without `0x`). The file
is appended to while the process runs and a later line for the same start
names the code that now lives there. It is read as the process sees it
(`/proc/PID/root/tmp/perf-NSPID.map`, NSPID being its pid in its own
namespace), incrementally: only the bytes appended since the last read, at
most once per batch of samples. At most MAX_BYTES of a file are read (a
runtime that writes a line per compiled function for days can write GBs);
what lies beyond is counted in `skipped_bytes` (and said once on stderr), and
its code stays unnamed.
The maps of the MAX_PROCESSES processes looked up last are kept (an exited
process's map goes when others push it out).
"""

from __future__ import annotations

import os
from bisect import bisect_right
from dataclasses import dataclass, field

from memtrace.util.log import log

MAX_BYTES = 16 << 20      # ~170,000 lines: ~35 MB of names and bounds in memtrace
READ_PIECE = 1 << 20
MAX_PROCESSES = 64


@dataclass
class _Map:
    path: str
    inode: int = -1
    offset: int = 0                      # bytes of the file read so far
    partial: bytes = b""                 # a last line not yet ended by "\n"
    by_start: dict[int, tuple[int, str]] = field(default_factory=dict)
    starts: list[int] | None = None      # by_start's keys sorted, rebuilt after a new one
    skipped_bytes: int = 0
    said: bool = False                   # the bound was named on stderr


def parse_line(line: bytes) -> tuple[int, int, str] | None:
    """(start, size, name) of one perf map line, or None if it is not one."""
    parts = line.strip().split(None, 2)
    if len(parts) < 3:
        return None
    try:
        start, size = int(parts[0], 16), int(parts[1], 16)
    except ValueError:
        return None
    if size <= 0:
        return None
    return start, size, parts[2].decode("utf-8", "backslashreplace")


class PerfMaps:
    """The perf maps of the processes whose samples are unwound."""

    def __init__(self, proc_root: str = "/proc", max_bytes: int = MAX_BYTES,
                 max_processes: int = MAX_PROCESSES) -> None:
        self.proc_root = proc_root
        self.max_bytes = max_bytes
        self.max_processes = max_processes
        self._maps: dict[int, _Map] = {}
        self._fresh: set[int] = set()    # pids whose file was looked at in this batch

    def new_batch(self) -> None:
        """Let the next lookup of each process read what its file gained."""
        self._fresh.clear()

    def forget(self, pid: int) -> None:
        self._maps.pop(pid, None)
        self._fresh.discard(pid)

    def skipped_bytes(self, pid: int) -> int:
        m = self._maps.get(pid)
        return m.skipped_bytes if m is not None else 0

    def lookup(self, pid: int, addr: int) -> tuple[str, int] | None:
        """(name, start) of the JIT code holding addr, or None."""
        if pid not in self._fresh:
            self._fresh.add(pid)
            self._refresh(pid)
        m = self._maps.get(pid)
        if m is None or not m.by_start:
            return None
        if m.starts is None:
            m.starts = sorted(m.by_start)
        i = bisect_right(m.starts, addr) - 1
        if i < 0:
            return None
        start = m.starts[i]
        end, name = m.by_start[start]
        return (name, start) if addr < end else None

    def _path(self, pid: int) -> str:
        return f"{self.proc_root}/{pid}/root/tmp/perf-{self._ns_pid(pid)}.map"

    def _ns_pid(self, pid: int) -> int:
        """The process's pid in its own pid namespace (the last NSpid field)."""
        try:
            with open(f"{self.proc_root}/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"NSpid:"):
                        return int(line.split()[-1])
        except (OSError, ValueError, IndexError):
            pass
        return pid

    def _refresh(self, pid: int) -> None:
        m = self._maps.pop(pid, None)
        if m is None:
            m = _Map(self._path(pid))
            while len(self._maps) >= self.max_processes:
                self._maps.pop(next(iter(self._maps)))
        self._maps[pid] = m        # the most recently used last
        try:
            fd = os.open(m.path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if st.st_ino != m.inode or st.st_size < m.offset:
                # a new file (the pid reused, or the runtime started over)
                m = self._maps[pid] = _Map(m.path, inode=st.st_ino)
            end = min(st.st_size, self.max_bytes)
            while m.offset < end:       # in pieces: a big file is not held twice
                data = os.pread(fd, min(end - m.offset, READ_PIECE), m.offset)
                if not data:
                    break
                m.offset += len(data)
                self._add(m, m.partial + data)
            m.skipped_bytes = max(0, st.st_size - m.offset)
        except OSError:
            return
        finally:
            os.close(fd)
        if m.skipped_bytes and not m.said:
            m.said = True
            log(f"pid {pid}: JIT code names: only the first {self.max_bytes:,} bytes of "
                f"{m.path} read ({m.skipped_bytes:,} more left unread; code named there "
                "shows as [unknown])")

    @staticmethod
    def _add(m: _Map, data: bytes) -> None:
        lines = data.split(b"\n")
        m.partial = lines.pop()
        for line in lines:
            entry = parse_line(line)
            if entry is None:
                continue
            start, size, name = entry
            if start not in m.by_start:
                m.starts = None
            m.by_start[start] = (start + size, name)
