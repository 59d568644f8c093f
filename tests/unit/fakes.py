"""In-memory stand-ins for a traced process: a /proc/PID tree written to a
temporary directory (maps, statm, stat, status, exe) and a PAGEMAP_SCAN
scanner that reads a page table kept in a dict. Tests change the page table
and the VMA list between ticks and call sync() to rewrite the files."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from memtrace.trace.events import CHUNK_SHIFT, USER_ADDR_MAX
from memtrace.trace.procfs import PAGE_SIZE, ProcFS, Vma

PAGE = PAGE_SIZE
CHUNK = 1 << CHUNK_SHIFT


def stat_line(
    pid: int,
    comm: bytes,
    state: str = "S",
    ppid: int = 1,
    flags: int = 0x400000,
    start_time: int = 4242,
) -> bytes:
    """A /proc/PID/stat line with the 52 fields of Linux 6.x."""
    after = [state, str(ppid), str(pid), str(pid), "0", "-1", str(flags)]
    after += ["0"] * 12  # minflt .. itrealvalue (fields 10..21)
    after += [str(start_time)]  # field 22
    after += ["0"] * (52 - 22)
    return b"%d (%s) " % (pid, comm) + " ".join(after).encode() + b"\n"


def status_text(pid: int, tgid: int, name: str = "fake") -> bytes:
    return (
        f"Name:\t{name}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{tgid}\n"
        f"Ngid:\t0\nPid:\t{pid}\nPPid:\t1\nVmRSS:\t  123 kB\n"
    ).encode()


def maps_line(v: Vma) -> bytes:
    """The line the kernel writes for v (its path the real bytes): a newline
    in a path becomes \\012, nothing else is escaped."""
    head = f"{v.start:x}-{v.end:x} {v.perms} {v.offset:08x} {v.dev} {v.inode}".encode()
    if not v.path:
        return head + b"\n"
    return head.ljust(73) + v.path.replace(b"\n", b"\\012") + b"\n"


def runs_of(pages: dict[int, bool], start: int, end: int) -> list[tuple[int, int, bool]]:
    """Coalesced runs of resident pages in [start, end), like the kernel returns
    them: adjacent pages of one kind form one run, across VMA boundaries."""
    runs: list[tuple[int, int, bool]] = []
    for addr in sorted(a for a in pages if start <= a < end):
        anon = pages[addr]
        if runs and runs[-1][1] == addr and runs[-1][2] == anon:
            runs[-1] = (runs[-1][0], addr + PAGE, anon)
        else:
            runs.append((addr, addr + PAGE, anon))
    return runs


class FakeProcess:
    """One process: VMAs, a page table {page address: anon?}, and its /proc files."""

    def __init__(
        self, root: Path, pid: int, comm: bytes = b"fake", exe: bytes = b"/usr/bin/fake"
    ) -> None:
        self.root = root
        self.pid = pid
        self.dir = root / str(pid)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.comm = comm
        self.state = "S"
        self.ppid = 1
        self.flags = 0x400000
        self.start_time = 4242
        self.tgid = pid
        self.vmas: list[Vma] = []
        self.pages: dict[int, bool] = {}
        # pages statm counts that no page table shows (anon pages, other pages)
        self.hidden = (0, 0)
        self.map_files = False      # write map_files links (names checks)
        self.set_exe(exe)
        self.sync()

    # -- layout ------------------------------------------------------------
    def set_exe(self, exe: bytes) -> None:
        link = os.fsencode(self.dir / "exe")
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(exe, link)

    def map(
        self,
        start: int,
        end: int,
        path: bytes = b"",
        perms: str = "rw-p",
        offset: int = 0,
        inode: int = 0,
        dev: str = "00:00",
    ) -> Vma:
        assert start % PAGE == 0 and end % PAGE == 0 and start < end
        assert not any(v.start < end and start < v.end for v in self.vmas), "overlap"
        v = Vma(start, end, perms, offset, dev, inode, path)
        self.vmas.append(v)
        self.vmas.sort(key=lambda x: x.start)
        return v

    def unmap(self, start: int, end: int) -> None:
        """munmap(start, end): drop pages, split or shrink the VMAs it covers."""
        out = []
        for v in self.vmas:
            if v.end <= start or end <= v.start:
                out.append(v)
                continue
            if v.start < start:
                out.append(Vma(v.start, start, v.perms, v.offset, v.dev, v.inode, v.path))
            if end < v.end:
                delta = end - v.start if v.inode else 0
                out.append(Vma(end, v.end, v.perms, v.offset + delta, v.dev, v.inode, v.path))
        self.vmas = out
        self.drop(start, end)

    # -- pages -------------------------------------------------------------
    def touch(self, start: int, end: int, anon: bool = True) -> None:
        for a in range(start, end, PAGE):
            self.pages[a] = anon

    def drop(self, start: int, end: int) -> None:
        for a in [a for a in self.pages if start <= a < end]:
            del self.pages[a]

    def expected(self, v: Vma) -> tuple[int, int]:
        """Brute force: (anon, other) bytes of the pages inside v."""
        anon = other = 0
        for a, is_anon in self.pages.items():
            if v.start <= a < v.end:
                if is_anon:
                    anon += PAGE
                else:
                    other += PAGE
        return anon, other

    def expected_total(self) -> tuple[int, int]:
        anon = other = 0
        for v in self.vmas:
            a, o = self.expected(v)
            anon += a
            other += o
        return anon, other

    # -- /proc files ---------------------------------------------------------
    def sync(self) -> None:
        (self.dir / "maps").write_bytes(b"".join(maps_line(v) for v in self.vmas))
        self._sync_map_files()
        anon, other = self.expected_total()
        anon_pages = anon // PAGE + self.hidden[0]
        other_pages = other // PAGE + self.hidden[1]
        size = sum(v.size for v in self.vmas) // PAGE
        (self.dir / "statm").write_text(
            f"{size} {anon_pages + other_pages} {other_pages} 1 0 {anon_pages} 0\n"
        )
        (self.dir / "stat").write_bytes(
            stat_line(self.pid, self.comm, self.state, ppid=self.ppid, flags=self.flags,
                      start_time=self.start_time)
        )
        (self.dir / "status").write_bytes(status_text(self.pid, self.tgid))

    def _sync_map_files(self) -> None:
        """map_files: one symlink per file-backed VMA, named START-END, its
        target the path's real bytes (maps shows a newline as \\012)."""
        d = self.dir / "map_files"
        if d.exists():
            shutil.rmtree(d)
        if not self.map_files:
            return       # off by default: the links would resolve on the real system
        d.mkdir()
        for v in self.vmas:
            if v.inode:
                os.symlink(v.path,
                           os.fsencode(d / f"{v.start:x}-{v.end:x}"))

    def vanish(self) -> None:
        for name in ("maps", "statm", "stat", "status", "exe"):
            (self.dir / name).unlink()
        shutil.rmtree(self.dir)


