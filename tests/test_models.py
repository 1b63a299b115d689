"""Base-model loading: tiny models are deterministic, gradient checkpointing changes no number,
and a bf16 base trains fp32 LoRA weights."""

from __future__ import annotations

import kit
import torch
from safetensors.torch import load_file

from peftcli.recipe_loader import recipe_from_dict
from peftcli.tiny import build_tiny, ensure_tiny


def test_tiny_models_are_deterministic(tmp_path):
    build_tiny("llama", tmp_path / "a")
    build_tiny("llama", tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_tokenizer_round_trips_any_text():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny("llama"))
    text = "Grüße, 世界! reverse: abc\n"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|user|>\nhi\n<|assistant|>\n"


def _loss_and_grads(checkpointing: bool, dtype: str = "float32"):
    recipe = recipe_from_dict(
        {
            "model": {"name": "tiny:llama", "gradient_checkpointing": checkpointing, "dtype": dtype},
            "data": {"train": "unused.jsonl"},
            "method": {"name": "lora", "r": 4},
        }
    )
    *_, model, method = kit.build(recipe)
    model.train()
    for name, p in model.named_parameters():  # B = 0 gives A no gradient: move B off zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(hash(name) % 1000))
    batch = kit.batch("causal_lm", 260, lengths=(16, 16))  # labels: the ids
    loss, _, grads = kit.window_gradients(model, method, [batch])  # the loop's forward/backward
    assert grads.keys() == {k for k, p in model.named_parameters() if p.requires_grad}
    return loss, grads, model


def test_gradient_checkpointing_changes_no_number():
    loss_plain, grads_plain, _ = _loss_and_grads(False)
    loss_ckpt, grads_ckpt, model = _loss_and_grads(True)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert abs(loss_plain - loss_ckpt) <= 1e-6
    assert max((grads_plain[k] - grads_ckpt[k]).abs().max().item() for k in grads_plain) <= 1e-6


def test_bf16_base_trains_fp32_adapter_weights():
    loss, grads, model = _loss_and_grads(False, dtype="bfloat16")
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    loss_fp32, _, _ = _loss_and_grads(False)
    assert abs(loss - loss_fp32) < 0.05  # bf16 rounding of the base only
    assert all(torch.isfinite(g).all() for g in grads.values())
