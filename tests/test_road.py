"""RoAd against the paper's equation and peft 0.21 as the oracle, fp32 on the CPU:

- the paper's map (eq. 4): with ``road_1`` each output pair (i, i + group_size/2) of a group turns by the
  scaled 2-D rotation α [[cos θ, −sin θ], [sin θ, cos θ]] of its own (θ, α); our R is that matrix, built
  pair by pair, and the layer's output is R (W0 x + b0);
- for every variant, our R is peft's (``_get_delta_weight``) for the same θ and α;
- with each option that changes the numbers (``variant`` road_1/road_2/road_4, ``group_size``), our
  adapter moved off init loads in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an adapter
  peft wrote loads in ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5) and ``peftcli merge``
  folds it into a plain model with peft's logits (≤ 1e-4), on tiny:llama and tiny:bert (seq_cls, biases);
- merge then unmerge (R⁻¹) gives back the logits and the base weights and biases;
- an odd group_size, one that does not divide a layer's outputs, and GPT-2's Conv1D are refused at start.
"""

from __future__ import annotations

import kit
import pytest
import torch

from peftcli.methods.road import RoadLinear
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]

OPTION_RUNS = {
    "road_1": [],
    "road_1-group_size": ["method.group_size=32"],
    "road_2": ["method.variant=road_2", "method.group_size=8"],
    "road_4": ["method.variant=road_4", "method.group_size=16"],
    "bert-road_4": [*BERT, "method.variant=road_4", "method.group_size=32"],
}

# run id -> (task, model, peft RoadConfig options)
PEFT_RUNS = {
    "llama-road_1": ("causal_lm", "tiny:llama", {"variant": "road_1", "group_size": 16}),
    "llama-road_2": ("causal_lm", "tiny:llama", {"variant": "road_2", "group_size": 32}),
    "llama-road_4": ("causal_lm", "tiny:llama", {"variant": "road_4", "group_size": 8}),
    "bert-road_2": ("seq_cls", "tiny:bert", {"variant": "road_2", "group_size": 16}),
}
TARGETS = {
    "tiny:bert": ["query", "key", "value", "dense"],
    "tiny:llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
}


def perturbed_layer(variant: str, group_size: int, out_features: int = 32) -> RoadLinear:
    torch.manual_seed(0)
    layer = RoadLinear(torch.nn.Linear(8, out_features), variant, group_size, init_weights=False)
    return layer


def test_road_1_is_a_scaled_rotation_of_each_pair():
    g = 8
    layer = perturbed_layer("road_1", g)
    theta, alpha = layer.road_theta.detach(), layer.road_alpha.detach()
    expected = torch.zeros(32, 32)
    for p in range(theta.numel()):  # pair p: group p // (g/2), position p % (g/2) in the group's first half
        i = (p // (g // 2)) * g + p % (g // 2)
        j = i + g // 2
        c, s = alpha[p] * theta[p].cos(), alpha[p] * theta[p].sin()
        expected[i, i], expected[i, j], expected[j, i], expected[j, j] = c, -s, s, c
    assert kit.max_diff(layer.rotation(), expected) <= 1e-6
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert kit.max_diff(layer(x), layer.base_layer(x) @ expected.T) <= 1e-5


@pytest.mark.parametrize("variant,group_size", [("road_1", 8), ("road_2", 16), ("road_4", 4)])
def test_rotation_is_peft_matrix(variant, group_size):
    from peft.tuners.road.layer import _get_delta_weight

    layer = perturbed_layer(variant, group_size)
    theirs = _get_delta_weight(variant, group_size, layer.road_theta.detach(), layer.road_alpha.detach())
    assert kit.max_diff(layer.rotation(), theirs) <= 1e-7


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("road", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.RoadConfig, task, tmp_path, model_name, target_modules=TARGETS[model_name], **options
    )
    assert result.method == "road" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_merge_unmerge_round_trip_with_biases(tmp_path):
    built = kit.build("road", tmp_path, [*BERT, "method.variant=road_2"])
    kit.perturb(built.model, scale=0.3)  # scales near 1: R⁻¹ stays well conditioned, as after training
    batch = kit.batch("seq_cls", built.model.config.vocab_size, lengths=(10, 7))
    layer = built.model.get_submodule(built.method.targets[0])
    with torch.no_grad():  # the tiny model's biases start at zero: give this one something to rotate
        layer.base_layer.bias.normal_(generator=torch.Generator().manual_seed(1))
    ours = kit.logits(built.model, batch, "seq_cls")
    weight, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    built.method.merge_adapter(built.model)
    assert kit.max_diff(ours, kit.logits(built.model, batch, "seq_cls")) <= 1e-4
    assert kit.max_diff(layer.base_layer.bias, bias) > 1e-3  # R b was written, not only R W
    built.method.unmerge_adapter(built.model)
    assert kit.max_diff(layer.base_layer.weight, weight) <= 1e-5
    assert kit.max_diff(layer.base_layer.bias, bias) <= 1e-5
    assert kit.max_diff(ours, kit.logits(built.model, batch, "seq_cls")) <= 1e-4


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["method.group_size=6"], "method.group_size"),  # even, but 32 % 6 != 0
        (["method.group_size=7"], "method.group_size"),
        (["model.name=tiny:gpt2"], "method.target_modules"),
    ],
    ids=["not-dividing", "odd", "conv1d"],
)
def test_refused_at_start(overrides, key, tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("road", tmp_path, overrides)
    assert err.value.key == key
