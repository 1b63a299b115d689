"""LoRA and its options (DoRA, rsLoRA, LoRA+, PiSSA, rank/alpha patterns) against peft and the papers.

References and tolerances (fp32, CPU, fixed seeds):
- peft 0.21 as the oracle: the same weights in peft's LoraModel give our logits, ≤ 1e-5; our saved
  adapter loaded with ``PeftModel.from_pretrained`` on the original base gives our logits, ≤ 1e-5;
- DoRA's equation written out (W' = m ⊙ (W0 + s·B A)/‖W0 + s·B A‖_c), ≤ 1e-5;
- PiSSA: W_res + s·B0 A0 = W0 (≤ 1e-5) and the logits at step 0 equal the base's (≤ 1e-5);
- PiSSA and OLoRA, alone and composed with DoRA: A0, B0, the residual W0 and DoRA's magnitude equal peft's
  own init (``init_lora_weights="pissa"/"olora"``, ``use_dora``), ≤ 1e-5, and the same trained tensors
  in both give the same logits, ≤ 1e-5;
- merge: a merged plain model saved and reloaded with AutoModelForCausalLM gives the adapter
  model's logits, ≤ 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from kit import (
    base_model,
    batch_of,
    build,
    copy_into_peft,
    load_in_peft,
    logits,
    perturb,
    save,
    train_steps,
)

from peftcli.methods.lora import LoRALinear
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

# name -> (tiny recipe, overrides); gpt2 covers Conv1D (fan_in_fan_out) layers and biases.
VARIANTS = {
    "lora": ("lora", []),
    "dora": ("dora", []),
    "rslora": ("rslora", []),
    "patterns": (
        "lora",
        [
            "method.rank_pattern={down_proj: 4, 'layers\\.1\\.self_attn\\.q_proj': 2}",
            "method.alpha_pattern={v_proj: 3.0}",
        ],
    ),
    "rslora_patterns": ("rslora", ["method.rank_pattern={o_proj: 4}", "method.alpha_pattern={up_proj: 8.0}"]),
    "dora_gpt2": ("dora", ["model.name=tiny:gpt2"]),
    "pissa": ("lora", ["method.init=pissa"]),
    "pissa_rslora_patterns": (
        "rslora",
        ["method.init=pissa", "method.rank_pattern={o_proj: 4}", "method.alpha_pattern={up_proj: 8.0}"],
    ),
    "pissa_dora": ("dora", ["method.init=pissa"]),
    "pissa_gpt2": ("lora", ["method.init=pissa", "model.name=tiny:gpt2"]),
    "olora": ("lora", ["method.init=olora"]),
    "olora_dora": ("dora", ["method.init=olora"]),
}
RESIDUAL_INITS = ("pissa", "olora")  # inits that rewrite W0: peft redoes them, so no weight copy


def peft_config_for(method, model):
    """The peft LoraConfig equivalent to ours, built from our adapter_config (peft's field names)."""
    from peft import LoraConfig

    fields = method.adapter_config(model)
    fields["init_lora_weights"] = False  # peft's own init does not matter: our weights are copied in
    fields.pop("fan_in_fan_out")
    return LoraConfig(task_type="CAUSAL_LM", **fields)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v.startswith(RESIDUAL_INITS)])
def test_forward_equals_peft_for_the_same_weights(variant, tmp_path):
    recipe_name, overrides = VARIANTS[variant]
    recipe, base_path, _, model, method = build(recipe_name, tmp_path, overrides)
    perturb(model)  # B ≠ 0 and m ≠ ‖W0‖, so every term of the forward matters
    batch = batch_of(model.config.vocab_size)
    ours = logits(model, batch)

    peft_model = peft.get_peft_model(base_model(base_path, recipe), peft_config_for(method, model))
    copy_into_peft(peft_model, method.adapter_state_dict(model))
    peft_model.eval()
    assert (ours - logits(peft_model, batch)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_adapter_loads_in_peft_with_our_logits(variant, tmp_path):
    recipe_name, overrides = VARIANTS[variant]
    recipe, base_path, tokenizer, model, method = build(recipe_name, tmp_path, overrides)
    batch = batch_of(model.config.vocab_size)
    train_steps(model, method, batch, steps=2)
    ours = logits(model, batch)
    adapter = save(tmp_path, model, method, tokenizer, base_path, recipe)
    theirs = logits(load_in_peft(adapter, base_path), batch)
    assert (ours - logits(base_model(base_path, recipe), batch)).abs().max().item() > 1e-3  # not trivial
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_rank_and_alpha_patterns_set_each_layer(tmp_path):
    _, _, _, model, method = build("lora", tmp_path, VARIANTS["patterns"][1])
    layers = dict(method.lora_layers(model))
    assert layers["model.layers.0.mlp.down_proj"].r == 4
    assert layers["model.layers.1.self_attn.q_proj"].r == 2
    assert layers["model.layers.0.self_attn.q_proj"].r == 8
    assert layers["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(3.0 / 8)
    assert layers["model.layers.0.self_attn.k_proj"].scaling == pytest.approx(16.0 / 8)


def test_pattern_that_matches_nothing_is_an_error(tmp_path):
    with pytest.raises(RecipeError, match="rank_pattern.dwon_proj"):
        build("lora", tmp_path, ["method.rank_pattern={dwon_proj: 4}"])


def test_dora_forward_is_the_papers_equation():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, r=2, alpha=4.0, dropout=0.0, use_rslora=False, use_dora=True)
    layer.reset_parameters("kaiming")
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 5))
    x = torch.randn(3, 6)
    directed = base.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight  # W0 + s·B A
    merged = layer.lora_magnitude_vector[:, None] * directed / directed.norm(dim=1, keepdim=True)
    expected = x @ merged.T + base.bias
    assert (layer(x) - expected).abs().max().item() <= 1e-5


