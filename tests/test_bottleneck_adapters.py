"""Houlsby / Pfeiffer and parallel adapters, checked against their equations written out here.

References and tolerances: the hand-written equations of the methods' docstrings on one sublayer
(fp32, CPU, seed 0, max abs diff ≤ 1e-6); the base model's logits for identity at init (≤ 1e-6);
the parameter-count formulas written with the tiny models' dimensions; peft's own config loader
for "not a peft adapter".
"""

from __future__ import annotations

import json

import kit
import pytest
import torch
import torch.nn.functional as F

from peftcli.methods.bottleneck import find_sublayers
from peftcli.methods.houlsby_adapter import HoulsbyAdapter, HoulsbyConfig
from peftcli.methods.parallel_adapter import ParallelAdapter, ParallelAdapterConfig
from peftcli.recipe import RecipeError
from peftcli.recipe_loader import recipe_from_dict

TOL = 1e-6


def randomize(module: torch.nn.Module, seed: int = 1) -> None:
    """Give the adapter's zero-initialised up-projections values, so equations are not trivially h."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def capture(module: torch.nn.Module):
    """Record (args, output) of ``module``'s next call."""
    seen = {}

    def hook(mod, args, kwargs, output):
        seen["args"], seen["kwargs"], seen["output"] = args, kwargs, output

    handle = module.register_forward_hook(hook, with_kwargs=True)
    return seen, handle


ARCHS = [("llama", "causal_lm"), ("qwen2", "causal_lm"), ("gpt2", "causal_lm"), ("bert", "seq_cls")]


@pytest.mark.parametrize("arch,task", ARCHS)
@pytest.mark.parametrize("method", ["houlsby", "pfeiffer", "parallel"])
def test_identity_at_init_across_families(arch, task, method):
    base = kit.tiny(arch, task)
    model = kit.tiny(arch, task)
    if method == "parallel":
        m = ParallelAdapter(ParallelAdapterConfig(name="parallel_adapter", positions=["attn", "ffn"]), task)
    else:
        m = HoulsbyAdapter(HoulsbyConfig(name="houlsby_adapter", config=method), task)
    model = m.attach(model)
    b = kit.batch("causal_lm", base.config.vocab_size, labels=False)
    with torch.no_grad():
        diff = (model(**b).logits - base(**b).logits).abs().max().item()
    assert diff <= TOL
    assert len(m.sublayers) == base.config.num_hidden_layers * (1 if method == "pfeiffer" else 2)


def test_placement_per_family():
    expected = {
        ("llama", "causal_lm"): ("model.layers.0.self_attn", "model.layers.0.mlp"),
        ("gpt2", "causal_lm"): ("transformer.h.0.attn", "transformer.h.0.mlp"),
        ("bert", "seq_cls"): (
            "bert.encoder.layer.0.attention.output.dense",
            "bert.encoder.layer.0.output.dense",
        ),
    }
    for (arch, task), (attn, ffn) in expected.items():
        subs = find_sublayers(kit.tiny(arch, task))
        assert [s.output_module for s in subs[:2]] == [attn, ffn]
    bert = find_sublayers(kit.tiny("bert", "seq_cls"))
    assert [s.input_module for s in bert[:2]] == [
        "bert.encoder.layer.0.attention.self",
        "bert.encoder.layer.0.intermediate",
    ]


def adapter_of(model, name):
    return model.get_submodule(name).adapter.bottleneck


