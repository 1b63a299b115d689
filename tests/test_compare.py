"""`peftcli compare`: a three-method comparison on a tiny recipe, every column checked against a value
computed here another way:

- trainable parameters: ``Method.expected_trainable_parameters`` (the method's formula) on a freshly
  built model, and the % against the base counted here;
- parameters added: numel after ``apply`` minus numel of the plain base;
- changed by merge: ``peftcli merge`` writes the merged model; its safetensors are compared with the
  base's own weights scalar by scalar; a method that cannot merge says so (never 0);
- adapter file: ``os.path.getsize``; peak memory, tokens/s and eval metrics: the run's results.json;
- the PNG is a valid image of a sensible size.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import kit
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import peftcli
from peftcli.cli import app
from peftcli.methods.catalog import get_method_class
from peftcli.models import load_model, load_tokenizer, resolve_model_name
from peftcli.recipe import RecipeError
from peftcli.recipe_loader import load_recipe
from peftcli.tools.compare import MERGE_REFUSED, NOT_MERGEABLE, compare_recipe, measure_run, parse_sets

METHODS = ["lora", "ia3", "prompt_tuning"]


def write_recipe(directory: Path) -> Path:
    return kit.write_recipe(
        directory,
        output_dir=False,
        data={"max_train_examples": 16, "max_eval_examples": 8},
        method={"r": 64},  # dropped: each method starts from its own defaults
        train={"max_steps": 50, "batch_size": 8, "lr": 1.0e-2, "log_every": 1, "seed": 0},
    )


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    directory = tmp_path_factory.mktemp("compare")
    recipe = write_recipe(directory)
    output = directory / "out"
    result = compare_recipe(
        recipe,
        ",".join(METHODS),
        output,
        overrides=[],
        sets=["lora.r=4", "ia3.train.lr=3e-2"],
        steps=2,
        repeats=3,
    )
    return result, output


def plain_base(recipe) -> torch.nn.Module:
    path = resolve_model_name(recipe.model.name)
    tokenizer = load_tokenizer(path, recipe.model)
    return load_model(path, recipe.model, torch.device("cpu"), pad_token_id=tokenizer.pad_token_id)


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.slow
def test_columns_match_independent_values(comparison, tmp_path):
    result, output = comparison
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == METHODS and not any("error" in row for row in rows.values())
    for name, row in rows.items():
        run = output / "runs" / name
        recipe = load_recipe(run / "recipe.yaml")
        assert recipe.train.max_steps == 2 and row["steps"] == 2
        results = json.loads((run / "results.json").read_text())

        base = plain_base(recipe)
        base_count = numel(base)
        method = get_method_class(name)(recipe.method, recipe.model.task)
        torch.manual_seed(0)
        tuned = method.apply(plain_base(recipe))
        formula = method.expected_trainable_parameters(tuned)
        assert row["trainable"] == formula, name
        assert row["base_parameters"] == base_count
        assert row["trainable_percent_of_base"] == pytest.approx(100 * formula / base_count, rel=1e-12)
        assert row["added"] == numel(tuned) - base_count
        assert row["adapter_bytes"] == os.path.getsize(run / "adapter" / "adapter_model.safetensors")
        assert row["peak_memory_bytes"] == results["peak_memory_bytes"] and row["peak_memory_bytes"] > 2**20
        assert row["tokens_per_s"] == results["tokens_per_s"] and row["eval"] == results["eval_after"]
        assert math.isfinite(row["inference_ratio"]) and row["inference_ratio"] > 0

        if not method.mergeable:
            assert row["changed_after_merge"] == NOT_MERGEABLE and row["merged_for_inference"] is False
            continue
        merged_dir = tmp_path / f"merged-{name}"
        peftcli.merge(run / "adapter", merged_dir)
        merged = load_file(str(merged_dir / "model.safetensors"))
        base_state = base.state_dict()
        changed = sum(int((merged[k] != base_state[k]).sum()) for k in merged)
        assert row["changed_after_merge"] == changed > 0, name

    # the settings reached the right runs only: lora's r from --set (not the recipe's 64), ia3's own lr
    lora = load_recipe(output / "runs" / "lora" / "recipe.yaml")
    ia3 = load_recipe(output / "runs" / "ia3" / "recipe.yaml")
    assert lora.method.r == 4 and lora.train.lr == 1.0e-2 and ia3.train.lr == 3.0e-2
    # LoRA's merge changes exactly the weights it targets: every q/k/v/o/gate/up/down matrix entry
    assert rows["lora"]["changed_after_merge"] == sum(
        p.numel() for n, p in plain_base(lora).named_parameters() if n.endswith("proj.weight")
    )


@pytest.mark.slow
def test_a_merge_refused_on_this_model_times_the_adapter_model(comparison, monkeypatch):
    """A method that merges, but not on this model (BEFT on a base without biases), is measured unmerged
    rather than failing the whole comparison."""
    _, output = comparison

    def refuse(self, model):
        raise RecipeError("merge", "no bias to merge into", "keep the adapter")

    monkeypatch.setattr(get_method_class("lora"), "merge", refuse)
    row = measure_run(output / "runs" / "lora", repeats=1)
    assert row["changed_after_merge"] == MERGE_REFUSED and row["merged_for_inference"] is False
    assert math.isfinite(row["inference_ratio"]) and row["inference_ratio"] > 0


@pytest.mark.slow
def test_outputs_written_and_finished_runs_compare_alike(comparison, tmp_path):
    result, output = comparison
    saved = json.loads((output / "compare.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    md = (output / "compare.md").read_text()
    for name in METHODS:
        assert f"| {name} |" in md
    assert NOT_MERGEABLE in md and "peftcli compare" in md
    with Image.open(output / "compare.png") as image:
        image.verify()
    with Image.open(output / "compare.png") as image:
        assert image.format == "PNG" and image.size == (1100, 500)  # two panels: eval loss, memory

    # the finished runs compared again through the CLI: the same static columns
    runs = [str(output / "runs" / name) for name in METHODS]
    cli = CliRunner().invoke(app, ["compare", *runs, "--output", str(tmp_path / "again"), "--json"])
    assert cli.exit_code == 0, cli.output
    again = json.loads(cli.output.splitlines()[-1])
    static = (
        "method",
        "trainable",
        "added",
        "changed_after_merge",
        "adapter_bytes",
        "peak_memory_bytes",
        "eval",
    )
    assert [{k: r[k] for k in static} for r in again["rows"]] == [
        {k: r[k] for k in static} for r in result["rows"]
    ]


def test_set_parsing():
    assert parse_sets(
        ["lora.r=16", "ia3.train.lr=3e-2", "lora.target_modules=[q_proj]"], ["lora", "ia3"]
    ) == {
        "lora": ["method.r=16", "method.target_modules=[q_proj]"],
        "ia3": ["train.lr=3e-2"],
    }
    with pytest.raises(RecipeError, match=r"--set: 'lorra.r=16' names 'lorra'.*did you mean 'lora'"):
        parse_sets(["lorra.r=16"], ["lora", "ia3"])
    with pytest.raises(RecipeError, match="is not METHOD.key=value"):
        parse_sets(["r=16"], ["lora"])


def test_user_mistakes_are_one_line_exit_2(tmp_path):
    recipe = write_recipe(tmp_path)
    runner = CliRunner()
    for args, message in (
        ([str(recipe)], "--methods: is required with a recipe"),
        ([str(recipe), "--methods", "lora,ia4"], "did you mean 'ia3'"),
        (
            [str(recipe), "--methods", "lora", "--set", "lora.rank=4"],
            "method.rank: unknown key; did you mean 'r'",
        ),
        ([str(tmp_path)], "is not a finished run"),
    ):
        result = runner.invoke(app, ["compare", *args, "--output", str(tmp_path / "out")])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out" / "runs").exists()  # a bad --set is caught before anything trains
