"""Loads bpf/memtrace.bpf.c with BCC and reads its maps. The only module that
imports bcc."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import select
import struct
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

from memtrace.errors import ExitCode, MemtraceError
from memtrace.trace import btf
from memtrace.trace.events import (
    ChunkMark,
    Drained,
    RawStats,
    SampleRecord,
    Stats,
    SyscallEvent,
    decode_event,
    decode_range,
    decode_stack_sample_in,
    decode_stats,
)
from memtrace.trace.mallocprobes import MallocProbes
from memtrace.trace.ownmem import shed_compiler_memory
from memtrace.trace.pagemap import thp_mode
from memtrace.trace.pyoffsets import PY311_X86_64
from memtrace.trace.sampling import DEFAULT_STACK_PERIOD, exponential_gaps, sample_weight
from memtrace.util.log import debug, log

MAX_TARGETS = 1024
MAX_CHUNKS = 262144
CHUNK_BATCH = 8192      # dirty chunks read per batch call (ChunkBatch: 192 KiB of buffers)
RANGES_PAGES = 64       # 256 KiB: ~10k range records per drain
EVENTS_PAGES = 256      # 1 MiB: ~14k event records per drain
EVENT_CREDIT = 2000     # event records streamed per process per drain; the rest only counted
STACKS_PAGES = 2048     # 8 MiB: ~1000 sampled stacks (8 KiB each) per drain
STACKS_READER_PAUSE = 0.05  # s: the stack reader's rest after each read (at most 20 reads/s)


def bpf_source_dir() -> Path:
    """bpf/ of a source checkout, else the copy installed as memtrace.bpf."""
    checkout = Path(__file__).resolve().parents[2] / "bpf"
    if (checkout / "memtrace.bpf.c").is_file():
        return checkout
    return Path(str(resources.files("memtrace.bpf")))


def import_bcc() -> Any:
    first = "bcc" not in sys.modules
    try:
        import bcc  # type: ignore[import-not-found]
    except ImportError:
        raise MemtraceError(
            "BCC is not importable: install the distro packages (sudo scripts/setup.sh, or "
            "apt-get install python3-bpfcc) and use a Python that sees them",
            ExitCode.NO_BCC) from None
    if first:
        # Loading libLLVM/libclang runs their initialisers, which leave ~45 MB of
        # their code resident that compiling does not use again: given back now,
        # the compile's peak (memtrace's VmHWM) is ~30 MB lower (ownmem.py).
        shed_compiler_memory()
    return bcc


def headers_dir() -> Path:
    return Path(f"/lib/modules/{os.uname().release}/build")


class ChunkBatch:
    """Reads and deletes every entry of a dirty-chunk map, CHUNK_BATCH at a time,
    into buffers allocated once. (BCC's items_lookup_and_delete_batch allocates
    and zeroes arrays of the map's max_entries at every call: 8 MiB for 262,144
    chunks, ~2 ms a tick, and memory glibc keeps.) Raises OSError where the
    kernel has no batch operations (nothing read yet: the caller reads the map
    another way); an error after some batches returns what they read, and the
    rest stays in the map for its next drain."""

    KEY = struct.Struct("<IIQ")     # struct mt_chunk_key: tgid, epoch, chunk
    VALUE = struct.Struct("<QQ")    # struct mt_chunk_val: faults, last_addr

    def __init__(self, bcc: Any, batch: int = CHUNK_BATCH) -> None:
        self._lib = bcc.libbcc.lib
        self._n = batch
        self._keys = ctypes.create_string_buffer(self.KEY.size * batch)
        self._values = ctypes.create_string_buffer(self.VALUE.size * batch)

    def drain(self, map_fd: int) -> list[tuple[int, int, int, int, int]]:
        """(tgid, epoch, chunk, faults, last_addr) of every entry, now deleted."""
        out: list[tuple[int, int, int, int, int]] = []
        token, count = ctypes.c_uint32(0), ctypes.c_uint32(0)
        first = True
        while True:
            count.value = self._n
            res = self._lib.bpf_lookup_and_delete_batch(
                map_fd, None if first else ctypes.byref(token), ctypes.byref(token),
                ctypes.byref(self._keys), ctypes.byref(self._values), ctypes.byref(count))
            err = ctypes.get_errno()
            n = count.value
            if n:
                keys = self.KEY.iter_unpack(self._keys.raw[:n * self.KEY.size])
                values = self.VALUE.iter_unpack(self._values.raw[:n * self.VALUE.size])
                out.extend(k + v for k, v in zip(keys, values))
            if res != 0:
                if err == errno.ENOENT or out:
                    return out          # the whole map was read (or the rest waits)
                raise OSError(err, f"BPF_MAP_LOOKUP_AND_DELETE_BATCH: {os.strerror(err)}")
            first = False
            if n == 0:
                return out              # no progress (concurrent updates): the rest next time


class Probes:
    """The loaded BPF program: targets in, dirty chunks, ranges, events, stats out."""

    def __init__(self, use_raw_rss_stat: bool = True, watch_execs: bool = False,
                 rss_stat_probe: bool = True, stream_events: bool = True,
                 stacks: bool = False, stack_period: int = DEFAULT_STACK_PERIOD,
                 malloc_shim: str | None = None) -> None:
        if os.geteuid() != 0:
            raise MemtraceError("memtrace needs root (deploy/README.md: the capabilities it uses)",
                                ExitCode.NOT_ROOT)
        bcc = import_bcc()
        if not (headers_dir() / "include").exists() and not headers_dir().exists():
            raise MemtraceError(
                f"kernel headers missing: {headers_dir()} does not exist "
                "(run sudo scripts/setup.sh)", ExitCode.NO_HEADERS)
        if not os.path.isdir("/sys/kernel/tracing/events") and not os.path.isdir(
                "/sys/kernel/debug/tracing/events"):
            raise MemtraceError(
                "tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing",
                ExitCode.NO_TRACEFS)
        src = bpf_source_dir()
        cflags = [f"-I{src}", f"-DMT_PAGE_SIZE={os.sysconf('SC_PAGE_SIZE')}",
                  f"-DMT_MAX_TARGETS={MAX_TARGETS}",
                  f"-DMT_MAX_CHUNKS={MAX_CHUNKS}", f"-DMT_RANGES_PAGES={RANGES_PAGES}",
                  f"-DMT_EVENTS_PAGES={EVENTS_PAGES}", "-Wno-macro-redefined"]
        if watch_execs:
            cflags.append("-DMT_WATCH_EXECS")
        if not stream_events:
            # only the table shows syscall records; elsewhere decoding them
            # (600/s under a madvise-heavy load) is pure cost
            cflags.append("-DMT_NO_EVENT_STREAM")
        self.rss_stat_mechanism = "tracepoint kmem:rss_stat (mm_id)"
        if not rss_stat_probe:
            # Every RSS counter change (each first-touch fault) would run it;
            # where statm is exact, the per-tick statm check finds remote
            # changes instead (docs/design.md).
            cflags.append("-DMT_NO_RSS_STAT")
            self.rss_stat_mechanism = "statm check every tick (exact here; no rss_stat probe)"
        elif use_raw_rss_stat:
            try:
                offset = btf.member_offset("task_struct", "mm")
                cflags.append(f"-DMT_TASK_MM_OFFSET={offset}")
                self.rss_stat_mechanism = (
                    f"raw tracepoint rss_stat (task_struct.mm at {offset} from BTF)")
            except btf.BtfError:
                pass
        self.stack_period = stack_period
        self.stack_weight = 0
        self.stack_mechanism = ""
        self._python = False
        self._stacks_on = stacks
        # THP "always": every target's first fault in a chunk may map a huge
        # page; "madvise": BPF flags a process when it asks for MADV_HUGEPAGE
        self._huge_always = stacks and thp_mode() == "always"
        if stacks:
            if stack_period < 1:
                raise MemtraceError("the stack sampling period must be at least 1 byte",
                                    ExitCode.USAGE)
            cflags += ["-DMT_STACKS", f"-DMT_STACKS_PAGES={STACKS_PAGES}"]
            if os.uname().machine == "x86_64":
                cflags += PY311_X86_64.bpf_defines()     # CPython 3.11 frames
                self._python = True
            if _kernel_user_regs(bcc):
                cflags.append("-DMT_STACKS_KERNEL")
                self.stack_mechanism = "user and kernel-mode faults"
            else:
                self.stack_mechanism = ("user-mode faults only (kernel-mode faults: the kernel "
                                        "refuses the BTF task helpers)")
        self._python_in_stacks = self._python
        if malloc_shim is not None and os.uname().machine == "x86_64":
            self._python = True         # --malloc reads them too (its own object)
        try:
            self.bpf = bcc.BPF(src_file=str(src / "memtrace.bpf.c").encode(), cflags=cflags)
        except Exception as e:  # bcc raises bare Exception on compile/load/attach failure
            raise MemtraceError(f"loading the BPF program failed: {e}",
                                ExitCode.BPF_LOAD_FAILED) from None
        try:
            finish = self.bpf.load_func(b"finish_exit", bcc.BPF.TRACEPOINT)
            self.bpf["finish_prog"][ctypes.c_int(0)] = ctypes.c_int(finish.fd)
        except Exception as e:  # bcc raises bare Exception on load failure
            raise MemtraceError(f"loading the BPF program failed: {e}",
                                ExitCode.BPF_LOAD_FAILED) from None
        self._targets = self.bpf["targets"]
        self._stats = self.bpf["stats"]
        self._credit = self.bpf["event_credit"]
        self._dirty = (self.bpf["dirty0"], self.bpf["dirty1"])
        self._chunk_batch = ChunkBatch(bcc)
        if (ctypes.sizeof(self._dirty[0].Key), ctypes.sizeof(self._dirty[0].Leaf)) != (
                ChunkBatch.KEY.size, ChunkBatch.VALUE.size):
            raise MemtraceError("bpf/memtrace.h and ChunkBatch disagree on the dirty-chunk "
                                "layout", ExitCode.BPF_LOAD_FAILED)
        self._fault_cache = self.bpf["fault_cache"]
        self._mm_owner = self.bpf["mm_owner"]
        self._tgid_mm = self.bpf["tgid_mm"]
        self._names_gen = self.bpf["names_gen"]
        self._drain_gen = self.bpf["drain_gen"]
        self._gen = 0
        self._carry: dict[int, list[ChunkMark]] = defaultdict(list)
        self.grace_period_mechanism = "membarrier(MEMBARRIER_CMD_GLOBAL)"
        self._ranges: dict[int, list[tuple[int, int]]] = defaultdict(list)
        self._events: list[SyscallEvent] = []
        self.bpf["ranges"].open_ring_buffer(self._on_range)
        self.bpf["events"].open_ring_buffer(self._on_event)
        self._execs: list[int] = []
        self._forks: list[int] = []
        self._notices_lost: Any = None
        if watch_execs:
            self.bpf["execs"].open_ring_buffer(self._on_exec)
            self.bpf["forks"].open_ring_buffer(self._on_fork)
            self._notices_lost = self.bpf["notices_lost"]
        self._stacks: dict[int, list[SampleRecord]] = defaultdict(list)
        # ring callbacks run in drain() and, with --stacks, in the stack reader
        self._rings_lock = threading.Lock()
        self._reader_stop = threading.Event()
        self._reader: threading.Thread | None = None
        if stacks:
            self._start_stacks(stack_period)
        self._malloc: MallocProbes | None = None
        if malloc_shim is not None:
            self._malloc = MallocProbes(bcc, src, malloc_shim, MAX_TARGETS,
                                        python=self._python)

    def _start_stacks(self, period: int) -> None:
        """Fill the gap table BPF draws from, and collect the sampled stacks."""
        gaps = self.bpf["stack_gaps"]
        for i, gap in enumerate(exponential_gaps(period)):
            gaps[gaps.Key(i)] = gaps.Leaf(gap)
        self.stack_weight = sample_weight(period, os.sysconf("SC_PAGE_SIZE"))
        ring = self.bpf["stack_samples"]
        ring.open_ring_buffer(self._on_stack)
        self._reader = threading.Thread(target=self._read_stacks, args=(ring.map_fd,),
                                        name="memtrace-stacks", daemon=True)
        self._reader.start()

    def _read_stacks(self, ring_fd: int) -> None:
        """Read the rings whenever BPF wakes us (every MT_STACKS_WAKE-th sample
        of a process): a burst of faults between two drains would otherwise
        fill the stack ring. A poll on a ring's fd returns while it holds data,
        and blocks until a wakeup once it is empty."""
        poller = select.poll()
        poller.register(ring_fd, select.POLLIN)
        while not self._reader_stop.is_set():
            if poller.poll(200):
                with self._rings_lock:
                    self.bpf.ring_buffer_consume()
                self._reader_stop.wait(STACKS_READER_PAUSE)

    def _on_stack(self, _ctx: Any, data: Any, size: int) -> None:
        # a view of the record where it lies in the ring: no copy of its 8 KiB
        view = memoryview((ctypes.c_char * size).from_address(data))
        rec = decode_stack_sample_in(view, 0, size, self.stack_weight)
        self._stacks[rec.tgid].append(rec)

    def _on_range(self, _ctx: Any, data: Any, size: int) -> None:
        r = decode_range(ctypes.string_at(data, size))
        self._ranges[r.tgid].append((r.start, r.end))

    def _on_event(self, _ctx: Any, data: Any, size: int) -> None:
        self._events.append(decode_event(ctypes.string_at(data, size)))

    def _on_exec(self, _ctx: Any, data: Any, size: int) -> None:
        self._execs.append(ctypes.c_uint32.from_address(data).value)

    def _on_fork(self, _ctx: Any, data: Any, size: int) -> None:
        self._forks.append(ctypes.c_uint32.from_address(data).value)

    def add_target(self, pid: int, brk: int = 0) -> None:
        key = self._targets.Key(pid)
        st = RawStats()
        st.brk = brk
        self._stats[self._stats.Key(pid)] = self._stats.Leaf.from_buffer_copy(bytes(st))
        self._credit[self._credit.Key(pid)] = self._credit.Leaf(EVENT_CREDIT)
        # the value is the process's epoch: its execs from now on, as stats.exec_gen
        self._targets[key] = self._targets.Leaf(0)
        # after the insert: a fault path that remembered pid as not a target
        # (before it was one) sees a new generation and looks again
        gen = self.bpf["targets_gen"]
        gen[gen.Key(0)] = gen.Leaf(gen[gen.Key(0)].value + 1)
        if self._huge_always:
            table = self.bpf["huge_targets"]
            table[table.Key(pid)] = table.Leaf(1)
        if self._malloc is not None:
            self._malloc.add(pid)

    def remove_target(self, pid: int) -> None:
        if self._malloc is not None:
            self._malloc.remove(pid)
        # Collect what the per-CPU fault caches still hold, so that no later
        # fault of this pid is counted against a stale cache entry.
        self._swap()
        for table in (self._targets, self._stats, self._credit, self._tgid_mm):
            with contextlib.suppress(KeyError):
                del table[table.Key(pid)]
        self.set_python(pid, 0, 0)
        if self._stacks_on:
            table = self.bpf["huge_targets"]
            with contextlib.suppress(KeyError):
                del table[table.Key(pid)]
        for k, v in list(self._mm_owner.items()):
            if v.value == pid:
                with contextlib.suppress(KeyError):
                    del self._mm_owner[k]

    def forget_huge_chunks(self, pid: int, keys: Iterable[tuple[int, int]]) -> None:
        """Let the next fault of these (epoch, chunk)s of pid be force-sampled
        again (their pages are gone: a new huge page may come)."""
        if not self._stacks_on:
            return
        table = self.bpf["huge_chunks"]
        for epoch, chunk in keys:
            key = table.Key()
            key.tgid, key.epoch, key.chunk = pid, epoch & 0xFFFFFFFF, chunk
            with contextlib.suppress(KeyError):
                del table[key]

    @property
    def python_frames(self) -> bool:
        """Whether CPython 3.11 frames are read at samples (--stacks, --malloc; x86-64)."""
        return self._python

    def set_python(self, pid: int, epoch: int, runtime: int) -> None:
        """Read the CPython frames of pid's image `epoch` at its samples,
        with _PyRuntime at `runtime` (0: stop reading them)."""
        if not self.python_frames:
            return
        tables = [self.bpf["py_targets"]] if self._python_in_stacks else []
        if self._malloc is not None and self._malloc.python:
            tables.append(self._malloc.bpf["py_targets"])
        for table in tables:
            if not runtime:
                with contextlib.suppress(KeyError):
                    del table[table.Key(pid)]
                continue
            leaf = table.Leaf()
            leaf.runtime = runtime
            leaf.epoch = epoch & 0xFFFFFFFF
            table[table.Key(pid)] = leaf

    def _swap(self) -> None:
        """Start a new drain generation and collect the old one into the carry.

        BPF writes dirty chunks and per-CPU fault counts into the slot of the
        current generation's parity. After the bump, an RCU grace period lets
        every program that still saw the old generation finish; then the old
        slot has no writer and is read whole (nothing lost, nothing twice)."""
        old = self._gen
        self._gen = old + 1
        self._drain_gen[self._drain_gen.Key(0)] = self._drain_gen.Leaf(self._gen)
        self._grace_period()
        dirty = self._dirty[old & 1]
        try:
            marks = self._chunk_batch.drain(dirty.map_fd)
        except OSError:
            marks = []
            for k, v in list(dirty.items()):
                with contextlib.suppress(KeyError):
                    del dirty[k]
                marks.append((k.tgid, k.epoch, k.chunk, v.faults, v.last_addr))
        for tgid, epoch, chunk, faults, last_addr in marks:
            self._carry[tgid].append(ChunkMark(
                chunk=chunk, faults=faults, last_addr=last_addr, epoch=epoch))
        for fc in self._fault_cache[self._fault_cache.Key(old & 1)]:
            if fc.gen == old and fc.pending:
                self._carry[fc.tgid].append(ChunkMark(
                    chunk=fc.chunk, faults=fc.pending, last_addr=fc.last_addr,
                    epoch=fc.epoch))

    def _grace_period(self) -> None:
        if _membarrier_global() != 0:
            # No membarrier (nohz_full, old kernel): BPF programs run for
            # microseconds; a short sleep is a good bound but not a guarantee.
            self.grace_period_mechanism = "sleep 2 ms (membarrier unavailable)"
            time.sleep(0.002)

    def drain(self) -> Drained:
        self._swap()
        with self._rings_lock:
            self.bpf.ring_buffer_consume()
            ranges, self._ranges = dict(self._ranges), defaultdict(list)
            events, self._events = self._events, []
            execs, self._execs = self._execs, []
            forks, self._forks = self._forks, []
            stacks, self._stacks = dict(self._stacks), defaultdict(list)
        chunks, self._carry = dict(self._carry), defaultdict(list)
        stats: dict[int, Stats] = {}
        for k, v in self._stats.items():
            stats[k.value] = decode_stats(RawStats.from_buffer_copy(bytes(v)))
            self._credit[self._credit.Key(k.value)] = self._credit.Leaf(EVENT_CREDIT)
        notices_lost: dict[str, int] = {}
        if self._notices_lost is not None:
            notices_lost = {name: int(self._notices_lost[i].value)
                            for i, name in enumerate(("execs", "forks"))}
        names_gen = int(self._names_gen[0].value)
        drained = Drained(chunks=chunks, ranges=ranges, events=events, stats=stats,
                          names_gen=names_gen, execs=execs, forks=forks,
                          notices_lost=notices_lost, stacks=stacks)
        if self._malloc is not None:
            drained.malloc, drained.malloc_counts = self._malloc.take()
        return drained

    def _detach_quietly(self, tracepoint: bytes) -> None:
        with contextlib.suppress(Exception):
            self.bpf.detach_tracepoint(tracepoint)

    def close(self) -> None:
        if self._reader is not None:
            self._reader_stop.set()
            self._reader.join()
        if self._malloc is not None:
            self._malloc.close()
            self._malloc = None
        # Each detach waits for an RCU grace period; overlapping them halves the
        # time SIGTERM takes.
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(self._detach_quietly, list(self.bpf.tracepoint_fds)))
        # Empty the tail-call slot: a program array whose entries hold programs
        # is freed only after a deferred clear, which a reader opening it by ID
        # (bpftool, tests) can keep postponing; empty, it goes with its last fd.
        with contextlib.suppress(Exception):
            del self.bpf["finish_prog"][ctypes.c_int(0)]
        try:
            self.bpf.cleanup()
        except Exception as e:  # detaching must never turn into a traceback at exit
            log(f"warning: detaching probes: {e}")


# A raw-tracepoint program that reads the task's saved user registers the way
# bpf/memtrace.bpf.c does for kernel-mode faults (MT_STACKS_KERNEL).
_KERNEL_REGS_PROBE = b"""
int probe(void *ctx)
{
    u64 regs = (u64)bpf_task_pt_regs(bpf_get_current_task_btf());
    u64 ip = 0;
    bpf_probe_read_kernel(&ip, sizeof(ip), (void *)(regs + 128));
    return ip != 0;
}
"""


def _kernel_user_regs(bcc: Any) -> bool:
    """Does the kernel let a raw-tracepoint program reach the user registers
    through BTF (bpf_get_current_task_btf, bpf_task_pt_regs)? Tried on a small
    program of its own: a failed load of the main one could leave some of its
    programs attached (bcc attaches as it loads)."""
    try:
        probe = bcc.BPF(text=_KERNEL_REGS_PROBE)
        try:
            probe.load_func(b"probe", bcc.BPF.RAW_TRACEPOINT)
        finally:
            probe.cleanup()
    except Exception as e:  # bcc raises bare Exception on compile/load failure
        debug(f"kernel-mode faults not sampled for --stacks: {e}")
        return False
    return True


_MEMBARRIER_NR = {"x86_64": 324, "aarch64": 283}
_MEMBARRIER_CMD_GLOBAL = 1


def _membarrier_global() -> int:
    """membarrier(MEMBARRIER_CMD_GLOBAL): returns after an RCU grace period,
    i.e. once every BPF program that was running has finished. 0 on success."""
    nr = _MEMBARRIER_NR.get(os.uname().machine)
    if nr is None:
        return -1
    return int(_libc().syscall(nr, _MEMBARRIER_CMD_GLOBAL, 0, 0))


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def read_stats_of(probes: Probes, pid: int) -> Stats:
    """Current BPF counters of one target (zeros if none yet)."""
    table = probes._stats
    try:
        raw = table[table.Key(pid)]
    except KeyError:
        return Stats.empty()
    return decode_stats(RawStats.from_buffer_copy(bytes(raw)))
