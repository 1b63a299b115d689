"""No wasted work in the LoRA forward, and train.compile trains like eager.

References: the input tensor itself (LoRA at dropout 0 must hand ``x`` to ``lora_A`` without a copy);
the eager run of the same recipe (compiled losses equal within 1e-4: inductor reorders float sums).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kit import ROOT
from torch import nn

from peftcli.methods.lora import LoRALinear
from peftcli.recipe_loader import load_recipe
from peftcli.training.loop import train


@pytest.mark.parametrize("dropout, same_tensor", [(0.0, True), (0.1, False)])
def test_lora_forward_copies_no_input_at_zero_dropout(dropout, same_tensor):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=8, dropout=dropout, use_rslora=False).train()
    seen = []
    layer.lora_A.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randn(2, 3, 16)
    layer(x)
    assert (seen[0] is x) == same_tensor


def losses(run_dir: Path) -> list[float]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "train"]


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    common = ["train.max_steps=3", "train.log_every=1", "eval.generate=false"]
    for name, extra in (("eager", []), ("compiled", ["train.compile=true"])):
        recipe = load_recipe(
            ROOT / "recipes" / "tiny" / "lora.yaml", [*common, *extra, f"output_dir={tmp_path / name}"]
        )
        train(recipe)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 3
    assert max(abs(a - b) for a, b in zip(eager, compiled, strict=True)) <= 1e-4, (eager, compiled)
    assert eager[-1] < eager[0]  # it trains
