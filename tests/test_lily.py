"""Lily against peft 0.21 as the oracle and the paper's equation, fp32 on the CPU:

- the init and the sharing: for a seed, every A, B and router equals the one peft's model draws, and
  the layers share A (per ``stride_A`` block) and B (per group of same-name, same-shape layers) as
  peft's do: the same modules, so one gradient step moves every sharer;
- the paper's equation: a layer's output equals ``W0 x + s · h Σ_e p_e B_e`` with h = A x and p the
  router's softmax averaged over every token of the call, written out in float64;
- the router's mean is over the whole call, padding included: the same two examples padded wider give
  other logits, in peft by the same numbers (≤ 1e-5), so eval numbers depend on the batch layout; a
  cached decoding step (one new token) differs from re-running the sequence, in peft too;
- with each option that changes the numbers (``r``, ``stride_A``, ``num_B``, ``scaling``,
  ``init_weights``, names, a regex (one group per shape), all-linear), our adapter moved off init loads
  in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an adapter peft wrote loads in
  ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5), on tiny:llama, tiny:bert seq_cls and
  tiny:t5 seq2seq (whose all-linear names ``o`` and ``wo`` end one another, with no effect on the
  groups); the method table adds ours in peft on bert seq_cls and t5;
- one-line refusals: merge, packing, GPT-2's Conv1D, target names whose grouping in peft would depend
  on Python's hash order, a file whose copies of one shared tensor disagree.
"""

from __future__ import annotations

import kit
import pytest
import torch
from safetensors.torch import load_file, save_file

from peftcli.export import load_adapter, merge_adapter
from peftcli.methods.lily import Lily, LilyConfig
from peftcli.recipe import RecipeError
from peftcli.recipe_loader import load_recipe

peft = pytest.importorskip("peft")

# (the method table runs peft on our llama default, a name list with stride 1, bert seq_cls and t5 seq2seq)
OPTION_RUNS = {
    "names-stride-3-init_weights-false": [
        "method.target_modules=[q_proj,v_proj,down_proj]",
        "method.stride_A=3",
        "method.init_weights=false",
    ],
    "regex-one-group-per-shape": [
        "method.target_modules=.*(q_proj|o_proj|down_proj)",
        "method.num_B=4",
        "method.scaling=0.5",
    ],
}

