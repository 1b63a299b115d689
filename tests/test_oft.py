"""OFT against peft 0.21 as the oracle and the paper's equations, fp32 on the CPU:

- with each option that changes the numbers (r or oft_block_size, one that does not divide ``in``,
  coft with eps, block_share, use_cayley_neumann and its number of terms), our adapter moved off init
  loads in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an adapter peft wrote (moved off
  init) loads in ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and ``peftcli merge`` folds it
  into a plain model with peft's logits (≤ 1e-4), on tiny:llama (causal LM)
  and tiny:bert (seq_cls);
- the paper: with the exact Cayley transform each block is orthogonal (RᵀR = I, ≤ 1e-5), so merging keeps
  the angles and norms between W's neurons (W'W'ᵀ = WWᵀ, ≤ 1e-4); COFT keeps every stored Q within its
  radius eps/√blocks after a forward;
- the Neumann series and the block-size adjustment equal peft's (``_cayley_batch``,
  ``adjust_oft_parameters``).
"""

from __future__ import annotations

import kit
import pytest
import torch

from peftcli.methods.oft import OFTConfig, OFTRotation, block_geometry, nearest_divisor
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]

OPTION_RUNS = {
    "block_size": ["method.oft_block_size=8"],
    "block_size-not-dividing": ["method.oft_block_size=24"],
    "r": ["method.r=8", "method.oft_block_size=0"],
    "coft": ["method.coft=true", "method.eps=0.5"],
    "block_share": ["method.block_share=true"],
    "neumann-3": ["method.num_cayley_neumann_terms=3"],
    "neumann-8": ["method.num_cayley_neumann_terms=8"],
    "exact": ["method.use_cayley_neumann=false"],
    "bert-coft-share": [*BERT, "method.coft=true", "method.eps=0.3", "method.block_share=true"],
}

# run id -> (task, peft OFTConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", {"oft_block_size": 16}),
    "llama-r": ("causal_lm", {"r": 4, "oft_block_size": 0, "use_cayley_neumann": False}),
    "llama-coft": ("causal_lm", {"oft_block_size": 32, "coft": True, "eps": 0.4}),
    "llama-share": ("causal_lm", {"oft_block_size": 16, "block_share": True, "num_cayley_neumann_terms": 4}),
    "bert": ("seq_cls", {"oft_block_size": 8}),
}


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    result = kit.peft_loads_ours("oft", tmp_path, OPTION_RUNS[run])
    assert result.diff <= 1e-5
    stored = sum(t.numel() for t in peft.get_peft_model_state_dict(result.peft_model).values())
    assert stored == result.built.method.expected_trainable_parameters(result.built.model)


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, options = PEFT_RUNS[run]
    result = kit.we_load_peft(peft.OFTConfig, task, tmp_path, target_modules="all-linear", **options)
    assert result.method == "oft" and result.loaded <= 1e-5 and result.merged <= 1e-4


# -- the paper's equations ---------------------------------------------------------------------------


def test_exact_cayley_blocks_are_orthogonal_and_merging_keeps_the_neurons_angles(tmp_path):
    built = kit.build("oft", tmp_path, ["method.use_cayley_neumann=false", "method.oft_block_size=8"])
    kit.perturb(built.model, scale=0.3)
    layers = built.method.layers(built.model)
    before = {name: layer.base_layer.weight.detach().clone() for name, layer in layers}
    for _, layer in layers:
        blocks = layer.rotation_blocks().detach()
        eye = torch.eye(layer.block_size).expand_as(blocks)
        assert kit.max_diff(blocks.transpose(-2, -1) @ blocks, eye) <= 1e-5
        assert kit.max_diff(blocks, eye) > 1e-2  # a real rotation
    built.method.merge_adapter(built.model)
    for name, layer in layers:
        w0, w1 = before[name], layer.base_layer.weight
        assert kit.max_diff(w1 @ w1.T, w0 @ w0.T) <= 1e-4  # hyperspherical energy: the Gram matrix is kept
        assert kit.max_diff(w1, w0) > 1e-3


def test_coft_keeps_every_block_within_its_radius(tmp_path):
    eps = 0.2
    built = kit.build("oft", tmp_path, ["method.coft=true", f"method.eps={eps}"])
    kit.perturb(built.model, scale=0.5)
    kit.logits(built.model, kit.batch("causal_lm", built.model.config.vocab_size))
    for _, layer in built.method.layers(built.model):
        rotation = layer.oft_R
        radius = eps / rotation.weight.shape[0] ** 0.5
        norms = torch.linalg.matrix_norm(rotation.skew(rotation.weight.detach()))
        assert norms.max().item() <= radius * (1 + 1e-5)
        assert norms.min().item() >= radius * (1 - 1e-5)  # perturbed far outside: all on the sphere


@pytest.mark.parametrize("terms", range(1, 9))
def test_neumann_series_equals_peft(terms):
    from peft.tuners.oft.layer import OFTRotationModule

    block_size, stored = 6, 3
    cfg = OFTConfig(num_cayley_neumann_terms=terms)
    ours = OFTRotation(stored, block_size, cfg, torch.device("cpu"))
    theirs = OFTRotationModule(stored, block_size * (block_size - 1) // 2, block_size, 18)
    with torch.no_grad():
        ours.weight.copy_(
            torch.randn(ours.weight.shape, generator=torch.Generator().manual_seed(terms)) * 0.2
        )
    expected = theirs._cayley_batch(ours.weight.detach(), block_size, True, terms)
    assert kit.max_diff(ours.blocks().detach(), expected) <= 1e-6


def test_block_adjustment_equals_peft():
    from peft.tuners.oft.layer import OFTLayer

    for in_features in [*range(1, 130), 768, 4096, 11008]:
        for wanted in (1, 2, 3, 5, 7, 8, 16, 24, 32, 48, 100, 200):
            peft_value = OFTLayer.adjust_oft_parameters(None, in_features, wanted)
            assert nearest_divisor(in_features, wanted) == peft_value, (in_features, wanted)
    assert block_geometry(64, 0, 24) == (4, 16) and block_geometry(64, 7, 0) == (8, 8)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["method.r=4"], "method.r"),  # both set
        (["method.r=0", "method.oft_block_size=0"], "method.r"),
        (["model.name=tiny:gpt2"], "method.target_modules"),  # Conv1D
    ],
)
def test_refused_at_start_in_one_line(overrides, key, tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("oft", tmp_path, overrides)
    assert err.value.key == key
