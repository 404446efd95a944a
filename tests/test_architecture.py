"""The package's import graph, read from the source (every import, at module level or inside a function): no
module imports itself back through others, imports go only downward through the rooms (sub-packages) in the
order of ``ROOMS``, ``method/`` is arithmetic on tensors alone, and the library never imports its command line
(``cli/`` is the top: nothing else imports it)."""
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


# The rooms, bottom to top (docs/architecture.md explains the order): a module may import its own room and those
# below it. "" holds the floor modules that everything may use; "api" the package's top (api.py, __init__.py).
ROOMS = ["", "method", "data", "model", "store", "passes", "report", "stages", "api", "cli"]
FLOOR = {"errors", "defaults", "files"}
# warnings: to silence a library's warning that the arithmetic handles itself (an empty k-means cluster)
METHOD_MAY_IMPORT = {"__future__", "math", "dataclasses", "typing", "warnings", "torch", "numpy", "scipy"}


def room(name: str) -> str:
    if name in FLOOR:
        return ""
    if name in ("api", ""):
        return "api"
    return name.split(".")[0]


def test_the_graph_is_read():
    assert {"stages.relevance", "api", "cli.demo", "method.split"} <= set(GRAPH)
    assert "store.layout" in GRAPH["stages.relevance"] and "stages.relevance" in GRAPH["api"]  # module level and inside functions


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
    top = {n for n in GRAPH if n == "cli" or n.startswith("cli.")}
    wrong = sorted(f"{n} imports {d}" for n, ds in GRAPH.items() if n not in top for d in ds & top)
    assert not wrong, wrong


def test_the_library_imports_its_own_modules_at_the_top():
    """An import of the package's own modules inside a function hides the graph (and a circle). Only the command
    line keeps them, so that --help does not load torch."""
    hidden = []
    for name, path in modules().items():
        if name in ("cli", "") or name.startswith("cli."):
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden += [f"{name}:{n.lineno}" for n in ast.walk(fn) if isinstance(n, ast.ImportFrom) and n.level]
    assert not hidden, hidden


def test_every_module_lives_in_a_room_and_the_top_level_holds_five():
    rooms = {room(n) for n in GRAPH}
    assert rooms <= set(ROOMS), sorted(rooms - set(ROOMS))
    top = sorted(n for n in GRAPH if "." not in n)
    assert len([n for n in top if n not in ROOMS[1:]]) <= 5, top  # __init__, api and the floor


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{n} ({room(n) or 'floor'}) imports {d} ({room(d) or 'floor'})" for n, ds in graph.items()
                  for d in ds if ROOMS.index(room(d)) > ROOMS.index(room(n)))


def test_imports_go_only_downward():
    assert not upward(GRAPH), upward(GRAPH)


def _third_party(path: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
    return found


def test_method_is_arithmetic_on_tensors_alone():
    """method/ reads no file, store, hook or model: from the package only the floor's errors and defaults (not
    its files), outside it torch, numpy, scipy and the pure parts of the standard library."""
    for name, path in modules().items():
        if room(name) != "method":
            continue
        inside = {d for d in GRAPH[name] if room(d) != "method"}
        assert inside <= {"errors", "defaults"}, (name, sorted(inside))
        outside = _third_party(path) - {"utils", "disentangle_channels"}
        assert outside <= METHOD_MAY_IMPORT, (name, sorted(outside - METHOD_MAY_IMPORT))


def test_the_rules_catch_what_they_forbid(tmp_path):
    """The checks above can fail: an upward import (method -> stages, the floor -> anything, store -> passes) is
    seen, a downward one is not, and a method module's file import is read as such."""
    assert upward({"method.split": {"stages.layer"}, "files": {"method.split"}, "store.records": {"passes.topk"},
                   "stages.layer": {"method.split", "files"}}) == [
        "files (floor) imports method.split (method)", "method.split (method) imports stages.layer (stages)",
        "store.records (store) imports passes.topk (passes)"]
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom torch import nn\nfrom ..files import write_text\n")
    assert _third_party(str(bad)) - METHOD_MAY_IMPORT == {"os"}
    assert imports("method.bad", str(bad), set(GRAPH) | {"method.bad"}) == {"files"}
