"""Loading trained models: one module owns it, and no two of our modules import each other (at module level or
inside a function), so the layering reads bottom-up."""
from __future__ import annotations

import ast

from tests.conftest import REPO


def _import_graph() -> dict[str, set[str]]:
    """Our module -> our modules it imports anywhere in its source (lazy imports included)."""
    files = {}
    # eval/ and data_prep/ install as contrastive.eval and contrastive.data_prep (pyproject's package-dir).
    for package, prefix in (("contrastive", ()), ("eval", ("contrastive",)), ("data_prep", ("contrastive",))):
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(prefix + path.relative_to(REPO).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_two_modules_import_each_other():
    graph = _import_graph()
    assert "contrastive.loading" in graph and "contrastive.checkpoint" in graph["contrastive.loading"]
    assert "contrastive.loading" in graph["contrastive.eval.index"]  # eval/ is read as contrastive.eval
    assert _cycles(graph) == []
