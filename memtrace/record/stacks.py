"""The stack profile in a recording (--stacks): `{"stacks": {...}}` lines that
keep each process's whole profile (every stack's bytes held now and brought
in), so that a report can draw the flame graph at any moment, the peak first.

A line stores only what changed since the previous stacks line of its pid:

    {"stacks": {"pid", "ts", "comm", "period_bytes", "lost", "whole",
                "frames": [[fid, function, module, address, offset, build_id], ...],
                "new": [[sid, [fid, ...], mapping, kind], ...],
                "held": [[sid, bytes], ...], "brought": [[sid, bytes, samples], ...],
                "gone": [sid, ...]}}

Frames and stacks are interned once per recording (ids shared by every pid):
"frames" and "new" define the ones first used by this line, leaf first. A
(stack, mapping) pair's figure is written again only when it moved by more
than 1/CHANGE_FRACTION of itself and more than a page, so a process whose heap grows
a little every tick does not rewrite its 10k stacks each time; `whole` lines
(a pid's first, every `full_every`th, and the one after a dropped line) list
every pair exactly and replace what the reader had for that pid. A pair
left out of the profile (gone with its mapping, or an exec) is in "gone".

StackLineEncoder writes these lines (record/writer.py); StackTimeline reads
them back into StackProfiles (profiles_at: at a given time)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from memtrace.stacks.profile import Frame, Stack, StackProfile, StackSample
from memtrace.stacks.summary import FRAMES_MAX, frame_text

# A figure is rewritten when it moved by more than this part of itself (or by
# PAGE bytes for small ones): the flame graph's widths stay within 1.6 %.
CHANGE_FRACTION = 64            # 1/64
PAGE = 4096

Entry = tuple[tuple[int, ...], str, str]     # (frame ids, mapping, kind)
TextKey = tuple[tuple[str, ...], str, str]   # (frames as a snapshot prints them, mapping, kind)


def capped(frames: list[str]) -> list[str]:
    """A stack's frames as a snapshot's `stacks` entry lists them."""
    return frames if len(frames) <= FRAMES_MAX else frames[:FRAMES_MAX - 1] + ["[...]"]


@dataclass
class Defined:
    """What one line defined (undone when the line could not be written)."""

    frames: list[Frame] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    texts: list[TextKey] = field(default_factory=list)


def moved(old: int, new: int) -> bool:
    """Whether a figure that was `old` when last written is worth writing again."""
    if old == new:
        return False
    if old == 0 or new == 0:
        return True
    return abs(new - old) * CHANGE_FRACTION > max(old, PAGE * CHANGE_FRACTION)


@dataclass
class _PidState:
    last: dict[int, list[int]] = field(default_factory=dict)   # sid -> [held, brought, samples]
    # (id(stack), mapping, kind) -> (the stack, kept alive so its id is not reused; sid)
    cache: dict[tuple[int, str, str], tuple[Stack, int]] = field(default_factory=dict)
    profile: StackProfile | None = None
    since_whole: int = 0


class StackLineEncoder:
    """The stacks lines of one recording (see the module)."""

    def __init__(self, full_every: int = 0) -> None:
        self.full_every = full_every
        self._frames: dict[Frame, int] = {}
        self._text: dict[int, str] = {}              # frame id -> frame_text
        self._entries: dict[Entry, int] = {}
        self._by_text: dict[TextKey, int] = {}       # for compact()
        self._next_frame = 0
        self._next_entry = 0
        self._pids: dict[int, _PidState] = {}

    def line(self, profile: StackProfile) -> tuple[dict[str, Any], Defined] | None:
        """The line for `profile` (None when it is the one written last for its
        pid: nothing changed), with what it defines (for undo() if the line
        could not be written)."""
        st = self._pids.setdefault(profile.pid, _PidState())
        if profile is st.profile:
            return None
        n = st.since_whole + 1
        whole = st.profile is None or bool(self.full_every and n >= self.full_every)
        st.since_whole = 0 if whole else n
        st.profile = profile
        defined = Defined()
        defs: list[list[Any]] = []
        old_cache = st.cache
        cache: dict[tuple[int, str, str], tuple[Stack, int]] = {}
        now: dict[int, tuple[int, int, int]] = {}
        for s in profile.samples:       # 10k stacks: kept to plain lookups
            key = (id(s.stack), s.mapping, s.kind)
            hit = old_cache.get(key)
            if hit is None:
                hit = (s.stack, self._entry(s, defined, defs))
            cache[key] = hit
            sid = hit[1]
            if sid in now:      # two stacks that print the same (the same frames)
                h, b, k = now[sid]
                now[sid] = (h + s.held_bytes, b + s.brought_bytes, k + s.samples)
            else:
                now[sid] = (s.held_bytes, s.brought_bytes, s.samples)
        st.cache = cache
        held: list[list[int]] = []
        brought: list[list[int]] = []
        last = st.last
        floor = PAGE * CHANGE_FRACTION
        for sid, (h, b, k) in now.items():
            old = last.get(sid)
            if whole or old is None:
                if h:
                    held.append([sid, h])
                if b or k:
                    brought.append([sid, b, k])
                last[sid] = [h, b, k]
                continue
            # moved(), inlined: this loop runs for every stack of every tick
            o = old[0]
            if h != o and (not o or not h or abs(h - o) * CHANGE_FRACTION > max(o, floor)):
                held.append([sid, h])
                old[0] = h
            o = old[1]
            if b != o and (not o or not b or abs(b - o) * CHANGE_FRACTION > max(o, floor)):
                brought.append([sid, b, k])
                old[1], old[2] = b, k
        gone = [sid for sid in st.last if sid not in now]
        for sid in gone:
            del st.last[sid]
        out: dict[str, Any] = {
            "pid": profile.pid, "ts": profile.ts, "comm": profile.comm,
            "period_bytes": profile.sample_period_bytes, "lost": profile.samples_lost,
            "whole": whole,
            "frames": [[self._frames[f], f.function, f.module, f.address, f.offset,
                        f.build_id] for f in defined.frames],
            "new": defs, "held": held, "brought": brought,
            "gone": [] if whole else gone}
        return out, defined

    def _entry(self, s: StackSample, defined: Defined, defs: list[list[Any]]) -> int:
        fids = []
        for f in s.stack.frames:
            fid = self._frames.get(f)
            if fid is None:
                fid = self._frames[f] = self._next_frame
                self._text[fid] = frame_text(f.function, f.module)
                self._next_frame += 1
                defined.frames.append(f)
            fids.append(fid)
        entry = (tuple(fids), s.mapping, s.kind)
        sid = self._entries.get(entry)
        if sid is None:
            sid = self._entries[entry] = self._next_entry
            self._next_entry += 1
            defined.entries.append(entry)
            defs.append([sid, list(entry[0]), s.mapping, s.kind])
            text = (tuple(capped([self._text[f] for f in fids])), s.mapping, s.kind)
            if text not in self._by_text:
                self._by_text[text] = sid
                defined.texts.append(text)
        return sid

    def undo(self, pid: int, defined: Defined) -> None:
        """The line could not be written: what it defined is defined again by
        the next line that uses it, and the pid's next line is whole."""
        for f in defined.frames:
            self._text.pop(self._frames.pop(f), None)
        for e in defined.entries:
            self._entries.pop(e, None)
        for t in defined.texts:
            self._by_text.pop(t, None)
        self._pids.pop(pid, None)

    def compact(self, summary: dict[str, Any]) -> dict[str, Any]:
        """A snapshot's `stacks` object with each entry's frames replaced by
        the id of a stack already written ("stack": sid): the top stacks of
        every snapshot cost their figures, not their frames, in a recording.
        Entries of stacks not written (yet) keep their frames."""
        out = dict(summary)
        for measure in ("held", "brought"):
            entries = summary.get(measure)
            if not entries:
                continue
            compacted = []
            for e in entries:
                sid = self._by_text.get((tuple(e["frames"]), e["mapping"], e["kind"]))
                if sid is None:
                    compacted.append(e)
                else:
                    compacted.append({k: v for k, v in e.items() if k != "frames"}
                                     | {"stack": sid})
            out[measure] = compacted
        return out

    def forget(self, pid: int) -> None:
        """pid is no longer watched (its stacks stay defined for other pids)."""
        self._pids.pop(pid, None)


