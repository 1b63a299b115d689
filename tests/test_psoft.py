"""PSOFT against peft 0.21 as the oracle, fp32 on the CPU:

- the construction: A has orthonormal rows and s·B A is W's best rank-r part (psoft_init), R is the
  Cayley transform (I + Q)(I − Q)⁻¹ of a skew-symmetric Q and orthogonal, and the layer's output equals
  ``(W + s · B (diag(b) R diag(a) − I) A) x + b0`` built by hand;
- peft's truncated Cayley-Neumann series for a few term counts equals ours;
- with each option that changes the numbers (``r``, ``psoft_alpha``, ``ab_svd_init``, ``psoft_svd``,
  ``psoft_orth``, the magnitude vectors, ``use_cayley_neumann`` with its terms and eps), our adapter
  moved off init loads in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an adapter peft
  wrote loads in ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and ``peftcli merge``
  folds it into a plain model with peft's logits (≤ 1e-4);
- merge then unmerge gives back the logits and the base weights; r above min(in, out) is refused.
"""

from __future__ import annotations

import kit
import pytest
import torch

from peftcli.methods.psoft import neumann_cayley
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]

OPTION_RUNS = {
    "default": [],
    "r-4-alpha-8": ["method.r=4", "method.psoft_alpha=8"],
    "pissa_init": ["method.ab_svd_init=pissa_init"],
    "lowrank-svd": ["method.psoft_svd=lowrank", "method.psoft_svd_lowrank_niter=2", "method.random_seed=3"],
    "free-R": ["method.psoft_orth=false"],
    "no-magnitudes": ["method.psoft_mag_a=false", "method.psoft_mag_b=false"],
    "cayley_neumann": ["method.use_cayley_neumann=true", "method.num_cayley_neumann_terms=4"],
    "cayley_neumann-eps": ["method.use_cayley_neumann=true", "method.cayley_neumann_eps=0.5"],
    "bert": BERT,
}

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# run id -> (task, model, peft PsoftConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"r": 8, "target_modules": LLAMA_TARGETS}),
    "llama-pissa-free": (
        "causal_lm",
        "tiny:llama",
        {
            "r": 6,
            "psoft_alpha": 12,
            "ab_svd_init": "pissa_init",
            "psoft_orth": False,
            "target_modules": LLAMA_TARGETS,
        },
    ),
    "llama-neumann-lowrank": (
        "causal_lm",
        "tiny:llama",
        {
            "r": 8,
            "use_cayley_neumann": True,
            "num_cayley_neumann_terms": 6,
            "psoft_svd": "lowrank",
            "psoft_mag_a": False,
            "target_modules": LLAMA_TARGETS,
        },
    ),
    "bert": ("seq_cls", "tiny:bert", {"r": 4, "target_modules": ["query", "value", "dense"]}),
}


def test_construction_is_the_papers(tmp_path):
    built = kit.build("psoft", tmp_path, ["method.r=6", "method.psoft_alpha=12"])
    layer = built.model.get_submodule(built.method.targets[0])
    a, b, s = layer.psoft_A.double(), layer.psoft_B.double(), layer.scaling
    assert kit.max_diff(a @ a.T, torch.eye(6, dtype=torch.float64)) <= 1e-5
    u, sv, vh = torch.linalg.svd(layer.base_layer.weight.double())
    assert kit.max_diff(s * b @ a, (u[:, :6] * sv[:6]) @ vh[:6]) <= 1e-5
    kit.perturb(built.model, scale=0.3)
    rot_layer = layer.psoft_R
    q = rot_layer.skew().double()
    eye = torch.eye(6, dtype=torch.float64)
    cayley = (eye + q) @ torch.linalg.inv(eye - q)
    assert kit.max_diff(cayley.T @ cayley, eye) <= 1e-6
    rot = rot_layer.vector_b.double()[:, None] * cayley * rot_layer.vector_a.double()[None, :]
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)).double()
    weight = layer.base_layer.weight.double() + s * b @ (rot - eye) @ a
    assert kit.max_diff(layer(x.float()).double(), x @ weight.T) <= 1e-5


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 7])
def test_neumann_series_equals_peft(terms):
    from peft.tuners.psoft.layer import OrthLayer

    theirs = OrthLayer(5, use_cayley_neumann=True, num_cayley_neumann_terms=terms, mag_a=False, mag_b=False)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(10, generator=torch.Generator().manual_seed(terms)) * 0.2)
    assert kit.max_diff(neumann_cayley(theirs._skew_symmetric(), terms), theirs.get_matrix()) <= 1e-6


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("psoft", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(peft.PsoftConfig, task, tmp_path, model_name, **options)
    assert result.method == "psoft" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_merge_unmerge_round_trip(tmp_path):
    built = kit.build("psoft", tmp_path)
    kit.perturb(built.model)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    layer = built.model.get_submodule(built.method.targets[0])
    before = layer.base_layer.weight.detach().clone()
    built.method.merge_adapter(built.model)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
    built.method.unmerge_adapter(built.model)
    assert kit.max_diff(layer.base_layer.weight, before) <= 1e-5
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4


def test_r_above_the_layer_is_refused_in_one_line(tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("psoft", tmp_path, ["method.r=1000"])
    assert "larger than min(in, out)" in str(err.value) and "\n" not in str(err.value)
