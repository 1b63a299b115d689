"""Padding-free packing and length-grouped batching (peftcli/data/batching.py).

References: the unpacked path (each example right-padded in an ordinary batch, attention mask given)
for the loss and gradients of a packed batch, fp32 on the CPU, ≤ 1e-5; the plan's own definition for
the planners (every example exactly once, rows within budget, a pure function of (seed, epoch)); an
uninterrupted run for resume.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import kit
import numpy as np
import pytest
import torch
from kit import ROOT
from safetensors.torch import load_file

from peftcli.data.batching import collate_packed, padding_fraction, plan_length_grouped, plan_packed
from peftcli.data.collate import collate
from peftcli.methods.catalog import list_methods
from peftcli.recipe import RecipeError
from peftcli.recipe_loader import load_recipe
from peftcli.training.attention import ATTENTION_NAME, use_packed_attention
from peftcli.training.loop import train
from peftcli.training.loss import CHUNKED, FUSED, PLAIN

LENGTHS = np.random.default_rng(0).integers(3, 60, size=300)


def order(seed: int, epoch: int) -> np.ndarray:
    return torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(seed + epoch)).numpy()


# -- planners ------------------------------------------------------------------------------------


def test_packed_plan_covers_every_example_once_within_budget():
    plan = plan_packed(LENGTHS, order(1, 0), seed=1, epoch=0, row_tokens=64, rows_per_batch=4)
    flat = [i for batch in plan for row in batch for i in row]
    assert sorted(flat) == list(range(len(LENGTHS)))
    assert all(len(batch) <= 4 for batch in plan)
    assert all(sum(LENGTHS[i] for i in row) <= 64 for batch in plan for row in batch)
    # first-fit-decreasing packs tightly: fewer rows than one example per row, little padding
    rows = sum(len(batch) for batch in plan)
    assert rows < 0.6 * len(LENGTHS)
    assert padding_fraction(LENGTHS, plan, packed=True) < 0.1


def test_plans_are_pure_functions_of_seed_and_epoch():
    for plan in (
        lambda seed, epoch: plan_packed(LENGTHS, order(seed, epoch), seed, epoch, 64, 4),
        lambda seed, epoch: plan_length_grouped(LENGTHS, order(seed, epoch), seed, epoch, 8),
    ):
        assert plan(1, 0) == plan(1, 0)
        assert plan(1, 0) != plan(1, 1)
        assert plan(1, 0) != plan(2, 0)


def test_length_grouped_plan_cuts_padding_and_keeps_every_example():
    plan = plan_length_grouped(LENGTHS, order(3, 0), seed=3, epoch=0, batch_size=8)
    assert sorted(i for batch in plan for i in batch) == list(range(len(LENGTHS)))
    assert all(len(batch) <= 8 for batch in plan)
    shuffled = order(3, 0).tolist()
    plain = [shuffled[i : i + 8] for i in range(0, len(shuffled), 8)]
    assert padding_fraction(LENGTHS, plan, packed=False) < 0.5 * padding_fraction(
        LENGTHS, plain, packed=False
    )
    # batches come in a shuffled order, not longest-first
    longest = [max(LENGTHS[i] for i in batch) for batch in plan]
    assert longest != sorted(longest, reverse=True)


# -- packed loss == unpacked loss ------------------------------------------------------------------


def examples(vocab_size: int, n: int = 7) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for k in range(n):
        length = 4 + (5 * k) % 13
        ids = torch.randint(5, vocab_size, (length,), generator=gen).tolist()
        prompt = k % 3  # the first tokens carry no loss, as with a prompt
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


PACKABLE = sorted(
    cls.name
    for cls in list_methods()
    if cls.supports_packing and (ROOT / "recipes" / "tiny" / f"{cls.name}.yaml").exists()
)


# Methods that draw noise in training (PVeRA samples its latent z = μ + ε·σ): like dropout, the draws
# follow the layout, so packed and padded batches are compared on the mean path (eval).
SAMPLES_IN_TRAINING = {"pvera"}


def build(tmp_path: Path, recipe_name: str, *overrides: str):
    _, _, tokenizer, model, method = kit.build(recipe_name, tmp_path, list(overrides))
    model.train()
    if recipe_name in SAMPLES_IN_TRAINING or any(
        m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout)
    ):
        model.eval()  # dropout draws differ by layout (gpt2's resid/attn dropout); eval keeps it exact
    return model, tokenizer, method


@pytest.mark.parametrize("name", PACKABLE)
def test_packed_window_equals_unpacked(tmp_path, name):
    """Two packed micro-batches (rows of several examples) against the same examples in two padded
    micro-batches: same window loss, same target count, same gradients; on every loss path, with
    transformers' block-diagonal mask and with peftcli's per-example attention."""
    model, tokenizer, method = build(tmp_path, name)
    rows = examples(model.config.vocab_size)
    unpacked = [collate(rows[:4], tokenizer, "causal_lm"), collate(rows[4:], tokenizer, "causal_lm")]
    pad_id = tokenizer.pad_token_id
    packed = [
        collate_packed([[rows[0], rows[1]], [rows[2], rows[3]]], pad_id),  # second row shorter: padded
        collate_packed([[rows[4], rows[5], rows[6]]], pad_id),
    ]
    assert packed[0]["input_ids"].shape[0] == 2 and packed[1]["input_ids"].shape[0] == 1
    for attention in ("mask", "per_example"):
        if attention == "per_example":
            switched, why = use_packed_attention(model)
            assert switched, why
            assert model.config._attn_implementation == ATTENTION_NAME
        for path in (PLAIN, CHUNKED, FUSED):
            loss_u, n_u, grads_u = kit.window_gradients(model, method, unpacked, loss_path=path)
            loss_p, n_p, grads_p = kit.window_gradients(model, method, packed, loss_path=path)
            assert n_p == n_u
            assert abs(loss_p - loss_u) <= 1e-5, (attention, path, loss_p, loss_u)
            assert grads_u.keys() == grads_p.keys() and grads_u
            for key, grad in grads_u.items():
                scale = grad.abs().max().clamp_min(1e-6)
                assert (grads_p[key] - grad).abs().max() / scale <= 1e-5, (attention, path, key)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_packed_equals_unpacked_on_other_architectures(tmp_path, arch):
    target = "[c_attn]" if arch == "gpt2" else "[q_proj,v_proj]"
    model, tokenizer, method = build(
        tmp_path, "lora", f"model.name=tiny:{arch}", f"method.target_modules={target}"
    )
    rows = examples(model.config.vocab_size)
    loss_u, _, _ = kit.window_gradients(model, method, [collate(rows, tokenizer, "causal_lm")])
    packed = collate_packed([rows[:3], rows[3:]], tokenizer.pad_token_id or 0)
    loss_p, _, _ = kit.window_gradients(model, method, [packed])
    assert abs(loss_p - loss_u) <= 1e-5, (loss_p, loss_u)
    # per-example attention (both families hand position_ids to their attention)
    switched, why = use_packed_attention(model)
    assert switched, why
    loss_switched, _, _ = kit.window_gradients(model, method, [packed])
    assert abs(loss_switched - loss_u) <= 1e-5, (loss_switched, loss_u)
    # evaluation in the same run (padding mask, no position ids) still takes the ordinary path
    loss_padded, _, _ = kit.window_gradients(model, method, [collate(rows, tokenizer, "causal_lm")])
    assert abs(loss_padded - loss_u) <= 1e-6, (loss_padded, loss_u)


def test_packed_attention_keeps_transformers_path_when_the_probe_fails(tmp_path, monkeypatch):
    """A model whose attention never sees the position ids would attend across examples with no mask:
    the probe catches that and the model keeps its own attention."""
    import peftcli.training.attention

    model, _, _ = build(tmp_path, "lora")
    before = model.config._attn_implementation
    monkeypatch.setattr(peftcli.training.attention, "_record_probe", lambda: None)
    switched, why = use_packed_attention(model)
    assert not switched and "position_ids" in why
    assert model.config._attn_implementation == before


def test_packed_attention_leaves_sliding_windows_and_softcapping_to_transformers():
    """Plain causal SDPA per example would ignore a sliding window or attention soft-capping, so those
    models keep transformers' packed mask (which applies both)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM

    small = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    for model_class, config, reason in (
        (MistralForCausalLM, MistralConfig(**small, sliding_window=8), "sliding attention window"),
        (Gemma2ForCausalLM, Gemma2Config(**small, attn_implementation="eager"), "soft-capping"),
    ):
        model = model_class(config)
        before = model.config._attn_implementation
        switched, why = use_packed_attention(model)
        assert not switched and reason in why, why
        assert model.config._attn_implementation == before


