"""SHiRA against peft 0.21 as the oracle, fp32 on the CPU:

- the random mask: for a seed (and unseeded), our positions are the ones peft's ``random_mask`` picks,
  in the order peft stores them; another seed picks others; ``weight_magnitude`` picks the largest |W|;
- the paper's update: ΔW is zero except the trained entries at their positions, and r·(in + out) of them;
- with each option that changes the numbers (``mask_type`` random and weight_magnitude, ``random_seed``,
  ``r``), our adapter moved off init loads in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and
  an adapter peft wrote loads in ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and
  ``peftcli merge`` folds it into a plain model with peft's logits (≤ 1e-4), on tiny:llama and
  tiny:bert (seq_cls);
- merge then unmerge gives back the logits and the base weights;
- GPT-2's Conv1D is refused at start (peft's SHiRA adapts nn.Linear only).
"""

from __future__ import annotations

import kit
import pytest
import torch

from peftcli.methods.shira import magnitude_positions, random_positions
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]

OPTION_RUNS = {
    "default": [],
    "random_seed-r": ["method.random_seed=5", "method.r=2"],
    "unseeded": ["method.random_seed=null", "method.r=3"],
    "weight_magnitude": ["method.mask_type=weight_magnitude", "method.r=6"],
    "bert": [*BERT, "method.random_seed=1"],
}

# run id -> (task, model, peft ShiraConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"r": 4, "random_seed": 3}),
    "llama-unseeded": ("causal_lm", "tiny:llama", {"r": 2}),
    "bert": ("seq_cls", "tiny:bert", {"r": 3, "random_seed": 8}),
}
TARGETS = {
    "tiny:bert": ["query", "key", "value", "dense"],
    "tiny:llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
}


@pytest.mark.parametrize("seed", [11, None])
def test_random_positions_are_peft_mask(seed):
    from peft.tuners.shira.mask_functions import random_mask

    mask = random_mask(torch.nn.Linear(24, 16), 3, random_seed=seed)
    assert torch.equal(random_positions(16, 24, 3 * 40, seed), torch.stack(torch.where(mask)).int())
    assert not torch.equal(random_positions(16, 24, 120, 12), torch.stack(torch.where(mask)).int())


def test_weight_magnitude_picks_the_largest_entries():
    weight = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
    rows, cols = magnitude_positions(weight, 20).long()
    picked = weight.abs()[rows, cols]
    rest = weight.abs().clone()
    rest[rows, cols] = -1
    assert picked.min() > rest.max()


def test_delta_is_sparse_with_r_in_plus_out_entries(tmp_path):
    built = kit.build("shira", tmp_path, ["method.r=2", "method.init_weights=false"])
    layer = built.model.get_submodule(built.method.targets[0])
    delta = layer.delta_weight().detach()
    n = 2 * (layer.in_features + layer.out_features)
    rows, cols = layer.shira_indices.long()
    assert layer.shira_weight.numel() == n and int((delta != 0).sum()) == n
    assert torch.equal(delta[rows, cols], layer.shira_weight.detach())


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("shira", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.ShiraConfig, task, tmp_path, model_name, target_modules=TARGETS[model_name], **options
    )
    assert result.method == "shira" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_merge_unmerge_round_trip(tmp_path):
    built = kit.build("shira", tmp_path, ["method.init_weights=false"])
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    layer = built.model.get_submodule(built.method.targets[0])
    before = layer.base_layer.weight.detach().clone()
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    assert kit.max_diff(ours, kit.logits(base, batch)) > 1e-3  # not trivial
    built.method.merge_adapter(built.model)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
    built.method.unmerge_adapter(built.model)
    assert kit.max_diff(layer.base_layer.weight, before) <= 1e-6
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-5


def test_conv1d_and_too_large_r_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="nn.Linear"):
        kit.build("shira", tmp_path, ["model.name=tiny:gpt2"])
    with pytest.raises(RecipeError, match="method.r"):
        kit.build("shira", tmp_path, ["method.r=40"])
