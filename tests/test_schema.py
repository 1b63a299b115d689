"""`peftcli schema`: the recipe's JSON Schema (draft 2020-12) against the shipped recipes and the
validator in peftcli.recipe (the reference for what a recipe may say), and `peftcli methods`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import pytest
import yaml
from kit import ROOT
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.methods.catalog import list_methods
from peftcli.recipe import RecipeError
from peftcli.recipe_loader import recipe_from_dict
from peftcli.schema import SCHEMA_FILE, recipe_schema, schema_text

# recipes/data/ holds data, among it lm-eval task YAML (recipes/data/tasks), not recipes
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "data" not in p.parent.parts[-2:])
BASE = {"model": {"name": "tiny:llama"}, "data": {"train": "recipes/data/tiny_train.jsonl"}}


@pytest.fixture(scope="module")
def validator():
    schema = recipe_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def errors(validator, recipe: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(recipe)]


def with_(section: str, **values) -> dict:
    recipe = json.loads(json.dumps(BASE))
    recipe.setdefault(section, {}).update(values)
    return recipe


def test_the_committed_schema_is_the_generated_one():
    assert SCHEMA_FILE.read_text() == schema_text(), "run: python -m peftcli.docs --write"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_validates(path, validator):
    assert errors(validator, yaml.safe_load(path.read_text())) == []


def test_shipped_recipes_point_at_the_schema():
    for path in RECIPES:
        first = path.read_text().splitlines()[0]
        target = first.removeprefix("# yaml-language-server: $schema=")
        assert first != target, f"{path}: first line is not the modeline"
        assert (path.parent / target).resolve() == SCHEMA_FILE, path


@pytest.mark.parametrize(
    "section, values, where",
    [
        ("train", {"lerning_rate": 1e-4}, "lerning_rate"),  # a typo'd key
        ("train", {"lr": "fast"}, "train.lr"),  # a wrong type
        ("method", {"name": "lora", "r": "x"}, "method"),
        ("method", {"name": "lora", "rr": 8}, "method"),
        ("model", {"dtype": "float64"}, "model.dtype"),  # not in the Literal
        ("data", {"max_length": 4}, "data.max_length"),  # below min 8
        ("train", {"warmup_ratio": 1.5}, "train.warmup_ratio"),  # above max 1
        ("train", {"lr": 0}, "train.lr"),  # exclusive min 0
        ("model", {"quantization": {"bits": 3}}, "model.quantization.bits"),
    ],
)
def test_schema_and_validator_both_reject(section, values, where, validator):
    recipe = with_(section, **values)
    found = errors(validator, recipe)
    assert found and any(where in e or where.split(".")[0] in e for e in found), found
    with pytest.raises(RecipeError):  # the reference: peftcli's own validator rejects it too
        recipe_from_dict(recipe)


@pytest.mark.parametrize(
    "section, values",
    [
        ("train", {"lr": "3e-4", "epochs": "2", "batch_size": 4.0}),  # PyYAML reads 3e-4 as a string
        ("method", {"name": "lora", "target_modules": "q_proj", "use_dora": "yes", "alpha": 16}),
        ("model", {"quantization": {"bits": "4"}}),
        ("method", {"name": "ia3", "target_modules": ["q_proj", "v_proj"]}),
        ("method", {"r": 4}),  # no name: lora
    ],
)
def test_schema_and_validator_both_accept(section, values, validator):
    recipe = with_(section, **values)
    recipe_from_dict(recipe)
    assert errors(validator, recipe) == []


def test_method_oneof_picks_the_branch_by_name(validator):
    schema = recipe_schema()
    branches = schema["properties"]["method"]["oneOf"]
    assert [b["properties"]["name"]["const"] for b in branches] == [m.name for m in list_methods()]
    assert errors(validator, with_("method", name="lora", r=8)) == []
    ia3_with_lora_key = with_("method", name="ia3", r=8)  # r is a LoRA option, not IA3's
    assert errors(validator, ia3_with_lora_key)
    with pytest.raises(RecipeError, match="method.r: unknown key"):
        recipe_from_dict(ia3_with_lora_key)
    assert errors(validator, with_("method", name="no_such_method"))


def test_help_texts_and_defaults_are_in_the_schema():
    train = recipe_schema()["properties"]["train"]["properties"]
    assert train["lr"]["description"] == "peak learning rate"
    assert train["lr"]["default"] == 2e-4
    assert train["scheduler"]["enum"] == ["constant", "linear", "cosine"]
    lora = next(b for b in recipe_schema()["properties"]["method"]["oneOf"] if b["title"] == "lora")
    assert lora["properties"]["r"]["default"] == 8 and lora["additionalProperties"] is False


def run_cli(*args: str, columns: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("COLUMNS", None)
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [sys.executable, "-m", "peftcli", *args], capture_output=True, text=True, env=env, check=True
    )


def test_schema_command_prints_and_writes_the_schema(tmp_path):
    printed = CliRunner().invoke(app, ["schema"])
    assert printed.exit_code == 0 and json.loads(printed.stdout) == recipe_schema()
    written = CliRunner().invoke(app, ["schema", "--output", str(tmp_path / "s.json")])
    assert written.exit_code == 0 and (tmp_path / "s.json").read_text() == schema_text()


@pytest.mark.slow  # a real process: rich sees a pipe and the COLUMNS it was started with
@pytest.mark.parametrize("columns", [40, None])  # a narrow terminal, and piped with no width set
def test_methods_never_truncates_names(columns):
    out = run_cli("methods", columns=columns).stdout
    names_shown = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")]
    names_shown = [name for name in names_shown if name]  # continuation lines of a folded description
    assert names_shown == [cls.name for cls in list_methods()], out
    if columns is None:  # piped: one line per method, so `| grep parallel_adapter` shows its whole row
        row = next(line for line in out.splitlines() if "│ parallel_adapter " in line)
        assert "arXiv 2110.04366" in row and "plus a seq_cls head" in row


def test_methods_json_lists_the_registry():
    result = CliRunner().invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    listed = json.loads(result.stdout)
    assert [m["name"] for m in listed] == [m.name for m in list_methods()]
    lora = next(m for m in listed if m["name"] == "lora")
    assert lora["mergeable"] is True and lora["peft_type"] == "LORA"
    r = next(o for o in lora["options"] if o["name"] == "r")
    assert r == {
        "name": "r",
        "type": "integer",
        "default": 8,
        "help": "rank of the update B·A (typical 8–64)",
        "minimum": 1,
    }
