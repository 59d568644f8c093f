"""The background heap walker process of watch/run/agent (`python -m
memtrace.heap`): one pid a line on stdin, one compact summary of its heap a
line on stdout."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
from typing import Any

from memtrace.heap.analysis import WalkMemo
from memtrace.heap.layout import HeapError
from memtrace.heap.process import analyse_process

# Figures summed per arena kind for the `heap` key of watch/run snapshots and for
# the memtrace_heap_* metrics.
KIND_FIELDS = ("size_bytes", "resident_bytes", "in_use_bytes", "malloc_in_use_bytes",
               "free_bytes", "free_resident_bytes", "tcache_bytes", "fastbin_bytes",
               "top_chunk_bytes", "trimmable_bytes")
ARENA_KINDS = ("main", "thread")
SAMPLER_RETRIES = 3
# Processes whose last walk is remembered, least recent forgotten first; and the
# most maps text they may hold (a parse costs ~6x its text: 60k mappings, 3 MB).
MEMOS_KEPT = 256
MEMO_TEXT_BYTES = 16 << 20


def heap_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The compact form of a report, for the `heap` key of a snapshot: figures
    summed per arena kind (both kinds always present, 0 when there is none)."""
    if not report.get("supported"):
        return {"status": "unsupported", "allocator": report.get("allocator"),
                "supported": False, "reason": report.get("reason")}
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in ARENA_KINDS:
        arenas = [a for a in report["arenas"] if a["kind"] == kind]
        row: dict[str, Any] = {"arenas": len(arenas)}
        row.update({k: sum(a[k] for a in arenas) for k in KIND_FIELDS})
        row["top_pinned"] = any(a["top_pinned"] for a in arenas)
        by_kind[kind] = row
    mm = report["mmapped"]
    return {
        "status": "ok", "allocator": "glibc", "supported": True,
        "glibc_version": report.get("glibc_version"),
        "by_kind": by_kind,
        "totals": {k: report["totals"][k] for k in KIND_FIELDS},
        "mmapped": {k: mm[k] for k in ("count", "bytes", "resident_bytes", "threshold_bytes")},
        "verdict": report["verdict"],
        "attempts": report["attempts"],
        "analysis_seconds": round(report["analysis_seconds"], 6),
    }


def sample_once(pid: int, retries: int = SAMPLER_RETRIES, memo: WalkMemo | None = None,
                layout: int = 0) -> dict[str, Any]:
    """One walk of a live process, never stopped; the summary, or why there is none
    (`status`: ok, unsupported, failed, gone). `memo`: the last walk's (updated);
    `layout`: the watch loop's token of the VMA list (SnapshotBuilder's layout_token)."""
    try:
        return heap_summary(analyse_process(pid, stop=False, retries=retries, memo=memo,
                                            layout_token=layout))
    except HeapError as e:
        return {"status": "gone" if e.kind == "gone" else "failed", "reason": e.message}
    except OSError as e:
        why = ("cannot read its memory (needs root or CAP_SYS_PTRACE)"
               if e.errno in (errno.EPERM, errno.EACCES) else f"cannot read it: {e}")
        gone = e.errno in (errno.ESRCH, errno.ENOENT) and not os.path.exists(f"/proc/{pid}")
        return {"status": "gone" if gone else "failed", "reason": "process exited" if gone
                else why}
    except Exception as e:  # a walk must never take watch down
        return {"status": "failed", "reason": f"internal error: {type(e).__name__}: {e}"}


def worker_main() -> None:
    """The walker process: "pid [layout token]" a line on stdin, one JSON summary
    a line on stdout. Runs at nice 19 so that walks yield the CPU to the targets."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(19)
    memos: dict[int, WalkMemo] = {}
    for line in sys.stdin:
        try:
            pid, layout = (int(x) for x in (line.split() + ["0"])[:2])
        except ValueError:
            continue
        summary = sample_once(pid, memo=_memo_for(memos, pid), layout=layout)
        if summary["status"] != "ok":
            memos.pop(pid, None)
        sys.stdout.write(json.dumps(summary) + "\n")
        sys.stdout.flush()


def _memo_for(memos: dict[int, WalkMemo], pid: int) -> WalkMemo:
    """pid's memo, made most recent (a reused pid's is harmless: hints only)."""
    memo = memos.pop(pid, None) or WalkMemo()
    memos[pid] = memo
    while len(memos) > 1 and (len(memos) > MEMOS_KEPT or sum(
            len(m.maps_text) for m in memos.values()) > MEMO_TEXT_BYTES):
        del memos[next(iter(memos))]
    return memo
