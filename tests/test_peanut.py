"""PEANuT against peft 0.21 as the oracle and the paper's equation, fp32 on the CPU:

- the init: for a seed, A, the encoders, the decoders and B are the numbers peft's layer draws (B zero
  with ``init_weights: true``, so step 0 is the base; Kaiming-uniform with ``false``);
- the paper's equation, written out: ΔW = s·(σ(…) Bᵀ)ᵀ with the encoder/decoder skips spelled out for
  depth 0, 1 and 2 in float64, and the layer's output equals x (W0 + ΔW)ᵀ + b;
- with each option that changes the numbers (``r``, ``depth``, ``act_fn``, ``scaling``, ``init_weights``),
  our adapter moved off init loads in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an
  adapter peft wrote (moved off init) loads in ``peftcli.export.load_adapter`` with peft's logits
  (≤ 1e-5) and ``peftcli merge`` folds it into a plain model with peft's logits (≤ 1e-4), on tiny:llama
  and tiny:bert seq_cls;
- merge then unmerge gives back the base weights bit for bit and the logits;
- an unknown activation, GPT-2's Conv1D and a 4-bit base are refused at start in one line.
"""

from __future__ import annotations

import kit
import pytest
import torch

from peftcli.methods.peanut import PeanutConfig, PeanutLinear
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

OPTION_RUNS = {
    "default": [],
    "depth-0-r-4": ["method.depth=0", "method.r=4"],
    "depth-2-gelu-scaling": ["method.depth=2", "method.act_fn=gelu", "method.scaling=0.3"],
    "tanh-no-zero-B": ["method.act_fn=tanh", "method.init_weights=false"],
    "bert": BERT,
    "bert-depth-2": [*BERT, "method.depth=2", "method.act_fn=silu"],
}

# run id -> (task, model, peft PeanutConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"r": 8}),
    "llama-depth-1": ("causal_lm", "tiny:llama", {"r": 6, "depth": 1, "scaling": 2.0}),
    "llama-depth-3-gelu": ("causal_lm", "tiny:llama", {"r": 4, "depth": 3, "act_fn": "gelu"}),
    "llama-no-zero-B": ("causal_lm", "tiny:llama", {"r": 4, "init_weights": False, "act_fn": "tanh"}),
    "bert": ("seq_cls", "tiny:bert", {"r": 4, "depth": 2, "act_fn": "silu", "scaling": 0.5}),
}


def hand_delta(w0, a, encoders, decoders, b, act, s):
    """ΔW from the paper, in float64, the skips written out for each depth this file checks."""
    w0, a, b = w0.double(), a.double(), b.double()
    e = [m.double() for m in encoders]
    d = [m.double() for m in decoders]
    h0 = act(w0.T @ a.T)
    if not e:
        codes = h0
    elif len(e) == 1:
        h1 = act(h0 @ e[0].T)
        codes = act(h1 @ d[0].T) + h0
    else:  # depth 2: h0 -> h1 -> h2, then up with h1's skip, then h0's
        h1 = act(h0 @ e[0].T)
        h2 = act(h1 @ e[1].T)
        g1 = act(h2 @ d[0].T) + h1
        codes = act(g1 @ d[1].T) + h0
    return s * (codes @ b.T).T


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("init_weights", [True, False], ids=["zero-B", "kaiming-B"])
def test_init_is_peft_draw(depth, init_weights):
    from peft.tuners.peanut.layer import Linear

    linear = torch.nn.Linear(24, 16)
    options = {"r": 4, "depth": depth, "init_weights": init_weights}
    torch.manual_seed(5)
    theirs = Linear(linear, "default", r=4, config=peft.PeanutConfig(**options))
    torch.manual_seed(5)
    ours = PeanutLinear(linear, PeanutConfig(**options))
    theirs_state = {k.replace(".default", ""): v for k, v in theirs.state_dict().items() if "peanut" in k}
    ours_state = {k: v for k, v in ours.state_dict().items() if "peanut" in k}
    assert theirs_state.keys() == ours_state.keys()
    assert all(torch.equal(ours_state[k], theirs_state[k]) for k in ours_state)
    assert torch.count_nonzero(ours.peanut_B.weight).item() == (0 if init_weights else 16 * 4)


@pytest.mark.parametrize(("depth", "act_fn"), [(0, "relu"), (1, "gelu"), (2, "tanh")])
def test_layer_is_w0_plus_a_network_of_w0(depth, act_fn):
    from transformers.activations import ACT2FN

    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 16)
    layer = PeanutLinear(
        linear, PeanutConfig(r=5, depth=depth, act_fn=act_fn, scaling=0.7, init_weights=False)
    )
    delta = hand_delta(
        linear.weight.detach(),
        layer.peanut_A.weight.detach(),
        [m.weight.detach() for m in layer.peanut_encoders],
        [m.weight.detach() for m in layer.peanut_decoders],
        layer.peanut_B.weight.detach(),
        ACT2FN[act_fn],
        0.7,
    )
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(1))
    expected = x.double() @ (linear.weight.double() + delta).T + linear.bias.double()
    assert kit.max_diff(layer(x).double(), expected) <= 1e-5


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("peanut", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.PeanutConfig,
        task,
        tmp_path,
        model_name,
        target_modules=["query", "key", "value", "dense"] if model_name == "tiny:bert" else LLAMA_TARGETS,
        **options,
    )
    assert result.method == "peanut" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_merge_unmerge_round_trip(tmp_path):
    built = kit.build("peanut", tmp_path, ["method.depth=2"])
    kit.perturb(built.model)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    layer = built.model.get_submodule(built.method.targets[0])
    before = layer.base_layer.weight.detach().clone()
    built.method.merge_adapter(built.model)
    assert not torch.equal(layer.base_layer.weight, before)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-4
    built.method.unmerge_adapter(built.model)
    assert torch.equal(layer.base_layer.weight, before)  # W0 kept aside: ΔW depends on it
    assert kit.max_diff(ours, kit.logits(built.model, batch)) <= 1e-6


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["method.act_fn=rellu"], "method.act_fn", "unknown activation 'rellu'"),
        (
            ["model.name=tiny:gpt2"],
            "method.target_modules",
            "is a Conv1D; peanut adapts nn.Linear layers only",
        ),
        (["model.quantization.bits=4"], "model.quantization", ""),
    ],
    ids=["act_fn", "conv1d", "4bit"],
)
def test_what_cannot_work_is_refused_in_one_line(overrides, key, words, tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("peanut", tmp_path, overrides)
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value)
