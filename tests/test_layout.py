"""The package's layout, checked from the sources (no outside tool): imports flow one way.

Every import counts, at module level or inside a function. `ddrs.core` imports nothing of
ddrs but itself and `ddrs.errors`; and no import cycle exists, counting a package's
`__init__` as a module of its own, so that a child importing a name from its parent's
`__init__`, which imports the child, is a cycle too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ddrs"
CORE_MAY_IMPORT = ("ddrs.core", "ddrs.errors")


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The ddrs modules `name` imports (a `from pkg import x` names pkg.x if that is a
    module, else pkg)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def core_violations(edges: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} imports {t}"
        for m, targets in edges.items()
        if m.startswith("ddrs.core")
        for t in targets
        if not t.startswith(CORE_MAY_IMPORT)
    )


def test_the_core_imports_nothing_above_it():
    assert core_violations(graph()) == []


def test_no_import_cycle_not_even_between_a_package_and_its_children():
    assert cycles(graph()) == []


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A core module importing ddrs.models (inside a function), and a child importing from
    its parent's __init__ that imports it, are both found."""
    root = tmp_path / "ddrs"
    for name, text in {
        "__init__.py": "",
        "errors.py": "",
        "core/__init__.py": "",
        "core/smooth.py": "def f():\n    from ddrs.models import load_model\n",
        "models/__init__.py": "from ddrs.models.checkpoint import load_model\n",
        "models/checkpoint.py": "from ddrs.models import build_model\n",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    edges = graph(root)
    assert core_violations(edges) == ["ddrs.core.smooth imports ddrs.models"]
    assert cycles(edges) == [["ddrs.models", "ddrs.models.checkpoint"]]


def test_every_module_imports():
    """What the checks above read from the sources also loads (a name moved away fails here,
    not in a user's first command)."""
    import importlib

    for name in modules():
        if not name.endswith("__main__"):
            importlib.import_module(name)
