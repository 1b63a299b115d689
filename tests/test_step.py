"""The loop's optimizer step (``peftcli.training.step.Stepper``) against the step written out by hand, and
the method hooks in the loop's order; and the adapter's init seed, recorded at save and used at load.

Reference: one window of micro-batches b₁…b_k is one step of

    L = (Σ_i Σ_tokens CE(b_i)) / N          N = targets scored in the whole window (loss_normaliser)
    θ ← θ − lr · ∂L/∂θ                     (SGD, no momentum: the update is the gradient itself)

so accumulation over micro-batches of different sizes is token-weighted, not a mean of means.
Tolerance: 1e-6 in fp32.
"""

from __future__ import annotations

import json

import kit
import torch
import torch.nn.functional as F

from peftcli.export import SIDECAR, load_adapter
from peftcli.training.step import Stepper, loss_normaliser


def written_out_step(model, micro, lr):
    """The step by hand: the window's summed token loss over its target count, then θ − lr·grad."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total, count = 0.0, 0
    for batch in micro:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        total = total + F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            reduction="sum",
            ignore_index=-100,
        )
        count += int((targets != -100).sum())
    loss = total / count
    grads = torch.autograd.grad(loss, list(params.values()))
    return (
        loss.item(),
        count,
        {n: (p - lr * g).detach() for (n, p), g in zip(params.items(), grads, strict=True)},
    )


def test_one_step_equals_the_step_written_out(tmp_path):
    built = kit.build("lora", tmp_path)
    model, method = built.model, built.method
    kit.perturb(model)  # B ≠ 0: every LoRA tensor gets a gradient
    vocab = model.config.vocab_size
    micro = [
        kit.batch(vocab_size=vocab, lengths=(9, 4), seed=1),
        kit.batch(vocab_size=vocab, lengths=(7,), seed=2),
    ]
    model.train()
    expected_loss, expected_count, expected = written_out_step(model, micro, lr=0.1)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    result = Stepper(model=model, method=method, optimizer=optimizer).step(micro, 0)

    assert loss_normaliser(micro, "causal_lm") == expected_count == (9 - 1) + (4 - 1) + (7 - 1)
    assert abs(result.loss - expected_loss) < 1e-6 and result.fault is None
    assert result.tokens == 9 + 4 + 7
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (p.detach() - expected[name]).abs().max().item() < 1e-6, name
            assert p.grad is None, f"{name}: zero_grad(set_to_none) after the step"


def test_the_hooks_run_in_the_loops_order(tmp_path):
    """after_backward sees the gradients before the update; after_step sees the updated weights and the
    gradients still there (AdaLoRA's allocation reads both); zero_grad comes last."""
    built = kit.build("lora", tmp_path)
    model, method = built.model, built.method
    kit.perturb(model)
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    before = param.detach().clone()
    seen = []

    def after_backward(_model, step):
        seen.append(("after_backward", step, param.grad is not None, torch.equal(param.detach(), before)))

    def after_step(_model, step):
        seen.append(("after_step", step, param.grad is not None, torch.equal(param.detach(), before)))

    method.after_backward, method.after_step = after_backward, after_step
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    Stepper(model=model, method=method, optimizer=optimizer).step(
        [kit.batch(vocab_size=model.config.vocab_size)], 3
    )
    assert seen == [("after_backward", 3, True, True), ("after_step", 3, True, False)], name
    assert param.grad is None


def test_the_adapter_records_its_init_seed_and_loading_uses_it(tmp_path, monkeypatch):
    built = kit.build("lora", tmp_path, ["train.seed=1234"])
    adapter = kit.save(tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe)
    assert json.loads((adapter / SIDECAR).read_text())["seed"] == 1234

    import peftcli.export as export

    seeds = []
    real = export.build_model

    def spy(*args, **kwargs):
        seeds.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "build_model", spy)
    loaded = load_adapter(adapter)
    assert seeds == [1234]
    batch = kit.batch(vocab_size=built.model.config.vocab_size)
    assert (kit.logits(loaded.model, batch) - kit.logits(built.model, batch)).abs().max().item() < 1e-6
