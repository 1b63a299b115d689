"""Super-Tuning against peft 0.21 as the oracle and the paper's definition, fp32 on the CPU:

- the support: k = ⌊(1 − sparsity)·out·in⌋ entries, the largest |W0| (or the smallest), the very
  positions peft's layer picks, and for a seed the same initial values (zero, or N(0, 1)) and LoRA draws;
- the definition, written out: the layer's output equals x (W0 + S(v))ᵀ + b + (α/r) x Aᵀ Bᵀ, with S(v)
  filled entry by entry from (row, column) = divmod(position, in);
- with each option that changes the numbers (``sparsity``, ``select_top``, ``r`` / ``lora_alpha``,
  ``save_precomputed_indices``), our adapter moved off init loads in ``PeftModel.from_pretrained`` with
  our logits (≤ 1e-5), and an adapter peft wrote (moved off init) loads in
  ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and ``peftcli merge`` folds it into a
  plain model with peft's logits (≤ 1e-4), on tiny:llama and tiny:bert seq_cls;
- merge then unmerge gives back the base weights (≤ 1e-6) and the logits;
- a sparsity that leaves a layer nothing to train, ``lora_alpha`` without ``r``, GPT-2's Conv1D and a
  4-bit base are refused at start in one line.
"""

from __future__ import annotations

import kit
import pytest
import torch

from peftcli.methods.supertuning import SupertuningConfig, SupertuningLinear, support_size
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

OPTION_RUNS = {
    "default": [],
    "sparsity-0.8-bottom": ["method.sparsity=0.8", "method.select_top=false"],
    "supra": ["method.r=4"],
    "supra-alpha-dropout": ["method.r=2", "method.lora_alpha=3", "method.lora_dropout=0.1"],
    "no-saved-indices": ["method.save_precomputed_indices=false", "method.r=2"],
    "bert": BERT,
    "bert-supra-bottom": [*BERT, "method.r=3", "method.select_top=false"],
}

# run id -> (task, model, peft SupertuningConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"sparsity": 0.9}),
    "llama-bottom-supra": ("causal_lm", "tiny:llama", {"sparsity": 0.95, "select_top": False, "r": 4}),
    "llama-alpha": ("causal_lm", "tiny:llama", {"sparsity": 0.99, "r": 2, "lora_alpha": 5.0}),
    "llama-no-saved-indices": (
        "causal_lm",
        "tiny:llama",
        {"sparsity": 0.9, "save_precomputed_indices": False},
    ),
    "bert": ("seq_cls", "tiny:bert", {"sparsity": 0.9, "r": 2}),
}


def hand_sparse(w0: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """S(v) (out, in) in float64, entry by entry: position p is row p // in, column p % in."""
    s = torch.zeros(w0.shape, dtype=torch.float64)
    for p, v in zip(positions.tolist(), values.tolist(), strict=True):
        row, col = divmod(p, w0.shape[1])
        s[row, col] += v
    return s


@pytest.mark.parametrize("select_top", [True, False], ids=["top", "bottom"])
@pytest.mark.parametrize("init_weights", [True, False], ids=["zero", "random"])
def test_support_and_init_are_pefts(select_top, init_weights):
    from peft.tuners.supertuning.layer import Linear

    linear = torch.nn.Linear(40, 24)
    options = {"sparsity": 0.9, "select_top": select_top, "r": 3, "init_weights": init_weights}
    torch.manual_seed(5)
    theirs = Linear(linear, "default", peft.SupertuningConfig(**options))
    torch.manual_seed(5)
    ours = SupertuningLinear(linear, SupertuningConfig(**options))
    k = support_size(linear.weight.numel(), 0.9)
    assert k == 95 and ours.supertuning_indices.shape == (k,)  # 960·(1 − 0.9) is 95.99… in floats, as in peft
    assert ours.supertuning_indices.dtype == torch.int32
    assert torch.equal(ours.supertuning_indices, theirs.supertuning_indices["default"])
    magnitudes = linear.weight.detach().abs().flatten()
    chosen = magnitudes[ours.supertuning_indices.long()]
    rest = magnitudes[
        [p for p in range(magnitudes.numel()) if p not in set(ours.supertuning_indices.tolist())]
    ]
    assert (chosen.min() >= rest.max()) if select_top else (chosen.max() <= rest.min())
    assert torch.equal(ours.supertuning_values, theirs.supertuning_values["default"])
    assert torch.equal(ours.supertuning_lora_A.weight, theirs.supertuning_lora_A["default"].weight)
    assert torch.equal(ours.supertuning_lora_B.weight, theirs.supertuning_lora_B["default"].weight)


@pytest.mark.parametrize("r", [None, 3], ids=["super", "supra"])
def test_layer_is_w0_plus_sparse_plus_lora(r):
    torch.manual_seed(0)
    linear = torch.nn.Linear(20, 12)
    layer = SupertuningLinear(linear, SupertuningConfig(sparsity=0.8, r=r, lora_alpha=1.5 if r else None))
    kit.perturb(layer, scale=0.5)
    w0 = linear.weight.detach().double()
    weight = w0 + hand_sparse(w0, layer.supertuning_indices, layer.supertuning_values.detach())
    if r:
        a, b = layer.supertuning_lora_A.weight.detach(), layer.supertuning_lora_B.weight.detach()
        weight = weight + (1.5 / r) * b.double() @ a.double()
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    expected = x.double() @ weight.T + linear.bias.double()
    assert kit.max_diff(layer(x).double(), expected) <= 1e-5


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("supertuning", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.SupertuningConfig,
        task,
        tmp_path,
        model_name,
        target_modules=["query", "key", "value", "dense"] if model_name == "tiny:bert" else LLAMA_TARGETS,
        **options,
    )
    assert result.method == "supertuning" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_saved_positions_follow_save_precomputed_indices(tmp_path):
    from safetensors.torch import load_file

    for save in (True, False):
        built = kit.build(
            "supertuning", tmp_path / str(save), [f"method.save_precomputed_indices={str(save).lower()}"]
        )
        adapter = kit.save(
            tmp_path / str(save), built.model, built.method, built.tokenizer, built.base_path, built.recipe
        )
        keys = load_file(adapter / "adapter_model.safetensors").keys()
        indices = [k for k in keys if k.endswith("supertuning_indices")]
        assert len(indices) == (len(built.method.targets) if save else 0)


def test_merge_unmerge_round_trip(tmp_path):
    built = kit.build("supertuning", tmp_path, ["method.r=4"])
    kit.perturb(built.model)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    layer = built.model.get_submodule(built.method.targets[0])
    before = layer.base_layer.weight.detach().clone()
    built.method.merge_adapter(built.model)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
    built.method.unmerge_adapter(built.model)
    assert kit.max_diff(layer.base_layer.weight, before) <= 1e-6
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-5


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["method.sparsity=0.9999"], "method.sparsity", "leaves no trainable entry"),
        (["method.sparsity=1.0"], "method.sparsity", "is not in [0, 1)"),
        (["method.lora_alpha=4"], "method.lora_alpha", "is set but r is not"),
        (
            ["model.name=tiny:gpt2"],
            "method.target_modules",
            "is a Conv1D; supertuning adapts nn.Linear layers only",
        ),
        (["model.quantization.bits=4"], "model.quantization", ""),
    ],
    ids=["sparsity-too-high", "sparsity-1", "alpha-without-r", "conv1d", "4bit"],
)
def test_what_cannot_work_is_refused_in_one_line(overrides, key, words, tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("supertuning", tmp_path, overrides)
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value)
