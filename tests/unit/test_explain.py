"""memtrace.explain: statm, status and meminfo explained, on fixture /proc trees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from memtrace.explain import (
    STATM_FIELDS,
    explain,
    machine_summary,
    machine_view,
    memtrace_figures,
    parse_kb_fields,
    process_view,
    render_json,
    render_text,
)

FIXTURE = Path(__file__).parent / "fixtures" / "proc_explain"
KB = 1024

BUSY_MEMINFO = b"""MemTotal:       16000000 kB
MemFree:          300000 kB
MemAvailable:   12000000 kB
Buffers:          200000 kB
Cached:         11000000 kB
SwapCached:            0 kB
Active(file):    5000000 kB
Inactive(file):  5500000 kB
AnonPages:       3500000 kB
Mapped:           400000 kB
Shmem:            500000 kB
SReclaimable:     600000 kB
SUnreclaim:       100000 kB
Dirty:              1000 kB
SwapTotal:             0 kB
SwapFree:              0 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""


def test_parse_kb_fields_skips_counts_and_odd_lines():
    got = parse_kb_fields(BUSY_MEMINFO + b"garbage line\nVmFlags: rd wr\n")
    assert got["MemTotal"] == 16000000 * KB and got["Hugepagesize"] == 2048 * KB
    assert "HugePages_Total" not in got and "VmFlags" not in got


def test_process_view_on_fixture():
    v = process_view(4242, FIXTURE, page_size=4096)
    statm = [int(x) for x in (FIXTURE / "4242" / "statm").read_text().split()]
    status = parse_kb_fields((FIXTURE / "4242" / "status").read_bytes())
    assert v["pid"] == 4242 and v["comm"] == "my sleep"
    rows = {r["field"]: r for r in v["rows"]}
    assert list(rows) == [f"statm {f}" for f in STATM_FIELDS]
    for f, pages in zip(STATM_FIELDS, statm):
        assert rows[f"statm {f}"]["bytes"] == pages * 4096
    # each statm field next to the status line that says the same
    assert rows["statm size"]["status_bytes"] == status["VmSize"] == rows["statm size"]["bytes"]
    assert rows["statm resident"]["status_bytes"] == status["VmRSS"]
    assert rows["statm shared"]["status_bytes"] == status["RssFile"] + status["RssShmem"]
    assert rows["statm shared"]["bytes"] == rows["statm shared"]["status_bytes"]
    assert rows["statm text"]["status_bytes"] == status["VmExe"]
    assert rows["statm data"]["status_bytes"] == status["VmData"] + status["VmStk"]
    assert rows["statm data"]["bytes"] == rows["statm data"]["status_bytes"]
    assert rows["statm lib"]["bytes"] == 0 and "since Linux 2.6" in rows["statm lib"]["meaning"]
    assert rows["statm dt"]["bytes"] == 0 and rows["statm dt"]["status"] is None
    assert "since Linux 2.6" in rows["statm dt"]["meaning"]
    assert v["memtrace"] is None and all(r["memtrace_bytes"] is None for r in v["rows"])
    assert {r["field"] for r in v["status_rows"]} >= {"VmHWM", "RssAnon", "VmSwap", "VmPTE"}


def test_machine_view_why_free_is_small(tmp_path):
    (tmp_path / "meminfo").write_bytes(BUSY_MEMINFO)
    m = machine_view(tmp_path)
    assert m["meminfo"]["MemFree"] == 300000 * KB
    assert m["derived"] == {
        "used_bytes": (16000000 - 12000000) * KB,
        "buff_cache_bytes": (200000 + 11000000 + 600000) * KB,
        "page_cache_without_shmem_bytes": (11000000 - 500000) * KB,
    }
    names = [f["name"] for f in m["fields"]]
    assert names[:3] == ["MemTotal", "MemFree", "MemAvailable"] and "Shmem" in names
    assert "page cache" in m["fields"][1]["meaning"]
    assert m["summary"] == ("machine: RAM 15.3 GiB, free 293.0 MiB (unused), available "
                            "11.4 GiB (free + what the kernel can reclaim); page cache + "
                            "buffers 10.2 GiB, shmem 488.3 MiB (cannot be dropped)")


def test_machine_summary_without_memavailable():
    # kernels before 3.14 had no MemAvailable
    assert "available -" in machine_summary({"MemTotal": 1 << 30, "MemFree": 1 << 20})


def snap_fixture() -> dict:
    def m(kind, seg, virt, rss, anon=0):
        return {"kind": kind, "segment": seg, "virtual_bytes": virt, "rss_bytes": rss,
                "anon_bytes": anon}
    return {"virtual_bytes": 100, "rss_bytes": 60, "anon_bytes": 20, "file_bytes": 35,
            "shmem_bytes": 5,
            "mappings": [m("executable", "text", 20, 12), m("executable", "data", 4, 4, 4),
                         m("library", "text", 30, 10), m("library", "bss", 8, 8, 8),
                         m("anon", None, 38, 26, 8)]}


def test_memtrace_figures_next_to_statm():
    f = memtrace_figures(snap_fixture())
    assert f == {"size": 100, "resident": 60, "shared": 40, "text": 12, "text_virtual": 20,
                 "lib": 30, "lib_resident": 10, "data": 20}
    v = process_view(4242, FIXTURE, snap_fixture())
    rows = {r["field"]: r for r in v["rows"]}
    assert rows["statm resident"]["memtrace_bytes"] == 60
    assert rows["statm dt"]["memtrace_bytes"] is None


def test_render_text_and_json():
    report = explain(4242, FIXTURE, snap_fixture())
    text = render_text(report)
    assert "process 4242 (my sleep)" in text and "statm lib" in text
    assert "machine: /proc/meminfo" in text and "MemAvailable" in text
    assert text.splitlines()[-1].startswith("machine: RAM ")
    back = json.loads(render_json(report))
    assert back["process"]["rows"][0]["field"] == "statm size"
    assert set(back) == {"process", "machine"}
    assert set(explain(None, FIXTURE)) == {"machine"}
    assert "need root" in render_text(explain(4242, FIXTURE))


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_cli_machine_only(fmt):
    from memtrace.commands.main import cli

    r = CliRunner().invoke(cli, ["explain", "--format", fmt])
    assert r.exit_code == 0, r.output
    if fmt == "json":
        assert set(json.loads(r.output)) == {"machine"}
    else:
        assert "MemAvailable" in r.output


def test_cli_no_such_process():
    from memtrace.commands.main import cli
    from memtrace.errors import MemtraceError

    r = CliRunner().invoke(cli, ["explain", "999999999"])
    assert isinstance(r.exception, MemtraceError)


def test_process_view_escapes_a_hostile_comm(tmp_path):
    """The comm holds a newline, an escape sequence and markup (issue 16 item 9):
    shown as every name is (docs/output.md "Names"), in the text and JSON."""
    import shutil

    d = tmp_path / "4242"
    shutil.copytree(FIXTURE / "4242", d)
    (d / "comm").write_bytes(b"a\nb\x1b[31m[/b] \n")     # the kernel adds one newline
    shutil.copy(FIXTURE / "meminfo", tmp_path / "meminfo")
    v = process_view(4242, tmp_path, page_size=4096)
    assert v["comm"] == "a\\nb\\u001b[31m[/b] "
    text = render_text(explain(4242, tmp_path))
    assert "process 4242 (a\\nb\\u001b[31m[/b] ):" in text and "\x1b" not in text
