"""DEFT against peft 0.21 as the oracle, fp32 on the CPU:

- the definition: our layer's output equals ``((I − P_proj) W + s·Q_P R) x + b`` built by hand, with
  P_proj = P relu(P)ᵀ (relu) or Q_P Q_Pᵀ (qr), and PaRa's ``(I − P_proj) W x + b``;
- with each option that changes the numbers (``r``, ``decomposition_method``, ``alpha``, ``para``), our
  adapter moved off init loads in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an adapter
  peft wrote loads in ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and ``peftcli merge``
  folds it into a plain model with peft's logits (≤ 1e-4), on tiny:llama, tiny:gpt2 (Conv1D) and
  tiny:bert seq_cls;
- merge then unmerge gives back the logits and the base weights.
"""

from __future__ import annotations

import kit
import pytest
import torch

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]

OPTION_RUNS = {
    "default": [],
    "qr-alpha-r4": ["method.decomposition_method=qr", "method.alpha=8", "method.r=4"],
    "para": ["method.para=true"],
    "para-qr": ["method.para=true", "method.decomposition_method=qr"],
    "gpt2": ["model.name=tiny:gpt2"],
    "bert": BERT,
}

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# run id -> (task, model, peft DeftConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"target_modules": LLAMA_TARGETS}),
    "llama-qr-alpha": (
        "causal_lm",
        "tiny:llama",
        {"target_modules": LLAMA_TARGETS, "decomposition_method": "qr", "alpha": 16, "r": 4},
    ),
    "llama-para": ("causal_lm", "tiny:llama", {"target_modules": LLAMA_TARGETS, "para": True}),
    "gpt2": (
        "causal_lm",
        "tiny:gpt2",
        {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True},
    ),
    "bert": ("seq_cls", "tiny:bert", {"target_modules": ["query", "value", "dense"]}),
}


@pytest.mark.parametrize("method", ["relu", "qr"])
@pytest.mark.parametrize("para", [False, True], ids=["deft", "para"])
def test_layer_is_the_definition(method, para, tmp_path):
    options = [f"method.decomposition_method={method}", f"method.para={str(para).lower()}", "method.alpha=4"]
    built = kit.build("deft", tmp_path, options)
    kit.perturb(built.model, scale=0.3)
    layer = built.model.get_submodule(built.method.targets[0])
    p, w = layer.deft_P.double(), layer.base_layer.weight.double()
    q = torch.linalg.qr(p).Q if method == "qr" else p
    right = q if method == "qr" else torch.relu(p)
    weight = (torch.eye(w.shape[0], dtype=torch.float64) - q @ right.T) @ w
    if not para:
        weight = weight + (4 / layer.r) * q @ layer.deft_R.double()
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)).double()
    assert kit.max_diff(layer(x.float()).double(), x @ weight.T) <= 1e-5


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("deft", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(peft.DeftConfig, task, tmp_path, model_name, **options)
    assert result.method == "deft" and result.loaded <= 1e-5 and result.merged <= 1e-4


@pytest.mark.parametrize(
    "options", [[], ["method.para=true", "method.decomposition_method=qr"]], ids=["deft", "para-qr"]
)
def test_merge_unmerge_round_trip(options, tmp_path):
    built = kit.build("deft", tmp_path, options)
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
