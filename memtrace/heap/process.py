"""The real process: its memory read with process_vm_readv and PAGEMAP_SCAN
(ProcessSpace), or copied while it is stopped with SIGSTOP (SnapshotSpace), and
analyse_process, the report of `memtrace heap` and of the background walker."""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import os
import signal
import time
from typing import Any

from memtrace.heap.analysis import WalkMemo, analyse_glibc
from memtrace.heap.detect import AllocatorInfo, detect_allocator
from memtrace.heap.figures import totals, verdict
from memtrace.heap.layout import HEAP_MAX_SIZE, HeapError, layout_for, parse_glibc_version
from memtrace.heap.memory import ResidentMap
from memtrace.heap.structures import libc_data_regions
from memtrace.trace.procfs import Vma, escape_name, parse_maps


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                                   ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
_libc.process_vm_readv.restype = ctypes.c_ssize_t
IOV_MAX = 1024


class ProcessSpace:
    """A live process: maps, process_vm_readv, PAGEMAP_SCAN."""

    def __init__(self, pid: int, proc_root: str = "/proc", memo: WalkMemo | None = None,
                 layout: int = 0) -> None:
        from memtrace.trace.pagemap import open_scanner

        self.pid = pid
        self.proc_root = proc_root
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self._maps: list[Vma] | None = None
        self.memo = memo or WalkMemo()  # the parse is kept here (across walks, if given)
        self._layout = layout           # the watch loop's token of the VMA list, or 0
        self._cache: dict[int, bytes] = {}
        self.reads = 0
        self.bytes_read = 0
        self.scanner = open_scanner(pid, proc_root, self._vmas_in)

    def close(self) -> None:
        self.scanner.close()

    def _vmas_in(self, start: int, end: int) -> list[tuple[int, int, bytes]]:
        return [(v.start, v.end, v.path) for v in self.maps() if v.start < end and v.end > start]

    def refresh(self) -> None:
        """Read everything again, the maps included (a retry after a changing heap)."""
        self._maps = None
        self._cache = {}
        self._layout = 0

    def maps(self) -> list[Vma]:
        """The mappings as of the last refresh(); read again after it, parsed
        again only if they changed (60k mappings: a 3 MB read, 0.1 s of parsing)."""
        memo = self.memo
        if self._maps is None and self._layout and memo.layout == self._layout and memo.maps:
            self._maps = memo.maps      # the watch loop has seen no layout change since
        if self._maps is None:
            try:
                with open(f"{self.proc_root}/{self.pid}/maps", "rb") as f:
                    text = f.read()
            except FileNotFoundError:
                raise HeapError(f"process {self.pid} has gone", "gone") from None
            if text != memo.maps_text or not memo.maps:
                memo.maps_text, memo.maps = text, parse_maps(text)
            memo.layout = self._layout
            self._maps = memo.maps
        return self._maps

    def _readv(self, buf: Any, segs: list[tuple[int, int, int]]) -> None:
        """segs: (remote address, length, offset in buf, a writable buffer)."""
        base = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf)) if len(buf) else 0
        for k in range(0, len(segs), IOV_MAX):
            part = segs[k:k + IOV_MAX]
            local = (_IoVec * len(part))()
            remote = (_IoVec * len(part))()
            want = 0
            for i, (addr, n, off) in enumerate(part):
                local[i].iov_base = base + off
                local[i].iov_len = n
                remote[i].iov_base = addr
                remote[i].iov_len = n
                want += n
            got = _libc.process_vm_readv(self.pid, local, len(part), remote, len(part), 0)
            self.reads += 1
            if got < 0:
                err = ctypes.get_errno()
                if err == errno.ESRCH:
                    raise HeapError(f"process {self.pid} has gone", "gone")
                raise OSError(err, f"process_vm_readv: {os.strerror(err)}")
            self.bytes_read += got
            if got != want:
                raise HeapError(f"short read at {part[0][0]:#x}: {got} of {want} bytes "
                                "(mapping changed)")

    def read(self, addr: int, size: int) -> bytes:
        """Small reads go through a cache of 4 KiB blocks (list walks read one
        word per chunk); the cache lives until refresh()."""
        block = addr >> 12
        if size <= 64 and (addr + size - 1) >> 12 == block:
            data = self._cache.get(block)
            if data is None:
                data = self.read(block << 12, 4096)
                self._cache[block] = data
            off = addr & 4095
            return data[off:off + size]
        buf = bytearray(size)
        if size:
            self._readv(buf, [(addr, size, 0)])
        return bytes(buf)

    def read_resident(self, addr: int, size: int, runs: list[tuple[int, int]]) -> bytearray:
        """Only the resident pages of [addr, addr+size); the rest reads as zeros
        (reading them would map the zero page or swap them in)."""
        buf = bytearray(size)
        segs = [(s, e - s, s - addr) for s, e in runs]
        if segs:
            self._readv(buf, segs)
        return buf

    def copy_resident(self, addr: int, size: int, runs: list[tuple[int, int]]) -> Any:
        """Like read_resident into a fresh anonymous mapping: its pages are
        touched once, by the copy (a bytearray would be zero-filled first)."""
        import mmap

        buf = mmap.mmap(-1, max(size, 1))
        segs = [(s, e - s, s - addr) for s, e in runs]
        if segs:
            self._readv(buf, segs)
        return buf

    def read_heads(self, addrs: list[int], size: int) -> bytes:
        """`size` bytes at each address, concatenated (batched process_vm_readv)."""
        buf = bytearray(size * len(addrs))
        if addrs:
            self._readv(buf, [(a, size, size * k) for k, a in enumerate(addrs)])
        return bytes(buf)

    def resident_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        try:
            return [(s, e) for s, e, _ in self.scanner.scan(start, end)]
        except ProcessLookupError:
            raise HeapError(f"process {self.pid} has gone", "gone") from None

    def file_bytes(self, path: bytes, limit: int) -> bytes | None:
        full = os.fsencode(f"{self.proc_root}/{self.pid}/root") + path
        try:
            with open(full, "rb") as f:
                if os.fstat(f.fileno()).st_size > limit:
                    return None
                return f.read()
        except OSError:
            return None


