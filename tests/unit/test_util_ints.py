"""memtrace/util/ints.py: equal figures share one int object, in a bounded table."""

from __future__ import annotations

from memtrace.util import ints


def test_equal_values_come_back_as_one_object_and_the_table_stays_bounded(monkeypatch):
    table: dict[int, int] = {}
    monkeypatch.setattr(ints, "_table", table)
    monkeypatch.setattr(ints, "shared", table.setdefault)
    monkeypatch.setattr(ints, "SHARED_MAX", 4)
    a = ints.shared(int("73728"), int("73728"))
    b = ints.shared(int("73728"), int("73728"))     # built apart: a distinct object until shared
    assert a == b == 73728 and a is b
    for v in range(10_000, 10_010):
        assert ints.shared(v, v) == v
    assert len(table) == 11
    ints.trim()
    assert table == {}
    ints.trim()                           # small: kept
    assert ints.shared(5, 5) == 5 and table == {5: 5}
