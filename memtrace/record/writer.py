"""Writing a recording: a Reporter that appends `.mtrace` lines (format.py) to a
file through an OutputStream (never blocking the loop), and a Tee that feeds
the same tick to the live view and the recording."""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from memtrace import __version__
from memtrace.errors import ExitCode, MemtraceError, OutputError
from memtrace.record.format import DEFAULT_FULL_EVERY, FORMAT_VERSION, MAGIC_KEY
from memtrace.record.gzipped import GzipRecords
from memtrace.record.stacks import StackLineEncoder
from memtrace.reporter import Reporter
from memtrace.snapshot import encode_parts
from memtrace.trace.events import SyscallEvent
from memtrace.views.jsonl import JsonReporter
from memtrace.views.output import OutputStream

if TYPE_CHECKING:
    from memtrace.stacks.profile import StackProfile


def _line(obj: dict[str, Any]) -> list[bytes]:
    return [json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii"), b"\n"]


def make_header(mode: str, interval: float, command: Sequence[str] | None = None,
                pids: Sequence[int] = (), options: dict[str, Any] | None = None,
                full_every: int = DEFAULT_FULL_EVERY) -> dict[str, Any]:
    """The first line of a recording (format.HEADER_KEYS)."""
    return {
        MAGIC_KEY: FORMAT_VERSION,
        "memtrace_version": __version__,
        "created_ts": time.time(),
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "page_size": os.sysconf("SC_PAGE_SIZE"),
        "interval_seconds": interval,
        "full_every": full_every,
        "mode": mode,
        "command": list(command) if command is not None else None,
        "pids": list(pids),
        "options": options or {},
    }


def open_recording_output(path: str) -> OutputStream:
    """`path` created/truncated for a recording; OutputError when it cannot be."""
    if not path:
        raise MemtraceError("--record: empty file name", ExitCode.USAGE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    return OutputStream(fd, path, owns_fd=True)


class RecordingWriter(JsonReporter):
    """Appends a recording: the header, then every snapshot as --changed-only
    JSON Lines (whole every `full_every`th per process), messages, run's
    summary, and an end line at close. A snapshot the stream had to drop is
    counted ({"dropped": ...} line) and the next one of its pid is whole, so
    that the changes that follow still apply. With --stacks, each snapshot is
    followed by a {"stacks": ...} line with what changed in the process's stack
    profile (record/stacks.py)."""

    wants_stack_profiles = True

    def __init__(self, stream: OutputStream, header: dict[str, Any],
                 compress: bool = True) -> None:
        """`compress`: a gzip stream flushed every tick (gzipped.py), as every
        command writes; False: plain JSON Lines (tests of dropped records)."""
        super().__init__(stream, changed_only=True, full_every=int(header["full_every"]))
        self.stream_out: OutputStream | GzipRecords = (
            GzipRecords(stream) if compress else stream)
        self.snapshots = 0
        self.dropped = 0
        self.stack_lines = 0
        self._closed = False
        self._stacks = StackLineEncoder(int(header["full_every"]))
        self._profiles: dict[int, StackProfile] = {}     # this tick's, until its snapshot
        self.stream_out.write_record(_line(header))

    def stack_profile(self, profile: StackProfile) -> None:
        self._profiles[profile.pid] = profile

    def snapshot(self, snap: dict[str, Any]) -> None:
        profile = self._profiles.pop(snap["pid"], None)
        summary = snap.get("stacks")
        if profile is not None and self._write_stacks(profile) and summary is not None:
            # the top stacks name the stacks just written by id (the reader
            # puts their frames back); the view's snapshot is left as it was
            snap["stacks"] = self._stacks.compact(summary)
            try:
                parts = self._changes(snap)
            finally:
                snap["stacks"] = summary
        else:
            parts = self._changes(snap)
        parts.append(b"\n")
        if self.stream_out.write_record(parts):
            self.snapshots += 1
            return
        self.dropped += 1
        self._last.pop(snap["pid"], None)       # the next one is whole
        self.stream_out.write_record(_line({"dropped": {"pid": snap["pid"],
                                                        "ts": snap.get("ts")}}))

    def _write_stacks(self, profile: StackProfile) -> bool:
        """The stacks line of `profile`, before its snapshot; False when it
        could not be written (the snapshot then keeps its frames)."""
        got = self._stacks.line(profile)
        if got is None:
            return True         # the same profile as last time: nothing changed
        line, defined = got
        if self.stream_out.write_record(_line({"stacks": line})):
            self.stack_lines += 1
            return True
        self._stacks.undo(profile.pid, defined)
        return False

    def tick_done(self) -> None:
        if isinstance(self.stream_out, GzipRecords):
            self.stream_out.flush()
        self.stream_out.check()

    def detached(self, pid: int, why: str) -> None:
        self._stacks.forget(pid)
        self._profiles.pop(pid, None)
        self.message(f"pid {pid} {why}")

    def message(self, text: str) -> None:
        self.stream_out.write_record(_line({"message": text, "ts": time.time()}))

    def summary(self, summary: dict[str, Any]) -> None:
        self.stream_out.write_record(_line({"summary": summary}))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stream_out.write_record(_line({"end": {
            "ts": time.time(), "snapshots": self.snapshots, "dropped": self.dropped}}))
        self.stream_out.close()


def whole_line(snap: dict[str, Any]) -> bytes:
    """A whole snapshot as one recording line (tests, tools)."""
    return b"".join(encode_parts(snap)) + b"\n"


class Tee(Reporter):
    """One tick to several reporters: the live view first, then the recording.
    Messages go to the view only once (the recording keeps its own copy)."""

    def __init__(self, view: Reporter, *others: Reporter) -> None:
        self.view = view
        self.others = others
        self.wants_events = view.wants_events or any(o.wants_events for o in others)
        self.wants_json_text = view.wants_json_text or any(
            o.wants_json_text for o in others)
        self.wants_stack_profiles = view.wants_stack_profiles or any(
            o.wants_stack_profiles for o in others)

    def _all(self) -> tuple[Reporter, ...]:
        return (self.view, *self.others)

    def snapshot(self, snap: dict[str, Any]) -> None:
        for r in self._all():
            r.snapshot(snap)

    def stack_profile(self, profile: StackProfile) -> None:
        for r in self._all():
            if r.wants_stack_profiles:
                r.stack_profile(profile)

    def events(self, events: list[SyscallEvent]) -> None:
        for r in self._all():
            if r.wants_events:
                r.events(events)

    def tick_done(self) -> None:
        for r in self._all():
            r.tick_done()

    def message(self, text: str) -> None:
        for r in self._all():
            r.message(text)

    def detached(self, pid: int, why: str) -> None:
        for r in self._all():
            r.detached(pid, why)

    def summary(self, summary: dict[str, Any]) -> None:
        for r in self._all():
            r.summary(summary)

    def close(self) -> None:
        """Every reporter is closed (a recording gets its end line even when
        the view's output failed); the first error is raised after."""
        failure: Exception | None = None
        for r in self._all():
            try:
                r.close()
            except Exception as e:  # noqa: BLE001 (raised again below)
                failure = failure or e
        if failure is not None:
            raise failure