def snapshot_regions(vmas: list[Vma], libc: bytes) -> list[tuple[int, int]]:
    """Where malloc state lives: libc's data, [heap], and 64 MiB-aligned anonymous
    mappings (thread heaps start at HEAP_MAX_SIZE-aligned addresses)."""
    picked = list(libc_data_regions(vmas, libc))
    for v in vmas:
        if v.perms.startswith("rw") and (v.path == b"[heap]" or (
                not v.path and not v.inode and v.start % HEAP_MAX_SIZE == 0)):
            picked.append((v.start, v.end))
    return sorted(picked)


def populated_buffer(size: int) -> Any:
    """An anonymous mapping with its pages already faulted in (so that copying
    into it while the target is stopped costs a memcpy, not page faults)."""
    import mmap

    buf = mmap.mmap(-1, max(size, 1))
    try:
        buf.madvise(23)  # MADV_POPULATE_WRITE (Linux 5.14+)
    except (OSError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        for off in range(0, len(buf), page):
            buf[off] = 0
    return buf


class SnapshotSpace:
    """The resident pages of the regions malloc state lives in, copied while the
    process is stopped so that it runs again during the analysis. Pages are
    stored compactly (resident runs back to back); non-resident ones read as
    zeros. Reads elsewhere (files, own-mmap chunk headers) go to the live process."""

    def __init__(self, live: ProcessSpace, libc: bytes, buffer: Any = None) -> None:
        self.live = live
        self.page_size = live.page_size
        self._maps = live.maps()
        self.regions: list[tuple[int, int, ResidentMap, int]] = []  # start, end, runs, offset
        total = 0
        for start, end in snapshot_regions(self._maps, libc):
            res = ResidentMap(live.resident_runs(start, end))
            self.regions.append((start, end, res, total))
            total += res.cum[-1]
        self.copied_bytes = total
        if buffer is None or len(buffer) < total:
            if buffer is not None:
                buffer.close()
            buffer = populated_buffer(total)
        self.buf = buffer
        segs = []
        for _, _, res, base in self.regions:
            segs += [(s, e - s, base + res.cum[i])
                     for i, (s, e) in enumerate(zip(res.starts, res.ends))]
        if segs:
            live._readv(self.buf, segs)
        self.bounds = [r[0] for r in self.regions]

    @property
    def bytes_read(self) -> int:
        return self.live.bytes_read

    def close(self) -> None:
        self.buf.close()

    def _find(self, addr: int, size: int) -> tuple[int, int, ResidentMap, int] | None:
        i = bisect.bisect_right(self.bounds, addr) - 1
        if i >= 0 and addr + size <= self.regions[i][1]:
            return self.regions[i]
        return None

    def maps(self) -> list[Vma]:
        return self._maps

    def read(self, addr: int, size: int) -> bytes:
        r = self._find(addr, size)
        if r is None:
            return self.live.read(addr, size)
        res, base = r[2], r[3]
        i = bisect.bisect_right(res.starts, addr) - 1
        if i >= 0 and addr + size <= res.ends[i]:  # within one run
            off = base + res.cum[i] + addr - res.starts[i]
            return self.buf[off:off + size]  # type: ignore[no-any-return]
        out = bytearray(size)
        for s, e in res.runs_in(addr, addr + size):
            j = bisect.bisect_right(res.starts, s) - 1
            off = base + res.cum[j] + s - res.starts[j]
            out[s - addr:e - addr] = self.buf[off:off + e - s]
        return bytes(out)

    def read_resident(self, addr: int, size: int, runs: list[tuple[int, int]]) -> Any:
        return self.read(addr, size)

    def read_heads(self, addrs: list[int], size: int) -> bytes:
        return self.live.read_heads(addrs, size)

    def resident_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        r = self._find(start, end - start)
        if r is None:
            return self.live.resident_runs(start, end)
        return r[2].runs_in(start, end)

    def file_bytes(self, path: bytes, limit: int) -> bytes | None:
        return self.live.file_bytes(path, limit)


def _threads_stopped(pid: int, proc_root: str) -> bool:
    try:
        tids = os.listdir(f"{proc_root}/{pid}/task")
    except FileNotFoundError:
        raise HeapError(f"process {pid} has gone", "gone") from None
    for tid in tids:
        try:
            with open(f"{proc_root}/{pid}/task/{tid}/stat", "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        state = data[data.rindex(b")") + 2:data.rindex(b")") + 3]
        if state not in (b"T", b"t", b"Z", b"X"):
            return False
    return True


