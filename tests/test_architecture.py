"""The package's import graph, read from the source (every import, at module level or inside a function): no
module imports itself back through others, and the library never imports its command line (``cli.py`` and
``commands/`` are the top: nothing else imports them)."""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "utils")


def modules() -> dict[str, str]:
    """Dotted name inside the package (``stage1``, ``commands.demo``) -> file."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__") if rel != "__init__" else ""] = os.path.join(folder, f)
    return out


def imports(name: str, path: str, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (relative and ``utils.`` imports)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                stem = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] in ("utils", "disentangle_channels"):
                stem = node.module.partition(".")[2]
            else:
                continue
            targets = [f"{stem}.{a.name}".lstrip(".") for a in node.names] + [stem]
        elif isinstance(node, ast.Import):
            targets = [a.name.partition(".")[2] for a in node.names
                       if a.name.split(".")[0] in ("utils", "disentangle_channels")]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {n: imports(n, p, set(modules())) for n, p in modules().items()}


def test_the_graph_is_read():
    assert {"stage1", "api", "commands.demo"} <= set(GRAPH)
    assert "store" in GRAPH["stage1"] and "stage1" in GRAPH["api"]  # module level and inside functions


def test_no_module_imports_itself_back():
    seen: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(n: str, path: list[str]) -> None:
        seen[n] = 1
        for d in sorted(GRAPH[n]):
            if seen.get(d) == 1:
                cycle = path[path.index(d):] + [d]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if d not in seen:
                visit(d, path + [d])
        seen[n] = 2

    for n in sorted(GRAPH):
        if n not in seen:
            visit(n, [n])


def test_only_the_command_line_imports_the_command_line():
    top = {n for n in GRAPH if n == "cli" or n == "commands" or n.startswith("commands.")}
    wrong = sorted(f"{n} imports {d}" for n, ds in GRAPH.items() if n not in top for d in ds & top)
    assert not wrong, wrong


def test_the_library_imports_its_own_modules_at_the_top():
    """An import of the package's own modules inside a function hides the graph (and a circle). Only the command
    line keeps them, so that --help does not load torch."""
    hidden = []
    for name, path in modules().items():
        if name in ("cli", "") or name == "commands" or name.startswith("commands."):
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden += [f"{name}:{n.lineno}" for n in ast.walk(fn) if isinstance(n, ast.ImportFrom) and n.level]
    assert not hidden, hidden