# run id -> (task, model, peft LilyConfig options)
PEFT_RUNS = {
    "llama-names": (
        "causal_lm",
        "tiny:llama",
        {"r": 4, "stride_A": 2, "num_B": 3, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    ),
    "llama-regex-scaling": (
        "causal_lm",
        "tiny:llama",
        {"r": 6, "stride_A": 2, "num_B": 4, "scaling": 2.0, "target_modules": ".*(q_proj|o_proj)"},
    ),
    "llama-init_weights-false": (
        "causal_lm",
        "tiny:llama",
        {"r": 4, "num_B": 2, "init_weights": False, "target_modules": ["k_proj", "up_proj"]},
    ),
    "bert-all-linear": ("seq_cls", "tiny:bert", {"r": 4, "num_B": 2, "target_modules": "all-linear"}),
    "t5-all-linear": ("seq2seq", "tiny:t5", {"r": 4, "num_B": 2, "target_modules": "all-linear"}),
}


def both_drawn(seed: int, **options):
    """Our Lily and peft's on two copies of the same tiny llama, each built right after ``seed``."""
    ours_base, peft_base = kit.tiny("llama"), kit.tiny("llama")
    method = Lily(LilyConfig(name="lily", **options))
    torch.manual_seed(seed)
    ours = method.attach(ours_base)
    torch.manual_seed(seed)
    config = peft.LilyConfig(task_type="CAUSAL_LM", **options)
    theirs = peft.get_peft_model(peft_base, config)
    return method, ours, theirs


@pytest.mark.slow
def test_init_and_sharing_are_peft_draws_and_peft_groups():
    targets = ["q_proj", "v_proj", "down_proj"]
    method, ours, theirs = both_drawn(5, r=4, stride_A=2, num_B=3, init_weights=False, target_modules=targets)
    mine = method.adapter_state_dict(ours)
    peft_state = peft.get_peft_model_state_dict(theirs)
    assert mine.keys() == peft_state.keys()
    for key, value in peft_state.items():
        assert torch.equal(mine[key], value), key
    layers = dict(method.layers(ours))
    first, second = (layers[f"model.layers.{i}.self_attn.q_proj"] for i in (0, 1))
    assert first.lily_A is second.lily_A and first.lily_B is second.lily_B  # stride 2 over 2 layers
    assert first.lily_router is not second.lily_router
    assert layers["model.layers.0.self_attn.v_proj"].lily_B is not first.lily_B  # another group


@pytest.mark.slow
def test_stride_blocks_share_a_and_one_step_moves_every_sharer(tmp_path):
    built = kit.build("lily", tmp_path, ["method.stride_A=1", "method.target_modules=[q_proj]"])
    q0, q1 = (built.model.get_submodule(f"model.layers.{i}.self_attn.q_proj") for i in (0, 1))
    assert q0.lily_A is not q1.lily_A and q0.lily_B is q1.lily_B
    before = q1.lily_B.weight.detach().clone()
    kit.train_step(built.model, built.method, kit.batch("causal_lm", built.model.config.vocab_size))
    assert not torch.equal(q1.lily_B.weight, before)  # B's gradient sums over both layers


def test_layer_is_the_paper_equation_with_the_mix_averaged_over_the_call(tmp_path):
    built = kit.build("lily", tmp_path, ["method.scaling=0.7"])
    kit.perturb(built.model, scale=0.3)
    layer = built.model.get_submodule("model.layers.1.mlp.down_proj")
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    a, router = layer.lily_A.weight.double(), layer.lily_router.weight.double()
    experts = layer.lily_B.weight.double().view(3, 8, layer.out_features)  # num_B, r, out
    h = x.double() @ a.T
    p = torch.softmax(h @ router.T, dim=-1).mean(dim=(0, 1))  # one mix for all 10 tokens
    mixed = (p[:, None, None] * experts).sum(dim=0)  # Σ_e p_e B_e (r, out)
    expected = x.double() @ layer.base_layer.weight.double().T + 0.7 * h @ mixed
    assert kit.max_diff(layer(x).detach().double(), expected) <= 1e-5  # fp32 against float64
    alone = layer(x[:1]).detach().double()  # the first row without the second: another mix
    assert kit.max_diff(alone, expected[:1]) > 1e-4


@pytest.mark.slow
def test_the_mix_is_per_call_padding_and_decoding_steps_included_as_in_peft(tmp_path):
    result = kit.peft_loads_ours("lily", tmp_path)
    built, theirs = result.built, result.peft_model
    vocab = built.model.config.vocab_size
    narrow = kit.batch("causal_lm", vocab, lengths=(10, 7))
    wide = {k: torch.nn.functional.pad(v, (0, 4)) for k, v in narrow.items()}  # 4 more pad columns
    assert torch.equal(
        kit.logits(kit.base_model(built.base_path, built.recipe), narrow),
        kit.logits(kit.base_model(built.base_path, built.recipe), wide),
    )
    ours_narrow, ours_wide = kit.logits(built.model, narrow), kit.logits(built.model, wide)
    assert kit.max_diff(ours_narrow, ours_wide) > 1e-4  # the pad columns moved the real positions' logits
    assert kit.max_diff(ours_narrow, kit.peft_logits(theirs, narrow)) <= 1e-5
    assert kit.max_diff(ours_wide, kit.peft_logits(theirs, wide)) <= 1e-5
    # a cached decoding step mixes over its one new token, not over the whole sequence a re-run sees
    ids = narrow["input_ids"][:1]
    steps = []
    for model in (built.model, theirs):
        with torch.no_grad():
            prefix = model(input_ids=ids[:, :-1], use_cache=True)
            step = model(input_ids=ids[:, -1:], past_key_values=prefix.past_key_values).logits[0, -1]
            steps.append((step, model(input_ids=ids).logits[0, -1]))
    (ours_step, ours_full), (peft_step, peft_full) = steps
    assert kit.max_diff(ours_step, ours_full) > 1e-4
    assert kit.max_diff(ours_step, peft_step) <= 1e-5 and kit.max_diff(ours_full, peft_full) <= 1e-5


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("lily", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(peft.LilyConfig, task, tmp_path, model_name, merges=False, **options)
    assert result.method == "lily" and result.loaded <= 1e-5


def one_line(err: pytest.ExceptionInfo, text: str) -> None:
    assert text in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.slow
def test_merge_is_refused_in_one_line(tmp_path):
    built = kit.build("lily", tmp_path)
    adapter = kit.save(tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe)
    with pytest.raises(RecipeError) as err:
        merge_adapter(adapter, tmp_path / "merged")
    one_line(err, "lily cannot be merged")
    with pytest.raises(RecipeError) as err:
        built.model.get_submodule("model.layers.0.self_attn.q_proj").merge()
    one_line(err, "router mixes the B experts by the tokens of each forward")


@pytest.mark.slow
def test_packing_conv1d_and_hash_dependent_names_are_refused_in_one_line(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(kit.TINY / "lily.yaml", ["train.packing=true"])
    one_line(err, "averages each layer's router over every token of a forward, padding included")
    with pytest.raises(RecipeError) as err:
        kit.build("lily", tmp_path, ["model.name=tiny:gpt2"])
    one_line(err, "is a Conv1D; lily adapts nn.Linear layers only")
    with pytest.raises(RecipeError) as err:  # q0 ends both names, q1 only q_proj: two groups or one
        kit.build("lily", tmp_path, ["method.target_modules=[model.layers.0.self_attn.q_proj,q_proj]"])
    one_line(err, "Python's hash order")


@pytest.mark.slow
def test_disagreeing_copies_of_a_shared_tensor_are_refused(tmp_path):
    built = kit.build("lily", tmp_path)
    kit.perturb(built.model)
    adapter = kit.save(tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe)
    weights = adapter / "adapter_model.safetensors"
    state = load_file(weights)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lily_B.weight"  # layer 0's B, repeated
    state[key] = state[key] + 1.0
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(RecipeError) as err:
        load_adapter(adapter)
    one_line(err, "lily shares one tensor between them")
