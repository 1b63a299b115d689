"""HiRA against peft 0.21 as the oracle and the paper's equation, fp32 on the CPU:

- the init: for a seed, our A and B are the tensors peft's layer ends with (B zero: step 0 is the base);
- the paper's equation: a layer's output equals ``x (W0 + W0 ⊙ B A)ᵀ + b``, and W0 ⊙ B A has a rank
  above r (the point of the method);
- with each option that changes the numbers (``r``; ``hira_dropout`` in training), our adapter moved off init loads
  in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an adapter peft wrote loads in
  ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and ``peftcli merge`` folds it into a
  plain model with peft's logits (≤ 1e-4), on tiny:llama, tiny:gpt2 (Conv1D) and tiny:bert seq_cls;
- merge then unmerge gives back the logits (≤ 1e-4) and the base weights exactly.

peft 0.21's HiRA has a ``rank_pattern`` key but its layers are built with ``config.r`` (``dispatch_default``),
so a pattern changes nothing there; we offer none (docs/methods.md).
"""

from __future__ import annotations

import kit
import pytest
import torch

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]

OPTION_RUNS = {
    "default": [],
    "r-dropout": ["method.r=3", "method.hira_dropout=0.1"],
    "gpt2": ["model.name=tiny:gpt2", "method.r=4"],
    "bert": [*BERT, "method.r=4"],
}

TARGETS = {
    "tiny:gpt2": ["c_attn", "c_proj", "c_fc"],
    "tiny:bert": ["query", "key", "value", "dense"],
    "tiny:llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# run id -> (task, model, peft HiraConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"r": 8}),
    "llama-r2": ("causal_lm", "tiny:llama", {"r": 2}),
    "gpt2": ("causal_lm", "tiny:gpt2", {"r": 4, "fan_in_fan_out": True}),
    "bert": ("seq_cls", "tiny:bert", {"r": 4}),
}


def test_init_is_peft_draw_and_the_base():
    from peft.tuners.hira.layer import Linear as PeftHira

    from peftcli.methods.hira import HiraLinear

    linear = torch.nn.Linear(24, 16)
    torch.manual_seed(5)
    theirs = PeftHira(linear, "default", peft.HiraConfig(r=4), r=4)
    after_theirs = torch.rand(1)
    torch.manual_seed(5)
    ours = HiraLinear(linear, 4, 0.0)
    assert torch.equal(torch.rand(1), after_theirs)  # the global stream advanced alike
    assert torch.equal(ours.hira_A, theirs.hira_A["default"])
    assert torch.equal(ours.hira_B, theirs.hira_B["default"]) and not ours.hira_B.any()


def test_layer_is_w0_modulated_by_b_a(tmp_path):
    built = kit.build("hira", tmp_path, ["method.r=2"])
    kit.perturb(built.model, scale=0.5)
    layer = built.model.get_submodule(built.method.targets[0])
    a, b = layer.hira_A.detach().double(), layer.hira_B.detach().double()
    w0 = layer.base_layer.weight.detach().double()
    delta = w0 * (b @ a)
    assert torch.linalg.matrix_rank(delta) > 2  # higher than B·A's rank
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    bias = layer.base_layer.bias
    expected = x.double() @ (w0 + delta).T + (bias.double() if bias is not None else 0)
    assert kit.max_diff(layer(x).double(), expected) <= 1e-5


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("hira", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.HiraConfig, task, tmp_path, model_name, target_modules=TARGETS[model_name], **options
    )
    assert result.method == "hira" and result.loaded <= 1e-5 and result.merged <= 1e-4


@pytest.mark.parametrize("model", ["tiny:llama", "tiny:gpt2"])
def test_merge_unmerge_round_trip(model, tmp_path):
    built = kit.build("hira", tmp_path, [f"model.name={model}"])
    kit.perturb(built.model)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    layer = built.model.get_submodule(built.method.targets[0])
    before = layer.base_layer.weight.detach().clone()
    built.method.merge_adapter(built.model)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
    built.method.unmerge_adapter(built.model)
    assert torch.equal(layer.base_layer.weight, before)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-5
