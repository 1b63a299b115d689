"""DeLoRA against peft 0.21 as the oracle and the paper's equation, fp32 on the CPU:

- the init: for a seed, our A is the one peft's layer draws, B is zero and λ the configured value, and
  the saved column norms are W0's;
- the paper's equation: a layer's output equals ``x (W0 + ΔW)ᵀ + b`` with ΔW = (λ/r) B Ξ A diag(‖W0‖)
  written out rank term by rank term, and ‖ΔW‖_F ≤ λ · max_j ‖W0[:, j]‖ (the bound the method is for);
- with each option that changes the numbers (``r``, ``delora_lambda``, ``rank_pattern``,
  ``lambda_pattern``), our adapter moved off init loads in ``PeftModel.from_pretrained`` with our
  logits (≤ 1e-5), and an adapter peft wrote loads in ``peftcli.export.load_adapter`` with peft's
  logits (≤ 1e-5) and ``peftcli merge`` folds it into a plain model with peft's logits (≤ 1e-4), on
  tiny:llama and tiny:bert seq_cls;
- merge then unmerge gives back the logits (≤ 1e-4) and the base weights (≤ 1e-6);
- GPT-2's Conv1D is refused in one line.
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
    "r-lambda": ["method.r=3", "method.delora_lambda=2.5"],
    "patterns": ["method.rank_pattern={down_proj: 5}", "method.lambda_pattern={q_proj: 4.0}"],
    "bert": [*BERT, "method.r=4"],
}

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "dense"]
# run id -> (task, model, peft DeloraConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"r": 8}),
    "llama-r-lambda": ("causal_lm", "tiny:llama", {"r": 2, "delora_lambda": 3}),
    "llama-patterns": (
        "causal_lm",
        "tiny:llama",
        {"r": 4, "rank_pattern": {"v_proj": 6}, "lambda_pattern": {"up_proj": 7}},
    ),
    "bert": ("seq_cls", "tiny:bert", {"r": 4, "delora_lambda": 5}),
}


def test_init_is_peft_draw_with_w0_column_norms():
    from peft.tuners.delora.layer import DeloraLinear as PeftDelora

    from peftcli.methods.delora import DeloraLinear

    linear = torch.nn.Linear(24, 16)
    torch.manual_seed(5)
    theirs = PeftDelora(linear, "default", peft.DeloraConfig(r=4), r=4, delora_lambda=15)
    torch.manual_seed(5)
    ours = DeloraLinear(linear, 4, 15.0, 0.0)
    assert torch.equal(ours.delora_A, theirs.delora_A["default"])
    assert torch.equal(ours.delora_B, theirs.delora_B["default"]) and not ours.delora_B.any()
    assert torch.equal(ours.delora_lambda, theirs.delora_lambda["default"])
    assert kit.max_diff(ours.delora_w_norm, theirs.delora_w_norm["default"]) <= 1e-7


def test_layer_is_the_paper_update_and_stays_within_its_bound(tmp_path):
    built = kit.build("delora", tmp_path, ["method.r=4", "method.delora_lambda=2.0"])
    kit.perturb(built.model, scale=0.5)
    layer = built.model.get_submodule(built.method.targets[0])
    a, b = layer.delora_A.detach().double(), layer.delora_B.detach().double()
    lam = layer.delora_lambda.detach().double()
    w0 = layer.base_layer.weight.detach().double()
    column_norms = w0.norm(dim=0)
    delta = (
        sum(  # Σ_i (λ/r) b_i a_iᵀ / (‖b_i‖ ‖a_i‖), then each column j times ‖W0[:, j]‖
            lam / 4 * torch.outer(b[:, i], a[i]) / (b[:, i].norm() * a[i].norm()) for i in range(4)
        )
        * column_norms
    )
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    expected = x.double() @ (w0 + delta).T
    assert kit.max_diff(layer(x).double(), expected) <= 1e-5
    assert delta.norm() <= lam * column_norms.max()  # the bound: ‖ΔW‖_F ≤ λ · max_j ‖W0[:, j]‖
    assert kit.max_diff(layer.delta_weight().double(), delta) <= 1e-6


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("delora", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    targets = BERT_TARGETS if model_name == "tiny:bert" else LLAMA_TARGETS
    result = kit.we_load_peft(
        peft.DeloraConfig, task, tmp_path, model_name, target_modules=targets, **options
    )
    assert result.method == "delora" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_merge_unmerge_round_trip(tmp_path):
    built = kit.build("delora", tmp_path, ["method.r=4"])
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


def test_conv1d_is_refused_in_one_line(tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("delora", tmp_path, ["model.name=tiny:gpt2"])
    assert "is a Conv1D; delora adapts nn.Linear layers only" in str(err.value) and "\n" not in str(err.value)
