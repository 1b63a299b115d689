"""The README and the shipped recipes stay true to the code."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.docs import readme_block
from peftcli.methods.catalog import list_methods

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml"))


def test_readme_recipe_reference_is_generated_from_the_schema():
    assert readme_block() in README, "run `python -m peftcli.docs --write` after changing the schema"


def test_readme_documents_every_command_and_method():
    for command in ("train", "merge", "eval", "validate", "methods"):
        assert f"peftcli {command}" in README
    for method in list_methods():
        assert f"`{method.name}`" in README, f"README says nothing about {method.name}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_shipped_recipe_validates(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipe paths are relative to the repository root
    result = CliRunner().invoke(app, ["validate", recipe])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok")


def test_every_shipped_recipe_is_commented():
    for recipe in RECIPES:
        text = (ROOT / recipe).read_text()
        assert text.lstrip().startswith("#"), f"{recipe} should open with a comment saying what it does"
        assert text.count("#") >= 5, f"{recipe} should be commented line by line"


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, peftcli.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "peftcli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "train" in proc.stdout
    assert time.perf_counter() - start < 5.0  # generous for a loaded CI machine; ~0.4 s here


def test_methods_lists_every_method_with_its_formula(monkeypatch):
    from rich.console import Console

    import peftcli.cli

    monkeypatch.setattr(peftcli.cli, "out_console", Console(width=1000))  # no wrapping inside the table
    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0
    for method in list_methods():
        assert method.name in result.output
        assert method.trainable_formula and method.trainable_formula[:30] in result.output
