"""BEFT against peft 0.21 as the oracle, fp32 on the CPU:

- the paper's equation: our layer's output equals ``W x + b + β``, and the default targets are the value
  projections (peft's default for the method);
- our adapter moved off init loads in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an
  adapter peft wrote loads in ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and
  ``peftcli merge`` folds it into a plain model with peft's logits (≤ 1e-4), on tiny:qwen2 (biased
  v_proj) and tiny:bert seq_cls;
- merge then unmerge gives back the logits and the base biases;
- merging into a layer without a bias (llama's v_proj) is refused in one line, as peft refuses it.
"""

from __future__ import annotations

import kit
import pytest
import torch

from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]

OPTION_RUNS = {
    "default": [],
    "q-v": ["method.target_modules=[q_proj,v_proj]"],
    "init_weights-false": ["method.init_weights=false"],
    "bert": BERT,
}

# run id -> (task, model, peft BeftConfig options)
PEFT_RUNS = {
    "qwen2": ("causal_lm", "tiny:qwen2", {"target_modules": ["v_proj"]}),
    "qwen2-qkv": ("causal_lm", "tiny:qwen2", {"target_modules": ["q_proj", "k_proj", "v_proj"]}),
    "bert": ("seq_cls", "tiny:bert", {"target_modules": ["value"]}),
}


def test_layer_is_base_plus_the_bias_and_targets_are_value_projections(tmp_path):
    built = kit.build("beft", tmp_path)
    assert built.method.targets and all(t.endswith("v_proj") for t in built.method.targets)
    kit.perturb(built.model, scale=0.5)
    layer = built.model.get_submodule(built.method.targets[0])
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    base = layer.base_layer
    expected = x @ base.weight.T + base.bias + layer.beft_bias[0]
    assert kit.max_diff(layer(x), expected) <= 1e-6


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("beft", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(peft.BeftConfig, task, tmp_path, model_name, **options)
    assert result.method == "beft" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_merge_unmerge_round_trip(tmp_path):
    built = kit.build("beft", tmp_path, ["method.target_modules=[q_proj,v_proj]"])
    kit.perturb(built.model)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    layer = built.model.get_submodule(built.method.targets[0])
    before = layer.base_layer.bias.detach().clone()
    built.method.merge_adapter(built.model)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-5
    built.method.unmerge_adapter(built.model)
    assert kit.max_diff(layer.base_layer.bias, before) <= 1e-6
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-6


def test_merge_without_a_base_bias_is_refused_in_one_line(tmp_path):
    built = kit.build("beft", tmp_path, ["model.name=tiny:llama"])
    with pytest.raises(RecipeError) as err:
        built.method.merge(built.model)
    assert "has no bias" in str(err.value) and "\n" not in str(err.value)
