"""LoRA's initialisations against peft's own ``init_lora_weights`` and their defining properties.

References and tolerances (fp32, CPU, the recipe's seed, which is also what peft's draws start from):
- gaussian, orthogonal and pissa_niter_N draw from torch's generator in peft's order, so with the same
  seed A, B (and PiSSA's residual W0) equal peft's ``get_peft_model`` with that init, ≤ 1e-6 (1e-5 for
  the SVD-based residual);
- orthogonal: B·A = 0 (≤ 1e-6), so the logits at step 0 equal the base's (≤ 1e-5), with A and B ≠ 0;
- pissa_niter: W_res + s·B A = W0 (≤ 1e-5); s·B A's singular values are at most W0's top r and within
  10 % of them (the randomized SVD's error on the tiny model's flat spectra: up to ~6 %); the export, a plain LoRA on the
  original base, gives our trained logits in peft (≤ 1e-5);
- a peft adapter config naming ``pissa_niter_N`` reads back as ``init: pissa`` with ``pissa_niter: N``.
"""

from __future__ import annotations

import pytest
import torch
from kit import base_model, batch_of, build, load_in_peft, logits, save, train_steps

from peftcli.methods.lora import LoRA
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

INITS = {  # ours (overrides) -> peft's init_lora_weights
    "gaussian": (["method.init=gaussian", "method.r=4"], "gaussian"),
    "orthogonal": (["method.init=orthogonal", "method.r=4"], "orthogonal"),
    "pissa_niter": (["method.init=pissa", "method.pissa_niter=4", "method.r=4"], "pissa_niter_4"),
}


def peft_twin(built, init: str):
    """peft's model with the same targets, r, alpha and ``init``, built from the same seed."""
    recipe, base_path, _, model, method = built
    fields = method.adapter_config(model)
    fields.pop("fan_in_fan_out")
    fields.update(r=method.cfg.r, lora_alpha=method.cfg.alpha, init_lora_weights=init)
    base = base_model(base_path, recipe)
    torch.manual_seed(recipe.train.seed)  # as build_model seeds before attaching the method
    return peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **fields))


@pytest.mark.parametrize("init", list(INITS))
def test_init_equals_peft_for_the_same_seed(init, tmp_path):
    overrides, peft_init = INITS[init]
    built = build("lora", tmp_path, overrides)
    theirs = dict(peft_twin(built, peft_init).base_model.model.named_modules())
    tolerance = 1e-5 if init.startswith("pissa") else 1e-6
    for name, layer in built.method.lora_layers(built.model):
        other = theirs[name]
        assert (layer.lora_A.weight - other.lora_A["default"].weight).abs().max().item() <= tolerance
        assert (layer.lora_B.weight - other.lora_B["default"].weight).abs().max().item() <= tolerance
        assert (layer.base_layer.weight - other.base_layer.weight).abs().max().item() <= tolerance


def test_orthogonal_starts_at_the_base_with_both_factors_nonzero(tmp_path):
    recipe, base_path, _, model, method = build("lora", tmp_path, INITS["orthogonal"][0])
    for _, layer in method.lora_layers(model):
        assert layer.lora_A.weight.abs().min().item() > 0 and layer.lora_B.weight.abs().max().item() > 1e-3
        assert (layer.lora_B.weight @ layer.lora_A.weight).abs().max().item() <= 1e-6
    batch = batch_of(model.config.vocab_size)
    assert (logits(model, batch) - logits(base_model(base_path, recipe), batch)).abs().max().item() <= 1e-5


def test_pissa_niter_holds_the_top_singular_part(tmp_path):
    recipe, base_path, _, model, method = build("lora", tmp_path, INITS["pissa_niter"][0])
    originals = dict(base_model(base_path, recipe).named_modules())
    for name, layer in method.lora_layers(model):
        held = layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
        assert (layer.base_layer.weight + held - originals[name].weight).abs().max().item() <= 1e-5
        # a projection of W0 onto an r-dimensional subspace: each singular value at most W0's (interlacing),
        # near it when the subspace is near the top one
        top = torch.linalg.svdvals(originals[name].weight)[: layer.r]
        found = torch.linalg.svdvals(held)[: layer.r]
        assert (found <= top + 1e-5).all()
        assert ((top - found) / top).max().item() <= 0.1


def test_pissa_niter_export_loads_in_peft_on_the_original_base(tmp_path):
    recipe, base_path, tokenizer, model, method = build("lora", tmp_path, INITS["pissa_niter"][0])
    batch = batch_of(model.config.vocab_size)
    train_steps(model, method, batch, steps=2)
    adapter = save(tmp_path, model, method, tokenizer, base_path, recipe)
    theirs = logits(load_in_peft(adapter, base_path), batch)
    assert (logits(model, batch) - theirs).abs().max().item() <= 1e-5


def test_peft_pissa_niter_config_reads_back():
    cfg = LoRA.config_from_adapter({"r": 4, "lora_alpha": 8, "init_lora_weights": "pissa_niter_16"})
    assert (cfg.init, cfg.pissa_niter) == ("pissa", 16)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["method.init=orthogonal", "method.r=5"], "r=5 is odd"),
        (["method.init=orthogonal", "method.rank_pattern={q_proj: 3}"], "r=3 is odd"),
        (["method.pissa_niter=4"], "method.pissa_niter"),
    ],
)
def test_refused_init_options(overrides, needle, tmp_path):
    with pytest.raises(RecipeError, match=needle):
        build("lora", tmp_path, overrides)