def test_collate_packed_layout():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    batch = collate_packed([rows, rows[:1]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 6, 7, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


# -- recipes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe_name, overrides, key",
    [
        ("prompt_tuning", ["train.packing=true"], "train.packing"),
        ("prefix_tuning", ["train.packing=true"], "train.packing"),
        ("mam_adapter", ["train.packing=true"], "train.packing"),
        ("lora", ["train.packing=true", "train.batch_tokens=32"], "train.batch_tokens"),
        ("lora", ["train.batch_tokens=4096"], "train.batch_tokens"),
        ("lora", ["train.packing=true", "train.group_by_length=true"], "train.group_by_length"),
    ],
)
def test_recipe_refuses_what_cannot_pack(recipe_name, overrides, key):
    with pytest.raises(RecipeError) as err:
        load_recipe(ROOT / "recipes" / "tiny" / f"{recipe_name}.yaml", overrides)
    assert err.value.key == key


# -- the loop ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["train.packing=true", "train.group_by_length=true"])
def test_resume_is_exact_with_planned_batches(tmp_path, mode):
    """Run 6 steps (checkpoints at 3 and 6), keep the adapter; drop step 6 and resume from step 3: the
    resumed adapter is bit-identical."""
    overrides = [mode, "train.max_steps=6", "train.save_every=3", "train.batch_size=4", "train.grad_accum=2"]
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "lora.yaml", [*overrides, f"output_dir={tmp_path}"])
    adapter = tmp_path / "adapter" / "adapter_model.safetensors"
    train(recipe)
    uninterrupted = load_file(adapter)
    shutil.rmtree(tmp_path / "checkpoints" / "step-6")
    shutil.rmtree(tmp_path / "adapter")
    result = train(recipe, resume=True)
    resumed = load_file(adapter)
    assert result.steps == 6
    assert uninterrupted.keys() == resumed.keys() and uninterrupted
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_summary_line_reports_the_padding_saved():
    """The start-up line's figures are padding_fraction of the plain and the packed plan of epoch 0."""
    from peftcli.data.sampler import BatchSampler
    from peftcli.training.setup import build_sampler

    recipe = load_recipe(
        ROOT / "recipes" / "tiny" / "lora.yaml", ["train.packing=true", "train.batch_size=4"]
    )
    sampler, lines = build_sampler(recipe, BatchSampler(LENGTHS, 4, recipe.train.seed))
    plain = BatchSampler(len(LENGTHS), 4, recipe.train.seed).epoch_batches(0)
    before = padding_fraction(LENGTHS, plain, packed=False)
    after = padding_fraction(LENGTHS, sampler.epoch_batches(0), packed=True)
    assert before > 0.3 and after < 0.1
    assert f"padding {100 * before:.0f}% → {100 * after:.1f}%" in lines[0]
    assert sorted(i for batch in sampler.epoch_batches(0) for row in batch for i in row) == list(range(300))
