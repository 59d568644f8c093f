"""Snapshots have the shape memtrace/snapshot.py declares (SnapshotRecord,
MappingRecord): every key declared, every required key present, every value
of its declared type. Checked on the golden snapshots and on snapshots built
from a fixture process."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

from memtrace.snapshot import MappingRecord, SnapshotRecord, snapshot

from .fakes import standard_process

GOLDEN = Path(__file__).parent / "golden" / "snapshot.json"


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin is dict:
        key, val = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _fits(k, key) and _fits(v, val) for k, v in value.items())
    if hint is Any:
        return True
    if typing.is_typeddict(hint):
        return not _misfits(value, hint)
    return isinstance(value, hint)


def _misfits(record: dict[str, Any], shape: Any) -> list[str]:
    hints = typing.get_type_hints(shape)
    wrong = [f"undeclared key {k!r}" for k in record if k not in hints]
    wrong += [f"missing key {k!r}" for k in shape.__required_keys__ if k not in record]
    wrong += [f"{k}={record[k]!r} is not {hints[k]}" for k in record
              if k in hints and not _fits(record[k], hints[k])]
    return wrong


def test_golden_snapshots_have_the_declared_shape():
    for name, snap in json.loads(GOLDEN.read_text()).items():
        assert _misfits(snap, SnapshotRecord) == [], name


def test_built_snapshots_have_the_declared_shape(world):
    p, _maps = standard_process(world)
    from memtrace.trace.tracker import ProcessTracker

    tr = ProcessTracker(p.pid, world.procfs())
    tr.start()
    snap = snapshot(tr, 1.0)
    assert snap["mappings"], "the fixture has mappings"
    assert _misfits(dict(snap), SnapshotRecord) == []


def test_the_checker_catches_a_wrong_shape():
    good = json.loads(GOLDEN.read_text())["full"]
    assert _misfits(dict(good, extra=1), SnapshotRecord) == ["undeclared key 'extra'"]
    bad_mapping = dict(good["mappings"][0], rss_bytes="4 KiB")
    assert _misfits(dict(good, mappings=[bad_mapping]), SnapshotRecord)
    assert _misfits({k: v for k, v in bad_mapping.items() if k != "kind"}, MappingRecord) == [
        "missing key 'kind'", "rss_bytes='4 KiB' is not <class 'int'>"]
