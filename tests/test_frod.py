"""FRoD against peft 0.21 as the oracle and the paper's equation, fp32 on the CPU:

- the naming: categories and block numbers of module names are peft's (they key the shared bases on
  disk), and the shared basis (both branches: QR of a tall stack, SVD of a wide one) and the sparse
  positions are bit-identical to the ones peft builds, so ``save_projection: false`` adapters rebuild
  in either tool;
- the paper's equation: every layer factors as W0 = U diag(Λ⁰) Vᵀ, its output is ``x (U (Λ + S) Vᵀ)ᵀ + b``
  with S dense at the trained positions, and the update is full rank (what LoRA cannot reach);
- with each option that changes the numbers (``sparse_rate`` including 0, ``regularization_alpha``,
  ``projection_prng_key`` with ``save_projection: false``, ``init_weights: false``, a one-block category
  (the SVD branch)), our adapter moved off init loads in ``PeftModel.from_pretrained`` with our logits
  (≤ 1e-5), and an adapter peft wrote loads in ``peftcli.export.load_adapter`` with peft's logits
  (≤ 1e-5) and ``peftcli merge`` folds it into a plain model with peft's logits (≤ 1e-4), on tiny:llama,
  tiny:gpt2 (Conv1D) and tiny:bert seq_cls; ``frod_dropout`` draws as peft's in training;
- tiny:t5, whose logits reach ~45, where fp32 itself is good to ~1e-5: ours are as close to the fp64
  value of the same adapter as the plain base's fp32 logits are to its fp64 ones, and peft's within 5e-5
  of ours both ways (peft computes U (Λ + S) Vᵀ x and rounds differently);
- step 0 is the base exactly, in bf16 too (peft's reconstruction is off by bf16 rounding there);
- a file's V replaces ours and U, Λ⁰ are rebuilt from it; merge then unmerge restores the weights;
- a category whose layers differ in input size, and peft's bias / layers_to_transform, are refused in one line.
"""

from __future__ import annotations

import copy

import kit
import pytest
import torch
from safetensors.torch import load_file, save_file

from peftcli.export import load_adapter
from peftcli.methods.frod import (
    Frod,
    FrodConfig,
    block_of,
    category_of,
    pattern_size,
    shared_basis,
    sparse_pattern,
)
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]
T5 = ["model.name=tiny:t5", "model.task=seq2seq"]

OPTION_RUNS = {
    "no-saved-projection-key-alpha-rate": [
        "method.save_projection=false",  # peft rebuilds V and the positions with these options
        "method.projection_prng_key=7",
        "method.regularization_alpha=0.1",
        "method.sparse_rate=0.05",
    ],
    "sparse_rate-0-q-v": ["method.sparse_rate=0", "method.target_modules=[q_proj,v_proj]"],
    "one-block-svd": [r"method.target_modules=model\.layers\.0\.self_attn\.(k|v)_proj"],
    "gpt2-random-init": ["model.name=tiny:gpt2", "method.init_weights=false"],
    "bert-no-saved-projection": [*BERT, "method.save_projection=false", "method.sparse_rate=0.02"],
}

TARGETS = {
    "tiny:gpt2": ["c_attn", "c_proj", "c_fc"],
    "tiny:bert": ["query", "key", "value", "dense"],
    "tiny:llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# run id -> (task, model, peft FrodConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {}),
    "llama-sparse-alpha-key": (
        "causal_lm",
        "tiny:llama",
        {"sparse_rate": 0.05, "regularization_alpha": 0.1, "projection_prng_key": 3},
    ),
    "llama-q-v-no-projection-random": (
        "causal_lm",
        "tiny:llama",
        {"target_modules": ["q_proj", "v_proj"], "save_projection": False, "init_weights": False},
    ),
    "gpt2": ("causal_lm", "tiny:gpt2", {"fan_in_fan_out": True}),
    "bert": ("seq_cls", "tiny:bert", {"sparse_rate": 0.03}),
}


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.3.self_attn.q_proj",
        "model.layers.x.mlp.down_proj",
        "bert.encoder.layer.11.attention.self.query",
        "bert.encoder.layer.0.attention.output.dense",
        "bert.encoder.layer.0.output.dense",
        "bert.pooler.dense",
        "transformer.h.1.attn.c_attn",
        "decoder.block.1.layer.2.DenseReluDense.wo",
        "blocks.4.fc",
        "head",
    ],
)
def test_categories_and_blocks_are_peft_naming(name):
    from peft.tuners.frod.model import _category_from_key, _layer_index_from_key

    assert category_of(name) == _category_from_key(name)
    assert block_of(name, 17) == _layer_index_from_key(name, 17)


