"""RandLoRA against its equation and peft 0.21 as the oracle, fp32 on the CPU:

- the shared bases: for a key, our A and B are bit-identical to the ones peft draws for the same targets,
  dense, ``sparse`` and ``very_sparse`` (so ``save_projection: false`` adapters rebuild in either tool),
  and another key draws others; a fresh layer's Λ and Γ equal peft's init (Λ = 0: step 0 is the base);
- the update: ΔW = (α/r) Σ_k b_k a_kᵀ over the n·r rank-one terms, a_k = λ[i, j] (A_i ⊙ γ_j) for
  k = i·n + j and b_k = B[:, k // r, k % r] (peft's pairing), written out with loops;
- with each option that changes the numbers (``r``, ``randlora_alpha``, ``projection_prng_key``,
  ``save_projection``, ``sparse``, ``very_sparse``), our adapter moved off init loads in
  ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an adapter peft wrote (which repeats A and B
  under every module) loads in ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and
  ``peftcli merge`` folds it into a plain model with peft's logits (≤ 1e-4), on tiny:llama, tiny:gpt2
  (Conv1D) and tiny:bert (seq_cls);
- ``save_projection``: true stores A and B once (``base_model.randlora_A`` / ``_B``), false only Λ, Γ;
- merge then unmerge gives back the logits and the base weights.
"""

from __future__ import annotations

import kit
import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]

OPTION_RUNS = {
    "default": [],
    "r-alpha": ["method.r=16", "method.randlora_alpha=40"],
    "key-no-saved-projection": ["method.save_projection=false", "method.projection_prng_key=3"],
    "sparse": ["method.sparse=true", "method.projection_prng_key=2"],
    "very_sparse-no-saved-projection": ["method.very_sparse=true", "method.save_projection=false"],
    "gpt2": ["model.name=tiny:gpt2", "method.r=6"],
    "bert": [*BERT, "method.sparse=true"],
}

TARGETS = {
    "tiny:gpt2": ["c_attn", "c_proj", "c_fc"],
    "tiny:bert": ["query", "key", "value", "dense"],
    "tiny:llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
}

# run id -> (task, model, peft RandLoraConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"r": 8, "randlora_alpha": 160}),
    "llama-no-saved-projection-sparse": (
        "causal_lm",
        "tiny:llama",
        {"r": 16, "save_projection": False, "sparse": True, "projection_prng_key": 5},
    ),
    "llama-very_sparse": ("causal_lm", "tiny:llama", {"r": 4, "very_sparse": True, "randlora_alpha": 20}),
    "gpt2": ("causal_lm", "tiny:gpt2", {"r": 8, "save_projection": False}),
    "bert": ("seq_cls", "tiny:bert", {"r": 8, "projection_prng_key": 4}),
}


def peft_model_for(built: kit.Built):
    """peft's RandLoRA on the same base with the same targets and options as ``built`` (not trained)."""
    cfg = built.method.cfg
    base = kit.auto_class(built.task).from_pretrained(built.base_path, dtype=torch.float32)
    config = peft.RandLoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        target_modules=list(built.method.targets),
        projection_prng_key=cfg.projection_prng_key,
        sparse=cfg.sparse,
        very_sparse=cfg.very_sparse,
        randlora_alpha=cfg.randlora_alpha,
    )
    return peft.get_peft_model(base, config)


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.projection_prng_key=9", "method.r=12"],
        ["method.sparse=true", "method.r=8"],
        ["method.very_sparse=true", "method.projection_prng_key=4"],
        ["model.name=tiny:gpt2", "method.r=16"],
    ],
    ids=["dense", "sparse", "very_sparse", "gpt2"],
)
def test_bases_and_init_are_peft_draws_bit_for_bit(overrides, tmp_path):
    built = kit.build("randlora", tmp_path, overrides)
    theirs = peft_model_for(built)
    shared, tuner = built.model.adapter_shared, theirs.base_model
    assert torch.equal(shared.randlora_A, tuner.randlora_A["default"])
    assert torch.equal(shared.randlora_B, tuner.randlora_B["default"])
    ours = {k.removesuffix(".default"): v for k, v in built.method.adapter_state_dict(built.model).items()}
    for key, value in peft.get_peft_model_state_dict(theirs).items():
        if key.endswith(("lambda", "gamma")) or key.startswith("base_model.randlora_"):
            assert torch.equal(ours[key], value), key
    other = kit.build("randlora", tmp_path, [*overrides, "method.projection_prng_key=10"])
    assert not torch.equal(other.model.adapter_shared.randlora_B, shared.randlora_B)


def test_update_is_the_sum_of_scaled_random_rank_one_terms(tmp_path):
    built = kit.build("randlora", tmp_path, ["method.r=16", "method.randlora_alpha=48"])
    kit.perturb(built.model, scale=1.0)
    shared = built.model.adapter_shared
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.up_proj"):  # out < in, in < out
        layer = built.model.get_submodule(name)
        lam, gamma = layer.randlora_lambda.detach(), layer.randlora_gamma.detach()
        r, n = lam.shape
        m, big = layer.min_dim, layer.max_dim
        expected = torch.zeros(big, m, dtype=torch.float64)
        for k in range(r * n):
            i, j = divmod(k, n)
            a_k = lam[i, j] * shared.randlora_A[i, 0, :m] * gamma[j]
            b_k = shared.randlora_B[:big, k // r, k % r]
            expected += torch.outer(b_k.double(), a_k.double())
        expected *= 48 / 16
        if layer.out_features == m < layer.in_features:  # A acts on the smaller side, the output: transpose
            expected = expected.T
        assert expected.abs().max() > 1e-2
        scale = expected.abs().max().item()
        assert kit.max_diff(layer.stored_delta().double(), expected) <= 1e-6 * scale  # fp32 rounding


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    result = kit.peft_loads_ours("randlora", tmp_path, OPTION_RUNS[run])
    assert result.diff <= 1e-5
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    bases = sorted(k for k in stored if k.endswith(("randlora_A", "randlora_B")))
    if result.built.method.cfg.save_projection:
        assert bases == ["base_model.randlora_A", "base_model.randlora_B"]
    else:
        assert bases == []


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.RandLoraConfig, task, tmp_path, model_name, target_modules=TARGETS[model_name], **options
    )
    assert result.method == "randlora" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_merge_unmerge_round_trip(tmp_path):
    built = kit.build("randlora", tmp_path, ["model.name=tiny:gpt2"])  # Conv1D: ΔW transposed
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
