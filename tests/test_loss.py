"""The fused and chunked linear cross-entropy (peftcli/training/loss.py) against the plain logits path.

Reference: the plain path (full logits, ``F.cross_entropy`` summed), same model, same batch, fp32 on
the CPU, seed 0. The fused path (plain linear heads) and the chunked path (any head) must give the
same summed loss and the same gradient on every trainable tensor, ≤ 1e-5 (relative to the largest
entry), with chunks small enough that a batch spans several; and neither may save a
(targets × vocabulary) tensor for backward.
"""

from __future__ import annotations

from pathlib import Path

import kit
import pytest
import torch
from kit import CPU

from peftcli.training.loss import (
    CHUNKED,
    FUSED,
    PLAIN,
    FusedLinearCrossEntropy,
    choose_loss_path,
    micro_batch_loss_sum,
)


def build(tmp_path: Path, recipe_name: str, *overrides: str):
    return kit.build(recipe_name, tmp_path, list(overrides)).model


def loss_and_grads(model, batch, path: str, chunk_tokens: int | None = None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # same dropout masks on both paths
    loss = micro_batch_loss_sum(model, batch, "causal_lm", path, chunk_tokens=chunk_tokens)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def assert_same(model, batch, path):
    loss_plain, grads_plain = loss_and_grads(model, batch, PLAIN)
    loss_chunked, grads_chunked = loss_and_grads(model, batch, path, chunk_tokens=5)
    assert torch.allclose(loss_chunked, loss_plain, rtol=1e-6, atol=1e-5), (loss_chunked, loss_plain)
    assert grads_plain.keys() == grads_chunked.keys() and grads_plain
    for name, grad in grads_plain.items():
        scale = grad.abs().max().clamp_min(1e-6)
        assert (grads_chunked[name] - grad).abs().max() / scale <= 1e-5, name


# case -> (recipe and overrides, the path ``auto`` picks on the CPU)
CASES = {
    "lora": (("lora",), FUSED),
    "lora_on_lm_head": (("lora", "method.target_modules=[q_proj,v_proj,lm_head]"), CHUNKED),
    "modules_to_save_lm_head": (
        ("lora", "method.modules_to_save=[lm_head]"),
        FUSED,
    ),  # a trainable copy, still nn.Linear
    "dora": (("dora",), FUSED),
    "ladder_side_tuning": (("ladder_side_tuning",), FUSED),
    "houlsby_adapter": (("houlsby_adapter",), FUSED),
}


@pytest.mark.parametrize("case", CASES)
def test_chunked_loss_and_gradients_equal_plain(tmp_path, case):
    recipe, expected = CASES[case]
    model = build(tmp_path, *recipe)
    model.train()
    assert choose_loss_path(model, "causal_lm", "auto", CPU)[0] == expected
    assert choose_loss_path(model, "causal_lm", "chunked", CPU)[0] == expected
    assert_same(
        model, kit.batch("causal_lm", model.config.vocab_size, lengths=(12, 8, 5), prompt=3), expected
    )
    if expected == FUSED:  # the checkpointed path works for linear heads too
        assert_same(
            model, kit.batch("causal_lm", model.config.vocab_size, lengths=(12, 8, 5), prompt=3), CHUNKED
        )


@pytest.mark.parametrize("path", [FUSED, CHUNKED])
def test_chunked_with_tied_embeddings(tmp_path, path):
    """gpt2 ties lm_head to wte: training the shared weight gets its input- and output-side gradients."""
    model = build(tmp_path, "lora", "model.name=tiny:gpt2", "method.target_modules=[c_attn]")
    head = model.get_output_embeddings()
    assert head.weight is model.get_input_embeddings().weight
    head.weight.requires_grad_(True)
    model.train()
    assert_same(model, kit.batch("causal_lm", model.config.vocab_size, lengths=(12, 8, 5), prompt=3), path)


def test_fused_function_against_autograd():
    """FusedLinearCrossEntropy on its own: a trainable weight and bias, ignored rows, a row-count that is
    not a multiple of the chunk, and an incoming gradient other than 1, against F.cross_entropy."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=gen, dtype=torch.float32)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float32)
    bias = torch.randn(50, generator=gen, dtype=torch.float32)
    labels = torch.randint(0, 50, (23,), generator=gen)
    labels[[2, 7, 19]] = -100
    grads = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        if fused:
            loss = FusedLinearCrossEntropy.apply(*leaves, labels, 5)
        else:
            logits = torch.nn.functional.linear(*leaves)
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        (loss * 0.37).backward()
        grads.append([loss.detach(), *(t.grad for t in leaves)])
    for fused, reference in zip(*grads, strict=True):
        assert torch.allclose(fused, reference, rtol=1e-5, atol=1e-5)


def test_soft_prompts_fall_back_to_plain(tmp_path):
    model = build(tmp_path, "prompt_tuning")
    assert choose_loss_path(model, "causal_lm", "auto", CPU)[0] == PLAIN
    assert choose_loss_path(model, "causal_lm", "plain", CPU)[0] == PLAIN
    assert choose_loss_path(model, "seq_cls", "auto", CPU)[0] == PLAIN


def test_chunked_saves_no_full_logits(tmp_path):
    """Every tensor autograd keeps for backward is smaller than (targets × vocab); the plain path keeps one."""
    model = build(tmp_path, "lora")
    model.train()
    batch = kit.batch("causal_lm", model.config.vocab_size, lengths=(12, 8, 5), prompt=3)
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    full = n_targets * model.config.vocab_size

    vocab = model.config.vocab_size

    def largest_logits_saved(path):
        sizes = [0]

        def pack(tensor):
            if tensor.dim() and tensor.shape[-1] == vocab:  # logits or their softmax
                sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            micro_batch_loss_sum(model, batch, "causal_lm", path, chunk_tokens=4)
        return max(sizes)

    assert largest_logits_saved(PLAIN) >= full
    assert largest_logits_saved(CHUNKED) == 0  # backward recomputes each chunk's logits
    assert largest_logits_saved(FUSED) == 0  # the forward already took the gradients