def test_houlsby_llama_ffn_equals_equation():
    model = kit.tiny("llama", "causal_lm")
    method = HoulsbyAdapter(HoulsbyConfig(name="houlsby_adapter", bottleneck_size=8), "causal_lm")
    model = method.attach(model)
    randomize(model)
    mlp = model.model.layers[1].mlp
    seen, handle = capture(mlp)
    with torch.no_grad():
        model(**kit.batch("causal_lm", model.config.vocab_size, labels=False))
    handle.remove()
    x = seen["args"][0]
    a = adapter_of(model, "model.layers.1.mlp")
    with torch.no_grad():  # LlamaMLP: down(silu(gate(x)) * up(x)), then h + W_up swish(W_down h + b) + b
        h = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        want = h + F.linear(F.silu(F.linear(h, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
    assert (seen["output"] - want).abs().max().item() <= TOL


def test_houlsby_llama_attention_output_equals_equation():
    model = kit.tiny("llama", "causal_lm")
    method = HoulsbyAdapter(HoulsbyConfig(name="houlsby_adapter", bottleneck_size=8), "causal_lm")
    model = method.attach(model)
    randomize(model)
    attn = model.model.layers[0].self_attn
    a = adapter_of(model, "model.layers.0.self_attn")
    seen, handle = capture(attn.o_proj)  # the attention sublayer's raw output is o_proj's output
    seen_attn, handle_attn = capture(attn)
    with torch.no_grad():
        model(**kit.batch("causal_lm", model.config.vocab_size, labels=False))
    handle.remove()
    handle_attn.remove()
    h = seen["output"]
    with torch.no_grad():
        want = h + F.linear(F.silu(F.linear(h, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
    assert (seen_attn["output"][0] - want).abs().max().item() <= TOL


def test_houlsby_bert_inside_output_sublayer_before_layernorm():
    model = kit.tiny("bert", "seq_cls")
    method = HoulsbyAdapter(
        HoulsbyConfig(name="houlsby_adapter", bottleneck_size=8, nonlinearity="relu"), "seq_cls"
    )
    model = method.attach(model)
    randomize(model)
    out_layer = model.bert.encoder.layer[0].attention.output  # BertSelfOutput(hidden_states, input_tensor)
    seen, handle = capture(out_layer)
    with torch.no_grad():
        model(**kit.batch("causal_lm", model.config.vocab_size, labels=False))
    handle.remove()
    hidden, residual = seen["args"]
    a = adapter_of(model, "bert.encoder.layer.0.attention.output.dense")
    with torch.no_grad():  # Houlsby: LayerNorm(h + W_up relu(W_down h + b) + b + residual), h = dense(hidden)
        h = F.linear(hidden, out_layer.dense.weight, out_layer.dense.bias)
        adapted = h + F.linear(F.relu(F.linear(h, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
        want = out_layer.LayerNorm(adapted + residual)
    assert (seen["output"] - want).abs().max().item() <= TOL


def test_parallel_llama_and_gpt2_ffn_equal_equation():
    for arch in ("llama", "gpt2"):
        model = kit.tiny(arch, "causal_lm")
        method = ParallelAdapter(
            ParallelAdapterConfig(name="parallel_adapter", bottleneck_size=8, scaling=4.0), "causal_lm"
        )
        model = method.attach(model)
        randomize(model)
        name = method.sublayers[0].output_module
        mlp = model.get_submodule(name)
        seen, handle = capture(mlp)
        with torch.no_grad():
            model(**kit.batch("causal_lm", model.config.vocab_size, labels=False))
        handle.remove()
        x = seen["args"][0]
        a = adapter_of(model, name)
        with torch.no_grad():
            handle_off = mlp._forward_hooks.copy()
            mlp._forward_hooks.clear()  # the base sublayer alone: f(x)
            f_x = mlp(x)
            mlp._forward_hooks.update(handle_off)
            want = f_x + 4.0 * F.linear(
                F.relu(F.linear(x, a.down.weight, a.down.bias)), a.up.weight, a.up.bias
            )
        assert (seen["output"] - want).abs().max().item() <= TOL, arch


def test_parallel_bert_reads_ffn_input_and_adds_before_layernorm():
    model = kit.tiny("bert", "seq_cls")
    method = ParallelAdapter(
        ParallelAdapterConfig(name="parallel_adapter", bottleneck_size=8, scaling=2.0), "seq_cls"
    )
    model = method.attach(model)
    randomize(model)
    layer = model.bert.encoder.layer[1]
    seen, handle = capture(layer.output)  # BertOutput(intermediate_output, attention_output)
    with torch.no_grad():
        model(**kit.batch("causal_lm", model.config.vocab_size, labels=False))
    handle.remove()
    inter, x = seen["args"]
    a = adapter_of(model, "bert.encoder.layer.1.output.dense")
    with torch.no_grad():  # LayerNorm(dense(i) + s·(W_up relu(W_down x + b) + b) + x), x = the FFN's input
        delta = 2.0 * F.linear(F.relu(F.linear(x, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
        want = layer.output.LayerNorm(
            F.linear(inter, layer.output.dense.weight, layer.output.dense.bias) + delta + x
        )
    assert (seen["output"] - want).abs().max().item() <= TOL


def test_trainable_counts_equal_formula():
    d, m, L = 64, 16, 2  # tiny:llama hidden size, bottleneck, layers
    adapter = 2 * d * m + m + d
    model = kit.tiny("llama", "causal_lm")
    method = HoulsbyAdapter(HoulsbyConfig(name="houlsby_adapter", bottleneck_size=m), "causal_lm")
    model = method.attach(model)
    rms_norms = 2 * L * d  # input_layernorm + post_attention_layernorm weights
    assert (
        sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * L * adapter + rms_norms == 8768
    )
    model = kit.tiny("llama", "causal_lm")
    method = HoulsbyAdapter(HoulsbyConfig(name="houlsby_adapter", config="pfeiffer"), "causal_lm")
    model = method.attach(model)
    m16 = d // 16
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == L * (2 * d * m16 + m16 + d)
    bert = kit.tiny("bert", "seq_cls")
    method = ParallelAdapter(ParallelAdapterConfig(name="parallel_adapter", bottleneck_size=m), "seq_cls")
    bert = method.attach(bert)
    head = d * 2 + 2  # the new classifier: d -> 2 labels
    trainable = {n for n, p in bert.named_parameters() if p.requires_grad}
    assert all(".adapter." in n or n.startswith("classifier.") for n in trainable)
    assert sum(p.numel() for p in bert.parameters() if p.requires_grad) == L * adapter + head


def test_pfeiffer_preset_and_explicit_override():
    m = HoulsbyAdapter(HoulsbyConfig(name="houlsby_adapter", config="pfeiffer", nonlinearity="gelu"))
    assert m.options.positions == ["ffn"] and m.options.nonlinearity == "gelu"
    assert m.options.reduction_factor == 16.0 and m.options.train_layer_norms is False


def test_bad_options_are_recipe_errors():
    raw = {
        "model": {"name": "tiny:llama"},
        "data": {"train": "x.jsonl"},
        "method": {"name": "houlsby_adapter", "reduction_factor": 8, "bottleneck_size": 4},
    }
    with pytest.raises(RecipeError, match="method.bottleneck_size"):
        recipe_from_dict(raw)
    raw["method"] = {"name": "parallel_adapter", "positions": ["mlp"]}
    with pytest.raises(RecipeError, match=r"method.positions\[0\]"):
        recipe_from_dict(raw)


@pytest.mark.parametrize(
    "name", ["houlsby_adapter", "parallel_adapter", "ladder_side_tuning", "mam_adapter", "unipelt"]
)
def test_adapter_dir_is_not_a_peft_adapter_and_reloads(name, tmp_path):
    """adapter_config.json names our method, the base and the task, and no peft_type; peft refuses it;
    peftcli.load and peftcli eval reload it with equal logits / the training run's final eval loss."""
    import peft

    from peftcli import api
    from peftcli.export import load_adapter

    result = api.train(
        f"recipes/tiny/{name}.yaml", overrides=[f"output_dir={tmp_path}/run", "train.max_steps=3"]
    )
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert "peft_type" not in config and config["peftcli_method"] == name
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"]
    with pytest.raises(TypeError, match="missing required keys.*peft_type"):  # peft cannot build a config
        peft.PeftConfig.from_pretrained(str(result.adapter_dir))
    model, _ = api.load(result.adapter_dir)
    loaded = load_adapter(result.adapter_dir)
    b = kit.batch("causal_lm", model.config.vocab_size, labels=False)
    with torch.no_grad():
        assert (model(**b).logits - loaded.model(**b).logits).abs().max().item() <= TOL
    trained_eval = result.eval_after["eval_loss"]
    again = api.evaluate_target(result.adapter_dir)
    assert abs(again["eval_loss"] - trained_eval) <= 1e-5
