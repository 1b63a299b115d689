"""Ladder side-tuning against its equations, and the promise that the backbone never sees a gradient.

References and tolerances: the side network written out by hand from the backbone's hidden states
(fp32, CPU, seed 0, max abs diff ≤ 1e-5); the base's logits at init (≤ 1e-6); the parameter formula
with the tiny models' dimensions; ``.grad is None`` / ``grad_fn is None`` for the backbone.
"""

from __future__ import annotations

import kit
import pytest
import torch
import torch.nn.functional as F

from peftcli.compat import cache_argument, output_cache
from peftcli.methods.ladder_side_tuning import LadderConfig, LadderSideTuning
from peftcli.training.loop import token_loss_sum

ARCHS = [("llama", "causal_lm"), ("qwen2", "causal_lm"), ("gpt2", "causal_lm"), ("bert", "seq_cls")]


def applied(arch: str, task: str, **options):
    model = kit.tiny(arch, task)
    method = LadderSideTuning(LadderConfig(name="ladder_side_tuning", **options), task)
    torch.manual_seed(0)
    return method.attach(model), method


def randomize_upsample(method, model) -> None:
    side = method.side_network(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        side.upsample.weight.copy_(torch.randn(side.upsample.weight.shape, generator=gen) * 0.3)
        side.upsample.bias.copy_(torch.randn(side.upsample.bias.shape, generator=gen) * 0.3)
        side.gates.copy_(torch.randn(side.gates.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("arch,task", ARCHS)
def test_identity_at_init(arch, task):
    base = kit.tiny(arch, task)
    model, _ = applied(arch, task)
    if task == "seq_cls":  # same (new, random) head on both
        base.classifier.load_state_dict(model.classifier.state_dict())
    inputs, _ = kit.inputs_and_labels(kit.batch(task, base.config.vocab_size), task)
    with torch.no_grad():
        assert (model(**inputs).logits - base(**inputs).logits).abs().max().item() <= 1e-6


@pytest.mark.parametrize("arch,task", ARCHS)
def test_no_gradient_reaches_the_backbone_and_it_runs_without_a_graph(arch, task):
    model, method = applied(arch, task)
    randomize_upsample(method, model)
    body = model.get_submodule(method.body_name)
    backbone_params = dict(body.backbone.named_parameters())
    layers = [
        m
        for n, m in body.backbone.named_modules()
        if n.count(".") == 1 and n.split(".")[0] in ("layers", "h", "layer")
    ]
    layers += [
        m for n, m in body.backbone.named_modules() if n.count(".") == 2 and n.startswith("encoder.layer.")
    ]
    assert len(layers) == model.config.num_hidden_layers
    records = []

    def record(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        records.append((torch.is_grad_enabled(), out.requires_grad, out.grad_fn))

    handles = [layer.register_forward_hook(record) for layer in layers]
    inputs, labels = kit.inputs_and_labels(kit.batch(task, model.config.vocab_size), task)
    model.train()
    loss_sum, n = token_loss_sum(model(**inputs).logits, labels, task)
    (loss_sum / n).backward()
    for h in handles:
        h.remove()
    assert records and all(r == (False, False, None) for r in records), (
        records
    )  # no graph on any backbone activation
    assert all(p.grad is None for p in backbone_params.values())
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    side_grads = [p.grad for p in method.side_network(model).parameters()]
    assert all(g is not None for g in side_grads) and any(g.abs().sum() > 0 for g in side_grads)


def test_activations_saved_for_backward_are_only_the_side_and_head():
    """With LST nothing of width d·(layers) is saved: every saved tensor belongs to the side network
    (width d_s or its FFN), the upsample/head input (width d) or the logits/loss."""
    model, method = applied("llama", "causal_lm", reduction_factor=4)
    randomize_upsample(method, model)
    inputs, labels = kit.inputs_and_labels(kit.batch("causal_lm", model.config.vocab_size), "causal_lm")
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_loss_sum(model(**inputs).logits, labels, "causal_lm")
    d, ds, vocab = 64, 16, model.config.vocab_size
    intermediate = model.config.intermediate_size  # 128: would show up if an MLP of the backbone saved inputs
    assert shapes
    assert not any(s and s[-1] == intermediate for s in shapes)
    attention_like = [s for s in shapes if len(s) == 4]  # (B, heads, T, T) or (B, heads, T, head_dim)
    assert not attention_like
    assert all(len(s) <= 2 or s[-1] in (1, d, ds, 4 * ds, vocab) for s in shapes), shapes


@pytest.mark.parametrize("arch,task", [("llama", "causal_lm"), ("bert", "seq_cls")])
def test_forward_equals_side_network_equation(arch, task):
    model, method = applied(arch, task, reduction_factor=4)
    randomize_upsample(method, model)
    side = method.side_network(model)
    backbone = model.get_submodule(method.body_name).backbone
    inputs, _ = kit.inputs_and_labels(kit.batch(task, model.config.vocab_size), task)
    with torch.no_grad():
        ours = model(**inputs).logits
        out = backbone(**inputs, output_hidden_states=True)
        hs = out.hidden_states
        s = F.linear(hs[0], side.downsamplers[0].weight, side.downsamplers[0].bias)
        for i in range(side.num_layers):
            mu = torch.sigmoid(side.gates[i] / 0.1)
            z = (
                mu * F.linear(hs[i + 1], side.downsamplers[i + 1].weight, side.downsamplers[i + 1].bias)
                + (1 - mu) * s
            )
            block = side.blocks[i]
            normed = F.layer_norm(z, (side.width,), block.norm.weight, block.norm.bias, block.norm.eps)
            s = z + F.linear(
                F.gelu(F.linear(normed, block.fc1.weight, block.fc1.bias)), block.fc2.weight, block.fc2.bias
            )
        final = F.layer_norm(
            s, (side.width,), side.final_norm.weight, side.final_norm.bias, side.final_norm.eps
        )
        h_last = hs[-1] + F.linear(final, side.upsample.weight, side.upsample.bias)
        if task == "causal_lm":
            want = model.lm_head(h_last)
        else:  # BERT: pooler on the corrected sequence, then the classifier
            want = model.classifier(backbone.pooler(h_last))
    assert (ours - want).abs().max().item() <= 1e-5


def test_trainable_count_equals_formula():
    model, _ = applied("llama", "causal_lm", reduction_factor=4, ffn_multiplier=4)
    d, L = 64, 2
    ds = d // 4
    f = 4 * ds
    formula = (L + 1) * (d * ds + ds) + L + L * (2 * ds + ds * f + f + f * ds + ds) + 2 * ds + ds * d + d
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == formula == 8562
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.startswith("model.side.") for n in names)


def test_greedy_generation_with_cache_matches_full_recompute():
    """The side network is position-wise, so the backbone's KV cache keeps generation exact."""
    model, method = applied("llama", "causal_lm", reduction_factor=4)
    randomize_upsample(method, model)
    ids = torch.randint(5, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cached = model(input_ids=ids[:, :4], use_cache=True)
        step = model(input_ids=ids[:, 4:], **{cache_argument(): output_cache(cached)}, use_cache=True).logits[
            :, -1
        ]
        full = model(input_ids=ids).logits[:, -1]
    assert (step - full).abs().max().item() <= 1e-5