class FakeScanner:
    """Replaces the scanner from memtrace.trace.pagemap.open_scanner: scan() reads
    FakeProcess.pages."""

    def __init__(self, proc: FakeProcess) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.calls: list[tuple[int, int]] = []
        self.closed = False
        self.fail: BaseException | None = None
        self.on_scan: Callable[[int, int], None] | None = None

    def scan(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        assert not self.closed, "scan after close"
        if self.fail is not None:
            raise self.fail
        # The kernel's PAGEMAP_SCAN rejects ranges outside the user address space.
        if start % PAGE or end > USER_ADDR_MAX or start > end:
            raise OSError(errno.EFAULT, "Bad address")
        self.calls.append((start, end))
        if self.on_scan:
            self.on_scan(start, end)
        return runs_of(self.proc.pages, start, end)

    def close(self) -> None:
        self.closed = True


class World:
    """All fake processes under one proc root, and the scanners opened on them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[int, FakeProcess] = {}
        self.scanners: list[FakeScanner] = []

    def process(self, pid: int, **kw: object) -> FakeProcess:
        p = FakeProcess(self.root, pid, **kw)  # type: ignore[arg-type]
        self.procs[pid] = p
        return p

    def scanner_factory(self, pid: int, proc_root: str = "/proc",
                        vmas_in: object = None) -> FakeScanner:
        assert proc_root == str(self.root), proc_root
        if pid not in self.procs or not (self.root / str(pid)).exists():
            raise FileNotFoundError(errno.ENOENT, "No such file", f"{proc_root}/{pid}/pagemap")
        s = FakeScanner(self.procs[pid])
        self.scanners.append(s)
        return s

    @property
    def scanner(self) -> FakeScanner:
        return self.scanners[-1]

    def procfs(self) -> ProcFS:
        return ProcFS(self.root)


class HookedProcFS(ProcFS):
    """A ProcFS that calls a hook before every statm read (to change the process
    while the tracker is in the middle of a tick)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.statm_reads = 0
        self.before_statm: Callable[[int], None] | None = None

    def statm(self, pid: int):  # type: ignore[no-untyped-def]
        self.statm_reads += 1
        if self.before_statm:
            self.before_statm(self.statm_reads)
        return super().statm(pid)


# -- a realistic process used by several test modules ----------------------------
ANON = 0x7F0000000000  # chunk aligned: a 10 MiB anonymous VMA, 5 chunks
ARENA = ANON + 5 * CHUNK  # an adjacent anonymous VMA (runs coalesce across)
LIBC = 0x7F0001000000
SHM = 0x7F0001400000
STACK_END = 0x7FFD00000000


def standard_process(world: World, pid: int = 4000) -> tuple[FakeProcess, dict[str, Vma]]:
    p = world.process(pid, comm=b"server", exe=b"/usr/bin/server")
    m = {
        "exe_r": p.map(
            0x555555554000, 0x555555556000, b"/usr/bin/server", "r--p", inode=11, dev="fe:00"
        ),
        "exe_x": p.map(
            0x555555556000,
            0x55555555B000,
            b"/usr/bin/server",
            "r-xp",
            offset=0x2000,
            inode=11,
            dev="fe:00",
        ),
        "heap": p.map(0x55555555B000, 0x55555557C000, b"[heap]"),
        "anon": p.map(ANON, ARENA),
        "arena": p.map(ARENA, ARENA + 8 * PAGE, b"[anon:arena]"),
        "libc": p.map(
            LIBC,
            LIBC + 0x20000,
            b"/usr/lib/x86_64-linux-gnu/libc.so.6",
            "r-xp",
            inode=22,
            dev="fe:00",
        ),
        "shm": p.map(SHM, SHM + 0x40000, b"/memfd:buf (deleted)", "rw-s", inode=33, dev="00:01"),
        "odd": p.map(
            SHM + 0x40000, SHM + 0x41000, b"/tmp/caf\xe9 \xff.dat", "r--p", inode=44, dev="fe:00"
        ),
        "stack": p.map(STACK_END - 0x21000, STACK_END, b"[stack]"),
        "vdso": p.map(0x7FFD00100000, 0x7FFD00102000, b"[vdso]", "r-xp"),
    }
    p.touch(0x555555554000, 0x555555556000, anon=False)
    p.touch(0x555555556000, 0x555555558000, anon=False)
    p.touch(0x55555555B000, 0x555555560000)
    p.touch(ANON + CHUNK - 3 * PAGE, ANON + 3 * CHUNK + 5 * PAGE)  # across 3 chunk borders
    p.touch(ARENA - 2 * PAGE, ARENA + 3 * PAGE)  # across the VMA border
    p.touch(LIBC, LIBC + 0x8000, anon=False)
    p.touch(SHM, SHM + 0x10000, anon=False)
    p.touch(SHM + 0x40000, SHM + 0x41000, anon=False)
    p.touch(STACK_END - 0x3000, STACK_END)
    p.touch(0x7FFD00100000, 0x7FFD00101000, anon=False)
    p.sync()
    return p, m
