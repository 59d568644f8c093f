"""--stacks with transparent huge pages (issue 13: "a huge page is always
sampled"). tests/workloads/hugestacks.c maps 16 huge pages with 16 faults in
fill_huge (MADV_HUGEPAGE) and 8 MiB with 2,048 faults in fill_small. The
fault tracepoint fires before the kernel picks the page size, so a sampler
that counts every fault as one page would sample a huge page's fault with
probability 4 KiB / 256 KiB and count 4 KiB for it: fill_huge would be
[unsampled] or a few pages. memtrace samples the first fault of each chunk of
a process that asked for huge pages (stacks/huge.py): held and brought give
fill_huge exactly what the kernel mapped."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from memtrace.trace.pagemap import thp_mode
from tests.root.harness import (
    MEMTRACE,
    REPO_ROOT,
    TIMEOUT_SCALE,
    build_without_frame_pointers,
    skip_reason,
)

_SKIP = skip_reason() or (None if thp_mode() != "never" else
                          "transparent huge pages are off (enabled: never)")
pytestmark = [pytest.mark.root, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

MiB = 1 << 20
WORKLOAD = REPO_ROOT / "tests" / "workloads" / "hugestacks.c"
QUIET = ["--no-serve", "--pss-interval", "0", "--heap-interval", "0"]


def bytes_of(stacks: list[dict[str, Any]], function: str) -> int:
    """Bytes of the stacks through `function` (gcc may name it fill_huge.constprop.0)."""
    return sum(s["bytes"] for s in stacks
               if any(f.split(" (")[0].split(".")[0] == function for f in s["frames"]))


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], int]:
    program = build_without_frame_pointers(
        WORKLOAD, tmp_path_factory.mktemp("hugestacks") / "hugestacks")
    r = subprocess.run(
        [*MEMTRACE, "run", "--format", "json", *QUIET, "--interval", "0.5", "--stacks",
         "--stacks-period", "256K", "--", str(program), "2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120 * TIMEOUT_SCALE,
        stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert r.returncode == 0, r.stderr[-2000:]
    thp = next(int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("thp "))
    snaps = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    snaps = [s for s in snaps if "summary" not in s and "stacks" in s]
    full = [s for s in snaps if s["rss_bytes"] >= 8 * MiB + thp * 2 * MiB]
    assert full, [s["rss_bytes"] for s in snaps]
    return full[-1]["stacks"], thp


def test_every_huge_page_is_sampled_and_weighs_what_it_mapped(traced):
    stacks, thp = traced
    if thp == 0:
        pytest.skip("the kernel gave the workload no huge page (memory fragmented?)")
    # what the kernel mapped for fill_huge: its huge pages, and one page per
    # 2 MiB where it could not give one
    mapped = thp * 2 * MiB + (16 - thp) * 4096
    assert bytes_of(stacks["held"], "fill_huge") == pytest.approx(mapped, rel=0.01), stacks
    assert bytes_of(stacks["brought"], "fill_huge") == pytest.approx(mapped, rel=0.01), stacks


def test_the_pages_of_ordinary_faults_keep_their_share(traced):
    stacks, _ = traced
    assert bytes_of(stacks["held"], "fill_small") == pytest.approx(8 * MiB, rel=0.05), stacks
    assert bytes_of(stacks["brought"], "fill_small") == pytest.approx(8 * MiB, rel=0.05), stacks
