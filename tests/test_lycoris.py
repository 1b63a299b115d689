"""LoHa and LoKr (the LyCORIS family), against peft 0.21 as the oracle, fp32 on the CPU:

- with every option that changes the numbers (rank/alpha patterns, decompose_both, decompose_factor,
  LoKr's lycoris init), our adapter, moved off init, loads in ``peft.PeftModel.from_pretrained`` with
  our logits (≤ 1e-5), and an adapter peft wrote (moved off init) loads in ``peftcli.export.load_adapter``
  with peft's logits (≤ 1e-5) and ``peftcli merge`` folds it into a plain model with peft's logits
  (≤ 1e-4), on tiny:llama (causal LM) and tiny:bert (seq_cls);
- rank_dropout / module_dropout: in training mode, the same seed drops the same rows and layers as
  peft (equal logits, ≤ 1e-5), and the result differs from eval, where neither acts (eval equals the
  dropout-free adapter exactly);
- LoKr's split of a side into two divisors equals peft's ``factorization`` for every size and factor.

The shared checks (identity at init, parameter count, one loop step, save → load, merge, peft loading
the table's runs) are the table rows in tests/test_methods.py; merge → unmerge is in test_method_kit.
``use_effective_conv2d`` is not tested: it decomposes convolutions, and our language models have none.
"""

from __future__ import annotations

import kit
import pytest
import torch

from peftcli.export import load_adapter, merge_adapter
from peftcli.models import resolve_model_name
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]

# run id -> (method, recipe overrides): every option that changes the update
OPTION_RUNS = {
    "loha": ("loha", []),
    "loha-patterns": (
        "loha",
        ["method.r=2", "method.rank_pattern={down_proj: 5}", "method.alpha_pattern={q_proj: 3}"],
    ),
    "loha-bert": ("loha", BERT),
    "lokr": ("lokr", []),
    "lokr-decompose_both": ("lokr", ["method.r=2", "method.decompose_both=true"]),
    "lokr-decompose_factor": ("lokr", ["method.decompose_factor=4", "method.r=1"]),
    "lokr-lycoris_init": ("lokr", ["method.init_weights=lycoris", "method.r=2"]),
    "lokr-patterns": ("lokr", ["method.rank_pattern={o_proj: 1}", "method.alpha_pattern={up_proj: 2}"]),
    "lokr-bert": ("lokr", [*BERT, "method.decompose_both=true", "method.r=2"]),
}

# run id -> (peft config class, its options): adapters peft makes
PEFT_RUNS = {
    "loha": ("LoHaConfig", {"r": 4, "alpha": 6}),
    "loha-patterns": (
        "LoHaConfig",
        {"r": 2, "alpha": 4, "rank_pattern": {"v_proj": 3}, "alpha_pattern": {"k_proj": 7}},
    ),
    "loha-bert": ("LoHaConfig", {"r": 3, "alpha": 3}),
    "lokr": ("LoKrConfig", {"r": 4, "alpha": 8}),
    "lokr-decompose_both": ("LoKrConfig", {"r": 2, "alpha": 2, "decompose_both": True}),
    "lokr-decompose_factor": ("LoKrConfig", {"r": 1, "alpha": 2, "decompose_factor": 2}),
    "lokr-lycoris_init": ("LoKrConfig", {"r": 2, "alpha": 2, "init_weights": "lycoris"}),
    "lokr-bert": ("LoKrConfig", {"r": 8, "alpha": 4, "decompose_factor": 16}),
}

PEFT_TASKS = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}


def probe(task: str, vocab_size: int) -> dict[str, torch.Tensor]:
    return kit.batch(task, vocab_size, lengths=(10, 7))


# -- ours -> peft ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    method_name, overrides = OPTION_RUNS[run]
    result = kit.peft_loads_ours(method_name, tmp_path, overrides)
    assert result.diff <= 1e-5
    stored = sum(t.numel() for t in peft.get_peft_model_state_dict(result.peft_model).values())
    assert stored == result.built.method.expected_trainable_parameters(result.built.model)


