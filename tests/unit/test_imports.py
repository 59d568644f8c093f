"""The pure core must import, and work, without bcc and without the probes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PURE = [
    "memtrace.procfs",
    "memtrace.model",
    "memtrace.attribution",
    "memtrace.events",
    "memtrace.tracker",
    "memtrace.views.snapshot",
    "memtrace.views.jsonl",
    "memtrace.doctor",
    "memtrace.btf",
    "memtrace.pagemap",
    "memtrace.errors",
]


def test_pure_modules_need_neither_bcc_nor_probes():
    code = (
        "import sys; sys.modules['bcc'] = None\n"
        f"import importlib\nfor m in {PURE!r}: importlib.import_module(m)\n"
        "bad = [m for m in ('memtrace.probes', 'memtrace.session') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr


def test_util_imports_nothing_else_from_memtrace():
    """memtrace/util/ is below every other layer: its modules import only each
    other and the standard library."""
    import ast

    for path in sorted((REPO / "memtrace" / "util").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith("memtrace") or name.startswith("memtrace.util"), (
                    path.name, name)
