"""Reading a recording back (format.py): the header, then whole snapshots in
the order they were written (changes applied), and the other lines. A file
cut short (a recorder killed, a full disk) reads up to its last whole line; a
corrupt line stops the reading there. Either way `Recording.problem` says what
happened and where, and everything before it was read."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from memtrace.errors import ExitCode, MemtraceError
from memtrace.record.format import FORMAT_VERSION, MAGIC_KEY, RECORD_KINDS
from memtrace.record.gzipped import GzipLines, open_lines
from memtrace.record.stacks import StackNames


class RecordingError(MemtraceError):
    """The file is not a readable recording (exit 16)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.RECORDING_UNREADABLE)


@dataclass
class Record:
    """One line after the header: `kind` is "snapshot" (`data` a whole
    snapshot, changes applied) or one of format.RECORD_KINDS."""

    kind: str
    data: Any
    ts: float | None = None


@dataclass
class Recording:
    """An open recording. Iterate `records()` once; afterwards `problem` is
    None for a recording read to its end line, else one sentence (killed
    before its end line, cut mid-line, corrupt at line N), and `ended` says
    whether the end line was there."""

    path: str
    header: dict[str, Any]
    file: IO[bytes] | GzipLines
    problem: str | None = None
    ended: bool = False
    lines_read: int = 1
    bytes_read: int = 0
    last_ts: float | None = None
    corrupt: bool = False
    _current: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)
    _skipping: set[int] = field(default_factory=set)
    _names: StackNames = field(default_factory=StackNames)

    def records(self) -> Iterator[Record]:
        try:
            yield from self._records()
        finally:
            self.file.close()

    def snapshots(self) -> Iterator[dict[str, Any]]:
        """Only the whole snapshots."""
        return (r.data for r in self.records() if r.kind == "snapshot")

    def _records(self) -> Iterator[Record]:
        for raw in self.file:
            self.lines_read += 1
            if not raw.endswith(b"\n"):
                if self._stream_error():
                    return
                if not _could_be_cut_json(raw):
                    # garbled compressed data can leave zlib waiting to the end
                    # of the file with no error, its output text copied by
                    # back-references: printable, but no line of a recording
                    self.corrupt = True
                    self.problem = (f"{self.path}: corrupt data in line {self.lines_read} "
                                    f"(byte {self.bytes_read}), not a line cut short; "
                                    f"{self._upto()}")
                    return
                self.problem = (f"{self.path}: cut short in line {self.lines_read} "
                                f"(byte {self.bytes_read}): {self._upto()}")
                return
            self.bytes_read += len(raw)
            if not raw.strip():
                continue
            try:
                record = self._decode(raw)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                self.corrupt = True
                self.problem = (f"{self.path}: corrupt line {self.lines_read} "
                                f"(byte {self.bytes_read - len(raw)}): {_short(e)}; "
                                f"{self._upto()}")
                return
            if record is None:
                continue
            if record.ts is not None:
                self.last_ts = record.ts
            yield record
            if record.kind == "end":
                self.ended = True
                return
        if not self._stream_error() and not self.ended:
            self.problem = f"{self.path}: no end line (the recorder was killed?): {self._upto()}"

    def _stream_error(self) -> bool:
        """A compressed stream that stopped making sense: corrupt, said so."""
        error = getattr(self.file, "error", None)
        if error is None:
            return False
        self.corrupt = True
        self.problem = f"{self.path}: {error} after line {self.lines_read - 1}; {self._upto()}"
        return True

    def _upto(self) -> str:
        if self.last_ts is None:
            return "nothing recorded before it"
        import time
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.last_ts))
        return f"read up to {when}"

    def _decode(self, raw: bytes) -> Record | None:
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        if "pid" in obj and "mappings" in obj:
            snap = self._apply(obj)
            return None if snap is None else Record("snapshot", snap, obj.get("ts"))
        kind = next(iter(obj), None)
        if kind in RECORD_KINDS:
            data = obj[kind]
            ts = obj.get("ts") if kind == "message" else (
                data.get("ts") if isinstance(data, dict) else None)
            if kind == "stacks":
                self._names.feed(data)
            if kind == "dropped":
                self._current.pop(int(data["pid"]), None)
                self._skipping.add(int(data["pid"]))
            return Record(str(kind), data, ts)
        return None         # a kind from a later version: skipped

    def _apply(self, snap: dict[str, Any]) -> dict[str, Any] | None:
        """The whole snapshot; None for changes that follow a dropped snapshot
        (skipped until the next whole one of that pid)."""
        pid = int(snap["pid"])
        if "stacks" in snap:
            self._names.expand(snap["stacks"])
        if snap.pop("changed_only", False):
            maps = self._current.get(pid)
            if maps is None:
                if pid in self._skipping:
                    return None
                raise KeyError(f"changes for pid {pid} before any whole snapshot of it")
            for start in snap.pop("removed_starts"):
                maps.pop(start, None)
            maps.update((m["start"], m) for m in snap["mappings"])
        else:
            self._skipping.discard(pid)
            maps = self._current[pid] = {m["start"]: m for m in snap["mappings"]}
        snap["mappings"] = sorted(maps.values(), key=lambda m: m["start"])
        return snap


_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")


def _could_be_cut_json(raw: bytes) -> bool:
    """Whether `raw` may be a line memtrace wrote (compact JSON, UTF-8, no control
    characters) cut short: a valid start of JSON up to its last few bytes (a cut
    number, literal or escape; a multibyte character may be cut too)."""
    if _CONTROL.search(raw):
        return False
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.reason != "unexpected end of data" or e.end != len(raw):
            return False
        text = raw[:e.start].decode("utf-8", errors="replace")
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        # the first error: all before it was read as JSON. A cut string, or a
        # cut number, literal or escape in the last few bytes; never a whole
        # value with more after it
        if e.msg.startswith("Unterminated string"):
            return True
        return e.msg != "Extra data" and e.pos >= len(text) - 8
    return True


def _short(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def open_recording(path: str) -> Recording:
    """The recording at `path`, its header read; RecordingError when the file
    cannot be opened or does not start with a recording header."""
    try:
        f = open_lines(path)        # closed by Recording.records
    except OSError as e:
        raise RecordingError(f"cannot read {path}: {e.strerror or e}") from None
    first = f.readline()
    try:
        header = json.loads(first) if first.endswith(b"\n") else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or MAGIC_KEY not in header:
        f.close()
        error = getattr(f, "error", None)
        what = (error if error else "empty" if not first
                else "not a memtrace recording (no header line)")
        raise RecordingError(f"{path}: {what}")
    if header[MAGIC_KEY] != FORMAT_VERSION:
        f.close()
        raise RecordingError(f"{path}: recording format {header[MAGIC_KEY]!r}; this "
                             f"memtrace reads format {FORMAT_VERSION}")
    return Recording(path=path, header=header, file=f, bytes_read=len(first))
