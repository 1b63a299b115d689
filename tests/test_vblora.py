"""VB-LoRA against the paper's equation and peft 0.21 as the oracle, fp32 on the CPU:

- the paper's factors: every sub-vector of A and B is the softmax-weighted sum of the k bank vectors its
  logits rank highest, laid out as peft lays them (written out here with loops);
- ``save_only_topk_weights``: the stored top-k indices and weights rebuild logits that give the same A
  and B; the file holds peft's keys and index dtype (uint8 below 256 vectors, int16 below 2^15);
- with each option that changes the numbers (``r``, ``num_vectors``, ``vector_length``, ``topk``,
  ``save_only_topk_weights``), our adapter moved off init loads in ``PeftModel.from_pretrained`` with our
  logits (≤ 1e-5), and an adapter peft wrote loads in ``peftcli.export.load_adapter`` with peft's logits
  (≤ 1e-5) and ``peftcli merge`` folds it into a plain model with peft's logits (≤ 1e-4), on tiny:llama,
  tiny:gpt2 (Conv1D) and tiny:bert (seq_cls);
- merge then unmerge gives back the logits and the base weights;
- a vector_length that does not divide a layer, and topk > num_vectors, are refused at start.
"""

from __future__ import annotations

import kit
import pytest
import torch
from safetensors.torch import load_file

from peftcli.methods.vblora import logits_from_topk, topk_entries
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]

OPTION_RUNS = {
    "default": [],
    "r-num_vectors-vector_length": ["method.r=2", "method.num_vectors=20", "method.vector_length=32"],
    "topk-3": ["method.topk=3", "method.num_vectors=10"],
    "save_only_topk_weights": ["method.save_only_topk_weights=true"],
    "save_only_topk_weights-int16": [
        "method.save_only_topk_weights=true",
        "method.num_vectors=300",
        "method.topk=4",
    ],
    "gpt2": ["model.name=tiny:gpt2"],
    "bert": [*BERT, "method.vector_length=32"],
}

# run id -> (task, model, peft VBLoRAConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"r": 4, "num_vectors": 32, "vector_length": 16}),
    "llama-topk-only": (
        "causal_lm",
        "tiny:llama",
        {"r": 2, "num_vectors": 40, "vector_length": 32, "topk": 3, "save_only_topk_weights": True},
    ),
    "gpt2": ("causal_lm", "tiny:gpt2", {"r": 4, "num_vectors": 16, "vector_length": 16}),
    "bert": ("seq_cls", "tiny:bert", {"r": 3, "num_vectors": 24, "vector_length": 32}),
}
TARGETS = {
    "tiny:gpt2": ["c_attn", "c_proj", "c_fc"],
    "tiny:bert": ["query", "key", "value", "dense"],
    "tiny:llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
}


def first_layer(built):
    return built.model.get_submodule(built.method.targets[0])


def test_factors_are_topk_mixtures_of_the_bank(tmp_path):
    built = kit.build("vblora", tmp_path, ["method.r=2", "method.num_vectors=12", "method.topk=3"])
    layer = first_layer(built)
    bank = built.model.adapter_shared.vblora_vector_bank.detach()
    length = bank.shape[1]

    def sub_vector(z: torch.Tensor) -> torch.Tensor:  # Σ_{i in topk(z)} softmax(z_topk)_i V_i
        chosen = sorted(range(z.numel()), key=lambda i: -z[i].item())[:3]
        weights = torch.softmax(z[chosen], dim=0)
        return sum(w * bank[i] for w, i in zip(weights, chosen, strict=True))

    logits_a, logits_b = layer.vblora_logits_A.detach(), layer.vblora_logits_B.detach()
    lora_a, lora_b = (t.detach() for t in layer.factors())
    for i in range(logits_a.shape[0]):  # row i of A: its in/L sub-vectors end to end
        for j in range(logits_a.shape[1]):
            assert kit.max_diff(lora_a[i, j * length : (j + 1) * length], sub_vector(logits_a[i, j])) <= 1e-6
    for j in range(logits_b.shape[0]):  # rows j·L … of B: block j, column c is its sub-vector c
        for c in range(logits_b.shape[1]):
            block = lora_b[j * length : (j + 1) * length, c]
            assert kit.max_diff(block, sub_vector(logits_b[j, c])) <= 1e-6


def test_topk_entries_rebuild_logits_with_the_same_factors(tmp_path):
    built = kit.build("vblora", tmp_path, ["method.topk=3"])
    layer = first_layer(built)
    before = [t.detach().clone() for t in layer.factors()]
    with torch.no_grad():
        for logits in (layer.vblora_logits_A, layer.vblora_logits_B):
            indices, weights = topk_entries(logits, 3)
            assert indices.dtype == torch.uint8 and weights.shape[-1] == 2
            logits.copy_(logits_from_topk(indices, weights, logits.shape[-1]))
    for old, new in zip(before, layer.factors(), strict=True):
        assert kit.max_diff(old, new) <= 1e-6


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    result = kit.peft_loads_ours("vblora", tmp_path, OPTION_RUNS[run])
    assert result.diff <= 1e-5
    cfg = result.built.method.cfg
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert stored["base_model.vblora_vector_bank"].shape == (cfg.num_vectors, cfg.vector_length)
    if cfg.save_only_topk_weights:
        theirs = peft.get_peft_model_state_dict(result.peft_model)  # what peft writes for this model
        assert sorted(stored) == sorted(theirs)
        assert all(stored[k].dtype == theirs[k].dtype for k in stored)
        assert not any(k.endswith(("vblora_logits_A", "vblora_logits_B")) for k in stored)


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.VBLoRAConfig, task, tmp_path, model_name, target_modules=TARGETS[model_name], **options
    )
    assert result.method == "vblora" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_merge_unmerge_round_trip(tmp_path):
    built = kit.build("vblora", tmp_path, ["model.name=tiny:gpt2"])  # Conv1D: ΔW transposed
    kit.perturb(built.model, scale=0.5)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    layer = first_layer(built)
    before = layer.base_layer.weight.detach().clone()
    built.method.merge_adapter(built.model)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
    built.method.unmerge_adapter(built.model)
    assert kit.max_diff(layer.base_layer.weight, before) <= 1e-6
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-5


@pytest.mark.parametrize(
    "overrides,key",
    [(["method.vector_length=24"], "method.vector_length"), (["method.topk=65"], "method.topk")],
    ids=["vector_length-not-dividing", "topk-over-bank"],
)
def test_refused_at_start(overrides, key, tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("vblora", tmp_path, overrides)
    assert err.value.key == key
