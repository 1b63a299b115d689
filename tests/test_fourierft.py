"""FourierFT against peft 0.21 as the oracle, fp32 on the CPU:

- the frequency positions: for a seed, ours are peft's (same cells), another seed picks others; with
  ``init_weights: true`` step 0 is the base;
- the paper's equation: a layer's ΔW equals α · Re(IDFT2(S)) written out with the DFT matrices;
- with each option that changes the numbers (``n_frequency``, ``scaling``, ``random_loc_seed``), our
  adapter loads in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an adapter peft wrote
  loads in ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and ``peftcli merge`` folds it
  into a plain model with peft's logits (≤ 1e-4), on tiny:llama, tiny:gpt2 (Conv1D) and tiny:bert seq_cls;
- merge then unmerge gives back the logits (≤ 1e-4) and the base weights (≤ 1e-6).
"""

from __future__ import annotations

import math

import kit
import pytest
import torch

from peftcli.export import load_adapter, merge_adapter
from peftcli.methods.fourierft import frequency_positions
from peftcli.models import resolve_model_name

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]
SMALL = ["method.n_frequency=64", "method.scaling=10.0"]

OPTION_RUNS = {
    "default-n64": SMALL,
    "n_frequency-scaling": ["method.n_frequency=200", "method.scaling=3.0"],
    "random_loc_seed": [*SMALL, "method.random_loc_seed=5"],
    "gpt2": ["model.name=tiny:gpt2", *SMALL],
    "bert": [*BERT, *SMALL],
}

# run id -> (task, model, peft FourierFTConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"n_frequency": 100, "scaling": 20.0}),
    "llama-seed": ("causal_lm", "tiny:llama", {"n_frequency": 50, "scaling": 5.0, "random_loc_seed": 3}),
    "gpt2": ("causal_lm", "tiny:gpt2", {"n_frequency": 64, "scaling": 10.0, "fan_in_fan_out": True}),
    "bert": ("seq_cls", "tiny:bert", {"n_frequency": 64, "scaling": 30.0, "random_loc_seed": 9}),
}
TARGETS = {
    "tiny:gpt2": ["c_attn", "c_proj", "c_fc"],
    "tiny:bert": ["query", "key", "value", "dense"],
    "tiny:llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
}


def auto_class(task: str):
    import transformers

    return {
        "causal_lm": transformers.AutoModelForCausalLM,
        "seq_cls": transformers.AutoModelForSequenceClassification,
    }[task]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_positions_are_peft_cells_and_zero_init_is_the_base(tmp_path):
    from peft.tuners.fourierft.layer import FourierFTLinear

    config = peft.FourierFTConfig(n_frequency=40, random_loc_seed=11)
    theirs = FourierFTLinear(torch.nn.Linear(24, 16), "default", config, n_frequency=40)
    assert torch.equal(frequency_positions(16, 24, 40, 11), theirs.indices["default"])
    assert not torch.equal(frequency_positions(16, 24, 40, 12), theirs.indices["default"])
    built = kit.build("fourierft", tmp_path, [*SMALL, "method.init_weights=true"])
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    assert max_diff(kit.logits(built.model, batch), kit.logits(base, batch)) == 0.0


def test_delta_is_the_inverse_dft_of_the_spectrum(tmp_path):
    built = kit.build("fourierft", tmp_path, ["method.n_frequency=30", "method.scaling=7.0"])
    kit.perturb(built.model, scale=1.0)
    layer = built.model.get_submodule(built.method.targets[0])
    out_f, in_f = layer.out_features, layer.in_features
    grid = torch.zeros(out_f, in_f, dtype=torch.complex128)
    grid[layer.positions[0], layer.positions[1]] = (
        layer.fourierft_spectrum.detach().double().to(torch.complex128)
    )

    def inverse_dft(n: int) -> torch.Tensor:  # F⁻¹[j, k] = e^{2πi jk/n} / n
        j = torch.arange(n, dtype=torch.float64)
        return torch.exp(2j * math.pi * torch.outer(j, j) / n) / n

    expected = (inverse_dft(out_f) @ grid @ inverse_dft(in_f).T).real * 7.0
    assert expected.abs().max() > 1e-2  # a spectrum off zero
    assert max_diff(layer.delta_weight().double(), expected) <= 1e-5


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    built = kit.build("fourierft", tmp_path, OPTION_RUNS[run])
    kit.perturb(built.model)
    batch = kit.batch(built.task, built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch, built.task)
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    assert max_diff(ours, kit.logits(base, batch, built.task)) > 1e-3  # the adapter is not trivial
    adapter = kit.save(
        tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe, built.labels
    )
    extra = {"num_labels": len(built.labels)} if built.labels else {}
    theirs = kit.load_in_peft(adapter, built.base_path, auto_class(built.task), **extra)
    assert max_diff(ours, kit.peft_logits(theirs, batch, built.task)) <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    torch.manual_seed(0)
    extra = {"num_labels": 2} if task == "seq_cls" else {}
    base = auto_class(task).from_pretrained(resolve_model_name(model_name), dtype=torch.float32, **extra)
    config = peft.FourierFTConfig(
        task_type={"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}[task],
        target_modules=TARGETS[model_name],
        **options,
    )
    peft_model = peft.get_peft_model(base, config)
    kit.perturb(peft_model, seed=2)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()
    batch = kit.batch(task, peft_model.config.vocab_size, lengths=(10, 7))
    theirs = kit.peft_logits(peft_model, batch, task)
    with peft_model.disable_adapter():
        assert max_diff(theirs, kit.peft_logits(peft_model, batch, task)) > 1e-3  # not trivial
    loaded = load_adapter(tmp_path / "adapter")
    assert loaded.method.name == "fourierft"
    assert max_diff(theirs, kit.logits(loaded.model, batch, task)) <= 1e-5
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")  # peftcli merge of peft's adapter
    merged = auto_class(task).from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert max_diff(theirs, kit.logits(merged, batch, task)) <= 1e-4


def test_merge_unmerge_round_trip(tmp_path):
    built = kit.build("fourierft", tmp_path, [*SMALL, "method.init_weights=false"])  # N(0, 1) spectrum
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    layer = built.model.get_submodule(built.method.targets[0])
    before = layer.base_layer.weight.detach().clone()
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    assert max_diff(ours, kit.logits(base, batch)) > 1e-3  # not trivial
    built.method.merge_adapter(built.model)
    assert max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
    built.method.unmerge_adapter(built.model)
    assert max_diff(layer.base_layer.weight, before) <= 1e-6
    assert max_diff(ours, kit.logits(built.model, batch)) <= 1e-5
