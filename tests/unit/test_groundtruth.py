"""Unit tests for tests/groundtruth.py (no root needed)."""

import os
import sys
from pathlib import Path

import pytest

try:
    from tests import groundtruth as gt
except ImportError:  # run from somewhere that does not put the repo on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests import groundtruth as gt


def _fields(size, rss, anon, pss=None):
    pss = rss if pss is None else pss
    return (
        f"Size:           {size} kB\n"
        "KernelPageSize:        4 kB\n"
        "MMUPageSize:           4 kB\n"
        f"Rss:            {rss} kB\n"
        f"Pss:            {pss} kB\n"
        "Pss_Dirty:             0 kB\n"
        "Shared_Clean:          0 kB\n"
        "Shared_Dirty:          0 kB\n"
        f"Private_Clean:  {rss - anon} kB\n"
        f"Private_Dirty:  {anon} kB\n"
        f"Referenced:     {rss} kB\n"
        f"Anonymous:      {anon} kB\n"
        "KSM:                   0 kB\n"
        "LazyFree:              0 kB\n"
        "AnonHugePages:         0 kB\n"
        "ShmemPmdMapped:        0 kB\n"
        "FilePmdMapped:         0 kB\n"
        "Shared_Hugetlb:        0 kB\n"
        "Private_Hugetlb:       0 kB\n"
        "Swap:                  0 kB\n"
        "SwapPss:               0 kB\n"
        "Locked:                0 kB\n"
        "THPeligible:           0\n"
        "ProtectionKey:         0\n"
        "VmFlags: rd wr mr mw me ac \n"
    ).encode()


PAD = b" " * 20
SMAPS = b"".join(
    [
        b"55d0c0a00000-55d0c0a02000 r--p 00000000 fe:00 260386                     /usr/bin/true\n",
        _fields(8, 8, 0),
        b"55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]\n",
        _fields(132, 12, 12),
        # a path with spaces and a byte that is not UTF-8
        b"7f0000000000-7f0000400000 r--s 00100000 fe:00 1234"
        + PAD
        + b"/tmp/my dir/map file \xe9.bin\n",
        _fields(4096, 1024, 0),
        # a deleted file mapped private with some copy-on-write pages
        b"7f0000400000-7f0000800000 rw-p 00000000 fe:00 1235" + PAD + b"/tmp/gone.bin (deleted)\n",
        _fields(4096, 4096, 512),
        b"7f0000800000-7f0000a00000 rw-s 00000000 00:01 99" + PAD + b"/memfd:mt memfd (deleted)\n",
        _fields(2048, 2048, 0),
        # anonymous: no path at all (the kernel ends the line after the inode)
        b"7f0000a00000-7f0000b00000 ---p 00000000 00:00 0 \n",
        _fields(1024, 0, 0),
        b"7f0000b00000-7f0000c00000 rw-p 00000000 00:00 0\n",
        _fields(1024, 100, 100),
        b"7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]\n",
        _fields(132, 16, 16),
        b"ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]\n",
        _fields(4, 0, 0),
    ]
)


def test_parse_smaps_headers():
    maps = gt.parse_smaps(SMAPS)
    assert len(maps) == 9
    paths = [m["path"] for m in maps]
    assert paths == [
        "/usr/bin/true",
        "[heap]",
        "/tmp/my dir/map file \\xe9.bin",
        "/tmp/gone.bin (deleted)",
        "/memfd:mt memfd (deleted)",
        "",
        "",
        "[stack]",
        "[vsyscall]",
    ]
    odd = maps[2]
    assert odd["path_bytes"] == b"/tmp/my dir/map file \xe9.bin"
    assert odd["start"] == 0x7F0000000000 and odd["end"] == 0x7F0000400000
    assert odd["perms"] == "r--s"
    assert odd["offset"] == 0x100000
    assert odd["dev"] == "fe:00" and odd["inode"] == 1234
    assert maps[-1]["start"] == 0xFFFFFFFFFF600000


def test_parse_smaps_fields():
    maps = gt.parse_smaps(SMAPS)
    heap = maps[1]
    assert heap["size_bytes"] == 132 * 1024
    assert heap["rss_bytes"] == 12 * 1024
    assert heap["anonymous_bytes"] == 12 * 1024
    assert heap["fields"]["Private_Dirty"] == 12 * 1024
    assert heap["private_dirty_bytes"] == 12 * 1024
    assert heap["anon_huge_pages_bytes"] == 0
    assert heap["mmu_page_size_bytes"] == 4096
    assert heap["vmflags"] == ["rd", "wr", "mr", "mw", "me", "ac"]
    assert heap["extra"] == {"THPeligible": "0", "ProtectionKey": "0"}
    cow = maps[3]
    assert cow["rss_bytes"] == 4096 * 1024 and cow["anonymous_bytes"] == 512 * 1024


def test_parse_smaps_rejects_garbage():
    with pytest.raises(ValueError):
        gt.parse_smaps(b"this is not smaps\n")


