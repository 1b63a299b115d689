"""TinyLoRA against peft 0.21 as the oracle and the paper's equation, fp32 on the CPU:

- the layers' groups: for every n and weight_tying, our assignment is peft's (the tiny model's 14
  layers: 14 vectors at 0.0, 7 at 0.5, 1 at 1.0), and the trainable count is u per group;
- the frozen parts: A and B are the top-r SVD of W0 with √S on each side (B A is W0's best rank-r
  approximation), P is peft's seeded draw for the layer;
- the paper's equation: a layer's output equals ``x (W0 + B (Σ v_i P_i) A)ᵀ + b``;
- with each option that changes the numbers (``r``, ``u``, ``weight_tying``, ``projection_seed`` with
  ``save_projection: false``, ``init_weights: uniform``), our adapter moved off init loads in
  ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an adapter peft wrote loads in
  ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and ``peftcli merge`` folds it into a
  plain model with peft's logits (≤ 1e-4), on tiny:llama, tiny:gpt2 (Conv1D) and tiny:bert seq_cls;
- merge then unmerge gives back the logits (≤ 1e-4) and the base weights (≤ 1e-6).
"""

from __future__ import annotations

import kit
import pytest
import torch

from peftcli.methods.tinylora import group_of, projections, svd_factors
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]

OPTION_RUNS = {
    "default": [],
    "r-u": ["method.r=4", "method.u=5"],
    "weight_tying": ["method.weight_tying=0.5"],
    "seed-no-projection": [
        "method.projection_seed=3",
        "method.save_projection=false",
        "method.weight_tying=1.0",
    ],
    "gpt2": ["model.name=tiny:gpt2", "method.init_weights=uniform"],
    "bert": [*BERT, "method.u=8"],
}

TARGETS = {
    "tiny:gpt2": ["c_attn", "c_proj", "c_fc"],
    "tiny:bert": ["query", "key", "value", "dense"],
    "tiny:llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# run id -> (task, model, peft TinyLoraConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"r": 2, "u": 16}),
    "llama-tied": ("causal_lm", "tiny:llama", {"r": 3, "u": 4, "weight_tying": 0.7}),
    "llama-no-projection": (
        "causal_lm",
        "tiny:llama",
        {"u": 6, "save_projection": False, "projection_seed": 9},
    ),
    "gpt2": ("causal_lm", "tiny:gpt2", {"u": 8, "fan_in_fan_out": True}),
    "bert": ("seq_cls", "tiny:bert", {"u": 8, "weight_tying": 1.0}),
}


@pytest.mark.parametrize("layers", [1, 7, 14, 23])
@pytest.mark.parametrize("tying", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_groups_are_peft_groups(layers, tying):
    groups = max(1, round(layers * (1.0 - tying)))  # peft's TinyLoraModel._create_and_replace
    size = max(1, layers // groups)
    assert [group_of(i, layers, tying) for i in range(layers)] == [
        min(i // size, groups - 1) for i in range(layers)
    ]


@pytest.mark.parametrize("tying,vectors", [(0.0, 14), (0.5, 7), (1.0, 1)])
def test_weight_tying_trains_u_per_group(tying, vectors, tmp_path):
    built = kit.build("tinylora", tmp_path, ["method.u=5", f"method.weight_tying={tying}"])
    trainable = [p for p in built.model.parameters() if p.requires_grad]
    assert len(trainable) == vectors and sum(p.numel() for p in trainable) == 5 * vectors


def test_frozen_factors_are_the_svd_and_peft_projections():
    from peft.tuners.tinylora.layer import TinyLoraLayer

    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(0))
    a, b = svd_factors(w, 3)
    u, s, vh = torch.linalg.svd(w.double())
    best = (u[:, :3] * s[:3]) @ vh[:3]
    assert kit.max_diff((b @ a).double(), best) <= 1e-5  # W0's best rank-3 approximation
    assert kit.max_diff(a.norm(dim=1), b.norm(dim=0)) <= 1e-5  # √S on each side
    layer = TinyLoraLayer.__new__(TinyLoraLayer)
    layer._layer_idx, layer.r, layer.tinylora_P = 5, {"default": 3}, {}
    TinyLoraLayer._init_projection(layer, "default", 7, 40)
    assert torch.equal(projections(7, 3, 45), layer.tinylora_P["default"])


def test_layer_is_w0_plus_b_r_a(tmp_path):
    built = kit.build("tinylora", tmp_path, ["method.u=6", "method.r=3"])
    kit.perturb(built.model, scale=0.5)
    layer = built.model.get_submodule(built.method.targets[0])
    v = built.model.adapter_shared.tinylora_v[layer.group].detach().double()
    mixing = sum(v[i] * layer.tinylora_P[i].double() for i in range(6))
    delta = layer.tinylora_B.double() @ mixing @ layer.tinylora_A.double()
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    bias = layer.base_layer.bias
    expected = x.double() @ (layer.base_layer.weight.double() + delta).T + (
        bias.double() if bias is not None else 0
    )
    assert kit.max_diff(layer(x).double(), expected) <= 1e-5


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("tinylora", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.TinyLoraConfig, task, tmp_path, model_name, target_modules=TARGETS[model_name], **options
    )
    assert result.method == "tinylora" and result.loaded <= 1e-5 and result.merged <= 1e-4


@pytest.mark.parametrize("model", ["tiny:llama", "tiny:gpt2"])
def test_merge_unmerge_round_trip(model, tmp_path):
    built = kit.build(
        "tinylora",
        tmp_path,
        [f"model.name={model}", "method.init_weights=uniform", "method.init_v_bound=0.5"],
    )
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    assert kit.max_diff(ours, kit.logits(base, batch)) > 1e-3  # uniform v: not the base
    layer = built.model.get_submodule(built.method.targets[0])
    before = layer.base_layer.weight.detach().clone()
    built.method.merge_adapter(built.model)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
    built.method.unmerge_adapter(built.model)
    assert kit.max_diff(layer.base_layer.weight, before) <= 1e-6
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-5


def test_uninitialised_v_is_refused_in_one_line(tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("tinylora", tmp_path, ["method.init_weights=false"])
    assert err.value.key == "method.init_weights" and "\n" not in str(err.value)
