"""HRA against peft 0.21 as the oracle, fp32 on the CPU:

- the init: for a seed, our U equals the one peft's layer draws (r/2 columns, each repeated), so a fresh even-r
  adapter is the base; an odd r is peft's unpaired draw and moves the logits;
- the paper's equation: our layer's output equals ``x (W H)ᵀ + b`` with H built by hand as the product
  of the reflections (and as I − 2 Q Qᵀ with Gram-Schmidt);
- with each option that changes the numbers (``r``, ``apply_GS``), our adapter moved off init loads in
  ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an adapter peft wrote (moved off init)
  loads in ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and ``peftcli merge`` folds it
  into a plain model with peft's logits (≤ 1e-4), on tiny:llama and tiny:bert seq_cls;
- merge then unmerge gives back the logits (≤ 1e-4) and the base weights (≤ 1e-5);
- GPT-2's Conv1D, and apply_GS with an even r (NaN from step 0, in peft too), are refused in one line.
"""

from __future__ import annotations

import kit
import pytest
import torch

from peftcli.methods.hra import symmetric_init
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]

OPTION_RUNS = {
    "default": [],
    "r-4": ["method.r=4"],
    "apply_GS": ["method.apply_GS=true", "method.r=5"],
    "bert": BERT,
    "bert-apply_GS": [*BERT, "method.apply_GS=true", "method.r=3"],
}

# run id -> (task, model, peft HRAConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"r": 8}),
    "llama-r3": ("causal_lm", "tiny:llama", {"r": 3}),
    "llama-apply_GS": ("causal_lm", "tiny:llama", {"r": 5, "apply_GS": True}),
    "bert": ("seq_cls", "tiny:bert", {"r": 3, "apply_GS": True}),
}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hand_rotation(u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    """H from the paper, written out: a product of reflections, or I − 2 Q Qᵀ (Q from torch's QR)."""
    eye = torch.eye(u.shape[0], dtype=torch.float64)
    u = u.double()
    if apply_gs:
        q, rr = torch.linalg.qr(u)
        q = q * torch.sign(torch.diagonal(rr))  # QR's Q with Gram-Schmidt's signs
        return eye - 2 * q @ q.T
    h = eye
    for i in range(u.shape[1]):
        ui = (u[:, i] / u[:, i].norm())[:, None]
        h = h @ (eye - 2 * ui @ ui.T)
    return h


@pytest.mark.parametrize("r", [8, 3])
def test_init_is_peft_draw_and_even_r_is_the_base(r, tmp_path):
    from peft.tuners.hra.layer import HRALinear

    linear = torch.nn.Linear(24, 16)
    torch.manual_seed(5)
    theirs = HRALinear(linear, "default", peft.HRAConfig(r=r), r=r).hra_u["default"]
    torch.manual_seed(5)
    assert torch.equal(symmetric_init(24, r), theirs)  # the same draw from the same seed
    built = kit.build("hra", tmp_path, [f"method.r={r}"])
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    moved = kit.max_diff(kit.logits(built.model, batch), kit.logits(base, batch))
    assert moved <= 1e-5 if r % 2 == 0 else moved > 1e-3


@pytest.mark.parametrize("apply_gs", [False, True], ids=["chain", "apply_GS"])
def test_layer_is_w_times_the_reflections(apply_gs, tmp_path):
    built = kit.build("hra", tmp_path, ["method.r=5", f"method.apply_GS={str(apply_gs).lower()}"])
    kit.perturb(built.model, scale=0.5)
    layer = built.model.get_submodule(built.method.targets[0])
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    h = hand_rotation(layer.hra_u.detach(), apply_gs)
    expected = x.double() @ (layer.base_layer.weight.double() @ h).T
    assert kit.max_diff(layer(x).double(), expected) <= 1e-5


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("hra", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.HRAConfig,
        task,
        tmp_path,
        model_name,
        target_modules=["query", "key", "value", "dense"] if model_name == "tiny:bert" else LLAMA_TARGETS,
        **options,
    )
    assert result.method == "hra" and result.loaded <= 1e-5 and result.merged <= 1e-4


@pytest.mark.parametrize("gs", ["false", "true"], ids=["chain", "apply_GS"])
def test_merge_unmerge_round_trip(gs, tmp_path):
    built = kit.build("hra", tmp_path, [f"method.apply_GS={gs}", "method.r=5"])
    kit.perturb(built.model)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    layer = built.model.get_submodule(built.method.targets[0])
    before = layer.base_layer.weight.detach().clone()
    built.method.merge_adapter(built.model)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
    built.method.unmerge_adapter(built.model)
    assert kit.max_diff(layer.base_layer.weight, before) <= 1e-5
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-5


def test_apply_gs_with_even_r_is_refused_in_one_line(tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("hra", tmp_path, ["method.apply_GS=true", "method.r=4"])
    assert "zero column" in str(err.value) and "\n" not in str(err.value)


def test_conv1d_is_refused_in_one_line(tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("hra", tmp_path, ["model.name=tiny:gpt2"])
    assert "is a Conv1D; hra adapts nn.Linear layers only" in str(err.value) and "\n" not in str(err.value)
