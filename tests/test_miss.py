"""MiSS against peft 0.21 as the oracle and the paper's equations, fp32 on the CPU:

- the paper's equations, written out by hand: MiSS's ΔW[o, c] = D[c mod r, o] (r dividing ``in`` or
  not; mini's D repeated along ``out``), and Bat's W'_ij = W_ij (I + B_i) + B_i block by block;
- with each option that changes the numbers (``r`` dividing ``in`` or not, ``init_weights`` true / false /
  bat / mini with ``mini_r``, ``miss_dropout``), our adapter moved off init loads in
  ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an adapter peft wrote (moved off init)
  loads in ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and ``peftcli merge`` folds it
  into a plain model with peft's logits (≤ 1e-4), on tiny:llama and tiny:bert seq_cls;
- miss_dropout while training: from the same seed our forward equals peft's;
- merge then unmerge gives back the weights (≤ 1e-5; Bat through (I + B)^(-1)) and the logits;
- a shape peft rejects, Bat on a 4-bit base, and GPT-2's Conv1D are refused at start in one line.
"""

from __future__ import annotations

import kit
import pytest
import torch

from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]
INIT = "method.init_weights"

OPTION_RUNS = {
    "default": [],
    "r-24-padded": ["method.r=24"],
    "random-init": [f"{INIT}=false", "method.r=8"],
    "bat": [f"{INIT}=bat", "method.r=16"],
    "mini": [f"{INIT}=mini", "method.r=16", "method.mini_r=8"],
    "dropout": ["method.r=16", "method.miss_dropout=0.3"],
    "bert": [*BERT, "method.r=16"],
    "bert-bat": [*BERT, f"{INIT}=bat", "method.r=32"],
}

# run id -> (task, model, peft MissConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"r": 16}),
    "llama-r-24-padded": ("causal_lm", "tiny:llama", {"r": 24}),
    "llama-bat": ("causal_lm", "tiny:llama", {"r": 8, "init_weights": "bat"}),
    "llama-mini": ("causal_lm", "tiny:llama", {"r": 16, "init_weights": "mini", "mini_r": 4}),
    "bert-bat": ("seq_cls", "tiny:bert", {"r": 16, "init_weights": "bat"}),
}
TARGETS = {
    "tiny:llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "tiny:bert": ["query", "key", "value", "dense"],
}


def hand_weight(weight: torch.Tensor, block: torch.Tensor, mode, r: int) -> torch.Tensor:
    """The adapted weight from the paper, one column (MiSS) or one r × r block (Bat) at a time."""
    w = weight.double().clone()
    block = block.double()
    out_features, in_features = w.shape
    if mode == "bat":
        eye = torch.eye(r, dtype=torch.float64)
        for i in range(out_features // r):
            for j in range(in_features // r):
                rows, cols = slice(i * r, (i + 1) * r), slice(j * r, (j + 1) * r)
                w[rows, cols] = w[rows, cols] @ (eye + block[i]) + block[i]
        return w
    if mode == "mini":
        block = torch.cat([block] * (out_features // block.shape[1]), dim=1)
    for c in range(in_features):
        w[:, c] += block[c % r]
    return w


@pytest.mark.parametrize("run", ["default", "r-24-padded", "bat", "mini"])
def test_layer_is_the_papers_weight(run, tmp_path):
    built = kit.build("miss", tmp_path, OPTION_RUNS[run])
    kit.perturb(built.model, scale=0.2)
    for name in built.method.targets[:7]:  # q, k, v, o (out 32 and 64), gate, up, down (in 128)
        layer = built.model.get_submodule(name)
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
        w = hand_weight(layer.base_layer.weight, layer.miss_block.detach(), layer.mode, layer.r)
        expected = x.double() @ w.T
        assert kit.max_diff(layer(x).double(), expected) <= 1e-5, name


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    result = kit.peft_loads_ours("miss", tmp_path, OPTION_RUNS[run])
    assert result.diff <= 1e-5
    stored = sum(t.numel() for t in peft.get_peft_model_state_dict(result.peft_model).values())
    assert stored == result.built.method.expected_trainable_parameters(result.built.model)


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.MissConfig, task, tmp_path, model_name, target_modules=TARGETS[model_name], **options
    )
    assert result.method == "miss" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_dropout_while_training_equals_peft(tmp_path):
    built = kit.build("miss", tmp_path, OPTION_RUNS["r-24-padded"] + ["method.miss_dropout=0.3"])
    kit.perturb(built.model)
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    config = peft.MissConfig(r=24, miss_dropout=0.3, target_modules=TARGETS["tiny:llama"])
    theirs = peft.get_peft_model(base, config)
    kit.copy_into_peft(theirs, built.method.adapter_state_dict(built.model))
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    built.model.train()
    theirs.train()
    torch.manual_seed(3)
    ours = kit.logits(built.model, batch)
    torch.manual_seed(3)
    assert kit.max_diff(ours, kit.peft_logits(theirs, batch)) <= 1e-5
    built.model.eval()
    assert kit.max_diff(ours, kit.logits(built.model, batch)) > 1e-4  # dropout changed the forward


@pytest.mark.parametrize("run", ["r-24-padded", "bat", "mini"])
def test_merge_unmerge_round_trip(run, tmp_path):
    built = kit.build("miss", tmp_path, OPTION_RUNS[run])
    kit.perturb(built.model, scale=0.1)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    layer = built.model.get_submodule(built.method.targets[0])
    before = layer.base_layer.weight.detach().clone()
    built.method.merge_adapter(built.model)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
    built.method.unmerge_adapter(built.model)
    assert kit.max_diff(layer.base_layer.weight, before) <= 1e-5
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-5


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["method.r=65"], "method.r", "more than in_features (64)"),
        ([f"{INIT}=bat", "method.r=24"], "method.r", "must divide in_features"),
        (
            [f"{INIT}=mini", "method.r=16", "method.mini_r=48"],
            "method.mini_r",
            "does not divide out_features",
        ),
        (["method.miss_dropout=1.0"], "method.miss_dropout", "< 1"),
        (["model.name=tiny:gpt2"], "method.target_modules", "is a Conv1D"),
    ],
)
def test_refused_at_start_in_one_line(overrides, key, words, tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("miss", tmp_path, overrides)
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value)


def test_bat_on_a_4bit_base_is_refused_at_start(tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.tiny_recipe("miss", tmp_path, [f"{INIT}=bat", "model.quantization.bits=4"])
    assert err.value.key == "method.init_weights" and "4-bit" in str(err.value)
