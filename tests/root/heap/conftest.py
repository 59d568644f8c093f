"""The C test programs of tests/root/heap, built once per session (root tests)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which("gcc"):
        pytest.skip("gcc is needed to build the test programs")
    out = tmp_path_factory.mktemp("heapbin")
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(out / "heapprog"),
                    str(HERE / "heapprog.c")], check=True)
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", str(out / "libmyalloc.so"),
                    str(HERE / "myalloc.c")], check=True)
    return out
