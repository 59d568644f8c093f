"""Reading and parsing /proc: maps, statm, status, stat. The root is injectable
so that the parsers run on fixture trees in tests."""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path

from memtrace.errors import ExitCode, MemtraceError

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PF_KTHREAD = 0x00200000


@dataclass(frozen=True, slots=True)
class Vma:
    """One line of /proc/PID/maps. `path` stays bytes: paths need not be UTF-8."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: bytes

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def identity(self) -> tuple[int, int, str, int, int, bytes]:
        """What must stay equal for two reads to name the same VMA."""
        return (self.start, self.end, self.perms, self.offset, self.inode, self.path)

    def same_identity(self, other: Vma) -> bool:
        """identity == other.identity, without building the tuples."""
        return self is other or (
            self.start == other.start and self.end == other.end and self.perms == other.perms
            and self.offset == other.offset and self.inode == other.inode
            and self.path == other.path)

    @property
    def display_path(self) -> str:
        return escape_name(self.path)


# -- names -----------------------------------------------------------------------
#
# File names, comms and exe paths are bytes. Every view (JSON, table, CSV,
# /metrics labels, libs, heap, explain, log lines) shows them as the text
# escape_name gives: valid UTF-8 stays as it is, except
#   \\                     a backslash
#   \b \f \n \r \t          those control characters (as JSON writes them)
#   \uXXXX, \UXXXXXXXX     any other control or format character (Unicode
#                          categories Cc, Cf, Zl, Zp: C0, DEL, C1, bidi overrides...)
#   \xNN                   a byte that is not part of valid UTF-8
# Every backslash in the result starts one of these escapes, so two different
# byte strings never give the same text, and the text holds no character that
# a terminal acts on. Names like [heap] or [anon:x] are plain ASCII: unchanged.

_SHORT_ESCAPES = {"\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                  "\t": "\\t"}
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def _escape_char(ch: str) -> str:
    short = _SHORT_ESCAPES.get(ch)
    if short is not None:
        return short
    o = ord(ch)
    if 0xDC80 <= o <= 0xDCFF:            # a byte that is not UTF-8 (surrogateescape)
        return f"\\x{o - 0xDC00:02x}"
    if unicodedata.category(ch) in _UNSAFE_CATEGORIES:
        return f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}"
    return ch


def escape_name(raw: bytes) -> str:
    """A name from the kernel (bytes) as printable text, one way everywhere
    (see above): injective, valid UTF-8, no control characters."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "surrogateescape")
    else:
        if text.isprintable() and "\\" not in text:
            return text
    return "".join(map(_escape_char, text))


def escape_text(text: str) -> str:
    """Text that is already made of escaped names and our own words (messages,
    table cells), with any control character left escaped like escape_name
    does; backslashes are kept (they start escapes already made)."""
    if text.isprintable():
        return text
    return "".join(ch if ch == "\\" or ch.isprintable() else _escape_char(ch) for ch in text)


# The name this function had before names were escaped one way.
decode_path = escape_name


_ascii_cache: dict[bytes, str] = {}


def _ascii(raw: bytes) -> str:
    """Perms and device fields as text, one str per distinct value (there are
    few: at 60k mappings, 120k strings fewer)."""
    text = _ascii_cache.get(raw)
    if text is None:
        text = raw.decode("ascii", "replace")
        if len(_ascii_cache) < 4096:
            _ascii_cache[raw] = text
    return text


def parse_maps(data: bytes) -> list[Vma]:
    """The lines of /proc/PID/maps. Only \\n ends a line: a path may hold \\r
    and other line breaks (the kernel writes a newline in a path as \\012)."""
    vmas = []
    for line in data.split(b"\n"):
        if not line:
            continue
        fields = line.split(None, 5)
        if len(fields) < 5:
            continue
        start_s, _, end_s = fields[0].partition(b"-")
        vmas.append(Vma(int(start_s, 16), int(end_s, 16), _ascii(fields[1]), int(fields[2], 16),
                        _ascii(fields[3]), int(fields[4]), fields[5] if len(fields) == 6 else b""))
    return vmas


@dataclass(frozen=True)
class Statm:
    size_pages: int
    resident_pages: int
    shared_pages: int
    text_pages: int
    data_pages: int

    @property
    def resident_bytes(self) -> int:
        return self.resident_pages * PAGE_SIZE

    @property
    def shared_bytes(self) -> int:
        return self.shared_pages * PAGE_SIZE

    @property
    def anon_bytes(self) -> int:
        return (self.resident_pages - self.shared_pages) * PAGE_SIZE


