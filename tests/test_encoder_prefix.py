"""Encoder prefixes for seq2seq prefix tuning / P-tuning v2 (``method.encoder_prefix: true``, tiny T5).

References and tolerances, all fp32 on the CPU with fixed seeds:
- the T5 encoder written out with torch ops, each self-attention over ``[prefix; computed]`` keys and
  values with zero relative bias on the prefix columns and the prefix never masked: ≤ 1e-5;
- the same model on the unpadded row, for a padded batch: ≤ 1e-5;
- the in-memory model for a saved and reloaded adapter: ≤ 1e-6;
- full recompute without a cache for generation: equal tokens.
With ``encoder_prefix: false`` peft stays the oracle (tests/test_soft_prompts.py).
"""

from __future__ import annotations

import json

import kit
import pytest
import torch
from kit import TINY
from safetensors import safe_open

from peftcli.export import load_adapter, save_adapter
from peftcli.methods.prefix_tuning import ENCODER_KEY
from peftcli.recipe import RecipeError

METHODS = {
    "prefix_tuning": {
        "name": "prefix_tuning",
        "num_virtual_tokens": 4,
        "encoder_hidden_size": 48,
        "encoder_prefix": True,
    },
    "p_tuning_v2": {"name": "p_tuning_v2", "num_virtual_tokens": 4, "encoder_prefix": True},
}


