"""--stacks in a recording (memtrace.record.stacks): the stacks lines read back
into the profiles that were written (exactly at whole lines, within the change
threshold between them), at any time; a stack's frames are written once; a line
that could not be written is made up for by a whole one; the snapshots' top
stacks read back with their frames; Tee closes the recording whatever the view
does."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from memtrace.record.gzipped import decompressed
from memtrace.record.reader import open_recording
from memtrace.record.stacks import CHANGE_FRACTION, StackLineEncoder, moved, profiles_at
from memtrace.record.writer import RecordingWriter, Tee, make_header, open_recording_output
from memtrace.reporter import Reporter
from memtrace.stacks.profile import Frame, Stack, StackProfile, StackSample
from memtrace.stacks.summary import stacks_summary

MAPPINGS = [("[heap]", "heap"), ("[anon]", "anon"), ("/usr/lib/libc.so.6", "library")]


def _stacks(n: int, rng: random.Random) -> list[Stack]:
    common = [Frame(0x1000 + i, f"root{i}", "/bin/prog", i, "ab") for i in range(3)]
    out = []
    for i in range(n):
        leaf = [Frame(0x7000 + 16 * i + j, f"f{i}_{j}", "/bin/prog", j, None)
                for j in range(rng.randint(1, 5))]
        out.append(Stack(tuple(leaf + common)))
    return out


class _Process:
    """A process whose stacks hold and bring in bytes that change tick by tick."""

    def __init__(self, pid: int, n: int, seed: int = 1) -> None:
        self.pid = pid
        self.rng = random.Random(seed)
        self.stacks = _stacks(n, self.rng)
        self.figures = {(i, MAPPINGS[i % 3]): [self.rng.randint(1, 400) * 4096, 0, 0]
                        for i in range(n)}
        self.ts = 1000.0

    def tick(self, changes: int) -> StackProfile:
        self.ts += 1.0
        keys = list(self.figures)
        for key in self.rng.sample(keys, min(changes, len(keys))):
            cell = self.figures[key]
            cell[0] = max(0, cell[0] + self.rng.choice([-1, 1]) * self.rng.randint(0, 64) * 4096)
            cell[1] += self.rng.randint(0, 64) * 4096
            cell[2] += 1
        samples = [StackSample(self.stacks[i], m, k, h, b, s)
                   for (i, (m, k)), (h, b, s) in self.figures.items() if h or b or s]
        return StackProfile(self.pid, "prog", self.ts, samples, 65536, 0)


def _snap(profile: StackProfile) -> dict[str, Any]:
    return {"ts": profile.ts, "pid": profile.pid, "comm": profile.comm,
            "rss_bytes": profile.held_total(),
            "mappings": [{"start": 4096, "end": 8192, "rss_bytes": 4096}],
            "stacks": stacks_summary(profile)}


def _figures(profile: StackProfile) -> dict[tuple[Any, ...], tuple[int, int, int]]:
    out: dict[tuple[Any, ...], tuple[int, int, int]] = {}
    for s in profile.samples:
        key = (s.stack.frames, s.mapping, s.kind)
        h, b, k = out.get(key, (0, 0, 0))
        out[key] = (h + s.held_bytes, b + s.brought_bytes, k + s.samples)
    return out


def _close_enough(got: StackProfile, want: StackProfile) -> None:
    g, w = _figures(got), _figures(want)
    assert set(g) <= set(w)
    for key, (h, b, _) in w.items():
        gh, gb, _ = g.get(key, (0, 0, 0))
        assert not moved(gh, h) and not moved(gb, b), (key, (gh, gb), (h, b))


def _read(path: str) -> bytes:
    return decompressed(path)


def _writer(path: str, full_every: int = 600, compress: bool = True) -> RecordingWriter:
    return RecordingWriter(open_recording_output(path),
                           make_header("run", 1.0, command=["prog"], full_every=full_every),
                           compress=compress)


def _write(writer: RecordingWriter, profile: StackProfile) -> dict[str, Any]:
    snap = _snap(profile)
    writer.stack_profile(profile)
    writer.snapshot(snap)
    writer.tick_done()
    return snap


def test_profiles_read_back_at_any_time(tmp_path):  # type: ignore[no-untyped-def]
    path = str(tmp_path / "s.mtrace")
    writer = _writer(path, full_every=5)
    procs = [_Process(10, 300, 1), _Process(11, 50, 2)]
    written: list[dict[int, StackProfile]] = []
    for t in range(12):
        now = {}
        for p in procs:
            now[p.pid] = prof = p.tick(changes=30 if t else 0)
            _write(writer, prof)
        written.append(now)
    writer.close()
    for t in (0, 4, 7, 11):
        got = profiles_at(path, written[t][10].ts)
        assert sorted(got) == [10, 11]
        for pid in (10, 11):
            _close_enough(got[pid], written[t][pid])
            assert got[pid].ts == written[t][pid].ts
    # at a whole line (the first, then every 5th of a pid) the figures are exact
    for t in (0, 5, 10):
        got = profiles_at(path, written[t][10].ts)
        assert _figures(got[10]) == {k: v for k, v in _figures(written[t][10]).items()
                                     if any(v)}
    assert profiles_at(path, 0.0) == {}


def test_frames_are_written_once_and_unchanged_profiles_not_at_all(tmp_path):  # type: ignore[no-untyped-def]
    path = str(tmp_path / "s.mtrace")
    writer = _writer(path)
    proc = _Process(10, 200)
    first = proc.tick(0)
    for _ in range(3):
        _write(writer, first)           # the same object: an idle process
    for _ in range(5):
        _write(writer, proc.tick(changes=5))
    writer.close()
    lines = [json.loads(raw) for raw in _read(path).splitlines()]
    stacks = [ln["stacks"] for ln in lines if next(iter(ln)) == "stacks"]
    assert len(stacks) == 6                 # one for `first`, then one a tick
    frames = [f[0] for s in stacks for f in s["frames"]]
    assert len(frames) == len(set(frames)) == len({f for st in proc.stacks for f in st.frames})
    assert stacks[0]["whole"] and not any(s["whole"] for s in stacks[1:])
    # a tick that changed 5 stacks writes at most their figures
    assert all(len(s["held"]) <= 5 and len(s["brought"]) <= 5 and not s["new"]
               for s in stacks[1:])


def test_small_moves_are_not_rewritten():  # type: ignore[no-untyped-def]
    big = 64 << 20
    assert not moved(big, big + big // CHANGE_FRACTION - 1)
    assert moved(big, big + big // CHANGE_FRACTION + 4096)
    assert moved(4096, 0) and moved(0, 4096) and not moved(4096, 4096)
    assert not moved(8192, 12288)       # below 64 pages: a page's move is not worth it
    enc = StackLineEncoder()
    proc = _Process(10, 20)
    enc.line(proc.tick(0))
    prof = proc.tick(0)
    for s in prof.samples:
        s.held_bytes += 4096            # every stack a page more
    got = enc.line(prof)
    assert got is not None and got[0]["held"] == [] and got[0]["brought"] == []


def test_gone_stacks_and_a_new_image(tmp_path):  # type: ignore[no-untyped-def]
    path = str(tmp_path / "s.mtrace")
    writer = _writer(path)
    proc = _Process(10, 30)
    _write(writer, proc.tick(0))
    for key in list(proc.figures)[:10]:
        del proc.figures[key]           # their mapping is gone
    after = proc.tick(0)
    _write(writer, after)
    exec_ = _Process(10, 5, seed=9)     # an exec: other stacks entirely
    exec_.ts = after.ts
    new_image = exec_.tick(0)
    _write(writer, new_image)
    writer.close()
    assert _figures(profiles_at(path, after.ts)[10]) == _figures(after)
    assert _figures(profiles_at(path)[10]) == _figures(new_image)


def test_a_stacks_line_not_written_is_made_up_for(tmp_path):  # type: ignore[no-untyped-def]
    path = str(tmp_path / "s.mtrace")
    stream = open_recording_output(path)
    writer = RecordingWriter(stream, make_header("run", 1.0, full_every=0), compress=False)
    proc = _Process(10, 40)
    real = stream.write_record
    _write(writer, proc.tick(0))
    # the stacks line of the 2nd tick is dropped (the queue was full), with the
    # stacks it defined for the first time
    proc.stacks[0] = Stack((Frame(1, "brand_new", "/bin/prog"),))
    dropping = iter([False, True])
    stream.write_record = lambda parts: real(parts) if next(dropping) else False  # type: ignore[method-assign]
    second = proc.tick(10)
    snap = _write(writer, second)
    stream.write_record = real  # type: ignore[method-assign]
    third = proc.tick(10)
    _write(writer, third)
    writer.close()
    rec = open_recording(path)
    snaps = list(rec.snapshots())
    assert rec.problem is None and len(snaps) == 3
    assert snaps[1]["stacks"] == json.loads(json.dumps(snap["stacks"]))   # frames kept
    lines = [json.loads(raw) for raw in _read(path).splitlines()]
    assert [ln["stacks"]["whole"] for ln in lines if next(iter(ln)) == "stacks"] == [True, True]
    assert _figures(profiles_at(path)[10]) == _figures(third)


def test_snapshots_read_back_with_their_top_stacks(tmp_path):  # type: ignore[no-untyped-def]
    path = str(tmp_path / "s.mtrace")
    writer = _writer(path, compress=False)
    proc = _Process(10, 100)
    snaps = [_write(writer, proc.tick(20)) for _ in range(4)]
    writer.close()
    raw = _read(path)
    # the top stacks name the stacks by id: their frames are in the stacks lines only
    assert raw.count(b'"f0_0 (prog)"') <= 1
    got = list(open_recording(path).snapshots())
    assert got == json.loads(json.dumps(snaps))
    for s in snaps:    # the view's snapshot was left as it was
        assert all("frames" in e for e in s["stacks"]["held"])


def test_an_undefined_stack_is_a_corrupt_line(tmp_path):  # type: ignore[no-untyped-def]
    path = str(tmp_path / "s.mtrace")
    writer = _writer(path, compress=False)
    proc = _Process(10, 10)
    for _ in range(3):
        _write(writer, proc.tick(5))
    writer.close()
    lines = _read(path).split(b"\n")
    assert b'"stacks"' in lines[1]
    lines[1] = b'{"message":"x","ts":1}'        # the first stacks line lost
    (tmp_path / "s.mtrace").write_bytes(b"\n".join(lines))
    rec = open_recording(path)
    assert list(rec.snapshots()) == []
    assert rec.corrupt and rec.problem and "corrupt line 3" in rec.problem
    assert profiles_at(path) == {}          # read up to there, no traceback
    lines[1] = lines[3]                         # a stacks line naming undefined stacks
    (tmp_path / "s.mtrace").write_bytes(b"\n".join(lines))
    rec = open_recording(path)
    assert [r.kind for r in rec.records()] == [] and rec.corrupt
    assert profiles_at(path) == {}


class _Failing(Reporter):
    def close(self) -> None:
        raise OSError("the view's output failed")


def test_tee_closes_the_recording_when_the_view_fails(tmp_path):  # type: ignore[no-untyped-def]
    path = str(tmp_path / "t.mtrace")
    tee = Tee(_Failing(), _writer(path))
    assert tee.wants_stack_profiles and tee.wants_json_text
    tee.detached(42, "exited")
    with pytest.raises(OSError):
        tee.close()
    rec = open_recording(path)
    records = list(rec.records())
    assert [r.kind for r in records] == ["message", "end"] and rec.ended
    assert records[0].data == "pid 42 exited"
