"""LN tuning against peft 0.21 as the oracle, fp32 on the CPU:

- ``all-norms`` resolves on tiny:llama to exactly the modules peft's own default picks for llama
  (input_layernorm, post_attention_layernorm, norm), and a fresh adapter is the base (copies of the norms);
- with each ``target_modules`` choice (the default, a name list, a regex), our adapter moved off init
  loads in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), on tiny:llama and tiny:bert seq_cls;
- an adapter peft wrote (moved off init) loads in ``peftcli.export.load_adapter`` with peft's logits
  (≤ 1e-5), and ``peftcli merge`` folds it into a plain model with peft's logits (≤ 1e-4);
- merge then unmerge gives back the adapter's logits and the base weights bit for bit (a swap);
- ``target_modules`` that name a linear layer are refused in one line.
"""

from __future__ import annotations

import kit
import pytest
import torch

from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]

OPTION_RUNS = {
    "default": [],
    "names": ["method.target_modules=[post_attention_layernorm]"],
    "regex": [r"method.target_modules=.*layers\.1\.input_layernorm"],
    "bert": BERT,
}

# run id -> (task, model, peft LNTuningConfig target_modules: None is peft's own default)
PEFT_RUNS = {
    "llama-default": ("causal_lm", "tiny:llama", None),
    "llama-names": ("causal_lm", "tiny:llama", ["input_layernorm"]),
    "bert": ("seq_cls", "tiny:bert", ["LayerNorm"]),
}


def test_all_norms_are_peft_default_targets_and_start_at_the_base(tmp_path):
    built = kit.build("ln_tuning", tmp_path, [])
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    theirs = peft.get_peft_model(base, peft.LNTuningConfig(task_type="CAUSAL_LM"))
    peft_targets = {
        n.removeprefix("base_model.model.").removesuffix(".ln_tuning_layers")
        for n, _ in theirs.named_modules()
        if n.endswith(".ln_tuning_layers")
    }
    assert set(built.method.targets) == peft_targets
    assert len(peft_targets) == 2 * built.model.config.num_hidden_layers + 1
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    assert kit.max_diff(kit.logits(built.model, batch), kit.peft_logits(theirs, batch)) <= 1e-6


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    result = kit.peft_loads_ours("ln_tuning", tmp_path, OPTION_RUNS[run])
    assert result.diff <= 1e-5
    tuned = {n for n, _ in result.peft_model.named_modules() if n.endswith(".ln_tuning_layers")}
    assert len(tuned) == len(result.built.method.targets)


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, targets = PEFT_RUNS[run]
    result = kit.we_load_peft(peft.LNTuningConfig, task, tmp_path, model_name, target_modules=targets)
    assert result.method == "ln_tuning" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_merge_unmerge_is_an_exact_swap(tmp_path):
    built = kit.build("ln_tuning", tmp_path, [])
    kit.perturb(built.model)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    name = built.method.targets[0]
    layer = built.model.get_submodule(name)
    base_weight = layer.base_layer.weight.detach().clone()
    built.method.merge_adapter(built.model)
    assert not torch.equal(layer.base_layer.weight, base_weight)  # the tuned copy runs as the base
    assert kit.max_diff(ours, kit.logits(built.model, batch)) == 0.0
    built.method.unmerge_adapter(built.model)
    assert torch.equal(layer.base_layer.weight, base_weight)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) == 0.0


def test_a_linear_target_is_refused_in_one_line(tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("ln_tuning", tmp_path, ["method.target_modules=[q_proj]"])
    assert "not a norm layer" in str(err.value) and "\n" not in str(err.value)
