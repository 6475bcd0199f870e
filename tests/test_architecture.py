"""The shape of the package, read with `ast`: no import circles, the demo kept at the edge, short
functions, and a Trainer whose state is all introduced in `__init__` or `setup()`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "xti"
MAX_FUNCTION_LINES = 80
DEMO_MAY_IMPORT = {"xti.errors", "xti.paths", "xti.tokenizer"}
"""What the demo package may build on besides itself: nothing above the library's bottom."""
DEMO_USERS = {"xti.cli", "xti.quality"}
"""Besides the web UI (``xti.ui.*``): the CLI and the demo harness."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in root.rglob("*.py")}


def imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The package modules a module imports anywhere (function-local and TYPE_CHECKING included);
    ``from pkg import sub`` counts as importing ``pkg.sub``."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            found = [s for s in subs if s in known]
            out |= set(found)
            if len(found) < len(subs) and node.module in known:
                out.add(node.module)
    return out


def import_graph(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    known = set(trees)
    return {name: imports(tree, known) - {name} for name, tree in trees.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_the_circle_finder_finds_circles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("import x.a\nfrom x import b, c\ndef f():\n    from x.d import thing\n")
    assert imports(tree, {"x", "x.a", "x.b", "x.d"}) == {"x", "x.a", "x.b", "x.d"}


def test_no_import_circles() -> None:
    assert circles(import_graph(modules())) == []


def test_the_demo_stays_at_the_edge() -> None:
    graph = import_graph(modules())
    users = {m for m, deps in graph.items() if any(d.startswith("xti.demo") for d in deps)}
    outside = {m for m in users if not m.startswith(("xti.demo", "xti.ui"))} - DEMO_USERS
    assert outside == set(), f"the library imports the demo package: {sorted(outside)}"
    for name in (m for m in graph if m.startswith("xti.demo")):
        above = {d for d in reachable(graph, name) if not d.startswith("xti.demo")}
        assert above <= DEMO_MAY_IMPORT, f"{name} builds on {sorted(above - DEMO_MAY_IMPORT)}"


def test_no_long_functions() -> None:
    long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def assigned_attributes(function: ast.FunctionDef) -> set[str]:
    """``self.X`` names a method stores (plain, annotated, augmented or tuple assignments)."""
    out = set()
    for node in ast.walk(function):
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        for target in targets:
            for e in ast.walk(target):
                if (
                    isinstance(e, ast.Attribute)
                    and isinstance(e.value, ast.Name)
                    and e.value.id == "self"
                    and isinstance(e.ctx, ast.Store)
                ):
                    out.add(e.attr)
    return out


def trainer_attributes() -> tuple[set[str], dict[str, set[str]]]:
    """The Trainer's attributes introduced by `__init__`/`setup`, and those every other method
    stores."""
    tree = ast.parse((PACKAGE / "training.py").read_text(encoding="utf-8"))
    (trainer,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    methods = [n for n in trainer.body if isinstance(n, ast.FunctionDef)]
    introduced = set().union(
        *(assigned_attributes(m) for m in methods if m.name in ("__init__", "setup"))
    )
    others = {
        m.name: assigned_attributes(m) for m in methods if m.name not in ("__init__", "setup")
    }
    return introduced, others


def test_trainer_state_is_introduced_in_init_or_setup() -> None:
    introduced, others = trainer_attributes()
    late = {
        name: sorted(attrs - introduced) for name, attrs in others.items() if attrs - introduced
    }
    assert late == {}, f"attributes first created outside __init__/setup: {late}"
    assert {"plan", "run", "data", "models", "opt"} <= introduced


@pytest.mark.parametrize("source", ["bench/step.py", "tests/test_step_maths.py"])
def test_step_maths_come_from_the_step_module(source: str) -> None:
    tree = ast.parse((ROOT / source).read_text(encoding="utf-8"))
    used = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "xti.step" in used and "xti.training" not in used
