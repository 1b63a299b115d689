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

from peftcli.methods.fourierft import frequency_positions

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


def test_positions_are_peft_cells_and_zero_init_is_the_base(tmp_path):
    from peft.tuners.fourierft.layer import FourierFTLinear

    config = peft.FourierFTConfig(n_frequency=40, random_loc_seed=11)
    theirs = FourierFTLinear(torch.nn.Linear(24, 16), "default", config, n_frequency=40)
    assert torch.equal(frequency_positions(16, 24, 40, 11), theirs.indices["default"])
    assert not torch.equal(frequency_positions(16, 24, 40, 12), theirs.indices["default"])
    built = kit.build("fourierft", tmp_path, [*SMALL, "method.init_weights=true"])
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    assert kit.max_diff(kit.logits(built.model, batch), kit.logits(base, batch)) == 0.0


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
    assert kit.max_diff(layer.delta_weight().double(), expected) <= 1e-5


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("fourierft", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.FourierFTConfig, task, tmp_path, model_name, target_modules=TARGETS[model_name], **options
    )
    assert result.method == "fourierft" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_merge_unmerge_round_trip(tmp_path):
    built = kit.build("fourierft", tmp_path, [*SMALL, "method.init_weights=false"])  # N(0, 1) spectrum
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    layer = built.model.get_submodule(built.method.targets[0])
    before = layer.base_layer.weight.detach().clone()
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    assert kit.max_diff(ours, kit.logits(base, batch)) > 1e-3  # not trivial
    built.method.merge_adapter(built.model)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
    built.method.unmerge_adapter(built.model)
    assert kit.max_diff(layer.base_layer.weight, before) <= 1e-6
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-5
