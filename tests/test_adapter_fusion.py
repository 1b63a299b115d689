"""AdapterFusion (stage two) against its equation, over the shipped tiny Pfeiffer sources.

References and tolerances: the fusion equation written out with an explicit loop over the adapters
(fp32, CPU, seed 0, ≤ 1e-6); the sources' tensors as stored in their safetensors files (exact);
logits before save vs after reload (≤ 1e-6); the count formula 3·(d² + d) per fused sublayer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import kit
import pytest
import torch
import torch.nn.functional as F
from kit import ROOT

from peftcli.checkpoint import read_adapter_state
from peftcli.export import load_adapter, save_adapter
from peftcli.methods.bottleneck import block_of
from peftcli.recipe import RecipeError

SOURCES = [ROOT / "recipes/tiny/fusion_sources/reverse", ROOT / "recipes/tiny/fusion_sources/upper"]


def build(tmp_path: Path, sources: list[Path] | None = None) -> kit.Built:
    adapters = "[" + ",".join(str(p) for p in (sources or SOURCES)) + "]"
    return kit.build("adapter_fusion", tmp_path, [f"method.adapters={adapters}"])


def randomize_fusion(model, method) -> None:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, block in method.blocks(model):
            for linear in (block.query, block.key, block.value):
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * 0.2)
                linear.bias.copy_(torch.randn(linear.bias.shape, generator=gen) * 0.2)


def test_sources_are_loaded_frozen_and_fusion_trains(tmp_path):
    _, _, _, model, method = build(tmp_path)
    assert [s.position for s in method.sublayers] == ["ffn", "ffn"]  # Pfeiffer sources: FFN only
    for n, source_dir in enumerate(SOURCES):
        stored = read_adapter_state(source_dir)
        for sub in method.sublayers:
            source = block_of(model, sub).sources[n]
            assert not any(p.requires_grad for p in source.parameters())
            for pname, param in source.named_parameters():
                assert torch.equal(param, stored[f"base_model.model.{sub.output_module}.adapter.{pname}"])
    d, fused = 64, 2
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.split(".adapter.")[1].split(".")[0] in ("query", "key", "value") for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == fused * 3 * (d * d + d) == 24960


def test_fusion_forward_equals_equation(tmp_path):
    _, _, _, model, method = build(tmp_path)
    randomize_fusion(model, method)
    sub = method.sublayers[1]
    mlp = model.get_submodule(sub.output_module)
    block = block_of(model, sub)
    seen = {}
    handle = mlp.register_forward_hook(lambda m, a, o: seen.update(args=a, output=o))
    with torch.no_grad():
        model(**kit.batch("causal_lm", model.config.vocab_size, lengths=(9, 9), labels=False))
    handle.remove()
    x = seen["args"][0]
    with torch.no_grad():
        hooks = dict(mlp._forward_hooks)
        mlp._forward_hooks.clear()
        h = mlp(x)  # the base FFN output
        mlp._forward_hooks.update(hooks)
        q = F.linear(h, block.query.weight, block.query.bias)
        scores, values = [], []
        for source in block.sources:  # z_n = W_up relu(W_down h + b) + b (the Pfeiffer preset's relu)
            z = F.linear(
                F.relu(F.linear(h, source.down.weight, source.down.bias)), source.up.weight, source.up.bias
            )
            k = F.linear(z, block.key.weight, block.key.bias)
            values.append(F.linear(z, block.value.weight, block.value.bias))
            scores.append((q * k).sum(-1) / 1.0)
        a = torch.softmax(torch.stack(scores, dim=-1), dim=-1)
        want = h + sum(a[..., n : n + 1] * values[n] for n in range(len(values)))
    assert (seen["output"] - want).abs().max().item() <= 1e-6


def test_reload_needs_no_source_directories(tmp_path):
    copies = []
    for source in SOURCES:
        copies.append(tmp_path / "sources" / source.name)
        shutil.copytree(source, copies[-1])
    recipe, base_path, tokenizer, model, method = build(tmp_path, copies)
    randomize_fusion(model, method)
    b = kit.batch("causal_lm", model.config.vocab_size, lengths=(9, 9), labels=False)
    with torch.no_grad():
        ours = model(**b).logits
    save_adapter(tmp_path / "adapter", model, method, tokenizer, base_path, recipe.model)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "peft_type" not in config and config["peftcli_method"] == "adapter_fusion"
    assert len(config["source_configs"]) == 2
    shutil.rmtree(tmp_path / "sources")
    loaded = load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        assert (loaded.model(**b).logits - ours).abs().max().item() <= 1e-6


def test_bad_sources_are_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="at least 2"):
        build(tmp_path, SOURCES[:1])
    with pytest.raises(RecipeError, match=r"method.adapters\[1\]: directory not found"):
        build(tmp_path, [SOURCES[0], tmp_path / "missing"])
    other = tmp_path / "other"
    shutil.copytree(SOURCES[1], other)
    sidecar = json.loads((other / "peftcli_adapter.json").read_text())
    sidecar["model_name"] = "tiny:qwen2"
    (other / "peftcli_adapter.json").write_text(json.dumps(sidecar))
    with pytest.raises(RecipeError, match="same base model"):
        build(tmp_path, [SOURCES[0], other])
    sidecar["model_name"] = "tiny:llama"
    sidecar["method_config"]["train_layer_norms"] = True
    (other / "peftcli_adapter.json").write_text(json.dumps(sidecar))
    with pytest.raises(RecipeError, match="train_layer_norms: false"):
        build(tmp_path, [SOURCES[0], other])
