"""(IA)³ against peft's IA3Model and its equation; BitFit against its definition (b0 + Δb) and a merged
plain model. fp32, CPU, fixed seeds; tolerances named per test."""

from __future__ import annotations

import json

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

from peftcli.export import load_adapter, merge_adapter
from peftcli.methods.ia3 import IA3Linear
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

IA3_VARIANTS = {
    "llama": [],
    "gpt2": ["model.name=tiny:gpt2", "method.target_modules=null", "method.feedforward_modules=null"],
}


def reload_plain(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


@pytest.mark.parametrize("variant", list(IA3_VARIANTS))
def test_ia3_forward_equals_peft_for_the_same_weights(variant, tmp_path):
    from peft import IA3Config

    recipe, base_path, _, model, method = build("ia3", tmp_path, IA3_VARIANTS[variant])
    perturb(model, scale=0.3)
    batch = batch_of(model.config.vocab_size)
    fields = method.adapter_config(model)
    fields.pop("fan_in_fan_out")
    peft_model = peft.get_peft_model(
        base_model(base_path, recipe), IA3Config(task_type="CAUSAL_LM", **fields)
    )
    copy_into_peft(peft_model, method.adapter_state_dict(model))
    peft_model.eval()
    assert (logits(model, batch) - logits(peft_model, batch)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", list(IA3_VARIANTS))
def test_ia3_saved_adapter_loads_in_peft_and_merges(variant, tmp_path):
    recipe, base_path, tokenizer, model, method = build("ia3", tmp_path, IA3_VARIANTS[variant])
    batch = batch_of(model.config.vocab_size)
    train_steps(model, method, batch, steps=2, lr=5e-2)
    ours = logits(model, batch)
    assert (ours - logits(base_model(base_path, recipe), batch)).abs().max().item() > 1e-3
    adapter = save(tmp_path, model, method, tokenizer, base_path, recipe)
    assert (ours - logits(load_in_peft(adapter, base_path), batch)).abs().max().item() <= 1e-5
    merge_adapter(adapter, tmp_path / "merged")
    assert (ours - logits(reload_plain(tmp_path / "merged"), batch)).abs().max().item() <= 1e-4


def test_ia3_layer_is_the_papers_equation():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    x = torch.randn(3, 6)
    attention = IA3Linear(base, is_feedforward=False)
    feedforward = IA3Linear(base, is_feedforward=True)
    assert attention.ia3_l.shape == (5, 1) and feedforward.ia3_l.shape == (1, 6)
    with torch.no_grad():
        attention.ia3_l.copy_(torch.linspace(0.5, 1.5, 5)[:, None])
        feedforward.ia3_l.copy_(torch.linspace(0.2, 2.0, 6)[None, :])
    assert (attention(x) - (x @ base.weight.T + base.bias) * torch.linspace(0.5, 1.5, 5)).abs().max() <= 1e-6
    assert (
        feedforward(x) - ((x * torch.linspace(0.2, 2.0, 6)) @ base.weight.T + base.bias)
    ).abs().max() <= 1e-6


def test_ia3_feedforward_must_be_a_target(tmp_path):
    with pytest.raises(RecipeError, match="feedforward_modules"):
        build("ia3", tmp_path, ["method.target_modules=[k_proj, v_proj]"])


def test_bitfit_trains_only_biases_and_saves_their_deltas(tmp_path):
    recipe, base_path, tokenizer, model, method = build("bitfit", tmp_path)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".bias") for n in trainable)
    biases = [n for n, _ in base_model(base_path, recipe).named_parameters() if n.endswith(".bias")]
    assert sorted(trainable) == sorted(biases)  # target_modules: all means every bias
    batch = batch_of(model.config.vocab_size)
    train_steps(model, method, batch, steps=2)
    adapter = save(tmp_path, model, method, tokenizer, base_path, recipe)
    from safetensors.torch import load_file

    state = load_file(str(adapter / "adapter_model.safetensors"))
    base_params = dict(base_model(base_path, recipe).named_parameters())
    params = dict(model.named_parameters())
    assert len(state) == len(biases)
    for name in biases:  # the file holds Δb = b − b0, nothing else
        assert torch.equal(
            state[f"base_model.model.{name}"], params[name].detach() - base_params[name].detach()
        )
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peftcli_method"] == "bitfit" and "peft_type" not in config


def test_bitfit_adapter_reapplies_and_merges_to_a_plain_model(tmp_path):
    recipe, base_path, tokenizer, model, method = build("bitfit", tmp_path)
    batch = batch_of(model.config.vocab_size)
    train_steps(model, method, batch, steps=2)
    ours = logits(model, batch)
    assert (ours - logits(base_model(base_path, recipe), batch)).abs().max().item() > 1e-3
    adapter = save(tmp_path, model, method, tokenizer, base_path, recipe)
    assert (ours - logits(load_adapter(adapter).model, batch)).abs().max().item() <= 1e-6
    merge_adapter(adapter, tmp_path / "merged")
    assert (ours - logits(reload_plain(tmp_path / "merged"), batch)).abs().max().item() <= 1e-4


def test_bitfit_subset_by_name(tmp_path):
    _, _, _, model, _ = build("bitfit", tmp_path, ["model.name=tiny:qwen2", "method.target_modules=[q_proj]"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"model.layers.{i}.self_attn.q_proj.bias" for i in range(2)]


def test_bitfit_refuses_a_model_without_biases(tmp_path):
    with pytest.raises(RecipeError, match="no bias terms") as err:
        build("bitfit", tmp_path, ["model.name=tiny:llama"])
    assert err.value.key == "model.name"
    with pytest.raises(RecipeError, match="not a module with a bias"):
        build("bitfit", tmp_path, ["model.name=tiny:qwen2", "method.target_modules=[o_proj]"])
