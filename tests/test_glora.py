"""GLoRA against peft 0.21 as the oracle, fp32 on the CPU:

- the paper's equations: our layer's output equals ``(W0 + W0 ⊙ A + B) x + b0 + b0 ⊙ D + E + W0 C`` with
  A..E built by hand from the saved factors, for each form (lora, vector, constant, none);
- with each combination of forms that changes the numbers (and ``r``), our adapter moved off init
  loads in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an adapter peft wrote loads in
  ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and ``peftcli merge`` folds it into a plain
  model with peft's logits (≤ 1e-4), on tiny:qwen2 (biased q/k/v: C, D, E act), tiny:llama (no biases:
  C, D, E are zeros, saved as peft saves them) and tiny:bert seq_cls;
- merge then unmerge gives back the logits and the base weights and biases.
"""

from __future__ import annotations

import kit
import pytest
import torch

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]
QWEN2 = ["model.name=tiny:qwen2"]
FORMS = {  # run id -> (config_A_B, config_C, config_D_E)
    "lora-lora-constant": ("lora", "lora", "constant"),
    "vector-vector-vector": ("vector", "vector", "vector"),
    "constant-none-constant": ("constant", "none", "constant"),
    "none-lora-none": ("none", "lora", "none"),
}


def forms(run: str) -> list[str]:
    a_b, c, d_e = FORMS[run]
    return [f"method.config_A_B={a_b}", f"method.config_C={c}", f"method.config_D_E={d_e}"]


OPTION_RUNS = {
    **{f"qwen2-{run}": [*QWEN2, *forms(run)] for run in FORMS},
    "qwen2-r2": [*QWEN2, "method.r=2"],
    "llama": [],
    "bert": BERT,
}

# run id -> (task, model, peft GloraConfig options)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_RUNS = {
    **{
        f"qwen2-{run}": (
            "causal_lm",
            "tiny:qwen2",
            {"config_A_B": a_b, "config_C": c, "config_D_E": d_e, "r": 4, "target_modules": LLAMA_TARGETS},
        )
        for run, (a_b, c, d_e) in FORMS.items()
    },
    "llama": ("causal_lm", "tiny:llama", {"target_modules": LLAMA_TARGETS}),
    "bert": ("seq_cls", "tiny:bert", {"config_D_E": "vector", "target_modules": ["query", "value", "dense"]}),
}


def hand_tensor(part: torch.nn.Module) -> torch.Tensor:
    """A support tensor from its saved factors, written out."""
    names = dict(part.named_parameters()) | dict(part.named_buffers())
    if "Xd" in names:
        return names["Xd"].double() @ names["Xu"].double()
    if "X" in names:
        x = names["X"].double()
        return x[0] if x.shape == (1,) else x
    return names["zeros"].double()


@pytest.mark.parametrize("run", list(FORMS))
def test_layer_is_the_papers_equations(run, tmp_path):
    built = kit.build("glora", tmp_path, [*QWEN2, *forms(run), "method.r=3"])
    kit.perturb(built.model, scale=0.5)
    layer = built.model.get_submodule(next(t for t in built.method.targets if t.endswith("q_proj")))
    w0, b0 = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    a, b, c, d, e = (hand_tensor(getattr(layer, f"glora_{k}")) for k in "ABCDE")
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)).double()
    weight = w0 + w0 * a + b
    bias = b0 + b0 * d + e + (w0 @ c).squeeze(-1)
    assert kit.max_diff(layer(x.float()).double(), x @ weight.T + bias) <= 1e-5


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("glora", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(peft.GloraConfig, task, tmp_path, model_name, **options)
    assert result.method == "glora" and result.loaded <= 1e-5 and result.merged <= 1e-4


@pytest.mark.parametrize("run", ["lora-lora-constant", "vector-vector-vector"])
def test_merge_unmerge_round_trip(run, tmp_path):
    built = kit.build("glora", tmp_path, [*QWEN2, *forms(run)])
    kit.perturb(built.model, scale=0.05)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    layer = built.model.get_submodule(built.method.targets[0])
    weight, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    built.method.merge_adapter(built.model)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
    built.method.unmerge_adapter(built.model)
    assert kit.max_diff(layer.base_layer.weight, weight) <= 1e-5
    assert kit.max_diff(layer.base_layer.bias, bias) <= 1e-5
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