# -- peft -> ours ---------------------------------------------------------------------------------------


def peft_adapter(run: str, out_dir):
    """An adapter peft makes for ``run`` on the task's tiny model, moved off init; the peft model (eval)."""
    config_name, options = PEFT_RUNS[run]
    task = "seq_cls" if run.endswith("-bert") else "causal_lm"
    base_path = resolve_model_name(kit.TASK_MODELS[task])
    torch.manual_seed(0)
    extra = {"num_labels": 2} if task == "seq_cls" else {}
    model = kit.auto_class(task).from_pretrained(base_path, dtype=torch.float32, **extra)
    config = getattr(peft, config_name)(task_type=PEFT_TASKS[task], target_modules="all-linear", **options)
    peft_model = peft.get_peft_model(model, config)
    kit.perturb(peft_model, seed=2)
    peft_model.save_pretrained(out_dir)
    peft_model.eval()
    return peft_model, task


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    peft_model, task = peft_adapter(run, tmp_path / "adapter")
    batch = probe(task, peft_model.config.vocab_size)
    theirs = kit.peft_logits(peft_model, batch, task)
    with peft_model.disable_adapter():
        assert kit.max_diff(theirs, kit.peft_logits(peft_model, batch, task)) > 1e-3  # not trivial
    loaded = load_adapter(tmp_path / "adapter")
    assert loaded.method.peft_type == PEFT_RUNS[run][0].removesuffix("Config").upper()
    assert kit.max_diff(theirs, kit.logits(loaded.model, batch, task)) <= 1e-5
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")  # peftcli merge of peft's adapter
    merged = kit.auto_class(task).from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert kit.max_diff(theirs, kit.logits(merged, batch, task)) <= 1e-4


# -- the training-only dropouts -----------------------------------------------------------------------


@pytest.mark.parametrize("method_name", ["loha", "lokr"])
def test_dropouts_act_in_training_as_peft_and_never_in_eval(method_name, tmp_path):
    dropouts = ["method.rank_dropout=0.3", "method.module_dropout=0.3"]
    extra = ["method.rank_dropout_scale=true"] if method_name == "lokr" else []
    built = kit.build(method_name, tmp_path, [*dropouts, *extra])
    plain = kit.build(method_name, tmp_path, [])
    kit.perturb(built.model)
    kit.perturb(plain.model)  # the same tensors: same build seed, same perturbation
    batch = probe("causal_lm", built.model.config.vocab_size)
    evaluated = kit.logits(built.model, batch)
    assert kit.max_diff(evaluated, kit.logits(plain.model, batch)) == 0.0  # eval: no dropout at all
    adapter = kit.save(tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe)
    theirs = kit.load_in_peft(adapter, built.base_path)
    built.model.train()
    theirs.train()
    for seed in (3, 4):
        torch.manual_seed(seed)
        ours = kit.logits(built.model, batch)
        torch.manual_seed(seed)
        assert kit.max_diff(ours, kit.peft_logits(theirs, batch)) <= 1e-5  # the same rows and layers dropped
        assert kit.max_diff(ours, evaluated) > 1e-4  # and something was dropped


# -- LoKr's factorisation, and what is refused --------------------------------------------------------


def test_lokr_factorization_equals_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    from peftcli.methods.lokr import factorization

    for dimension in [*range(1, 300), 1024, 4096, 11008, 14336]:
        for factor in (-1, 1, 2, 3, 4, 8, 16, 64):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (
                dimension,
                factor,
            )


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["method.name=lokr", "method.decompose_factor=0"], "method.decompose_factor"),
        (["method.name=lokr", "method.init_weights=false"], "method.init_weights"),
        (["method.name=loha", "model.name=tiny:gpt2"], "method.target_modules"),
        (["method.name=loha", "method.rank_pattern={nothing_here: 2}"], "method.rank_pattern.nothing_here"),
    ],
)
def test_refused_at_start_in_one_line(overrides, key, tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("loha", tmp_path, overrides)
    assert err.value.key == key
