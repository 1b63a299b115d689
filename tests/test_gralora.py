"""GraLoRA against peft 0.21 as the oracle and the paper's equation, fp32 on the CPU:

- the init: for a seed, our A (and the hybrid pair) are the tensors peft's layer draws, B is zero;
- the paper's equation: a layer's ΔW, assembled block by block from B_jn A_jn (out/k × in/k, rank r/k
  each) plus the hybrid B·A, times α/(r + hybrid_r), gives the layer's output; its rank exceeds r;
- with each option that changes the numbers (``r``, ``alpha``, ``gralora_k``, ``hybrid_r``), our adapter
  moved off init loads in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an adapter peft
  wrote loads in ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and ``peftcli merge`` folds
  it into a plain model with peft's logits (≤ 1e-4), on tiny:llama, tiny:gpt2 (Conv1D) and tiny:bert
  seq_cls;
- merge then unmerge gives back the logits (≤ 1e-4) and the base weights (≤ 1e-6);
- r not divisible by gralora_k, and a layer not divisible into k blocks, are refused in one line.
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
    "k4-alpha": ["method.r=8", "method.gralora_k=4", "method.alpha=5.0"],
    "hybrid_r": ["method.r=4", "method.hybrid_r=2"],
    "gpt2": ["model.name=tiny:gpt2", "method.hybrid_r=1"],
    "bert": [*BERT, "method.r=4"],
}

TARGETS = {
    "tiny:gpt2": ["c_attn", "c_proj", "c_fc"],
    "tiny:bert": ["query", "key", "value", "dense"],
    "tiny:llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# run id -> (task, model, peft GraloraConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"r": 8, "alpha": 16}),
    "llama-k4-hybrid": ("causal_lm", "tiny:llama", {"r": 8, "gralora_k": 4, "hybrid_r": 2, "alpha": 3}),
    "gpt2": ("causal_lm", "tiny:gpt2", {"r": 4, "alpha": 8, "fan_in_fan_out": True}),
    "bert": ("seq_cls", "tiny:bert", {"r": 4, "gralora_k": 2, "hybrid_r": 1}),
}


def test_init_is_peft_draw():
    from peft.tuners.gralora.layer import Linear as PeftGralora

    from peftcli.methods.gralora import GraloraLinear

    linear = torch.nn.Linear(24, 16)
    config = peft.GraloraConfig(r=4, gralora_k=2, hybrid_r=3)
    torch.manual_seed(5)
    theirs = PeftGralora(linear, "default", "lin", config, r=4)
    torch.manual_seed(5)
    ours = GraloraLinear(linear, 4, 2, 64.0, 3, 0.0)
    assert torch.equal(ours.gralora_A, theirs.gralora_A["default"])
    assert torch.equal(ours.gralora_B, theirs.gralora_B["default"]) and not ours.gralora_B.any()
    assert torch.equal(ours.gralora_A_general.weight, theirs.gralora_A_general["default"].weight)
    assert ours.scaling == theirs.scaling["default"] == 64.0 / 7


def test_delta_is_the_grid_of_block_loras(tmp_path):
    built = kit.build("gralora", tmp_path, ["method.r=4", "method.gralora_k=2", "method.hybrid_r=1"])
    kit.perturb(built.model, scale=0.5)
    layer = built.model.get_submodule(built.method.targets[0])  # q_proj: 64 -> 64
    k, s, out_k, in_k = 2, 2, layer.out_features // 2, layer.in_features // 2
    a, b = layer.gralora_A.detach().double(), layer.gralora_B.detach().double()
    delta = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    for j in range(k):  # output block
        for n in range(k):  # input block
            a_jn = a[n][:, j * s : (j + 1) * s].T  # (s, in/k)
            b_jn = b[j][n * s : (n + 1) * s].T  # (out/k, s)
            delta[j * out_k : (j + 1) * out_k, n * in_k : (n + 1) * in_k] = b_jn @ a_jn
    delta += layer.gralora_B_general.weight.double() @ layer.gralora_A_general.weight.double()
    delta *= layer.scaling
    assert torch.linalg.matrix_rank(delta) > 4 + 1  # more than LoRA's rank r + hybrid_r
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    bias = layer.base_layer.bias
    expected = x.double() @ (layer.base_layer.weight.double() + delta).T
    expected = expected + (bias.double() if bias is not None else 0)
    assert kit.max_diff(layer(x).double(), expected) <= 1e-5
    assert kit.max_diff(layer.delta_weight().double(), delta) <= 1e-6


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("gralora", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.GraloraConfig, task, tmp_path, model_name, target_modules=TARGETS[model_name], **options
    )
    assert result.method == "gralora" and result.loaded <= 1e-5 and result.merged <= 1e-4


@pytest.mark.parametrize("model", ["tiny:llama", "tiny:gpt2"])
def test_merge_unmerge_round_trip(model, tmp_path):
    built = kit.build("gralora", tmp_path, [f"model.name={model}", "method.hybrid_r=2"])
    kit.perturb(built.model)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    layer = built.model.get_submodule(built.method.targets[0])
    before = layer.base_layer.weight.detach().clone()
    built.method.merge_adapter(built.model)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
    built.method.unmerge_adapter(built.model)
    assert kit.max_diff(layer.base_layer.weight, before) <= 1e-6
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-5


@pytest.mark.parametrize(
    "overrides,key,words",
    [
        (["method.r=6", "method.gralora_k=4"], "method.r", "must be divisible by gralora_k"),
        (["method.r=3", "method.gralora_k=3"], "method.gralora_k", "not divisible into 3 blocks"),
    ],
    ids=["r", "layer"],
)
def test_indivisible_shapes_are_refused_in_one_line(overrides, key, words, tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("gralora", tmp_path, overrides)
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value)
