"""The import graph of peftcli: arrows point one way, and light modules stay light.

Reference: ARCHITECTURE.md's rule ``cli → api → loop → {data, methods, export, evaluate} → {models,
quantize, inject, checkpoint} → recipe``. The graph is read from the source with ``ast``, counting every
import: at module level, inside functions and under ``TYPE_CHECKING`` (a lazy import that closes a cycle
is still a cycle: it only moves the failure from import time to call time).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "peftcli"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve_relative(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def with_parents(name: str, modules: dict[str, Path]) -> set[str]:
    """Importing ``a.b.c`` runs ``a.b``'s ``__init__`` too: every enclosing package but the root, which
    only loads the API lazily (PEP 562 ``__getattr__``) and so is never implicitly imported here."""
    parts = name.split(".")
    found = {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve_relative(node, name, path.name == "__init__.py")
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                if target == "peftcli" or target.startswith("peftcli."):
                    edges |= with_parents(target, modules)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest closed path through the component's first module, for the failure message."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for succ in sorted(graph[node] & members):
                if succ == start:
                    return paths[node] + [start]
                if succ not in paths:
                    paths[succ] = paths[node] + [succ]
                    nxt.append(succ)
        frontier = nxt
    return component


def test_the_walk_sees_imports_inside_functions_and_packages():
    graph = import_graph()
    # recipe.py is the bottom of the stack: it imports no other peftcli module, even lazily.
    assert graph["peftcli.recipe"] == set()
    # A method file reaches the registry; importing a subpackage's module counts its __init__ too.
    assert "peftcli.methods.registry" in graph["peftcli.methods.lora"]
    assert "peftcli.methods" in graph["peftcli.methods.lora"]
    # The walk counts imports inside functions: the CLI imports the API lazily, and only there.
    assert "peftcli.api" in graph["peftcli.cli"]


def test_no_import_cycles():
    graph = import_graph()
    cycles = find_cycles(graph)
    message = "\n".join(" -> ".join(one_cycle(graph, c)) + f"   (component: {', '.join(c)})" for c in cycles)
    assert not cycles, f"{len(cycles)} import cycle(s) among peftcli's modules:\n{message}"


def test_importing_quantize_loads_no_method():
    code = "import peftcli.quantize, sys; print(sum(m.startswith('peftcli.methods.') for m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert int(out.strip()) <= 2, f"import peftcli.quantize loaded {out.strip()} peftcli.methods.* modules"


def test_the_training_package_never_shadows_the_public_train_function():
    """``peftcli.train(recipe)`` is the public API; a subpackage named ``train`` would replace it with a
    module as soon as anything imported it, so the loop lives in ``peftcli.training``."""
    code = (
        "import peftcli, peftcli.training.loop, peftcli.training.metrics\n"
        "from peftcli.api import train\n"
        "assert peftcli.train is train, peftcli.train\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
