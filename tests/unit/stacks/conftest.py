from __future__ import annotations

import pytest

from .helpers import build_prog


@pytest.fixture(scope="session")
def prog(tmp_path_factory):
    """prog.c built -O2 without frame pointers (symbols kept)."""
    return build_prog(tmp_path_factory.mktemp("stacks"))
