"""Adding a method touches the five places CONTRIBUTING.md lists, and no other: every registered method
is in each of them, and the numbered list in CONTRIBUTING names exactly those five (plus the one command
that regenerates the reference and the schema). Fast: reads files, builds no model."""

from __future__ import annotations

import ast
import re

import pytest
from kit import ROOT

from peftcli.methods.catalog import list_methods

METHODS = [m for m in list_methods()]
TEST_TABLE = ROOT / "tests" / "test_methods.py"

# The five places, as CONTRIBUTING's numbered list names them (in its order).
PLACES = [
    "peftcli/methods/<name>.py",
    "peftcli/methods/catalog.py",
    "recipes/tiny/<name>.yaml",
    "tests/test_methods.py",
    "docs/methods.md",
]
COMMAND = "python -m peftcli.docs --write"


def section(markdown: str, heading: str) -> str:
    """The text under ``## heading`` up to the next heading of any level."""
    after = markdown.split(f"## {heading}\n", 1)[1]
    return re.split(r"\n#{1,3} ", after, maxsplit=1)[0]


def numbered_items(text: str) -> list[str]:
    """The items of the first numbered list, each with its continuation lines joined."""
    items: list[str] = []
    for line in text.splitlines():
        if re.match(r"\d+\. ", line):
            items.append(line)
        elif items and line.startswith("   "):
            items[-1] += " " + line.strip()
        elif items and line.strip():
            break
    return items


def catalog_imports() -> set[str]:
    tree = ast.parse((ROOT / "peftcli" / "methods" / "catalog.py").read_text())
    return {
        alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module == "peftcli.methods"
        for alias in node.names
    }


def methods_table_rows() -> set[str]:
    """Method names in the first column of docs/methods.md's table "Every method"."""
    text = section((ROOT / "docs" / "methods.md").read_text(), "Every method")
    return {m.group(1) for m in re.finditer(r"^\| `([a-z0-9_]+)` \|", text, re.M)}


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_every_method_is_in_the_five_places(method):
    name, module = method.name, method.__module__
    assert module == f"peftcli.methods.{name}", f"{name} lives in {module}, not peftcli/methods/{name}.py"
    assert (ROOT / "peftcli" / "methods" / f"{name}.py").is_file()
    assert name in catalog_imports(), f"peftcli/methods/catalog.py does not import {name}"
    assert (ROOT / "recipes" / "tiny" / f"{name}.yaml").is_file(), f"no recipes/tiny/{name}.yaml"
    assert name in methods_table_rows(), f"docs/methods.md's table 'Every method' has no row for {name}"


@pytest.mark.skipif(
    not TEST_TABLE.is_file(), reason="tests/test_methods.py (the method test table) is not on this branch"
)
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_every_method_has_a_row_in_the_method_test_table(method):
    assert re.search(rf"""["']{method.name}["']""", TEST_TABLE.read_text()), (
        f"tests/test_methods.py has no row for {method.name}"
    )


def test_the_catalog_and_the_table_list_nothing_else():
    names = {m.name for m in METHODS}
    assert catalog_imports() == names
    assert methods_table_rows() == names


def test_contributing_lists_exactly_the_five_places_and_the_command():
    text = section((ROOT / "CONTRIBUTING.md").read_text(), "Adding a method")
    assert "exactly five places" in text
    items = numbered_items(text)
    assert [item.split(". ", 1)[0] for item in items] == ["1", "2", "3", "4", "5"]
    for item, place in zip(items, PLACES, strict=True):
        assert place in item, f"item {item[:2]} of CONTRIBUTING's list does not name {place}"
    other = [p for p in PLACES for item in items if p in item and PLACES.index(p) != items.index(item)]
    assert not other, f"a place is named in two items: {other}"
    assert COMMAND in text and "docs/recipe-reference.md" in text and "schema/recipe.schema.json" in text