def parse_statm(data: bytes) -> Statm:
    f = [int(x) for x in data.split()]
    return Statm(size_pages=f[0], resident_pages=f[1], shared_pages=f[2], text_pages=f[3],
                 data_pages=f[5])


@dataclass(frozen=True)
class ProcStat:
    pid: int
    comm: str
    state: str
    ppid: int
    flags: int
    start_time: int  # clock ticks after boot; with pid, a process identity that survives reuse
    minflt: int = 0  # the kernel's fault counters since the process started
    majflt: int = 0


def parse_stat(data: bytes) -> ProcStat:
    open_paren = data.index(b"(")
    close_paren = data.rindex(b")")
    rest = data[close_paren + 2:].split()
    return ProcStat(
        pid=int(data[:open_paren]),
        comm=escape_name(data[open_paren + 1:close_paren]),
        state=rest[0].decode(),
        ppid=int(rest[1]),
        flags=int(rest[6]),
        start_time=int(rest[19]),
        minflt=int(rest[7]),
        majflt=int(rest[9]),
    )


def parse_status(data: bytes) -> dict[str, str]:
    out = {}
    for line in data.splitlines():
        key, sep, value = line.partition(b":")
        if sep:
            out[key.decode("ascii", "replace")] = value.strip().decode("utf-8", "replace")
    return out


class ProcFS:
    """Access to one /proc tree (the real one unless a fixture root is given)."""

    def __init__(self, root: str | Path = "/proc") -> None:
        self.root = Path(root)
        # False once /proc/PID/map_files refused a readlink (no CAP_SYS_ADMIN /
        # CAP_CHECKPOINT_RESTORE): names then come from the maps text, where a
        # newline and the text "\\012" look the same (docs/output.md).
        self.names_exact = True

    def _read(self, pid: int, name: str) -> bytes:
        with open(self.root / str(pid) / name, "rb") as f:
            return f.read()

    def maps(self, pid: int) -> list[Vma]:
        """The VMAs, with file names as bytes exactly: maps writes a newline in a
        path as \\012, which a path may also hold as text; such names are read
        from map_files (while permitted)."""
        data = self._read(pid, "maps")
        vmas = parse_maps(data)
        if b"\\012" in data and self.names_exact:
            vmas = [self._exact_name(pid, v) if b"\\012" in v.path else v for v in vmas]
        return vmas

    def heap_end(self, pid: int) -> int:
        """The end of the [heap] mapping (0 if none), from maps without parsing
        every line (60k lines: 0.2 s)."""
        data = self._read(pid, "maps")
        at = data.find(b" [heap]\n")
        while at >= 0:
            vmas = parse_maps(data[data.rfind(b"\n", 0, at) + 1:at + 8])
            if vmas and vmas[0].path == b"[heap]":
                return vmas[0].end
            at = data.find(b" [heap]\n", at + 1)    # a file named "... [heap]"
        return 0

    def _exact_name(self, pid: int, vma: Vma) -> Vma:
        if not self.names_exact:
            return vma
        try:
            real = self.map_file_name(pid, vma.start, vma.end)
        except PermissionError:
            self.names_exact = False
            return vma
        except OSError:             # gone since maps was read
            return vma
        if real.replace(b"\n", b"\\012") != vma.path:
            return vma              # another mapping there now: maps is re-read later
        return replace(vma, path=real)

    def statm(self, pid: int) -> Statm:
        return parse_statm(self._read(pid, "statm"))

    def stat(self, pid: int) -> ProcStat:
        return parse_stat(self._read(pid, "stat"))

    def status(self, pid: int) -> dict[str, str]:
        return parse_status(self._read(pid, "status"))

    def peak_rss_bytes(self, pid: int) -> int | None:
        """VmHWM of /proc/PID/status in bytes: the kernel's high-water mark of the
        process's resident size since it started (None for a process without one)."""
        data = self._read(pid, "status")
        at = data.find(b"\nVmHWM:")
        if at < 0:
            return None
        return int(data[at + 7:data.index(b"\n", at + 1)].split()[0]) * 1024

    def exe(self, pid: int) -> bytes:
        try:
            return os.readlink(os.fsencode(self.root / str(pid) / "exe"))
        except OSError:
            return b""

    def map_file_name(self, pid: int, start: int, end: int) -> bytes:
        """The path of the file-backed VMA [start, end) as bytes, read from
        /proc/PID/map_files (one readlink; needs CAP_SYS_ADMIN): like maps, with
        " (deleted)" for a deleted file, but a newline stays a newline. OSError
        when the VMA or the process is gone, or not permitted."""
        link = os.fsencode(self.root / str(pid) / "map_files" / f"{start:x}-{end:x}")
        return os.readlink(link)

    def alive(self, pid: int) -> bool:
        try:
            return self.stat(pid).state not in ("Z", "X")
        except (OSError, ValueError, IndexError):
            return False

    def check_target(self, pid: int, own_pid: int | None = None) -> ProcStat:
        """Validate a PID given by the user; raise MemtraceError with a clear line."""
        if pid <= 0:
            raise MemtraceError(f"invalid PID {pid}", ExitCode.NO_SUCH_PROCESS)
        try:
            st = self.stat(pid)
            tgid = int(self.status(pid).get("Tgid", pid))
        except FileNotFoundError:
            raise MemtraceError(f"no such process: {pid}", ExitCode.NO_SUCH_PROCESS) from None
        except (OSError, ValueError, IndexError) as e:
            raise MemtraceError(f"cannot read /proc/{pid}: {e}", ExitCode.NO_SUCH_PROCESS) from None
        if tgid != pid:
            raise MemtraceError(
                f"{pid} is a thread of process {tgid}; watch {tgid} instead",
                ExitCode.NO_SUCH_PROCESS)
        if pid == (own_pid if own_pid is not None else os.getpid()):
            raise MemtraceError(f"{pid} is memtrace itself", ExitCode.OWN_PROCESS)
        if st.flags & PF_KTHREAD:
            raise MemtraceError(
                f"{pid} ({st.comm}) is a kernel thread: it has no user address space",
                ExitCode.KERNEL_THREAD)
        if st.state in ("Z", "X"):
            raise MemtraceError(f"{pid} ({st.comm}) is a zombie: its memory is already gone",
                                ExitCode.ZOMBIE)
        return st