@contextlib.contextmanager
def stopped(pid: int, proc_root: str = "/proc") -> Any:
    """SIGSTOP the process until the block ends (SIGCONT always, unless it was
    already stopped before). Yields a dict that gets `pause_seconds`."""
    info: dict[str, Any] = {"pause_seconds": None, "was_stopped": _threads_stopped(pid, proc_root)}
    t0 = time.monotonic()
    if not info["was_stopped"]:
        os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 5
        while not _threads_stopped(pid, proc_root):
            if time.monotonic() > deadline:
                raise HeapError(f"process {pid} did not stop within 5 s")
            time.sleep(0.0005)
        yield info
    finally:
        if not info["was_stopped"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        info["pause_seconds"] = time.monotonic() - t0


def _read_files(space: ProcessSpace, exe: bytes) -> tuple[AllocatorInfo, tuple[int, int] | None]:
    """The allocator and glibc's version, from the mapped files; kept in the memo
    while the same files are mapped (a replaced file maps as "... (deleted)")."""
    memo = space.memo
    maps = space.maps()
    if memo.files_key_of is maps and memo.files_key is not None and memo.files_key[0] == exe:
        key = memo.files_key            # the same maps text: the same files
    else:
        key = (exe, tuple(dict.fromkeys(v.path for v in maps if v.path.startswith(b"/"))))
        memo.files_key_of = maps
    if memo.files_key != key:
        alloc = detect_allocator(space, exe)
        version = None
        if alloc.supported:
            version = parse_glibc_version(space.file_bytes(alloc.libc_path, 64 << 20) or b"")
        memo.files_key, memo.files_learnt = key, (alloc, version)
    return memo.files_learnt  # type: ignore[no-any-return]


def analyse_process(pid: int, stop: bool = False, retries: int = 5,
                    proc_root: str = "/proc", comm: str = "",
                    memo: WalkMemo | None = None, layout_token: int = 0) -> dict[str, Any]:
    """The report for a live process. Not stopped, a walk that meets a changing
    heap is retried (`retries` times); with `stop`, the process is paused with
    SIGSTOP for one exact snapshot and `pause_seconds` says for how long.
    `memo`: what the last walk of this process left (kept up to date);
    `layout_token`: the watch loop's token of the VMA list (maps not read again while the same)."""
    t_start = time.monotonic()
    exe = b""
    with contextlib.suppress(OSError):
        exe = os.readlink(os.fsencode(f"{proc_root}/{pid}/exe"))
    space = ProcessSpace(pid, proc_root, memo, layout_token)
    try:
        alloc, version = _read_files(space, exe)
        base: dict[str, Any] = {"pid": pid, "comm": comm}
        if not alloc.supported:
            return {**base, "allocator": alloc.allocator, "supported": False,
                    "reason": alloc.reason}
        if version is None:
            return {**base, "allocator": "glibc", "supported": False,
                    "reason": "unsupported glibc layout: cannot read the glibc version of "
                    f"{escape_name(alloc.libc_path)}"}
        try:
            layout = layout_for(version)
        except HeapError as e:
            return {**base, "allocator": "glibc", "supported": False, "reason": e.message}
        attempts = 0
        last: HeapError | None = None
        pause: float | None = None
        report: dict[str, Any] | None = None
        while attempts <= retries and report is None:
            attempts += 1
            if attempts > 1:
                space.refresh()
            info: dict[str, Any] = {}
            try:
                if stop:
                    # copy the heap while stopped into a buffer faulted in before;
                    # analyse the copy once the process runs again
                    space.refresh()
                    size = sum(e - s for a, b in snapshot_regions(space.maps(), alloc.libc_path)
                               for s, e in space.resident_runs(a, b))
                    buffer = populated_buffer(size + size // 8 + (1 << 20))
                    try:
                        with stopped(pid, proc_root) as info:
                            space.refresh()
                            snap = SnapshotSpace(space, alloc.libc_path, buffer)
                    except BaseException:
                        buffer.close()
                        raise
                    finally:
                        pause = info.get("pause_seconds")
                    try:
                        report = analyse_glibc(snap, layout, alloc.libc_path, space.memo)
                    finally:
                        snap.close()
                else:
                    report = analyse_glibc(space, layout, alloc.libc_path, space.memo)
            except HeapError as e:
                if e.kind == "gone":
                    raise
                if e.kind != "inconsistent":
                    return {**base, "allocator": "glibc", "supported": False,
                            "reason": e.message, "glibc_version": f"{version[0]}.{version[1]}"}
                last = e
                if stop and info.get("was_stopped"):
                    break  # stopped by someone else: another look sees the same state
                time.sleep(0.01 * attempts)
        if report is None:
            assert last is not None
            if stop:
                raise HeapError(
                    f"the heap kept changing during {attempts} stopped snapshot(s) "
                    f"({last.message})" + ("; the process was already stopped, so another "
                                           "snapshot would see the same" if info.get(
                                               "was_stopped") else ""))
            raise HeapError(f"the heap kept changing during {attempts} walks ({last.message})"
                            "; try --stop for an exact snapshot")
        report = {**base, **report}
        report["totals"] = totals(report["arenas"])
        report["stopped"] = stop
        report["pause_seconds"] = pause
        report["attempts"] = attempts
        report["analysis_seconds"] = time.monotonic() - t_start
        report["bytes_read"] = space.bytes_read
        report["verdict"] = verdict(report)
        return report
    finally:
        space.close()
