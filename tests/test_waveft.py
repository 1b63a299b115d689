"""WaveFT against peft 0.21 as the oracle, fp32 on the CPU:

- the Daubechies filters db1 … db10, computed here from their definition, equal the table peft ships
  (≤ 1e-11); with Haar (db1) the synthesis is the 2×2 butterfly written out (≤ 1e-12, float64);
- a layer's ΔW equals peft's ``get_delta_weight`` for the same spectrum, every family and grid shape
  (odd and even sizes), with and without ``use_idwt`` (≤ 1e-6);
- with each option that changes the numbers (``n_frequency``, ``scaling``, ``wavelet_family``,
  ``use_idwt``, ``random_loc_seed``, ``n_frequency_pattern``, ``proportional_parameters``), our adapter
  loads in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an adapter peft wrote loads in
  ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and ``peftcli merge`` folds it into a
  plain model with peft's logits (≤ 1e-4), on tiny:llama, tiny:gpt2 (Conv1D) and tiny:bert seq_cls;
- merge then unmerge gives back the base weights (≤ 1e-6); symlets and coiflets are refused in one line.
"""

from __future__ import annotations

import kit
import pytest
import torch

from peftcli.methods.waveft import WaveFtConfig, WaveFtLinear, inverse_dwt2, reconstruction_filters
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]
SMALL = ["method.n_frequency=64", "method.init_weights=false", "method.scaling=25.0"]

OPTION_RUNS = {
    "default-n64": SMALL,
    "db4-scaling": [*SMALL, "method.wavelet_family=db4", "method.scaling=5.0"],
    "no-idwt-seed": [*SMALL, "method.use_idwt=false", "method.random_loc_seed=5"],
    "pattern": [*SMALL, "method.n_frequency_pattern={down_proj: 30}"],
    "proportional": [*SMALL, "method.proportional_parameters=true"],
    "gpt2-db2": ["model.name=tiny:gpt2", *SMALL, "method.wavelet_family=db2"],
    "bert": [*BERT, *SMALL],
}

# run id -> (task, model, peft WaveFTConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"n_frequency": 100, "scaling": 20.0}),
    "llama-db3-seed": (
        "causal_lm",
        "tiny:llama",
        {
            "n_frequency": 50,
            "wavelet_family": "db3",
            "random_loc_seed": 3,
            "n_frequency_pattern": {"o_proj": 20},
        },
    ),
    "llama-proportional": ("causal_lm", "tiny:llama", {"n_frequency": 40, "proportional_parameters": True}),
    "gpt2-no-idwt": (
        "causal_lm",
        "tiny:gpt2",
        {"n_frequency": 64, "use_idwt": False, "fan_in_fan_out": True},
    ),
    "bert": ("seq_cls", "tiny:bert", {"n_frequency": 64, "scaling": 30.0, "wavelet_family": "db2"}),
}
TARGETS = {
    "tiny:gpt2": ["c_attn", "c_proj", "c_fc"],
    "tiny:bert": ["query", "key", "value", "dense"],
    "tiny:llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
}


@pytest.mark.parametrize("n", range(1, 11))
def test_daubechies_filters_are_the_published_ones(n):
    from peft.tuners.waveft.wavelet import Wavelet

    low, high = reconstruction_filters(f"db{n}")
    assert kit.max_diff(low, torch.tensor(Wavelet(f"db{n}").rec_lo, dtype=torch.float64)) <= 1e-11
    assert kit.max_diff(high, torch.tensor(Wavelet(f"db{n}").rec_hi, dtype=torch.float64)) <= 1e-11


def test_haar_synthesis_is_the_two_by_two_butterfly():
    """db1: each coefficient quadruple (a, h, v, d) becomes one 2×2 block of W, ½·[[a+h+v+d, a+h−v−d],
    [a−h+v−d, a−h−v+d]] (h high-pass down the rows, v along them)."""
    low, high = reconstruction_filters("db1")
    a, h, v, d = torch.randn(4, 5, 6, dtype=torch.float64)
    block = inverse_dwt2(torch.stack([a, h, v, d]), low, high)
    assert kit.max_diff(block[0::2, 0::2], (a + h + v + d) / 2) <= 1e-12
    assert kit.max_diff(block[0::2, 1::2], (a + h - v - d) / 2) <= 1e-12
    assert kit.max_diff(block[1::2, 0::2], (a - h + v - d) / 2) <= 1e-12
    assert kit.max_diff(block[1::2, 1::2], (a - h - v + d) / 2) <= 1e-12


@pytest.mark.parametrize("family", ["db1", "db2", "db5", "db10"])
@pytest.mark.parametrize("shape", [(16, 24), (15, 23)])
@pytest.mark.parametrize("use_idwt", [True, False])
def test_delta_equals_peft_for_each_family_and_shape(family, shape, use_idwt):
    from peft.tuners.waveft.layer import WaveFTLinear

    base = torch.nn.Linear(shape[1], shape[0])
    options = dict(n_frequency=40, wavelet_family=family, use_idwt=use_idwt, random_loc_seed=3)
    theirs = WaveFTLinear(base, "default", peft.WaveFTConfig(init_weights=False, **options), n_frequency=40)
    ours = WaveFtLinear(base, 40, WaveFtConfig(**options))
    with torch.no_grad():
        ours.waveft_spectrum.copy_(theirs.waveft_spectrum["default"])
    expected = theirs.get_delta_weight("default")
    assert expected.abs().max() > 1e-2 and kit.max_diff(ours.delta_weight(), expected) <= 1e-6


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("waveft", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.WaveFTConfig, task, tmp_path, model_name, target_modules=TARGETS[model_name], **options
    )
    assert result.method == "waveft" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_merge_unmerge_round_trip_and_refusals(tmp_path):
    built = kit.build("waveft", tmp_path, [*SMALL, "method.wavelet_family=db3"])
    kit.perturb(built.model, scale=0.5)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    layer = built.model.get_submodule(built.method.targets[0])
    before = layer.base_layer.weight.detach().clone()
    built.method.merge_adapter(built.model)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
    built.method.unmerge_adapter(built.model)
    assert kit.max_diff(layer.base_layer.weight, before) <= 1e-6
    with pytest.raises(RecipeError, match="wavelet_family"):
        kit.build("waveft", tmp_path, ["method.wavelet_family=sym4"])
