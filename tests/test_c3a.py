"""C3A against peft 0.21 as the oracle and the paper's equation, fp32 on the CPU:

- the paper's equation, written out by hand: ΔW is block-circulant, block (m, n) the circulant matrix of
  w_mn (row j is w_mn rolled right by j) over ``in``, and it equals peft's ``get_circulant_fast`` / in;
  the layer's output is x (W + ΔW)ᵀ + b (our rFFT correlation, never building ΔW);
- the init: for a seed, each ``init_weights`` draws peft's kernel (xavier_uniform, false, kaiming_uniform,
  gaussian); ``true`` is zero and step 0 is the base;
- with each option that changes the numbers (``block_size``, ``block_size_pattern``, ``init_weights``),
  our adapter moved off init loads in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an
  adapter peft wrote (moved off init) loads in ``peftcli.export.load_adapter`` with peft's logits
  (≤ 1e-5) and ``peftcli merge`` folds it into a plain model with peft's logits (≤ 1e-4), on tiny:llama
  and tiny:bert seq_cls;
- merge then unmerge gives back the weights (≤ 1e-6) and the logits;
- a block size that does not divide a layer, a pattern that matches nothing, and GPT-2's Conv1D are
  refused at start in one line.
"""

from __future__ import annotations

import kit
import pytest
import torch

from peftcli.methods.c3a import C3aConfig, C3aLinear
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]
SIZE = "method.block_size"
INIT = "method.init_weights"

OPTION_RUNS = {
    "default": [],
    "block_size-32": [f"{SIZE}=32"],
    "block_size-8-kaiming": [f"{SIZE}=8", f"{INIT}=kaiming_uniform"],
    "gaussian": [f"{SIZE}=32", f"{INIT}=gaussian"],
    "zero-init": [f"{SIZE}=16", f"{INIT}=true"],
    "block_size_pattern": [f"{SIZE}=32", "method.block_size_pattern={down_proj: 64, q_proj: 8}"],
    "bert": BERT,
}

# run id -> (task, model, peft C3AConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"block_size": 32}),
    "llama-kaiming-8": ("causal_lm", "tiny:llama", {"block_size": 8, "init_weights": "kaiming_uniform"}),
    "llama-pattern": ("causal_lm", "tiny:llama", {"block_size": 16, "block_size_pattern": {"down_proj": 32}}),
    "bert": ("seq_cls", "tiny:bert", {"block_size": 32, "init_weights": "gaussian"}),
}
TARGETS = {
    "tiny:llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "tiny:bert": ["query", "key", "value", "dense"],
}


def hand_delta(kernel: torch.Tensor, in_features: int) -> torch.Tensor:
    """ΔW from the paper: each block the circulant of its vector (row j = w rolled right by j), / in."""
    rows = [
        torch.cat([torch.stack([torch.roll(w, j) for j in range(w.shape[0])]) for w in row], dim=1)
        for row in kernel.double()
    ]
    return torch.cat(rows, dim=0) / in_features


def test_delta_is_block_circulant_and_equals_peft():
    from peft.tuners.c3a.utils import get_circulant_fast

    torch.manual_seed(0)
    layer = C3aLinear(torch.nn.Linear(48, 32), 8, "gaussian")
    kernel = layer.c3a_kernel.detach()
    expected = hand_delta(kernel, 48)
    assert kit.max_diff(layer.delta_weight().double(), expected) <= 1e-6
    assert kit.max_diff(get_circulant_fast(kernel) / 48, expected.float()) <= 1e-6
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(1))
    full = layer.base_layer.weight.double() + expected
    reference = x.double() @ full.T + layer.base_layer.bias.double()
    assert kit.max_diff(layer(x).double(), reference) <= 1e-5


@pytest.mark.parametrize("init", ["xavier_uniform", False, "kaiming_uniform", "gaussian", True])
def test_init_is_peft_draw(init, tmp_path):
    from peft.tuners.c3a.layer import C3ALinear

    torch.manual_seed(4)
    theirs = C3ALinear(torch.nn.Linear(48, 32), "default", peft.C3AConfig(init_weights=init), block_size=16)
    torch.manual_seed(4)
    ours = C3aLinear(torch.nn.Linear(48, 32), 16, init)
    assert torch.equal(ours.c3a_kernel, theirs.c3a_kernel["default"])
    assert (ours.c3a_kernel.abs().sum() == 0) == (init is True)


def test_zero_init_is_the_base(tmp_path):
    built = kit.build("c3a", tmp_path, OPTION_RUNS["zero-init"])
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    assert kit.max_diff(kit.logits(built.model, batch), kit.logits(base, batch)) == 0.0


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    result = kit.peft_loads_ours("c3a", tmp_path, OPTION_RUNS[run])
    assert result.diff <= 1e-5
    stored = sum(t.numel() for t in peft.get_peft_model_state_dict(result.peft_model).values())
    assert stored == result.built.method.expected_trainable_parameters(result.built.model)


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.C3AConfig, task, tmp_path, model_name, target_modules=TARGETS[model_name], **options
    )
    assert result.method == "c3a" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_block_size_pattern_sets_each_modules_block(tmp_path):
    built = kit.build("c3a", tmp_path, OPTION_RUNS["block_size_pattern"])
    sizes = {name.split(".")[-1]: m.block_size for name, m in built.method.layers(built.model)}
    assert sizes == {
        "q_proj": 8,
        "k_proj": 32,
        "v_proj": 32,
        "o_proj": 32,
        "gate_proj": 32,
        "up_proj": 32,
        "down_proj": 64,
    }
    assert C3aConfig().block_size == peft.C3AConfig().block_size == 256


def test_merge_unmerge_round_trip(tmp_path):
    built = kit.build("c3a", tmp_path, OPTION_RUNS["block_size-8-kaiming"])
    kit.perturb(built.model, scale=0.2)
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
    "overrides, key, words",
    [
        (
            [f"{SIZE}=256"],
            SIZE,
            "does not divide both sides of model.layers.0.self_attn.q_proj (in 64, out 64)",
        ),
        ([f"{SIZE}=64"], SIZE, "use a divisor of 32"),
        (
            ["method.block_size_pattern={down_proj: 48}"],
            "method.block_size_pattern.down_proj",
            "does not divide",
        ),
        (
            ["method.block_size_pattern={nothing_here: 8}"],
            "method.block_size_pattern.nothing_here",
            "matches none",
        ),
        (["method.block_size_pattern={down_proj: 0}"], "method.block_size_pattern.down_proj", "> 0"),
        (["model.name=tiny:gpt2", f"{SIZE}=16"], "method.target_modules", "is a Conv1D"),
    ],
)
def test_refused_at_start_in_one_line(overrides, key, words, tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("c3a", tmp_path, overrides)
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value)
