"""--malloc's BPF side (docs/malloc.md): bpf/malloc.bpf.c, loaded with the bcc
module that trace/probes.py (the only module that imports bcc) hands in."""

from __future__ import annotations

import contextlib
import functools
import os
import select
import threading
from pathlib import Path
from typing import Any

from memtrace.errors import ExitCode, MemtraceError
from memtrace.trace.mallocevents import (
    MALLOC_COUNTS,
    MallocRecord,
    SampleBacklog,
    decode_malloc_free,
    decode_malloc_sample,
)
from memtrace.trace.pyoffsets import PY311_X86_64
from memtrace.util.log import log

MALLOC_PAGES = 8192     # 32 MiB: ~4000 sampled allocations (8 KiB of stack each) between reads
MALLOC_READER_PAUSE = 0.01  # s: the --malloc reader's rest after each read
# sampled allocations held between two ticks (mallocevents.SampleBacklog):
# with their stack copies up to these bytes, then this many without
MALLOC_BACKLOG_BYTES = 128 << 20
MALLOC_BACKLOG_STACKLESS = 250_000


class MallocProbes:
    """--malloc (docs/malloc.md): bpf/malloc.bpf.c, its own BPF object, with
    uprobes on the preloaded sampler's two probed functions; a reader thread
    empties its rings as they fill (a burst of samples between two drains)."""

    def __init__(self, bcc: Any, src: Path, shim: str, max_targets: int,
                 python: bool = False) -> None:
        cflags = [f"-I{src}", f"-DMT_PAGE_SIZE={os.sysconf('SC_PAGE_SIZE')}",
                  f"-DMT_MAX_TARGETS={max_targets}", f"-DMT_MALLOC_PAGES={MALLOC_PAGES}",
                  "-Wno-macro-redefined"]
        self.python = python
        if python:
            cflags += PY311_X86_64.bpf_defines()         # CPython 3.11 frames
        try:
            self.bpf = bcc.BPF(src_file=str(src / "malloc.bpf.c").encode(), cflags=cflags)
            for sym, fn in ((b"memtrace_malloc_sampled", b"on_malloc_sampled"),
                            (b"memtrace_malloc_freed", b"on_malloc_freed")):
                self.bpf.attach_uprobe(name=shim.encode(), sym=sym, fn_name=fn)
        except Exception as e:  # bcc raises bare Exception on compile/load/attach failure
            raise MemtraceError(f"loading the --malloc probes failed: {e}",
                                ExitCode.BPF_LOAD_FAILED) from None
        self._targets = self.bpf["malloc_targets"]
        self._counts = self.bpf["malloc_counts"]
        self._backlog = SampleBacklog(MALLOC_BACKLOG_BYTES, MALLOC_BACKLOG_STACKLESS)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        fds = []
        for ring, decode in (("malloc_samples", decode_malloc_sample),
                             ("malloc_frees", decode_malloc_free)):
            self.bpf[ring].open_ring_buffer(functools.partial(self._on_record, decode))
            fds.append(self.bpf[ring].map_fd)
        self._reader = threading.Thread(target=self._read, args=(fds,),
                                        name="memtrace-malloc", daemon=True)
        self._reader.start()

    def _on_record(self, decode: Any, _ctx: Any, data: Any, size: int) -> None:
        if decode is decode_malloc_sample and self._backlog.stacks_full():
            self._backlog.add(decode(data, size, with_stack=False))   # no copy of its stack
            return
        self._backlog.add(decode(data, size))

    def _read(self, fds: list[int]) -> None:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        while not self._stop.is_set():
            if poller.poll(200):
                with self._lock:
                    self.bpf.ring_buffer_consume()
                self._stop.wait(MALLOC_READER_PAUSE)

    def add(self, pid: int) -> None:
        self._targets[self._targets.Key(pid)] = self._targets.Leaf(1)

    def remove(self, pid: int) -> None:
        with contextlib.suppress(KeyError):
            del self._targets[self._targets.Key(pid)]

    def take(self) -> tuple[dict[int, list[MallocRecord]], dict[str, int]]:
        """The records read since the last take, by process, and the loss
        counters (totals since load)."""
        with self._lock:
            self.bpf.ring_buffer_consume()
            records = self._backlog.take()
            dropped = self._backlog.dropped
        counts = {name: int(self._counts[i].value) for i, name in enumerate(MALLOC_COUNTS)}
        counts["lost"] += dropped
        return records, counts

    def close(self) -> None:
        self._stop.set()
        self._reader.join()
        try:
            self.bpf.cleanup()
        except Exception as e:  # detaching must never turn into a traceback at exit
            log(f"warning: detaching the --malloc probes: {e}")
