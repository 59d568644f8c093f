"""The `.mtrace` recording format, version 1 (docs/recording.md).

A recording is JSON Lines, appended and written whole line by line, so that a
recorder killed at any time leaves a file that reads up to its last whole line:

- line 1, the header: {"memtrace_recording": 1, ...} (HEADER_KEYS);
- snapshot lines, as `--format json --changed-only --full-every N` writes them
  (docs/output.md): a process's first snapshot and every Nth are whole;
- other lines are objects with one of RECORD_KINDS as their first key:
  {"message": TEXT, "ts": T}, {"summary": {...}} (run's), {"dropped": {...}}
  (snapshots the writer could not keep up with: the next one of that pid is whole),
  {"end": {...}} (the last line of a recording that was closed, not killed),
  {"stacks": {...}} (--stacks: what changed in a process's stack profile since
  its previous stacks line; record/stacks.py).
"""

from __future__ import annotations

FORMAT_VERSION = 1
MAGIC_KEY = "memtrace_recording"
SUFFIX = ".mtrace"

# whole snapshots at least this often per process (1 s interval: every 10 min), so
# that a corrupt line costs at most this much of the rest of one process's record
DEFAULT_FULL_EVERY = 600

HEADER_KEYS = (
    MAGIC_KEY,          # FORMAT_VERSION
    "memtrace_version",
    "created_ts",       # time.time() at start
    "hostname",
    "kernel",           # uname release
    "page_size",
    "interval_seconds",
    "full_every",
    "mode",             # "run" | "watch" | "agent"
    "command",          # run/record: argv; else null
    "pids",             # watch: the PIDs asked for; else []
    "options",          # what was on: stacks, stacks_period, malloc, pss, heap
)

RECORD_KINDS = ("message", "summary", "dropped", "end", "stacks")