@pytest.mark.parametrize("rows,blocks", [(48, 3), (16, 2)], ids=["qr", "svd"])
@pytest.mark.parametrize("rate,count", [(0.0, 0), (1e-4, 1), (0.05, 80), (1.0, 1560)])
def test_basis_and_pattern_are_peft_bit_for_bit(rows, blocks, rate, count):
    from peft.tuners.frod.model import _projection_from_weights

    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(rows, 40, generator=generator) for _ in range(blocks)]
    assert torch.equal(shared_basis(weights, 0.01), _projection_from_weights(weights, 0.01))
    # peft's positions: the off-diagonal (i, j) row by row, permuted by the seeded generator
    grid = torch.stack(torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij"), -1).reshape(-1, 2)
    off = grid[grid[:, 0] != grid[:, 1]]
    assert pattern_size(40, rate) == count  # ⌊40² · rate⌋, at least 1, at most 40² − 40
    expected = off[torch.randperm(len(off), generator=torch.Generator().manual_seed(5))[:count]].T
    ours = sparse_pattern(40, rate, torch.Generator().manual_seed(5))
    assert ours.shape == (2, count) and (count == 0 or torch.equal(ours, expected))


@pytest.mark.slow
def test_layer_is_the_paper_update_and_full_rank(tmp_path):
    built = kit.build("frod", tmp_path, ["method.sparse_rate=0.05"])
    kit.perturb(built.model, scale=0.2)
    layer = built.model.get_submodule("model.layers.1.mlp.down_proj")  # (64, 128)
    u, v = layer.frod_U.double(), layer.basis().double()
    w0 = layer.base_layer.weight.detach().double()
    assert kit.max_diff(u @ torch.diag(layer.frod_lambda_0.double()) @ v.T, w0) <= 1e-6  # W0 = U Λ⁰ Vᵀ
    assert kit.max_diff(u.norm(dim=0), torch.ones(128, dtype=torch.float64)) <= 1e-6  # unit columns
    s = torch.zeros(128, 128, dtype=torch.float64)
    rows, cols = layer.positions()
    s[rows, cols] = layer.frod_lambda_s_values.detach().double()
    assert not s.diagonal().any() and rows.numel() == pattern_size(128, 0.05)
    adapted = u @ (torch.diag(layer.frod_lambda_l.detach().double()) + s) @ v.T  # W' = U (Λ + S) Vᵀ
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    assert kit.max_diff(layer(x).double(), x.double() @ adapted.T) <= 1e-5
    assert torch.linalg.matrix_rank(adapted - w0) == 64  # a full-rank update of the (64, 128) weight


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("frod", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    options = {"target_modules": TARGETS[model_name], "progressbar": False, **options}
    result = kit.we_load_peft(peft.FrodConfig, task, tmp_path, model_name, **options)
    assert result.method == "frod" and result.loaded <= 1e-5 and result.merged <= 1e-4


@pytest.mark.slow
def test_t5_logits_are_fp32_exact_and_peft_both_ways(tmp_path):
    result = kit.peft_loads_ours("frod", tmp_path / "ours", T5)
    built = result.built
    probe = kit.batch("seq2seq", built.model.config.vocab_size, lengths=(10, 7))
    wide = {k: v.double() if v.is_floating_point() else v for k, v in probe.items()}
    ours = kit.logits(built.model, probe, "seq2seq").double()
    exact = kit.logits(copy.deepcopy(built.model).double(), wide, "seq2seq")
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    base_gap = kit.max_diff(
        kit.logits(base, probe, "seq2seq").double(), kit.logits(base.double(), wide, "seq2seq")
    )
    assert ours.abs().max() > 20 and base_gap > 2e-6  # large logits: fp32 is good to ~1e-5 here
    assert kit.max_diff(ours, exact) <= 1.5 * base_gap
    assert result.diff <= 5e-5
    theirs = kit.we_load_peft(
        peft.FrodConfig, "seq2seq", tmp_path / "theirs", target_modules=["q", "v", "wo"], progressbar=False
    )
    assert theirs.loaded <= 5e-5 and theirs.merged <= 1e-4


@pytest.mark.slow
def test_dropout_draws_as_peft_in_training(tmp_path):
    result = kit.peft_loads_ours("frod", tmp_path, ["method.frod_dropout=0.3"])
    model, theirs = result.built.model, result.peft_model
    probe = kit.batch("causal_lm", model.config.vocab_size, lengths=(10, 7))
    model.train(), theirs.train()
    outputs = []
    for net in (model, theirs):
        torch.manual_seed(11)
        with torch.no_grad():
            outputs.append(net(**kit.inputs(probe, "causal_lm")).logits)
    torch.manual_seed(12)
    with torch.no_grad():
        other = model(**kit.inputs(probe, "causal_lm")).logits
    assert kit.max_diff(outputs[0], outputs[1]) <= 1e-5 and kit.max_diff(outputs[0], other) > 1e-4


@pytest.mark.slow
def test_step0_is_the_base_exactly_in_bf16(tmp_path):
    built = kit.build("frod", tmp_path, ["model.dtype=bfloat16"])
    layer = built.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.frod_U.dtype == torch.bfloat16 and layer.basis().dtype == torch.bfloat16
    probe = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    assert torch.equal(kit.logits(built.model, probe), kit.logits(base, probe))


@pytest.mark.slow
def test_a_files_basis_replaces_ours_and_refactors_the_layers(tmp_path):
    built = kit.build("frod", tmp_path, ["method.target_modules=[q_proj,down_proj]"])
    adapter = kit.save(tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe)
    state = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.frod_V.self_attn_q_proj"
    state[key] = state[key] + 0.01 * torch.randn(state[key].shape, generator=torch.Generator().manual_seed(0))
    save_file(state, adapter / "adapter_model.safetensors")
    loaded = load_adapter(adapter)
    layer = loaded.model.get_submodule("model.layers.1.self_attn.q_proj")
    assert torch.equal(layer.basis(), state[key])
    rebuilt = layer.frod_U.double() @ torch.diag(layer.frod_lambda_0.double()) @ layer.basis().double().T
    assert kit.max_diff(rebuilt, layer.base_layer.weight.double()) <= 1e-6
    assert torch.equal(
        layer.frod_lambda_l, state["base_model.model.model.layers.1.self_attn.q_proj.frod_lambda_l"]
    )


@pytest.mark.slow
def test_merge_unmerge_round_trip(tmp_path):
    built = kit.build("frod", tmp_path, ["model.name=tiny:gpt2", "method.sparse_rate=0.05"])
    kit.perturb(built.model, scale=0.2)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    layer = built.model.get_submodule("transformer.h.0.attn.c_attn")  # Conv1D: W stored (in, out)
    before = layer.base_layer.weight.detach().clone()
    built.method.merge_adapter(built.model)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
    built.method.unmerge_adapter(built.model)
    assert kit.max_diff(layer.base_layer.weight, before) <= 1e-6
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-5


class _TwoStacks(torch.nn.Module):
    """Two stacks whose ``fc`` layers share FRoD's category ``fc`` but not their input size."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.ModuleList([torch.nn.ModuleDict({"fc": torch.nn.Linear(8, 8)})])
        self.b = torch.nn.ModuleList([torch.nn.ModuleDict({"fc": torch.nn.Linear(16, 8)}) for _ in range(2)])


@pytest.mark.parametrize(
    "targets", [["a.0.fc", "b.0.fc"], ["a.0.fc", "b.1.fc"]], ids=["same-block", "two-blocks"]
)
def test_a_category_of_mixed_input_sizes_is_refused_in_one_line(targets):
    cfg = FrodConfig(target_modules=targets)
    with pytest.raises(RecipeError) as err:
        Frod(cfg).attach(_TwoStacks())
    assert err.value.key == "method.target_modules" and "shares FRoD category" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "config", [{"bias": "frod_only"}, {"layers_to_transform": [0]}], ids=["bias", "layers_to_transform"]
)
def test_peft_options_we_leave_out_are_refused_in_one_line(config):
    with pytest.raises(RecipeError) as err:
        Frod.config_from_adapter({"target_modules": ["q_proj"], **config})
    assert err.value.key == "adapter" and "\n" not in str(err.value)