class StackNames:
    """The frames of every stack defined so far, as a snapshot prints them:
    what the reader puts back into compacted `stacks` entries."""

    def __init__(self) -> None:
        self._text: dict[int, str] = {}
        self._stacks: dict[int, list[str]] = {}

    def feed(self, data: dict[str, Any]) -> None:
        for fid, function, module, *_ in data.get("frames", ()):
            self._text[int(fid)] = frame_text(str(function), str(module))
        for sid, fids, *_ in data.get("new", ()):
            self._stacks[int(sid)] = capped([self._text[int(f)] for f in fids])
        for measure in ("held", "brought"):
            for sid, *_ in data.get(measure, ()):
                if int(sid) not in self._stacks:
                    raise KeyError(f"stack {sid} used before its definition")

    def expand(self, summary: Any) -> None:
        """Put the frames back into `summary`'s entries that name a stack id."""
        if not isinstance(summary, dict):
            return
        for measure in ("held", "brought"):
            for e in summary.get(measure) or ():
                if "stack" in e and "frames" not in e:
                    sid = int(e.pop("stack"))
                    if sid not in self._stacks:
                        raise KeyError(f"stack {sid} used before its definition")
                    e["frames"] = list(self._stacks[sid])


@dataclass
class _Held:
    comm: str = ""
    ts: float = 0.0
    period: int = 0
    lost: int = 0
    figures: dict[int, list[int]] = field(default_factory=dict)  # sid -> [held, brought, samples]


