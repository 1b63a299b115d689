"""BOFT against peft 0.21 as the oracle and the paper's equations, fp32 on the CPU:

- with each option that changes the numbers (boft_block_size or boft_block_num, boft_n_butterfly_factor
  1–3, boft_dropout), our adapter moved off init loads in ``PeftModel.from_pretrained`` with our logits
  (≤ 1e-5), and an adapter peft wrote (moved off init) loads in ``peftcli.export.load_adapter`` with
  peft's logits (≤ 1e-5) and ``peftcli merge`` folds it into a plain model with peft's logits (≤ 1e-4),
  on tiny:llama (causal LM) and tiny:bert (seq_cls). peft's butterfly needs its CUDA block-diagonal
  extension; ``kit.boft_in_torch`` stands in for it with ``torch.block_diag`` (peft's own fallback);
- boft_dropout while training: from the same seed our forward equals peft's (the same blocks of the same
  factor dropped), and exactly int(p·D) blocks of one factor are the identity;
- the paper: R is orthogonal (RᵀR = I, ≤ 1e-5) and merging gives W' = diag(s) W Rᵀ, so W'W'ᵀ =
  diag(s) W Wᵀ diag(s) (the neurons' angles kept); the butterfly permutations are peft's;
- merge then unmerge gives back the weights (≤ 1e-5) and the logits;
- a geometry peft rejects, both or neither of block size / number, and GPT-2's Conv1D are refused at start
  in one line.
"""

from __future__ import annotations

import kit
import pytest
import torch

from peftcli.methods.boft import butterfly_permutation, drop_blocks
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]
SIZE = "method.boft_block_size"
NUM = "method.boft_block_num"
FACTOR = "method.boft_n_butterfly_factor"

OPTION_RUNS = {
    "default": [],
    "block_size-8": [f"{SIZE}=8"],
    "block_num": [f"{NUM}=8", f"{SIZE}=0"],
    "butterfly-2": [f"{SIZE}=8", f"{FACTOR}=2"],
    "butterfly-3": [f"{SIZE}=4", f"{FACTOR}=3"],
    "block_num-butterfly-3": [f"{NUM}=8", f"{SIZE}=0", f"{FACTOR}=3"],
    "dropout": [f"{SIZE}=8", f"{FACTOR}=2", "method.boft_dropout=0.5"],
    "bert-butterfly-2": [*BERT, f"{SIZE}=8", f"{FACTOR}=2"],
}

# run id -> (task, model, peft BOFTConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"boft_block_size": 4}),
    "llama-butterfly-2": ("causal_lm", "tiny:llama", {"boft_block_size": 8, "boft_n_butterfly_factor": 2}),
    "llama-block_num-butterfly-3": (
        "causal_lm",
        "tiny:llama",
        {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 3},
    ),
    "bert-butterfly-2": ("seq_cls", "tiny:bert", {"boft_block_size": 8, "boft_n_butterfly_factor": 2}),
}
TARGETS = {
    "tiny:llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "tiny:bert": ["query", "key", "value", "dense"],
}


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    result = kit.peft_loads_ours("boft", tmp_path, OPTION_RUNS[run])
    assert result.diff <= 1e-5
    stored = sum(t.numel() for t in peft.get_peft_model_state_dict(result.peft_model).values())
    assert stored == result.built.method.expected_trainable_parameters(result.built.model)


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.BOFTConfig, task, tmp_path, model_name, target_modules=TARGETS[model_name], **options
    )
    assert result.method == "boft" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_dropout_while_training_drops_peft_blocks(tmp_path):
    overrides = [f"{SIZE}=8", f"{FACTOR}=2", "method.boft_dropout=0.5"]
    built = kit.build("boft", tmp_path, overrides)
    kit.perturb(built.model)
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    kit.boft_in_torch()
    theirs = peft.get_peft_model(
        base,
        peft.BOFTConfig(
            boft_block_size=8,
            boft_n_butterfly_factor=2,
            boft_dropout=0.5,
            target_modules=TARGETS["tiny:llama"],
        ),
    )
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


def test_dropout_sets_int_p_d_blocks_of_one_factor_to_the_identity():
    blocks = torch.randn(3, 10, 4, 4)
    eye = torch.eye(4)
    for seed in range(5):
        torch.manual_seed(seed)
        dropped = drop_blocks(blocks, 0.35)
        is_eye = torch.tensor([[torch.equal(b, eye) for b in f] for f in dropped])
        assert is_eye.sum().item() == 3 and is_eye.any(dim=1).sum().item() == 1
        assert torch.equal(dropped[~is_eye], blocks[~is_eye])


def test_butterfly_permutations_are_peft_ones():
    from peft.tuners.boft.layer import BOFTLayer

    for n, blocks, width, factors in [(64, 8, 8, 2), (64, 16, 4, 3), (128, 4, 32, 3), (48, 12, 4, 3)]:
        for i in range(factors):
            group = n // (blocks // 2**i)
            expected = BOFTLayer.block_butterfly_perm(None, n, blocks // 2**i, width // 2, factors - 1)
            assert torch.equal(butterfly_permutation(n, group, width // 2), expected), (n, blocks, i)


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_rotation_is_orthogonal_and_merging_keeps_the_neurons_angles(factor, tmp_path):
    built = kit.build("boft", tmp_path, [f"{SIZE}=4", f"{FACTOR}={factor}"])
    kit.perturb(built.model, scale=0.3)
    layers = built.method.layers(built.model)
    before = {name: layer.base_layer.weight.detach().clone() for name, layer in layers}
    for _, layer in layers:
        rotation = layer.full_rotation()
        assert kit.max_diff(rotation.T @ rotation, torch.eye(layer.in_features)) <= 1e-5
        assert kit.max_diff(rotation, torch.eye(layer.in_features)) > 1e-2  # a real rotation
        # the butterfly reaches across blocks: a factor's product spans b·2^(m-1) features per row
        reach = (rotation.abs() > 1e-9).sum(dim=1).max().item()
        assert reach == 4 * 2 ** (factor - 1)
    scales = {name: layer.boft_s.detach().clone() for name, layer in layers}
    built.method.merge_adapter(built.model)
    for name, layer in layers:
        w0, w1, s = before[name], layer.base_layer.weight, scales[name]
        assert kit.max_diff(w1 @ w1.T, (s * w0) @ (s * w0).T) <= 1e-4


def test_merge_unmerge_round_trip(tmp_path):
    built = kit.build("boft", tmp_path, [f"{SIZE}=8", f"{FACTOR}=2"])
    kit.perturb(built.model, scale=0.2)
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
        ([f"{NUM}=4"], SIZE, "exactly one"),
        ([f"{SIZE}=0"], SIZE, "exactly one"),
        ([f"{SIZE}=24"], SIZE, "does not divide in_features 64"),
        ([f"{SIZE}=16", f"{FACTOR}=4"], SIZE, "= 128 does not divide in_features 64"),
        ([f"{SIZE}=1", f"{FACTOR}=2"], SIZE, "must both be even"),
        ([f"{NUM}=4", f"{SIZE}=0", f"{FACTOR}=4"], NUM, "not a multiple of"),
        (["method.boft_dropout=1.0"], "method.boft_dropout", "< 1"),
        (["model.name=tiny:gpt2"], "method.target_modules", "is a Conv1D"),
    ],
)
def test_refused_at_start_in_one_line(overrides, key, words, tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("boft", tmp_path, overrides)
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value)
