"""PVeRA against peft 0.21 as the oracle, fp32 on the CPU:

- the shared projections: for a key, our A (2r rows) and B are bit-identical to the ones peft draws for
  the same targets, and a fresh layer's vectors equal peft's init (b = 0, d = ``d_initial``, 2r long);
- the paper's equation: at inference the update is the mean path, Λ_b B μ with μ = (Λ_d A x)[:r], and
  merging folds exactly that (ΔW = Λ_b B Λ_{d[:r]} A[:r]); merge then unmerge gives back W (≤ 1e-6);
- with each option that changes the numbers (``projection_prng_key``, ``save_projection``, ``d_initial``,
  ``r``, ``sample_at_inference`` with ``generator_seed``), our adapter moved off init loads in
  ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an adapter peft wrote loads in
  ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and ``peftcli merge`` folds it into a
  plain model with peft's logits (≤ 1e-4), on tiny:llama, tiny:gpt2 (Conv1D) and tiny:bert (seq_cls);
- training samples z = μ + ε σ: with the same ``generator_seed`` our training-mode logits are peft's
  (same draws), and they differ from the mean's.
"""

from __future__ import annotations

import kit
import pytest
import torch

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]
SEEDED = ["method.sample_at_inference=true", "method.generator_seed=5"]

OPTION_RUNS = {
    "default": [],
    "key-7-d_initial-r": ["method.projection_prng_key=7", "method.d_initial=0.7", "method.r=8"],
    "no-saved-projection": ["method.save_projection=false", "method.projection_prng_key=3"],
    "sample_at_inference": SEEDED,
    "gpt2-no-saved-projection": ["model.name=tiny:gpt2", "method.save_projection=false"],
    "bert": BERT,
}

TARGETS = {
    "tiny:gpt2": ["c_attn", "c_proj", "c_fc"],
    "tiny:bert": ["query", "key", "value", "dense"],
    "tiny:llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
}

# run id -> (task, model, peft PveraConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"r": 16}),
    "llama-no-saved-projection": (
        "causal_lm",
        "tiny:llama",
        {"r": 8, "save_projection": False, "projection_prng_key": 11},
    ),
    "llama-d_initial": ("causal_lm", "tiny:llama", {"r": 4, "d_initial": 1.5, "projection_prng_key": 2}),
    "gpt2": ("causal_lm", "tiny:gpt2", {"r": 8, "save_projection": False}),
    "bert": ("seq_cls", "tiny:bert", {"r": 8, "projection_prng_key": 4}),
}


def peft_model_for(built: kit.Built):
    """peft's PVeRA on the same base with the same targets and options as ``built`` (not trained)."""
    cfg = built.method.cfg
    base = kit.auto_class(built.task).from_pretrained(built.base_path, dtype=torch.float32)
    config = peft.PveraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        target_modules=list(built.method.targets),
        projection_prng_key=cfg.projection_prng_key,
        d_initial=cfg.d_initial,
    )
    return peft.get_peft_model(base, config)


def test_projections_and_init_are_peft_draws_bit_for_bit(tmp_path):
    built = kit.build(
        "pvera", tmp_path, ["method.projection_prng_key=9", "method.d_initial=0.3", "method.r=12"]
    )
    theirs = peft_model_for(built)
    shared, tuner = built.model.adapter_shared, theirs.base_model
    assert shared.pvera_A.shape[0] == 24 and shared.pvera_B.shape[1] == 12
    assert torch.equal(shared.pvera_A, tuner.pvera_A["default"])
    assert torch.equal(shared.pvera_B, tuner.pvera_B["default"])
    ours = {k.removesuffix(".default"): v for k, v in built.method.adapter_state_dict(built.model).items()}
    for key, value in peft.get_peft_model_state_dict(theirs).items():
        assert torch.equal(ours[key], value), key


def test_inference_runs_the_mean_and_merge_folds_it(tmp_path):
    built = kit.build("pvera", tmp_path, ["method.r=8"])
    kit.perturb(built.model, scale=0.5)
    layer = built.model.get_submodule(built.method.targets[0]).eval()
    x = torch.randn(3, layer.in_features)
    a, b = layer.projections()
    d, lam_b = layer.pvera_lambda_d.detach(), layer.pvera_lambda_b.detach()
    mu = (d * (x @ a.T))[:, :8]  # the first half of Λ_d A x is the mean
    expected = layer.base_layer(x) + lam_b * (mu @ b.T)
    assert kit.max_diff(layer(x).detach(), expected.detach()) <= 1e-6
    before = layer.base_layer.weight.detach().clone()
    layer.merge()
    layer.merged = True
    assert kit.max_diff(layer(x).detach(), expected.detach()) <= 1e-5
    layer.unmerge()
    assert kit.max_diff(layer.base_layer.weight, before) <= 1e-6


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("pvera", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.PveraConfig, task, tmp_path, model_name, target_modules=TARGETS[model_name], **options
    )
    assert result.method == "pvera" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_training_samples_the_latent_with_peft_draws(tmp_path):
    built = kit.build("pvera", tmp_path, ["method.generator_seed=3"])
    kit.perturb(built.model)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    mean = kit.logits(built.model, batch)
    adapter = kit.save(tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe)
    theirs = kit.load_in_peft(adapter, built.base_path)
    built.model.train()
    theirs.train()
    sampled = kit.logits(built.model, batch)
    assert kit.max_diff(sampled, kit.peft_logits(theirs, batch)) <= 1e-5  # each layer's seeded draws
    assert kit.max_diff(sampled, mean) > 1e-4
