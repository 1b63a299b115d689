"""The import graph of peftcli: arrows point one way (down the layers CONTRIBUTING.md states, "Imports
point one way"), there are no cycles, and light modules stay light.

The graph is read from the source with ``ast``, counting every import: at module level, inside functions
and under ``TYPE_CHECKING`` (a lazy import that points upward or closes a cycle is still one: it only
moves the failure from import time to call time).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from kit import ROOT

PACKAGE = ROOT / "peftcli"


# The layers, bottom first: a module may import modules of its own layer or of a lower one, never of a
# higher one. Keep this table and CONTRIBUTING.md's "Imports point one way" the same. Names are relative to
# ``peftcli``; a name ending in "/" is a subpackage with every module under it; "__init__" is the root
# package (the public API's lazy re-exports).
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation: import nothing of ours", ["recipe", "compat", "adapter_compat"]),
    (
        "building blocks: the base model and what wraps it",
        ["tiny", "chat_templates", "inject", "checkpoint", "quantize", "dequantize", "models"],
    ),
    ("methods", ["methods/"]),
    ("recipes and data", ["recipe_loader", "schema", "docs", "data/"]),
    ("decoding: the one token loop", ["decoding"]),
    (
        "what a trained model becomes: export and evaluation",
        ["export", "combining", "gguf", "evaluate", "harness"],
    ),
    ("runs: training and using a model", ["training/", "use/"]),
    ("tools: commands that read runs", ["tools/"]),
    ("the Python API", ["api", "__init__"]),
    ("the command line", ["cli", "__main__"]),
]


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


def entry_matches(entry: str, module: str) -> bool:
    relative = module.removeprefix("peftcli").removeprefix(".") or "__init__"
    if entry.endswith("/"):
        package = entry[:-1]
        return relative == package or relative.startswith(package + ".")
    return relative == entry


def layer_index() -> dict[str, int]:
    """Each module's layer (its index in LAYERS); a module in no layer or in two fails here."""
    placed: dict[str, list[int]] = {}
    for module in all_modules():
        placed[module] = [
            i for i, (_, entries) in enumerate(LAYERS) if any(entry_matches(e, module) for e in entries)
        ]
    unplaced = sorted(m for m, layers in placed.items() if not layers)
    twice = sorted(f"{m} (layers {layers})" for m, layers in placed.items() if len(layers) > 1)
    assert not unplaced, f"modules in no layer of LAYERS (place them, and in CONTRIBUTING.md): {unplaced}"
    assert not twice, f"modules in more than one layer of LAYERS: {twice}"
    return {m: layers[0] for m, layers in placed.items()}


def test_every_module_sits_in_exactly_one_layer_and_every_entry_names_one():
    layer_index()
    modules = all_modules()
    stale = [e for _, entries in LAYERS for e in entries if not any(entry_matches(e, m) for m in modules)]
    assert not stale, f"LAYERS names what peftcli no longer has: {stale}"


def test_entry_matching():
    assert entry_matches("data/", "peftcli.data") and entry_matches("data/", "peftcli.data.pipeline")
    assert not entry_matches("data/", "peftcli.dataset") and not entry_matches("data/", "peftcli")
    assert entry_matches("__init__", "peftcli") and not entry_matches("__init__", "peftcli.api")
    assert entry_matches("api", "peftcli.api") and not entry_matches("api", "peftcli.api_extra")


def test_imports_point_down_the_layers():
    graph, layer = import_graph(), layer_index()
    upward = sorted(
        f"{src} (layer {layer[src]}: {LAYERS[layer[src]][0]}) imports {dst} "
        f"(layer {layer[dst]}: {LAYERS[layer[dst]][0]})"
        for src, targets in graph.items()
        for dst in targets
        if layer[dst] > layer[src]
    )
    assert not upward, f"{len(upward)} import(s) point up the layers:\n" + "\n".join(upward)


def test_the_layer_check_catches_an_upward_edge():
    """The check above is not vacuous: recipe (the bottom) importing the CLI would be named."""
    graph, layer = import_graph(), layer_index()
    graph["peftcli.recipe"] = {"peftcli.cli"}
    upward = [(s, d) for s, ts in graph.items() for d in ts if layer[d] > layer[s]]
    assert upward == [("peftcli.recipe", "peftcli.cli")]


def contributing_layers() -> list[set[str]]:
    """The numbered list under CONTRIBUTING.md's "Imports point one way": each item's `names`."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text.split("### Imports point one way", 1)[1].split("\n#", 1)[0]
    items = re.split(r"\n(?=\d+\. )", "\n" + section.split("\n1. ", 1)[1].split("\n\n", 1)[0])
    names = [set(re.findall(r"`([^`]+)`", item)) for item in items if item.strip()]
    return [{"__init__" if n == "peftcli/__init__.py" else n for n in item} for item in names]


def test_contributing_states_the_layers_this_test_checks():
    assert contributing_layers() == [set(entries) for _, entries in LAYERS]


def test_importing_quantize_loads_no_method():
    code = "import peftcli.quantize, sys; print(' '.join(m for m in sys.modules if m.startswith('peftcli.methods')))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [], f"import peftcli.quantize loaded {len(out)} peftcli.methods modules: {out}"


@pytest.mark.slow  # a fresh interpreter importing the whole training package (~4 s)
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
