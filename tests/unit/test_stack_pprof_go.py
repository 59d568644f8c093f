"""memtrace's pprof output read by Go's own pprof (`go tool pprof`, Debian's
golang-go, installed by scripts/setup.sh): a reader nobody here wrote. It
checks the profile (CheckValid: ids, tables, one value per sample type) before
printing; -raw prints every sample, location, label and mapping as decoded.
Skipped, with the reason, where Go is not installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from memtrace.views.pprof import render_pprof
from tests.stackprofiles import CPP, LIBC, LIBHELPER, PROG, two_paths

pytestmark = pytest.mark.skipif(shutil.which("go") is None,
                                reason="`go` not found (Debian package golang-go, "
                                       "installed by scripts/setup.sh)")


def _pprof(tmp_path: Path, *args: str) -> str:
    path = tmp_path / "stacks.pb.gz"
    if not path.exists():
        path.write_bytes(render_pprof(two_paths(), "held"))
    env = {**os.environ, "PPROF_TMPDIR": str(tmp_path), "HOME": str(tmp_path),
           "GOCACHE": str(tmp_path / "gocache")}
    r = subprocess.run(["go", "tool", "pprof", *args, str(path)], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _raw(text: str) -> tuple[list[dict], dict[int, dict], dict[int, dict]]:
    """Samples, locations and mappings of `pprof -raw`."""
    samples: list[dict] = []
    locations: dict[int, dict] = {}
    mappings: dict[int, dict] = {}
    section = ""
    for line in text.splitlines():
        if line in ("Samples:", "Locations", "Mappings"):
            section = line
            continue
        if section == "Samples:":
            m = re.fullmatch(r"\s*(\d+)\s+(\d+): ([\d ]+)", line)
            if m:
                samples.append({"values": [int(m[1]), int(m[2])],
                                "locations": [int(i) for i in m[3].split()], "labels": ""})
            elif samples:
                samples[-1]["labels"] += line.strip() + " "
        elif section == "Locations":
            m = re.fullmatch(r"\s*(\d+): 0x([0-9a-f]+)(?: M=(\d+))? (.*?) :0 s=0(?:\((.*)\))?",
                             line)
            assert m, line
            locations[int(m[1])] = {"address": int(m[2], 16), "mapping": int(m[3] or 0),
                                    "name": m[5] or m[4]}
        elif section == "Mappings":
            m = re.fullmatch(r"(\d+): 0x([0-9a-f]+)/0x([0-9a-f]+)/0x[0-9a-f]+ (\S+) (\S*) ?"
                             r"(\[FN\])?", line)
            assert m, line
            mappings[int(m[1])] = {"start": int(m[2], 16), "limit": int(m[3], 16),
                                   "file": m[4], "build_id": m[5], "fn": bool(m[6])}
    return samples, locations, mappings


def test_go_pprof_reads_every_sample_frame_label_and_mapping(tmp_path):
    p = two_paths()
    samples, locations, mappings = _raw(_pprof(tmp_path, "-symbolize=none", "-raw"))
    kept = [s for s in p.samples if s.held_bytes or s.brought_bytes]
    assert len(samples) == len(kept)
    for want, got in zip(kept, samples):
        assert got["values"] == [want.held_bytes, want.brought_bytes]
        assert f"kind:[{want.kind}]" in got["labels"]
        assert f"mapping:[{want.mapping}]" in got["labels"]
        assert f"samples:[{want.samples} count]" in got["labels"]
        locs = [locations[i] for i in got["locations"]]
        assert [loc["address"] for loc in locs] == [f.address for f in want.stack.frames]
        assert [loc["name"] for loc in locs] == [
            "[libc.so.6]" if f.function == "[unknown]" else f.function
            for f in want.stack.frames]
    assert {m["file"] for m in mappings.values()} == {PROG, LIBC, LIBHELPER}
    assert mappings[1]["file"] == PROG and all(m["fn"] for m in mappings.values())
    assert {m["file"]: m["build_id"] for m in mappings.values()}[LIBC] == "bb22" * 5
    assert any(loc["name"] == CPP for loc in locations.values())


def test_go_pprof_top_totals_sample_types_and_label_filters(tmp_path):
    p = two_paths()
    held = _pprof(tmp_path, "-symbolize=none", "-top", "-unit=B")
    assert "Type: resident_space" in held
    assert f"of {p.held_total()}B total" in held
    brought = _pprof(tmp_path, "-symbolize=none", "-top", "-unit=B",
                     "-sample_index=brought_space")
    assert "Type: brought_space" in brought and f"of {p.brought_total()}B total" in brought
    assert re.search(r"\b0\s+0%\s+\S+\s+67108864B\s+\S+\s+alloc_big$", brought, re.M)
    anon = _pprof(tmp_path, "-symbolize=none", "-top", "-unit=B",
                  "-sample_index=brought_space", "-tagfocus=kind=anon")
    in_anon = sum(s.brought_bytes for s in p.samples if s.kind == "anon")
    assert f"accounting for {in_anon}B" in anon
    # default symbolization keeps memtrace's names (the mappings say they have functions)
    plain = _pprof(tmp_path, "-top", "-unit=B")
    assert f"of {p.held_total()}B total" in plain and "alloc_small" in plain
