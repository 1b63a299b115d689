"""MAM adapter and UniPELT: each checked as the composition of its parts and against its equations.

References and tolerances (fp32, CPU, seed 0): a prefix_tuning-only model fed the same (gated) prefix
rows, when the other parts are at their zero init (≤ 1e-5); the gated LoRA / adapter equations written
out by hand (≤ 1e-6); the count formulas with tiny:llama's dimensions (exact); save → load logits on a
tiny BERT classifier (≤ 1e-6).
"""

from __future__ import annotations

import kit
import pytest
import torch
import torch.nn.functional as F

from peftcli.export import load_adapter, save_adapter
from peftcli.methods.mam_adapter import MamAdapter, MamConfig
from peftcli.methods.prefix_tuning import PrefixTuning, PrefixTuningConfig
from peftcli.methods.unipelt import GatedLoRA, UniPelt, UniPeltConfig
from peftcli.models import load_tokenizer, resolve_model_name
from peftcli.recipe import ModelConfig


def prefix_only(rows: torch.Tensor, n: int):
    """A prefix_tuning model whose prefix replays ``rows`` exactly (the reference)."""
    method = PrefixTuning(
        PrefixTuningConfig(name="prefix_tuning", num_virtual_tokens=n, prefix_projection=False)
    )
    torch.manual_seed(0)
    model = method.attach(kit.tiny(seed=None))
    model.prefix.start_from(rows)
    model.eval()
    return model


def mam(**options):
    torch.manual_seed(0)
    method = MamAdapter(
        MamConfig(
            name="mam_adapter", num_virtual_tokens=4, encoder_hidden_size=32, bottleneck_size=8, **options
        )
    )
    model = method.attach(kit.tiny(seed=None))
    model.eval()
    return model, method


def unipelt(arch: str = "llama", task: str = "causal_lm"):
    torch.manual_seed(0)
    method = UniPelt(
        UniPeltConfig(name="unipelt", num_virtual_tokens=4, encoder_hidden_size=32, bottleneck_size=8), task
    )
    model = method.attach(kit.tiny(arch, task, seed=None))
    model.eval()
    return model, method


def test_mam_at_adapter_init_equals_prefix_tuning_alone():
    model, method = mam()
    b = kit.batch("causal_lm", model.config.vocab_size, labels=False)
    reference = prefix_only(method.prefix.stored_rows(model), 4)
    with torch.no_grad():
        assert (model(**b).logits - reference(**b).logits).abs().max().item() <= 1e-5


def test_mam_ffn_is_the_scaled_parallel_adapter():
    model, method = mam(scaling=4.0)
    sub = method.adapter.sublayers[0]
    mlp = model.base_model.get_submodule(sub.output_module)
    a = mlp.adapter.bottleneck
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    seen = {}
    handle = mlp.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model(**kit.batch("causal_lm", model.config.vocab_size, labels=False))
    handle.remove()
    x = seen["x"]
    with torch.no_grad():  # f(x) + s·(W_up relu(W_down x + b) + b)
        f_x = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        want = f_x + 4.0 * F.linear(F.relu(F.linear(x, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
    assert (seen["out"] - want).abs().max().item() <= 1e-6


def test_mam_and_unipelt_counts_equal_formula():
    d, L, t, n, e, m = 64, 2, 32, 4, 32, 8  # tiny:llama: kv dim t = 2 kv heads × 16; prefix n, MLP width e
    prefix = n * t + (t * e + e) + (e * L * 2 * t + L * 2 * t)
    adapter = 2 * d * m + d + m
    model, method = mam()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == prefix + L * adapter
    model, method = unipelt()
    r = 8
    lora = L * (
        (r * (d + d) + d + 1) + (r * (d + t) + d + 1)
    )  # q: 64 -> 64, v: 64 -> 32, each + gate (in + 1)
    gated_adapters = L * (adapter + d + 1)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora + prefix + L + gated_adapters
    assert method.expected_trainable_parameters(model) == lora + prefix + L + gated_adapters


def test_unipelt_prefix_gate_scales_the_prefix_rows():
    model, method = unipelt()
    with torch.no_grad():
        model.prefix_gate.logits.copy_(torch.tensor([0.7, -1.3]))
    rows = method.prefix.stored_rows(model)  # (n, L·2·t): layer l's key and value blocks
    gated = rows.clone()
    t = rows.shape[1] // 4
    for layer, g in enumerate(torch.sigmoid(torch.tensor([0.7, -1.3]))):
        gated[:, layer * 2 * t : (layer + 1) * 2 * t] *= g
    reference = prefix_only(gated, 4)  # LoRA (B = 0) and the adapters (W_up = 0) add nothing yet
    b = kit.batch("causal_lm", model.config.vocab_size, labels=False)
    with torch.no_grad():
        assert (model(**b).logits - reference(**b).logits).abs().max().item() <= 1e-5


def test_unipelt_gated_lora_and_gated_adapter_equations():
    model, method = unipelt()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.base_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    gated = next(m for m in model.modules() if isinstance(m, GatedLoRA))
    x = torch.randn(2, 5, gated.lora.in_features, generator=gen)
    lora = gated.lora
    with torch.no_grad():  # W0 x + σ(w·x + b) · (α/r) B A x
        want = lora.base_layer(x) + torch.sigmoid(F.linear(x, gated.gate.weight, gated.gate.bias)) * (
            x @ lora.lora_A.weight.T @ lora.lora_B.weight.T
        ) * (16.0 / 8)
        assert (gated(x) - want).abs().max().item() <= 1e-6
    block = model.base_model.get_submodule(method.sublayers[0].output_module).adapter
    h = torch.randn(2, 5, 64, generator=gen)
    a = block.bottleneck
    with torch.no_grad():  # h + σ(w·h + b) · (W_up relu(W_down h + b) + b)
        want = h + torch.sigmoid(F.linear(h, block.gate.weight, block.gate.bias)) * F.linear(
            F.relu(F.linear(h, a.down.weight, a.down.bias)), a.up.weight, a.up.bias
        )
        assert (block(h) - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", ["mam_adapter", "unipelt"])
def test_bert_classifier_trains_saves_and_reloads(name, tmp_path):
    if name == "mam_adapter":
        torch.manual_seed(0)
        method = MamAdapter(MamConfig(name=name, num_virtual_tokens=4, bottleneck_size=8), "seq_cls")
        model = method.attach(kit.tiny("bert", "seq_cls", seed=None))
    else:
        model, method = unipelt("bert", "seq_cls")
    labelled = kit.batch("seq_cls", model.config.vocab_size)  # classes [0, 1]
    b = kit.inputs(labelled, "seq_cls")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    kit.train_step(model, method, labelled, task="seq_cls")
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with torch.no_grad():
        ours = model(**b).logits
    base_path = resolve_model_name("tiny:bert")
    cfg = ModelConfig(name="tiny:bert", task="seq_cls")
    save_adapter(
        tmp_path / "adapter", model, method, load_tokenizer(base_path, cfg), base_path, cfg, ["a", "b"]
    )
    loaded = load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        assert (loaded.model(**b).logits - ours).abs().max().item() <= 1e-6
