"""Each tiny recipe of the LoRA family and the selective methods trains through the real API path
(``peftcli.api.train``, as ``peftcli train`` runs it) and its training loss falls: the mean of the last
logged window is below the first logged window's (metrics.jsonl, written by the loop)."""

from __future__ import annotations

import json

import pytest
from peft_oracle import ROOT

from peftcli import api
from peftcli.recipe_loader import load_recipe, validate_files

RECIPES = ["lora", "dora", "rslora", "adalora", "ia3", "bitfit"]


@pytest.mark.parametrize("name", RECIPES)
def test_tiny_recipe_validates_and_its_loss_falls(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipe paths are relative to the repo root
    path = ROOT / "recipes" / "tiny" / f"{name}.yaml"
    validate_files(load_recipe(path))
    result = api.train(path, overrides=[f"output_dir={tmp_path / 'run'}", "data.eval=null"])
    assert result.steps == load_recipe(path).train.max_steps
    losses = [
        e["loss"]
        for e in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        if e["event"] == "train"
    ]
    assert len(losses) >= 2
    assert losses[-1] < losses[0] - 0.05, losses
    assert result.last_loss < result.first_loss