def test_dora_magnitude_starts_at_the_row_norms_of_w0(tmp_path):
    _, _, _, model, method = build("dora", tmp_path)
    for _, layer in method.lora_layers(model):
        expected = layer.base_layer.weight.norm(dim=1)
        assert (layer.lora_magnitude_vector - expected).abs().max().item() <= 1e-6


def test_lora_plus_gives_b_the_ratio_times_the_lr(tmp_path):
    _, _, _, model, method = build("lora", tmp_path, ["method.lora_plus_ratio=16", "method.use_dora=true"])
    groups = method.param_groups(model, 1e-3, 0.01)
    ids = {id(p): name for name, p in model.named_parameters()}
    by_lr = {g["lr"]: {ids[id(p)] for p in g["params"]} for g in groups}
    assert set(by_lr) == {1e-3, 16e-3}
    fast, slow = by_lr[16e-3], by_lr[1e-3]
    assert fast and all(".lora_B." in n or n.endswith("lora_magnitude_vector") for n in fast)
    assert slow and all(".lora_A." in n for n in slow)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert fast | slow == trainable and not fast & slow
    assert all(g["weight_decay"] == 0.01 for g in groups)


def test_pissa_residual_plus_adapter_is_the_original_weight(tmp_path):
    recipe, base_path, _, model, method = build("lora", tmp_path, ["method.init=pissa"])
    base = base_model(base_path, recipe)
    originals = dict(base.named_modules())
    for name, layer in method.lora_layers(model):
        rebuilt = layer.base_layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
        assert (rebuilt - originals[name].weight).abs().max().item() <= 1e-5
        # the adapter holds the principal part: its singular values are W0's top r
        top = torch.linalg.svdvals(originals[name].weight)[: layer.r]
        held = torch.linalg.svdvals(layer.scaling * layer.lora_B.weight @ layer.lora_A.weight)[: layer.r]
        assert (top - held).abs().max().item() <= 1e-4
    batch = batch_of(model.config.vocab_size)
    assert (logits(model, batch) - logits(base, batch)).abs().max().item() <= 1e-5


def test_pissa_export_is_a_plain_rank_2r_lora_on_the_original_base(tmp_path):
    import json

    recipe, base_path, tokenizer, model, method = build("lora", tmp_path, ["method.init=pissa"])
    batch = batch_of(model.config.vocab_size)
    train_steps(model, method, batch, steps=2)
    adapter = save(tmp_path, model, method, tokenizer, base_path, recipe)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 16 and config["lora_alpha"] == 32
    assert config["base_model_name_or_path"] == base_path
    # ΔW relative to the ORIGINAL W0, applied to the original base by hand (no peft, no peftcli)
    from safetensors.torch import load_file

    state = load_file(str(adapter / "adapter_model.safetensors"))
    originals = dict(base_model(base_path, recipe).named_modules())
    for name, layer in method.lora_layers(model):
        a = state[f"base_model.model.{name}.lora_A.weight"]
        b = state[f"base_model.model.{name}.lora_B.weight"]
        exported = originals[name].weight + (32 / 16) * b @ a
        ours = layer.base_layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
        assert (exported - ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", ["dora", "pissa", "dora_gpt2", "pissa_dora", "pissa_gpt2"])
def test_merged_plain_model_reloads_with_the_adapter_logits(variant, tmp_path):
    from transformers import AutoModelForCausalLM

    from peftcli.export import merge_adapter

    recipe_name, overrides = VARIANTS[variant]
    recipe, base_path, tokenizer, model, method = build(recipe_name, tmp_path, overrides)
    batch = batch_of(model.config.vocab_size)
    train_steps(model, method, batch, steps=2)
    ours = logits(model, batch)
    adapter = save(tmp_path, model, method, tokenizer, base_path, recipe)
    merge_adapter(adapter, tmp_path / "merged")  # the CLI path: reload the base, apply, load, merge
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    plain.eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert (ours - logits(plain, batch)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["pissa", "pissa_dora", "olora", "olora_dora"])
def test_residual_inits_equal_peft_and_compose_with_dora(variant, tmp_path):
    recipe_name, overrides = VARIANTS[variant]
    recipe, base_path, _, model, method = build(recipe_name, tmp_path, overrides)
    fields = method.adapter_config(model)
    fields.pop("fan_in_fan_out")
    fields.update(r=method.cfg.r, lora_alpha=method.cfg.alpha, init_lora_weights=method.cfg.init)
    peft_model = peft.get_peft_model(
        base_model(base_path, recipe), peft.LoraConfig(task_type="CAUSAL_LM", **fields)
    )
    theirs = dict(peft_model.base_model.model.named_modules())
    for name, layer in method.lora_layers(model):
        other = theirs[name]
        pairs = [
            (layer.lora_A.weight, other.lora_A["default"].weight),
            (layer.lora_B.weight, other.lora_B["default"].weight),
            (layer.base_layer.weight, other.base_layer.weight),  # the residual W0 − s·B0 A0
        ]
        if layer.use_dora:
            pairs.append((layer.lora_magnitude_vector, other.lora_magnitude_vector["default"].weight))
        for ours_t, theirs_t in pairs:
            assert (ours_t - theirs_t).abs().max().item() <= 1e-5
    perturb(model)  # trained tensors: the same in both, through each one's forward
    copy_into_peft(peft_model, {k: v.detach() for k, v in method.live_state_dict(model).items()})
    peft_model.eval()
    batch = batch_of(model.config.vocab_size)
    assert (logits(model, batch) - logits(peft_model, batch)).abs().max().item() <= 1e-5