def test_snake_case():
    assert gt.snake_case("AnonHugePages") == "anon_huge_pages"
    assert gt.snake_case("Shared_Clean") == "shared_clean"
    assert gt.snake_case("MMUPageSize") == "mmu_page_size"
    assert gt.snake_case("Pss_Dirty") == "pss_dirty"
    assert gt.snake_case("KSM") == "ksm"
    assert gt.snake_case("RssAnon") == "rss_anon"


def test_parse_statm_and_status():
    st = gt.parse_statm(b"1159 352 288 5 0 84 0\n", page_size=4096)
    assert st["size_bytes"] == 1159 * 4096
    assert st["resident_bytes"] == 352 * 4096
    assert st["shared_bytes"] == 288 * 4096
    status = gt.parse_status_rss(
        "Name:\tcat\nVmSize:\t    4636 kB\nVmRSS:\t    1408 kB\n"
        "RssAnon:\t      96 kB\nRssFile:\t    1312 kB\nRssShmem:\t       0 kB\n"
        "VmSwap:\t       0 kB\n"
    )
    assert status == {
        "vm_size_bytes": 4636 * 1024,
        "vm_rss_bytes": 1408 * 1024,
        "rss_anon_bytes": 96 * 1024,
        "rss_file_bytes": 1312 * 1024,
        "rss_shmem_bytes": 0,
        "vm_swap_bytes": 0,
    }


def _snapshot_from(maps):
    return {
        "pid": 1,
        "ts": 0.0,
        "rss_bytes": sum(m["rss_bytes"] for m in maps),
        "anon_bytes": sum(m["anonymous_bytes"] for m in maps),
        "file_bytes": 0,
        "shmem_bytes": 0,
        "mappings": [
            {
                "start": m["start"],
                "end": m["end"],
                "perms": m["perms"],
                "offset": m["offset"],
                "path": m["path"],
                "kind": "anon",
                "rss_bytes": m["rss_bytes"],
                "anon_bytes": m["anonymous_bytes"],
                "file_bytes": 0,
                "shmem_bytes": 0,
                "virtual_bytes": m["end"] - m["start"],
                "faults": 0,
            }
            for m in maps
        ],
    }


def test_compare_equal():
    maps = gt.parse_smaps(SMAPS)
    snap = _snapshot_from(maps)
    statm = {"resident_bytes": snap["rss_bytes"]}
    assert gt.compare_snapshot(snap, maps, statm) == []


def test_compare_reports_every_kind_of_difference():
    maps = gt.parse_smaps(SMAPS)
    snap = _snapshot_from(maps)
    statm = {"resident_bytes": snap["rss_bytes"]}
    status = {"rss_anon_bytes": snap["anon_bytes"], "rss_file_bytes": 0, "rss_shmem_bytes": 0}
    snap["mappings"][1]["rss_bytes"] += 4096  # [heap] rss off
    snap["mappings"][3]["anon_bytes"] = 0  # CoW pages missed
    snap["mappings"][2]["path"] = "/tmp/my dir/map file \ufffd.bin"
    del snap["mappings"][7]  # [stack] missing
    snap["mappings"].append(
        {
            "start": 0x1000,
            "end": 0x2000,
            "perms": "rw-p",
            "offset": 0,
            "path": "",
            "rss_bytes": 4096,
            "anon_bytes": 4096,
        }
    )  # stale mapping
    snap["rss_bytes"] += 1
    snap["file_bytes"] = 8192
    diffs = gt.compare_snapshot(snap, maps, statm, status)
    text = "\n".join(diffs)
    assert "process rss_bytes" in text
    assert "process file_bytes" in text
    assert "55d0c1000000-55d0c1021000 rw-p '[heap]': rss smaps 12288 B" in text
    assert "memtrace +4096 B" in text
    assert "7f0000400000-7f0000800000" in text and "anon smaps 524288 B" in text
    assert "path smaps '/tmp/my dir/map file \\\\xe9.bin'" in text
    assert "missing from memtrace: 7ffd00000000-7ffd00021000 rw-p '[stack]'" in text
    assert "not in smaps (stale or wrong bounds): 1000-2000" in text
    assert len(diffs) == 7


def test_compare_wrong_bounds_shows_overlap():
    maps = gt.parse_smaps(SMAPS)
    snap = _snapshot_from(maps)
    snap["mappings"][1]["end"] += 0x1000
    diffs = gt.compare_snapshot(snap, maps)
    assert any(
        "missing from memtrace: 55d0c1000000-55d0c1021000" in d
        and "overlapping 55d0c1000000-55d0c1022000" in d
        for d in diffs
    )
    assert any(d.startswith("not in smaps") for d in diffs)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_live_self():
    maps = gt.read_smaps(os.getpid())
    assert maps and all(m["end"] > m["start"] for m in maps)
    assert any(m["path"] == "[stack]" for m in maps)
    statm = gt.read_statm(os.getpid())
    assert statm["resident_bytes"] > 0
    states = gt.task_states(os.getpid())
    assert states[os.getpid()] == "R"
