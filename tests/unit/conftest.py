from __future__ import annotations

import pytest

import memtrace.trace.tracker as tracker_mod

from .fakes import World


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A fake /proc root whose processes the tracker scans with FakeScanner."""
    w = World(tmp_path / "proc")
    w.root.mkdir()
    monkeypatch.setattr(tracker_mod, "open_scanner", w.scanner_factory)
    return w
