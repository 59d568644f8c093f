"""The pure core must import, and work, without bcc and without the probes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PURE = [
    "memtrace.trace.procfs",
    "memtrace.trace.model",
    "memtrace.trace.attribution",
    "memtrace.trace.events",
    "memtrace.trace.tracker",
    "memtrace.snapshot",
    "memtrace.views.jsonl",
    "memtrace.views.table",
    "memtrace.commands.doctor",
    "memtrace.trace.btf",
    "memtrace.trace.pagemap",
    "memtrace.errors",
]


def test_pure_modules_need_neither_bcc_nor_probes():
    code = (
        "import sys; sys.modules['bcc'] = None\n"
        f"import importlib\nfor m in {PURE!r}: importlib.import_module(m)\n"
        "bad = [m for m in ('memtrace.trace.probes', 'memtrace.session') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr


# Import direction between layers (docs/architecture.md). A module's layer is
# its folder (memtrace/trace/ is the engine, ...) or, for the few top-level
# modules, the one named in TOP_LEVEL. A module may import its own layer and the
# layers below it (LAYERS is bottom-up; pss and heap are side by side). KNOWN holds
# edges that point the wrong way, each with its reason; the test is a ratchet: a
# new wrong-way edge fails it, and so does a KNOWN edge that is gone.
LAYERS = [
    {"util"},              # util/, errors: the standard library only
    {"trace"},             # the engine: probes to tracker
    {"pss", "heap", "stacks"},  # figures computed from the engine's output
    {"malloc"},            # --malloc: outstanding allocations by stack (uses stacks)
    {"domain"},            # the snapshot, what a tick publishes, library events, explain
    {"session"},           # the loop shared by watch, run and agent
    {"views", "exporter"}, # renderers: table, JSON Lines, summary, /metrics
    {"record"},            # recordings (.mtrace): the writer (a view) and the reader
    {"reports"},           # what is made from recordings: HTML report, diff, gate
    {"commands"},          # one module per subcommand
]
TOP_LEVEL = {
    "errors": "util", "snapshot": "domain", "published": "domain", "libevents": "domain",
    "explain": "domain", "reporter": "domain", "session": "session",
}
KNOWN: set[tuple[str, str]] = set()


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
    return TOP_LEVEL.get(module, module.split(".")[0])


def _level(role: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if role in layer)


def test_every_module_has_a_layer():
    roles = {_role(m) for m in _imports()}
    assert roles <= set().union(*LAYERS), roles - set().union(*LAYERS)
    top = {m for m in _imports() if "." not in m}
    assert top == set(TOP_LEVEL), f"top-level modules without a layer: {top - set(TOP_LEVEL)}"


def test_imports_point_one_way():
    wrong = set()
    for module, deps in _imports().items():
        for dep in deps:
            if _level(_role(dep)) > _level(_role(module)) or (
                    _level(_role(dep)) == _level(_role(module))
                    and _role(dep) != _role(module)):
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


MAX_LINES = 600


def test_no_module_is_longer_than_600_lines_without_a_reason():
    """A module over MAX_LINES says why at its top ("Longer than 600 lines:
    ..." in its docstring); the others stay short enough to read in one go."""
    import ast

    long = []
    for path in sorted((REPO / "memtrace").rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_LINES:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "Longer than 600 lines:" not in doc:
                long.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
    assert long == []


def test_every_module_has_its_line_in_the_architecture_doc():
    """docs/architecture.md gives each module one line (issue 12): a new module
    without one fails here."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(REPO / "memtrace"))
               for p in sorted((REPO / "memtrace").rglob("*.py"))
               if p.name != "__init__.py" and str(p.relative_to(REPO / "memtrace")) not in doc]
    assert missing == []
