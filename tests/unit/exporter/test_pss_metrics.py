"""memtrace_{process,mapping}_{pss,uss}_bytes: values, labels like the resident
series (same mapping identities, same cap and [other]), group mode, and no
series when a snapshot has no PSS figures."""

from __future__ import annotations

from typing import Any

from memtrace.exporter.rows import OTHER

from .helpers import LIBC, PAGE, realistic_process, registry_for, scrape, state_of
from .test_collector import many_identities

PSS_NAMES = ("memtrace_process_pss_bytes", "memtrace_process_uss_bytes",
             "memtrace_mapping_pss_bytes", "memtrace_mapping_uss_bytes")


def with_pss(snap: dict[str, Any], third: bool = True) -> dict[str, Any]:
    """Give every mapping PSS/USS figures: anonymous pages private, file pages
    shared by three (PSS a third, rounded down), and process totals."""
    fixed = 0
    for m in snap["mappings"]:
        shared = m["file_bytes"] + m["shmem_bytes"]
        m_fixed = (m["anon_bytes"] << 12) + ((shared << 12) // 3 if third else shared << 12)
        fixed += m_fixed
        m["pss_bytes"] = m_fixed >> 12
        m["uss_bytes"] = m["anon_bytes"]
        m["swap_bytes"] = 0
    snap["pss_bytes"] = fixed >> 12
    snap["uss_bytes"] = sum(m["uss_bytes"] for m in snap["mappings"])
    snap["swap_bytes"] = 0
    return snap


def test_process_and_mapping_values_and_labels():
    proc = with_pss(realistic_process(100, "server"))
    s = scrape(registry_for(state_of(proc))[0])
    assert s.value("memtrace_process_pss_bytes", pid="100", comm="server") == proc["pss_bytes"]
    assert s.value("memtrace_process_uss_bytes", pid="100") == proc["uss_bytes"]
    libc = [m for m in proc["mappings"] if m["mapping"] == LIBC]
    assert s.value("memtrace_mapping_pss_bytes", pid="100", mapping=LIBC, kind="library") \
        == sum(m["pss_bytes"] for m in libc)
    assert s.value("memtrace_mapping_uss_bytes", pid="100", mapping=LIBC) \
        == sum(m["uss_bytes"] for m in libc) == 5 * PAGE
    resident = {(lab["mapping"], lab["kind"])
                for lab, _ in s.series("memtrace_mapping_resident_bytes")}
    for name in ("memtrace_mapping_pss_bytes", "memtrace_mapping_uss_bytes"):
        assert {(lab["mapping"], lab["kind"]) for lab, _ in s.series(name)} == resident
        assert set(s.series(name)[0][0]) == {"pid", "comm", "mapping", "kind"}
    assert s.total("memtrace_mapping_uss_bytes", pid="100") == proc["uss_bytes"]
    # mapping PSS are per-mapping floors: their sum is at most the process PSS
    assert 0 <= proc["pss_bytes"] - s.total("memtrace_mapping_pss_bytes", pid="100") \
        < len(proc["mappings"])
    assert not s.duplicates()


def test_the_cap_keeps_the_same_identities_as_the_resident_series():
    proc = with_pss(many_identities(7, 200))
    s = scrape(registry_for(state_of(proc), max_series=50)[0])
    resident = s.label_values("memtrace_mapping_resident_bytes", "mapping", pid="7")
    for name in ("memtrace_mapping_pss_bytes", "memtrace_mapping_uss_bytes"):
        assert s.label_values(name, "mapping", pid="7") == resident
        assert len(s.series(name, pid="7")) == 50
    ranked = sorted(proc["mappings"], key=lambda m: m["rss_bytes"], reverse=True)
    assert s.value("memtrace_mapping_pss_bytes", pid="7", mapping=OTHER, kind="other") \
        == sum(m["pss_bytes"] for m in ranked[49:])
    assert s.total("memtrace_mapping_uss_bytes", pid="7") == proc["uss_bytes"]


def test_group_mode_sums_the_processes_of_a_group():
    a, b = with_pss(realistic_process(11, "nginx")), with_pss(realistic_process(12, "nginx"))
    c = with_pss(realistic_process(13, "postgres"))
    state = state_of(a, b, c, groups={11: "web", 12: "web", 13: "db"})
    s = scrape(registry_for(state)[0])
    assert s.value("memtrace_process_pss_bytes", group="web", comm="nginx") \
        == a["pss_bytes"] + b["pss_bytes"]
    assert s.value("memtrace_process_uss_bytes", group="db") == c["uss_bytes"]
    libc = [m for p in (a, b) for m in p["mappings"] if m["mapping"] == LIBC]
    assert s.value("memtrace_mapping_pss_bytes", group="web", mapping=LIBC) \
        == sum(m["pss_bytes"] for m in libc)
    for name in PSS_NAMES:
        assert not [lab for lab, _ in s.series(name) if "pid" in lab], name
    assert not s.duplicates()


def test_no_series_without_pss_figures():
    on = with_pss(realistic_process(100, "server"))
    off = realistic_process(200, "worker")          # pss_bytes absent (or null)
    off["pss_bytes"] = off["uss_bytes"] = None
    for m in off["mappings"]:
        m["pss_bytes"] = m["uss_bytes"] = None
    s = scrape(registry_for(state_of(on, off))[0])
    for name in PSS_NAMES:
        assert name in s.families
        assert s.label_values(name, "pid") == {"100"}, name


def test_the_text_path_serves_the_same_pss_series_as_collect():
    from .helpers import Scrape
    for groups in (None, {11: "web", 12: "web", 13: "db"}):
        a, b = with_pss(realistic_process(11, "nginx")), with_pss(realistic_process(12, "nginx"))
        c = with_pss(realistic_process(13, "postgres"))
        reg, _, collector = registry_for(state_of(a, b, c, groups=groups))
        text = Scrape(collector.render_text())
        via_collect = scrape(reg)
        def norm(series):
            return sorted((tuple(sorted(lab.items())), float(v)) for lab, v in series)
        for name in PSS_NAMES:
            assert norm(text.series(name)) == norm(via_collect.series(name)), name
            assert text.series(name), name


def test_text_path_pss_cache_follows_the_generation():
    from .helpers import Scrape
    a = with_pss(realistic_process(11, "nginx"))
    a["generation"] = 7
    reg, box, collector = registry_for(state_of(a))
    first = Scrape(collector.render_text()).series("memtrace_process_pss_bytes")
    assert Scrape(collector.render_text()).series("memtrace_process_pss_bytes") == first
    b = dict(a, pss_bytes=a["pss_bytes"] + 4096, generation=8)
    box.set(state_of(b))
    (labels, value), = Scrape(collector.render_text()).series("memtrace_process_pss_bytes")
    assert value == a["pss_bytes"] + 4096