class StackTimeline:
    """Stacks lines read back, in order: the profile of every pid as of the
    last line fed (feed() each `stacks` record's data)."""

    def __init__(self) -> None:
        self._frames: dict[int, Frame] = {}
        self._entries: dict[int, tuple[Stack, str, str]] = {}
        self._pids: dict[int, _Held] = {}

    def feed(self, data: dict[str, Any]) -> None:
        for fid, function, module, address, offset, build_id in data.get("frames", ()):
            self._frames[int(fid)] = Frame(int(address), str(function), str(module),
                                           int(offset), build_id)
        for sid, fids, mapping, kind in data.get("new", ()):
            stack = Stack(tuple(self._frames[int(f)] for f in fids))
            self._entries[int(sid)] = (stack, str(mapping), str(kind))
        pid = int(data["pid"])
        held = self._pids.get(pid)
        if held is None and not data.get("whole"):
            raise KeyError(f"changes to the stacks of pid {pid} before a whole line")
        if held is None or data.get("whole"):
            held = self._pids[pid] = _Held()
        held.comm, held.ts = str(data.get("comm", "")), float(data["ts"])
        held.period, held.lost = int(data.get("period_bytes", 0)), int(data.get("lost", 0))
        figures = held.figures
        for sid in data.get("gone", ()):
            figures.pop(int(sid), None)
        for sid, nbytes in data.get("held", ()):
            self._cell(figures, int(sid))[0] = int(nbytes)
        for sid, nbytes, samples in data.get("brought", ()):
            cell = self._cell(figures, int(sid))
            cell[1], cell[2] = int(nbytes), int(samples)

    def _cell(self, figures: dict[int, list[int]], sid: int) -> list[int]:
        if sid not in self._entries:
            raise KeyError(f"stack {sid} used before its definition")
        cell = figures.get(sid)
        if cell is None:
            cell = figures[sid] = [0, 0, 0]
        return cell

    def pids(self) -> list[int]:
        return sorted(self._pids)

    def forget(self, pid: int) -> None:
        self._pids.pop(pid, None)

    def profile(self, pid: int) -> StackProfile | None:
        """The profile of pid as of the last line fed (None: no stacks line yet)."""
        held = self._pids.get(pid)
        if held is None:
            return None
        samples = []
        for sid, (h, b, k) in held.figures.items():
            stack, mapping, kind = self._entries[sid]
            samples.append(StackSample(stack, mapping, kind, h, b, k))
        samples.sort(key=lambda s: (-s.held_bytes, -s.brought_bytes))
        return StackProfile(pid, held.comm, held.ts, samples,
                            sample_period_bytes=held.period, samples_lost=held.lost)


def profiles_at(path: str, ts: float | None = None,
                upto_bytes: int | None = None) -> dict[int, StackProfile]:
    """The stack profile of every pid of the recording at `path` as of time
    `ts` (the last stacks line of each pid at or before it; None: the end).
    Only the stacks lines are decoded; the reading stops at a line cut short,
    at a stacks line that does not read, and at `upto_bytes` (where a reader
    of the whole recording stopped: Recording.bytes_read). Empty without
    --stacks."""
    from memtrace.record.reader import open_recording

    rec = open_recording(path)      # the header checked
    timeline = StackTimeline()
    offset = rec.bytes_read
    try:
        for raw in rec.file:
            offset += len(raw)
            if not raw.endswith(b"\n") or (upto_bytes is not None and offset > upto_bytes):
                break
            if not raw.startswith(b'{"stacks":'):
                continue
            data = json.loads(raw)["stacks"]
            if ts is not None and float(data["ts"]) > ts:
                break
            timeline.feed(data)
    except (ValueError, KeyError, TypeError, IndexError):
        pass            # a stacks line that does not read: the profiles before it
    finally:
        rec.file.close()
    return {pid: p for pid in timeline.pids() if (p := timeline.profile(pid)) is not None}
