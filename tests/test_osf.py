"""OSF against peft 0.21 as the oracle, fp32 on the CPU:

- the paper's split: the frozen top-k part plus the starting low part rebuild W, and the layer's output
  equals ``(W + U_l S_l V_l − U_l⁰ S_l⁰ V_l⁰) x + b``;
- the constraint: after a backward pass the low factors' gradients have no component in the frozen
  high subspace (U_hᵀ ∇U_l = 0, ∇V_l V_hᵀ = 0), and they equal the gradients peft's hooks leave on the
  same adapter and batch (≤ 1e-5);
- with each option that changes the numbers (``effective_rank`` as an int or a fraction,
  ``rank_pattern``), our adapter moved off init loads in ``PeftModel.from_pretrained`` with our logits
  (≤ 1e-5), and an adapter peft wrote loads in ``peftcli.export.load_adapter`` with peft's logits
  (≤ 1e-5) and ``peftcli merge`` folds it into a plain model with peft's logits (≤ 1e-4);
- merge then unmerge gives back the logits and the base weights (peft itself has no unmerge).
"""

from __future__ import annotations

import kit
import pytest
import torch

from peftcli.methods.osf import frozen_rank

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]

OPTION_RUNS = {
    "default": [],
    "effective_rank-int": ["method.effective_rank=4"],
    "effective_rank-fraction": ["method.effective_rank=0.75"],
    "rank_pattern": ["method.rank_pattern={down_proj: 2, q_proj: 0.25}"],
    "bert": BERT,
}

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# run id -> (task, model, peft OSFConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"target_modules": LLAMA_TARGETS}),
    "llama-int": ("causal_lm", "tiny:llama", {"target_modules": LLAMA_TARGETS, "effective_rank": 5}),
    "llama-pattern": (
        "causal_lm",
        "tiny:llama",
        {"target_modules": LLAMA_TARGETS, "effective_rank": 0.25, "rank_pattern": {"mlp": 3}},
    ),
    "bert": ("seq_cls", "tiny:bert", {"target_modules": ["query", "value", "dense"]}),
}


@pytest.mark.parametrize(
    "value,min_dim,k",
    [(None, 32, 16), (None, 31, 15), (0.25, 32, 8), (1.0, 32, 32), (5, 32, 5), (99, 32, 32)],
)
def test_frozen_rank_reads_ints_and_fractions_as_peft(value, min_dim, k):
    assert frozen_rank(value, min_dim) == k


def test_split_rebuilds_w_and_layer_adds_the_change_of_the_low_part(tmp_path):
    built = kit.build("osf", tmp_path, ["method.effective_rank=5"])
    layer = built.model.get_submodule(built.method.targets[0])
    w = layer.base_layer.weight.double()
    s_high = torch.linalg.svdvals(w)[: layer.k]
    high = (layer.U_high.double() * s_high) @ layer.V_high.double()
    low = (layer.U_low0.double() * layer.S_low0.double()) @ layer.V_low0.double()
    assert kit.max_diff(high + low, w) <= 1e-5
    kit.perturb(built.model, scale=0.1)
    p = {n: t.double() for n, t in layer.osf_svd_params.items()}
    delta = (p["U_low"] * p["S_low"]) @ p["V_low"] - low
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)).double()
    assert kit.max_diff(layer(x.float()).double(), x @ (w + delta).T) <= 1e-5


@pytest.mark.slow
def test_gradients_stay_orthogonal_to_the_high_subspace_and_equal_peft(tmp_path):
    result = kit.peft_loads_ours("osf", tmp_path, ["method.effective_rank=0.5"])
    built, theirs = result.built, result.peft_model
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    for n, p in theirs.named_parameters():
        p.requires_grad_("osf_svd_params" in n)  # loaded for inference: trainable again, as peft trains it
    for model in (built.model, theirs):
        model.train()
        model.zero_grad()
        model(**batch).loss.backward()
    ours = {n: p.grad for n, p in built.model.named_parameters() if "osf_svd_params" in n}
    peft_grads = {
        n.replace(".default.", "."): p.grad for n, p in theirs.named_parameters() if p.grad is not None
    }
    for _, layer in built.method.layers(built.model):
        grads = layer.osf_svd_params
        assert (layer.U_high.T @ grads["U_low"].grad).abs().max() <= 1e-5
        assert (grads["V_low"].grad @ layer.V_high.T).abs().max() <= 1e-5
    assert len(ours) == len(peft_grads)
    for name, grad in ours.items():
        assert kit.max_diff(grad, peft_grads[f"base_model.model.{name}"]) <= 1e-5, name


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("osf", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(peft.OSFConfig, task, tmp_path, model_name, **options)
    assert result.method == "osf" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_merge_unmerge_round_trip(tmp_path):
    built = kit.build("osf", tmp_path)
    kit.perturb(built.model)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    layer = built.model.get_submodule(built.method.targets[0])
    before = layer.base_layer.weight.detach().clone()
    built.method.merge_adapter(built.model)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
    built.method.unmerge_adapter(built.model)
    assert kit.max_diff(layer.base_layer.weight, before) <= 1e-5
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
