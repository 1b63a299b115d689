"""The README, CONTRIBUTING.md, docs/ and the shipped recipes stay true to the code and to each other.

The link check follows GitHub's rules: a relative link must name an existing file, and a ``#anchor``
must be the slug of a heading in that file (lower-cased; characters other than letters, digits, ``_``,
``-`` and spaces dropped; spaces become ``-``; the n-th repeat of a slug gets ``-n``). Links inside code
blocks and code spans are not links.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kit import ROOT
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.docs import reference_block
from peftcli.methods.catalog import list_methods

README = (ROOT / "README.md").read_text()
METHODS_DOC = (ROOT / "docs" / "methods.md").read_text()
MARKDOWN = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")])
# recipes/data/ holds data, among it lm-eval task YAML (recipes/data/tasks), not recipes
RECIPES = sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml") if "data" not in p.parent.parts[-2:]
)


def test_recipe_reference_is_generated_from_the_schema():
    reference = (ROOT / "docs" / "recipe-reference.md").read_text()
    assert reference_block() in reference, "run `python -m peftcli.docs --write` after changing the schema"


def test_readme_documents_every_command_and_points_to_the_method_list():
    # a new method needs no README edit: the README points to docs/methods.md, which lists them all
    # (tests/test_adding_a_method.py checks its table row by row)
    for command in ("train", "merge", "eval", "validate", "methods"):
        assert f"peftcli {command}" in README
    assert "docs/methods.md#every-method" in README
    for method in list_methods():
        assert f"`{method.name}`" in METHODS_DOC, f"docs/methods.md says nothing about {method.name}"


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (before de-duplication)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    for line in _outside_code_blocks(markdown):
        match = re.match(r" {0,3}#{1,6} +(.*?)(?: +#+)? *$", line)
        if match:
            slug = github_slug(match.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            if n:
                seen[f"{slug}-{n}"] = 1
    return set(seen)


def _outside_code_blocks(markdown: str) -> list[str]:
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def broken_links(path: Path) -> list[str]:
    """Every relative link in ``path`` whose file or heading does not exist, as 'target: why'."""
    problems = []
    for line in _outside_code_blocks(path.read_text()):
        line = re.sub(r"`[^`]*`", "", line)  # code spans hold no links
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                problems.append(f"{target}: no such file {linked}")
            elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked.read_text())):
                problems.append(f"{target}: no heading #{anchor} in {linked.name}")
    return problems


def test_github_slugs_of_headings_in_these_docs():
    # anchors GitHub renders for headings of this kind (checked by hand against github.com)
    assert github_slug("Set-up: two commands") == "set-up-two-commands"
    assert github_slug("`lora` options") == "lora-options"
    assert github_slug("`method.name: adalora`") == "methodname-adalora"
    assert github_slug("Memory: `bench/memory.py`") == "memory-benchmemorypy"
    assert (
        github_slug("QLoRA: 4-bit and 8-bit bases, paged optimizers")
        == "qlora-4-bit-and-8-bit-bases-paged-optimizers"
    )
    assert github_slug("Tests in two tiers") == "tests-in-two-tiers"
    assert anchors("# A\n```\n# not a heading\n```\n## A\n## A") == {"a", "a-1", "a-2"}


def test_the_link_check_finds_a_broken_file_and_a_broken_anchor(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## Real heading\n")
    page.write_text(
        "# Page\n[ok](other.md#real-heading) [ok](#page) [web](https://example.com/x.md)\n"
        "[gone](missing.md) [bad](other.md#no-heading) [self](#nowhere) `[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
    )
    assert [p.split(":")[0] for p in broken_links(page)] == ["missing.md", "other.md#no-heading", "#nowhere"]


@pytest.mark.parametrize("path", MARKDOWN, ids=[str(p.relative_to(ROOT)) for p in MARKDOWN])
def test_every_relative_link_points_to_an_existing_file_and_heading(path):
    assert broken_links(path) == []


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
