"""Recordings are gzip streams (docs/recording.md, "Compressed"): JSON Lines
compress 5-10x, and a stream flushed with Z_SYNC_FLUSH at every tick stays
readable up to its last flush when the recorder is killed, or the disk fills,
in the middle of one. `zcat FILE` reads them too.

GzipRecords is what the writer writes to: records are compressed on the loop's
thread and handed to the OutputStream once a tick, so a tick costs one write.
GzipLines is what the reader reads from: the lines of the decompressed stream,
up to where it ends, is cut, or stops making sense (then `error` says why)."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from typing import IO

from memtrace.util.log import log
from memtrace.views.output import OutputStream

GZIP_MAGIC = b"\x1f\x8b"
LEVEL = 6                   # zlib's default: ~25 MB/s of JSON here, far above any tick
READ_CHUNK = 1 << 16
FEED = 1 << 6               # compressed bytes per decompress call (see GzipLines._more)


class GzipRecords:
    """A gzip stream on an OutputStream: write_record() compresses, flush()
    (each tick) hands the tick's bytes over, close() ends the stream."""

    def __init__(self, stream: OutputStream, level: int = LEVEL) -> None:
        self.stream = stream
        self.name = stream.name
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31)    # 31: gzip header
        self._pending: list[bytes] = []
        self.broken = False          # a tick's bytes were dropped: nothing more is written
        self.raw_bytes = 0

    def write_record(self, parts: Iterable[bytes]) -> bool:
        """Compress one record; False once the stream is broken."""
        if self.broken:
            return False
        for part in parts:
            if part:
                self.raw_bytes += len(part)
                out = self._z.compress(part)
                if out:
                    self._pending.append(out)
        return True

    def flush(self) -> None:
        """The tick's bytes to the file, ending with a sync point a reader can
        decompress up to."""
        if self.broken:
            return
        self._pending.append(self._z.flush(zlib.Z_SYNC_FLUSH))
        self._hand_over()

    def _hand_over(self) -> None:
        chunk, self._pending = self._pending, []
        if not self.stream.write_record(chunk):
            # a piece missing in the middle would make the rest unreadable: the
            # recording ends here instead (it reads up to the last whole tick)
            self.broken = True
            log(f"{self.name}: the disk does not keep up; recording stopped here "
                "(the file reads up to this point)")

    def check(self) -> None:
        self.stream.check()

    def close(self) -> None:
        if not self.broken:
            self._pending.append(self._z.flush(zlib.Z_FINISH))
            self._hand_over()
        self.stream.close()


class GzipLines:
    """The lines of a gzip file (several members, as `cat a.gz b.gz` makes,
    included), as a binary file gives them: the last one without its newline
    when the stream was cut. `error`: why decompressing stopped early."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.error: str | None = None
        self._z = zlib.decompressobj(31)
        self._buf = b""
        self._in = b""
        self._at = 0                    # in self._in: the next byte to decompress
        self._eof = False

    def _more(self) -> bool:
        """Decompress more into the buffer; False at the end of the data. The
        input goes in small pieces: at a corrupt byte, zlib gives nothing of
        the piece it was handed, so the lines before it are kept."""
        while not self._eof:
            if self._at >= len(self._in):
                self._in, self._at = self.f.read(READ_CHUNK), 0
                if not self._in:
                    self._eof = True
                    return False
            piece = self._in[self._at:self._at + FEED]
            self._at += FEED
            try:
                out = self._z.decompress(piece)
            except zlib.error as e:
                self.error = f"compressed data corrupt ({e})"
                self._eof = True
                return False
            if self._z.eof and self._z.unused_data:     # the next gzip member
                self._in, self._at = self._z.unused_data + self._in[self._at:], 0
                self._z = zlib.decompressobj(31)
            if out:
                self._buf += out
                return True
        return False

    def readline(self) -> bytes:
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line, self._buf = self._buf[:i + 1], self._buf[i + 1:]
                return line
            if not self._more():
                line, self._buf = self._buf, b""
                return line

    def __iter__(self) -> Iterator[bytes]:
        while True:
            line = self.readline()
            if not line:
                return
            yield line

    def read(self) -> bytes:
        """Everything left, decompressed (tests, tools)."""
        return b"".join(self)

    def close(self) -> None:
        self.f.close()


def open_lines(path: str) -> IO[bytes] | GzipLines:
    """The file's lines, decompressed when it is gzip; OSError as open()."""
    f = open(path, "rb")  # noqa: SIM115 (closed by the caller)
    magic = f.read(2)
    f.seek(0)
    return GzipLines(f) if magic == GZIP_MAGIC else f


def decompressed(path: str) -> bytes:
    """The whole text of a recording, compressed or not (tests, tools)."""
    lines = open_lines(path)
    try:
        return lines.read()
    finally:
        lines.close()
