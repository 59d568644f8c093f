"""The serving process's cyclic GC: the startup heap is frozen before any
process is watched (no root, no BCC)."""

from __future__ import annotations

import gc
from types import SimpleNamespace

from memtrace.commands import live
from memtrace.exporter import collector as exporter
from memtrace.published import StateBox


def test_freeze_startup_objects_takes_the_heap_out_of_collections():
    gc.unfreeze()
    gc.collect()
    tracked = len(gc.get_objects())
    try:
        exporter.freeze_startup_objects()
        assert gc.get_freeze_count() >= tracked - 100
        assert len(gc.get_objects()) < tracked // 10
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_serve_freezes_before_it_serves(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(live, "freeze_startup_objects", lambda: calls.append("freeze"))

    class FakeServer:
        tls = exposed = protected = False
        address = "127.0.0.1:0"

        busy = None

        def __init__(self, *args, **kw):  # type: ignore[no-untyped-def]
            calls.append("bind")

        def serve(self, *args, **kw):  # type: ignore[no-untyped-def]
            calls.append("serve")

    monkeypatch.setattr(live, "MetricsServer", FakeServer)
    session = SimpleNamespace(exporter_box=StateBox())
    server = live.bind_metrics(False, "127.0.0.1:0", None)
    assert calls == ["bind"]
    assert live.serve_metrics(session, server, 50) is server  # type: ignore[arg-type]
    assert calls == ["bind", "freeze", "serve"]
    calls.clear()
    assert live.bind_metrics(True, "127.0.0.1:0", None) is None
    assert live.serve_metrics(session, None, 50) is None  # type: ignore[arg-type]
    assert calls == []
