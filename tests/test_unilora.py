"""Uni-LoRA against peft 0.21 as the oracle and the paper's equation, fp32 on the CPU:

- the index map: for a count, length and seed, our indices are peft's ``UniLoraModel.generate_index``
  (balanced: each θ entry used ⌊D/d⌋ or ⌈D/d⌉ times), and a built model's layers hold them in model
  order, A then B;
- the paper's projection: P (D × d, one 1/√count per row) has orthonormal columns (PᵀP = I), and every
  layer's A and B equal the slices of P θ; θ is peft's draw for the same seed;
- with each option that changes the numbers (``r``, ``theta_d_length``, ``proj_seed``,
  ``init_theta_d_bound``, ``save_indices``), our adapter moved off init loads in
  ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an adapter peft wrote loads in
  ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and ``peftcli merge`` folds it into a
  plain model with peft's logits (≤ 1e-4), on tiny:llama, tiny:gpt2 (Conv1D) and tiny:bert seq_cls;
- merge then unmerge gives back the logits (≤ 1e-4) and the base weights (≤ 1e-6).
"""

from __future__ import annotations

import kit
import pytest
import torch

from peftcli.methods.unilora import balanced_indices, isometric_scales

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]

OPTION_RUNS = {
    "default": [],
    "r-length-seed": ["method.r=2", "method.theta_d_length=100", "method.proj_seed=3"],
    "save_indices-bound": ["method.save_indices=true", "method.init_theta_d_bound=0.3"],
    "gpt2": ["model.name=tiny:gpt2"],
    "bert": [*BERT, "method.theta_d_length=64"],
}

TARGETS = {
    "tiny:gpt2": ["c_attn", "c_proj", "c_fc"],
    "tiny:bert": ["query", "key", "value", "dense"],
    "tiny:llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# run id -> (task, model, peft UniLoraConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"r": 4}),
    "llama-seed-length": ("causal_lm", "tiny:llama", {"r": 2, "theta_d_length": 77, "proj_seed": 5}),
    "llama-save_indices": ("causal_lm", "tiny:llama", {"save_indices": True, "init_theta_d_bound": 0.1}),
    "gpt2": ("causal_lm", "tiny:gpt2", {"r": 3, "fan_in_fan_out": True}),
    "bert": ("seq_cls", "tiny:bert", {"r": 2, "theta_d_length": 64}),
}


@pytest.mark.parametrize("count,length,seed", [(1000, 256, 42), (1000, 250, 0), (37, 64, 9), (512, 128, 1)])
def test_index_map_is_peft_draw_and_balanced(count, length, seed):
    from peft.tuners.unilora.model import UniLoraModel

    ours = balanced_indices(count, length, seed)
    assert torch.equal(ours, UniLoraModel.generate_index(count, length, seed))
    uses = torch.bincount(ours, minlength=length)
    assert uses.max() - uses.min() <= 1 and uses.sum() == count


def test_layers_read_p_theta_and_p_is_an_isometry(tmp_path):
    torch.manual_seed(3)
    expected_theta = torch.empty(50).uniform_(-0.02, 0.02)  # peft's first draw from the seed
    built = kit.build("unilora", tmp_path, ["method.r=2", "method.theta_d_length=50", "train.seed=3"])
    theta = built.model.adapter_shared.unilora_theta_d.detach()
    assert torch.equal(theta, expected_theta)
    layers = [m for _, m in built.method.layers(built.model)]
    indices = torch.cat([t.flatten() for m in layers for t in (m.unilora_indices_A, m.unilora_indices_B)])
    assert torch.equal(indices, balanced_indices(indices.numel(), 50, 42))  # model order, A then B
    scales = isometric_scales(indices, 50)
    projection = torch.zeros(indices.numel(), 50, dtype=torch.float64)
    projection[torch.arange(indices.numel()), indices] = scales[indices].double()
    assert kit.max_diff(projection.T @ projection, torch.eye(50, dtype=torch.float64)) <= 1e-6  # fp32 scales
    flat = projection @ theta.double()
    ours = torch.cat([t.flatten() for m in layers for t in m.factors()]).double()
    assert kit.max_diff(ours, flat) <= 1e-7


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("unilora", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.UniLoraConfig, task, tmp_path, model_name, target_modules=TARGETS[model_name], **options
    )
    assert result.method == "unilora" and result.loaded <= 1e-5 and result.merged <= 1e-4


@pytest.mark.parametrize("model", ["tiny:llama", "tiny:gpt2"])
def test_merge_unmerge_round_trip(model, tmp_path):
    built = kit.build("unilora", tmp_path, [f"model.name={model}", "method.init_theta_d_bound=0.5"])
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    assert kit.max_diff(ours, kit.logits(base, batch)) > 1e-3  # step 0 is not the base
    layer = built.model.get_submodule(built.method.targets[0])
    before = layer.base_layer.weight.detach().clone()
    built.method.merge_adapter(built.model)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
    built.method.unmerge_adapter(built.model)
    assert kit.max_diff(layer.base_layer.weight, before) <= 1e-6
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-5