def reference_encoder(t5, rows: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The T5 encoder with prefixes, written out: per layer l with prefix keys/values P_k, P_v (heads × n × d)

        h += O · softmax(q [P_k; K]^T + [0; B] + [0; M]) [P_v; V]        (T5: no 1/√d scaling)

    B = the relative-position bias of the real tokens, M = -inf on padded keys; then the feed-forward."""
    encoder = t5.get_encoder()
    n_layers = len(encoder.block)
    heads, d = (
        encoder.block[0].layer[0].SelfAttention.n_heads,
        encoder.block[0].layer[0].SelfAttention.key_value_proj_dim,
    )
    n = rows.shape[0]
    blocks = rows.view(n, 2 * n_layers, heads, d).permute(
        1, 2, 0, 3
    )  # (2L, H, n, d): [k_0, v_0, k_1, v_1, ...]
    batch, length = input_ids.shape
    hidden = encoder.embed_tokens(input_ids)  # (B, T, h)
    first = encoder.block[0].layer[0].SelfAttention
    bias = first.compute_bias(length, length)  # (1, H, T, T), shared by all layers as in T5
    bias = torch.cat([torch.zeros(1, heads, length, n), bias], -1)  # zero bias on the prefix columns
    masked = torch.zeros(batch, 1, 1, n + length)
    masked[:, :, :, n:] = torch.where(mask.bool(), 0.0, float("-inf"))[:, None, None, :]
    for layer, block in enumerate(encoder.block):
        attention = block.layer[0].SelfAttention
        x = block.layer[0].layer_norm(hidden)
        q = attention.q(x).view(batch, length, heads, d).transpose(1, 2)  # (B, H, T, d)
        k = attention.k(x).view(batch, length, heads, d).transpose(1, 2)
        v = attention.v(x).view(batch, length, heads, d).transpose(1, 2)
        k = torch.cat([blocks[2 * layer].expand(batch, -1, -1, -1), k], dim=2)  # (B, H, n + T, d)
        v = torch.cat([blocks[2 * layer + 1].expand(batch, -1, -1, -1), v], dim=2)
        weights = torch.softmax(q @ k.transpose(-1, -2) + bias + masked, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, length, heads * d)
        hidden = hidden + attention.o(out)
        hidden = block.layer[1](hidden)  # T5LayerFF: pre-norm feed-forward with its residual
    return encoder.final_layer_norm(hidden)


@pytest.mark.parametrize("key", list(METHODS))
def test_encoder_output_equals_attention_over_prefix_and_tokens_written_out(key):
    *_, model, method = kit.build_inline("seq2seq", METHODS[key])
    kit.train_step(model, method, kit.batch("seq2seq"), task="seq2seq", lr=5e-2)
    input_ids, mask, kwargs, _ = kit.parts(kit.batch("seq2seq", seed=1), "seq2seq")  # row 1 right-padded
    rows = method.encoder_rows(model)
    assert tuple(rows.shape) == (4, 2 * 2 * 4 * 16)  # n × (encoder layers · 2 · heads · d_kv)
    with torch.no_grad():
        ours = model(input_ids=input_ids, attention_mask=mask, **kwargs).encoder_last_hidden_state
        reference = reference_encoder(model.base_model, rows, input_ids, mask)
        plain = model.base_model.get_encoder()  # hooks on: the prefix is part of the model
        alone = plain(input_ids=input_ids[1:, :6], attention_mask=mask[1:, :6]).last_hidden_state
    real = mask.bool()
    assert (ours[real] - reference[real]).abs().max().item() <= 1e-5
    assert (ours[1, :6] - alone[0]).abs().max().item() <= 1e-5  # padding does not leak into the prefix path


def test_encoder_prefix_alone_changes_the_encoder_and_decoder_prefix_is_unchanged():
    """The encoder prefix is really read (changing only it moves the encoder output), and adding it
    leaves the decoder prefix exactly as without it (same seed: same rows)."""
    *_, model, method = kit.build_inline("seq2seq", METHODS["p_tuning_v2"])
    *_, plain_model, plain_method = kit.build_inline(
        "seq2seq", {**METHODS["p_tuning_v2"], "encoder_prefix": False}
    )
    assert torch.equal(method.stored_rows(model), plain_method.stored_rows(plain_model))
    input_ids, mask, kwargs, _ = kit.parts(kit.batch("seq2seq", seed=1), "seq2seq")
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=mask, **kwargs).encoder_last_hidden_state
        model.encoder_prefix.embedding.weight.add_(torch.randn_like(model.encoder_prefix.embedding.weight))
        after = model(input_ids=input_ids, attention_mask=mask, **kwargs).encoder_last_hidden_state
        base = plain_model(input_ids=input_ids, attention_mask=mask, **kwargs).encoder_last_hidden_state
    assert (before - after).abs().max().item() > 1e-3
    assert (before - base).abs().max().item() > 1e-3  # the decoder-only model's encoder ignores prefixes


@pytest.mark.parametrize("key", list(METHODS))
def test_save_load_gives_equal_logits_and_no_peft_type(key, tmp_path):
    recipe, base_path, tokenizer, model, method = kit.build_inline("seq2seq", METHODS[key])
    kit.train_step(model, method, kit.batch("seq2seq"), task="seq2seq", lr=5e-2)
    input_ids, mask, kwargs, _ = kit.parts(kit.batch("seq2seq", seed=2), "seq2seq")
    with torch.no_grad():
        ours = model(input_ids=input_ids, attention_mask=mask, **kwargs).logits
    save_adapter(tmp_path / "a", model, method, tokenizer, base_path, recipe.model)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "peft_type" not in config and config["peftcli_method"] == METHODS[key]["name"]
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == {"prompt_embeddings", ENCODER_KEY}
        assert tuple(handle.get_tensor(ENCODER_KEY).shape) == (4, 2 * 2 * 4 * 16)
    loaded = load_adapter(tmp_path / "a")
    with torch.no_grad():
        theirs = loaded.model(input_ids=input_ids, attention_mask=mask, **kwargs).logits
    assert (ours - theirs).abs().max().item() <= 1e-6
    assert loaded.method.peft_type is None


def test_generation_with_encoder_prefix_matches_recompute():
    *_, model, method = kit.build_inline("seq2seq", METHODS["prefix_tuning"])
    kit.train_step(model, method, kit.batch("seq2seq"), task="seq2seq", lr=5e-2)
    kit.assert_seq2seq_generate_matches_recompute(model)


def test_encoder_prefix_is_refused_without_an_encoder():
    with pytest.raises(RecipeError, match="method.encoder_prefix"):
        kit.build_inline("causal_lm", {"name": "prefix_tuning", "encoder_prefix": True})


@pytest.mark.slow  # a whole recipe through the CLI path
def test_t5_recipe_trains_through_the_cli_path_and_loss_falls(tmp_path):
    from peftcli.api import train

    result = train(TINY / "prefix_tuning_t5.yaml", overrides=[f"output_dir={tmp_path / 'run'}"])
    assert result.last_loss < result.first_loss
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config.get("encoder_prefix") is True and "peft_type" not in config
