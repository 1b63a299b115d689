"""The issue-6 smoke recipes train through the real CLI path (peftcli.api.train) and their loss falls.

Reference: the run's own first logged train loss; each run is cut to 12 steps to stay fast (the full
recipes run 40). The logged metrics.jsonl must agree with the returned first/last losses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftcli import api

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [
    "houlsby_adapter",
    "parallel_adapter",
    "ladder_side_tuning",
    "adapter_fusion",
    "mam_adapter",
    "unipelt",
]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_and_loss_falls(name, tmp_path):
    result = api.train(
        ROOT / "recipes" / "tiny" / f"{name}.yaml",
        overrides=[f"output_dir={tmp_path / 'run'}", "train.max_steps=12", "train.log_every=1"],
    )
    assert result.steps == 12
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in logged if e["event"] == "train"]
    assert losses[0] == pytest.approx(result.first_loss) and losses[-1] == pytest.approx(result.last_loss)
    assert result.last_loss < result.first_loss - 0.01, (result.first_loss, result.last_loss)
    assert result.eval_after["eval_loss"] < result.eval_before["eval_loss"]
