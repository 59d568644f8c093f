"""Golden files: checked-in expected outputs that tests compare byte for byte.

Regenerate them after an intended change with either

    .venv/bin/python -m pytest -q tests/unit --update-golden
    MEMTRACE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/unit

then review `git diff` of the golden files: every line that changed is
something a user sees (a metric, a label, a JSON key, a CLI option)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

ENV = "MEMTRACE_UPDATE_GOLDEN"


def updating() -> bool:
    """True when golden files are to be rewritten (--update-golden, or the
    environment variable MEMTRACE_UPDATE_GOLDEN=1)."""
    return os.environ.get(ENV, "") not in ("", "0")


def check_golden(path: Path, actual: str) -> None:
    """Compare `actual` with the golden file at `path` (rewrite it when updating)."""
    if updating():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != actual:
            path.write_text(actual, encoding="utf-8")
        return
    if not path.exists():
        raise AssertionError(f"golden file {path} is missing: run with --update-golden "
                             f"(or {ENV}=1) to create it")
    expected = path.read_text(encoding="utf-8")
    if actual != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), actual.splitlines(keepends=True),
            f"{path.name} (golden)", f"{path.name} (now)", n=2))
        if len(diff) > 20_000:
            diff = diff[:20_000] + "\n... (diff cut)\n"
        raise AssertionError(
            f"output differs from the golden file {path}; if the change is intended, "
            f"regenerate with --update-golden (or {ENV}=1) and review git diff:\n{diff}")
