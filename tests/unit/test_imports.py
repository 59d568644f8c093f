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


# Import direction between roles (docs/architecture.md). A module may import its
# own role and the roles listed after it in ALLOWED; KNOWN holds today's edges
# that point the wrong way, each to be removed by issue 12's new layout. The test
# is a ratchet: a new wrong-way edge fails it, and so does a KNOWN edge that is gone
# (take it off the list).
ROLES = {
    "util": {"errors", "ownmem", "util.units", "util.log", "util.ranges", "util.elf"},
    "engine": {"probes", "events", "btf", "procfs", "pagemap", "model", "attribution",
               "tracker", "session", "targets"},
    "pss": {"pss", "livepss"},
    "heap": {"heap"},
    "views": {"views.snapshot", "views.table", "views.jsonl", "views.output",
              "views.summary", "exporter", "web", "libevents"},
    "commands": {"cli", "agent", "doctor", "explain", "libs"},
}
ALLOWED = {
    "util": set(),
    "engine": {"util"},
    "pss": {"util", "engine"},
    "heap": {"util", "engine"},
    "views": {"util", "engine", "pss", "heap"},
    "commands": {"util", "engine", "pss", "heap", "views"},
}
KNOWN = {
    ("tracker", "pss"),            # the tracker keeps pss.Usage per VMA (livepss owns it)
    ("session", "livepss"), ("session", "heap"),   # the loop drives live PSS and heap walks
    ("session", "exporter"),       # exporter state lives in the exporter
    ("session", "views.snapshot"), # the domain snapshot sits among the views
    ("session", "libevents"),
    ("views.table", "explain"),    # the table's machine line comes from explain
}


def _imports() -> dict[str, set[str]]:
    import ast

    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "memtrace").rglob("*.py")):
        name = ".".join(path.relative_to(REPO / "memtrace").with_suffix("").parts)
        if name.endswith(("__init__", "__main__")):
            continue
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("memtrace."):
                deps.add(node.module.removeprefix("memtrace."))
        graph[name] = deps
    return graph


def _role(module: str) -> str:
    return next(role for role, members in ROLES.items() if module in members)


def test_every_module_has_a_role():
    assert set(_imports()) == set().union(*ROLES.values())


def test_imports_point_one_way():
    wrong = set()
    for module, deps in _imports().items():
        for dep in deps:
            if _role(dep) != _role(module) and _role(dep) not in ALLOWED[_role(module)]:
                wrong.add((module, dep))
    assert wrong - KNOWN == set(), f"new wrong-way imports: {sorted(wrong - KNOWN)}"
    assert KNOWN - wrong == set(), f"gone (take them off KNOWN): {sorted(KNOWN - wrong)}"


def test_only_probes_loads_bcc():
    """probes.py is the only module that imports bcc at module level (doctor only
    tries an import to report whether BCC is there)."""
    import ast

    for path in sorted((REPO / "memtrace").rglob("*.py")):
        top = ast.parse(path.read_text()).body
        names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
        assert "bcc" not in names or path.name == "probes.py", path

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
