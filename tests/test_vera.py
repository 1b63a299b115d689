"""VeRA against peft 0.21 as the oracle, fp32 on the CPU:

- the shared projections: for a key, our A and B are bit-identical to the ones peft draws for the same
  targets (so ``save_projection: false`` adapters rebuild in either tool), and another key draws others;
  a fresh layer's vectors equal peft's init (b = 0, d = ``d_initial``);
- with each option that changes the numbers (``projection_prng_key``, ``save_projection`` true and
  false, ``d_initial``, ``r``), our adapter moved off init loads in ``PeftModel.from_pretrained`` with our
  logits (≤ 1e-5), and an adapter peft wrote (moved off init) loads in ``peftcli.export.load_adapter``
  with peft's logits (≤ 1e-5) and ``peftcli merge`` folds it into a plain model with peft's logits
  (≤ 1e-4), on tiny:llama (causal LM), tiny:gpt2 (Conv1D) and tiny:bert (seq_cls);
- ``save_projection``: true stores A and B once (``base_model.vera_A`` / ``vera_B``), false stores
  only the vectors;
- ``vera_dropout`` acts only in training, with the same draws as peft's (same seed, equal logits).
"""

from __future__ import annotations

import kit
import pytest
import torch
from safetensors.torch import load_file

from peftcli.export import load_adapter

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]

OPTION_RUNS = {
    "default": [],
    "key-7": ["method.projection_prng_key=7"],
    "no-saved-projection": ["method.save_projection=false", "method.projection_prng_key=3"],
    "d_initial-r": ["method.d_initial=0.7", "method.r=8"],
    "gpt2-no-saved-projection": ["model.name=tiny:gpt2", "method.save_projection=false"],
    "bert": BERT,
    "bert-no-saved-projection": [*BERT, "method.save_projection=false", "method.projection_prng_key=5"],
}

VERA_TARGETS = {
    "tiny:gpt2": ["c_attn", "c_proj", "c_fc"],
    "tiny:bert": ["query", "key", "value", "dense"],
    "tiny:llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
}

# run id -> (task, model, peft VeraConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"r": 16}),
    "llama-no-saved-projection": (
        "causal_lm",
        "tiny:llama",
        {"r": 8, "save_projection": False, "projection_prng_key": 11},
    ),
    "llama-d_initial": ("causal_lm", "tiny:llama", {"r": 4, "d_initial": 1.5, "projection_prng_key": 2}),
    "gpt2": ("causal_lm", "tiny:gpt2", {"r": 8, "save_projection": False}),
    "bert": ("seq_cls", "tiny:bert", {"r": 8, "projection_prng_key": 4}),
}


def peft_model_for(built: kit.Built):
    """peft's VeRA on the same base with the same targets and options as ``built`` (not trained)."""
    cfg = built.method.cfg
    extra = {"num_labels": 2} if built.task == "seq_cls" else {}
    base = kit.auto_class(built.task).from_pretrained(built.base_path, dtype=torch.float32, **extra)
    config = peft.VeraConfig(
        task_type={"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}[built.task],
        r=cfg.r,
        target_modules=list(built.method.targets),
        projection_prng_key=cfg.projection_prng_key,
        save_projection=cfg.save_projection,
        d_initial=cfg.d_initial,
    )
    return peft.get_peft_model(base, config)


@pytest.mark.parametrize(
    "overrides",
    [["method.projection_prng_key=9", "method.d_initial=0.3", "method.r=12"], ["model.name=tiny:gpt2"]],
    ids=["llama", "gpt2"],
)
def test_projections_and_init_are_peft_draws_bit_for_bit(overrides, tmp_path):
    built = kit.build("vera", tmp_path, overrides)
    theirs = peft_model_for(built)
    shared = built.model.adapter_shared
    tuner = theirs.base_model
    assert torch.equal(shared.vera_A, tuner.vera_A["default"])
    assert torch.equal(shared.vera_B, tuner.vera_B["default"])
    ours = {k.removesuffix(".default"): v for k, v in built.method.adapter_state_dict(built.model).items()}
    for key, value in peft.get_peft_model_state_dict(theirs).items():
        assert torch.equal(ours[key], value), key  # b = 0, d = d_initial, A, B: peft's keys and values
    other = kit.build("vera", tmp_path, [*overrides, "method.projection_prng_key=10"])
    assert not torch.equal(other.model.adapter_shared.vera_A, shared.vera_A)


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    result = kit.peft_loads_ours("vera", tmp_path, OPTION_RUNS[run])
    assert result.diff <= 1e-5
    built, adapter = result.built, tmp_path / "adapter"
    stored = load_file(adapter / "adapter_model.safetensors")
    projections = sorted(k for k in stored if "vera_A" in k or "vera_B" in k)
    if built.method.cfg.save_projection:
        assert projections == ["base_model.vera_A", "base_model.vera_B"]
        assert torch.equal(stored["base_model.vera_A"], built.model.adapter_shared.vera_A)
    else:
        assert projections == [] and all(".vera_lambda_" in k or "classifier" in k for k in stored)
    batch = kit.batch(built.task, built.model.config.vocab_size, lengths=(10, 7))
    again = load_adapter(adapter)  # and ours, from the key alone where A and B were not saved
    assert (
        kit.max_diff(kit.logits(built.model, batch, built.task), kit.logits(again.model, batch, built.task))
        <= 1e-6
    )


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.VeraConfig,
        task,
        tmp_path,
        model_name,
        target_modules=VERA_TARGETS.get(model_name, VERA_TARGETS["tiny:llama"]),
        **options,
    )
    assert result.method == "vera" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_dropout_acts_in_training_as_peft_and_never_in_eval(tmp_path):
    built = kit.build("vera", tmp_path, ["method.vera_dropout=0.3"])
    plain = kit.build("vera", tmp_path, [])
    kit.perturb(built.model)
    kit.perturb(plain.model)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    evaluated = kit.logits(built.model, batch)
    assert kit.max_diff(evaluated, kit.logits(plain.model, batch)) == 0.0
    adapter = kit.save(tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe)
    theirs = kit.load_in_peft(adapter, built.base_path)
    built.model.train()
    theirs.train()
    torch.manual_seed(3)
    ours = kit.logits(built.model, batch)
    torch.manual_seed(3)
    assert kit.max_diff(ours, kit.peft_logits(theirs, batch)) <= 1e-5
    assert kit.max_diff(ours, evaluated) > 1e-4
