"""Trainable tokens against peft 0.21 as the oracle, fp32 on the CPU:

- the equation: the layer's weight is the base with rows ``token_indices`` replaced by
  ``trainable_tokens_delta``, every other row bit-identical; step 0 is the base (``init_weights``), and
  with ``init_weights: false`` the rows start elsewhere;
- with each option that changes the numbers (``init_weights``, ``target_modules``: the LM head, both,
  a tied head on tiny:gpt2), on tiny:bert seq_cls and on tiny:t5 seq2seq (encoder, decoder and head
  all read ``shared``), our adapter loads in ``PeftModel.from_pretrained``
  with our logits (≤ 1e-5) and holds exactly peft's keys and shapes;
- an adapter peft wrote with each option loads in ``peftcli.export.load_adapter`` with peft's logits
  (≤ 1e-5), and ``peftcli merge`` folds it into a plain model with peft's logits (≤ 1e-4);
- a tied LM head reads the embedding's rows (one trained tensor, written under both keys as peft does);
- merge then unmerge gives back the logits and the base weights bit for bit;
- recipe mistakes (no indices, an index past the vocabulary, a norm as target) are one-line errors.
"""

from __future__ import annotations

import kit
import pytest
import torch
from safetensors.torch import load_file

from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

BERT = ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"]
INDICES = list(range(5, 200, 3))  # dense enough that the oracle batch reads some of them

OPTION_RUNS = {
    "default": [],
    "init_weights-false": ["method.init_weights=false"],
    "lm_head": ["method.target_modules=[lm_head]"],
    "embed_tokens-and-lm_head": ["method.target_modules=[embed_tokens, lm_head]"],
    "gpt2-tied": ["model.name=tiny:gpt2"],
    "bert": BERT,
    "t5-shared": ["model.name=tiny:t5", "model.task=seq2seq"],  # encoder, decoder and head read `shared`
}

# run id -> (task, model, peft TrainableTokensConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {}),
    "llama-init_weights-false": ("causal_lm", "tiny:llama", {"init_weights": False}),
    "llama-lm_head": ("causal_lm", "tiny:llama", {"target_modules": ["lm_head"]}),
    "gpt2-tied": ("causal_lm", "tiny:gpt2", {}),
    "t5-shared": ("seq2seq", "tiny:t5", {}),
}


def saved_shapes(adapter) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}


def test_only_the_chosen_rows_change_and_step_zero_is_the_base(tmp_path):
    built = kit.build("trainable_tokens", tmp_path, [])
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    assert kit.max_diff(kit.logits(built.model, batch), kit.logits(base, batch)) == 0.0
    kit.perturb(built.model)
    layer = built.model.get_submodule(built.method.targets[0])
    rows = torch.tensor(built.recipe.method.token_indices)
    weight = layer.current_weight().detach()
    others = torch.ones(weight.shape[0], dtype=torch.bool)
    others[rows] = False
    assert torch.equal(weight[others], layer.base_layer.weight[others])
    assert torch.equal(weight[rows], layer.token_adapter.trainable_tokens_delta.detach())
    assert kit.max_diff(weight[rows], layer.base_layer.weight[rows]) > 1e-3


def test_init_weights_false_starts_off_the_base(tmp_path):
    built = kit.build("trainable_tokens", tmp_path, ["method.init_weights=false"])
    layer = built.model.get_submodule(built.method.targets[0])
    rows = torch.tensor(built.recipe.method.token_indices)
    delta = layer.token_adapter.trainable_tokens_delta.detach()
    assert kit.max_diff(delta, layer.base_layer.weight[rows]) > 0.5
    assert abs(delta.std().item() - 1.0) < 0.2  # N(0, 1), as peft draws them


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    result = kit.peft_loads_ours("trainable_tokens", tmp_path, OPTION_RUNS[run])
    assert result.diff <= 1e-5
    ours = saved_shapes(tmp_path / "adapter")
    theirs = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(result.peft_model).items()}
    assert {k: v for k, v in ours.items() if "classifier" not in k} == theirs


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.TrainableTokensConfig, task, tmp_path, model_name, token_indices=INDICES, **options
    )
    assert result.method == "trainable_tokens" and result.loaded <= 1e-5 and result.merged <= 1e-4


def test_a_tied_head_reads_the_embedding_rows(tmp_path):
    built = kit.build("trainable_tokens", tmp_path, ["model.name=tiny:gpt2"])
    assert built.method.tied_modules == ["lm_head"]
    kit.perturb(built.model)
    head, embedding = built.model.lm_head, built.model.get_submodule(built.method.targets[0])
    assert torch.equal(head.current_weight(), embedding.current_weight())
    trained = [n for n, p in built.model.named_parameters() if p.requires_grad]
    assert trained == [f"{built.method.targets[0]}.token_adapter.trainable_tokens_delta"]
    kit.save(tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe)
    state = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    head_rows = state["base_model.model.lm_head.trainable_tokens_delta"]
    assert torch.equal(head_rows, state["base_model.model.transformer.wte.trainable_tokens_delta"])


def test_merge_then_unmerge_is_exact(tmp_path):
    built = kit.build("trainable_tokens", tmp_path, ["method.target_modules=[embed_tokens, lm_head]"])
    kit.perturb(built.model)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    weights = {
        n: built.model.get_submodule(n).base_layer.weight.detach().clone() for n in built.method.targets
    }
    built.method.merge_adapter(built.model)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) == 0.0
    built.method.unmerge_adapter(built.model)
    for name, weight in weights.items():
        assert torch.equal(built.model.get_submodule(name).base_layer.weight, weight)
    assert kit.max_diff(ours, kit.logits(built.model, batch)) == 0.0


@pytest.mark.parametrize(
    "overrides,key,words",
    [
        (["method.token_indices=[]"], "method.token_indices", "nothing would train"),
        (["method.token_indices=[5, 99999]"], "method.token_indices", "outside the"),
        (["method.target_modules=[norm]"], "method.target_modules", "not a embedding or linear head"),
    ],
)
def test_recipe_mistakes_are_one_line_errors(overrides, key, words, tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("trainable_tokens", tmp_path, overrides)
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value)