_statm_exact: bool | None = None
_STATM_TRIES = 20       # comparisons attempted before giving up on a quiet window


def statm_is_exact(attempts: int = 3) -> bool:
    """Does /proc/PID/statm count resident pages exactly on this kernel? Before
    6.2 RSS counters were cached per task, and until the sum-based readers of
    recent kernels they were per-CPU approximations; then statm can differ from
    the page tables. Tried on our own process: touch fresh pages, compare statm
    with smaps_rollup (a walk of our own small address space), `attempts`
    times. A comparison counts only when statm read the same before and after
    the walk: another thread of ours (the /metrics server, a compile) may
    fault pages in between, which says nothing about the kernel."""
    global _statm_exact
    if _statm_exact is None:
        _statm_exact = _statm_verdict(attempts)
    return _statm_exact


def _statm_verdict(attempts: int) -> bool:
    counted = 0
    for _ in range(_STATM_TRIES):
        match = _statm_matches_rollup()
        if match is None:
            continue
        if not match:
            return False
        counted += 1
        if counted == attempts:
            return True
    return False            # never quiet: trust statm less, not more


def _statm_matches_rollup() -> bool | None:
    """True/False: statm's resident equals smaps_rollup's Rss; None: statm
    moved while smaps_rollup was read (no verdict)."""
    import mmap

    # Both files are opened and their buffers made before the pages are touched,
    # and read with no allocation in between: an allocation of our own between
    # the reads (a file object, a new heap page) would change our RSS.
    before, after, rollup_buf = bytearray(512), bytearray(512), bytearray(8192)
    region = mmap.mmap(-1, 37 * PAGE_SIZE)
    fds: list[int] = []
    try:
        fds = [os.open("/proc/self/statm", os.O_RDONLY),
               os.open("/proc/self/smaps_rollup", os.O_RDONLY)]
        for page in range(37):
            region[page * PAGE_SIZE] = 1
        n_before = os.preadv(fds[0], [before], 0)
        n_rollup = os.readv(fds[1], [rollup_buf])
        n_after = os.preadv(fds[0], [after], 0)
    except OSError:
        return False
    finally:
        for fd in fds:
            os.close(fd)
        region.close()
    if before[:n_before] != after[:n_after]:
        return None
    resident = parse_statm(bytes(before[:n_before])).resident_bytes
    for line in bytes(rollup_buf[:n_rollup]).splitlines():
        if line.startswith(b"Rss:"):
            return int(line.split()[1]) * 1024 == resident
    return False


def want_rss_stat_probe() -> bool:
    """The rss_stat probe finds RSS changes made from outside a process (ksmd,
    khugepaged, reclaim by others, writes through /proc/PID/mem) the tick
    they happen, at the cost of one BPF run per RSS counter change. Where
    statm is exact the per-tick statm check finds them too (within a few ticks
    when the process is busy), so the probe is left out unless
    MEMTRACE_RSS_STAT_PROBE=1."""
    return os.environ.get("MEMTRACE_RSS_STAT_PROBE") == "1" or not statm_is_exact()
