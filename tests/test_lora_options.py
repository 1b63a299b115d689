"""LoRA's options, one row each, against peft 0.21.2 as the oracle (fp32, CPU, fixed seeds).

Every row is one set of peft ``LoraConfig`` options on one tiny model, and is checked three ways:

(a) peft makes the adapter (``get_peft_model``, trainable tensors moved to a random point, saved by
    ``save_pretrained``); ``peftcli.export.load_adapter`` loads it with peft's logits, max abs diff
    ≤ 1e-5, and those logits differ from the plain base's (> 1e-4), so the option's tensors loaded;
(b) we build the same options from a recipe (``kit.build_inline``), move the trainable tensors to a
    random point and take a training step (every trainable tensor moves); our file holds exactly peft's keys with peft's shapes
    (the same options' file from (a)), and ``PeftModel.from_pretrained`` gives our logits, ≤ 1e-5;
(c) merge: ``peftcli merge`` of both files gives a plain transformers model with the adapter model's
    logits, ≤ 1e-4; where merging does not apply (layer_replication: copies share one base weight;
    peft refuses it too) merge is a one-line RecipeError.

Recipe mistakes in the options are one-line RecipeErrors naming the key (the table at the end).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import kit
import pytest
import torch
from safetensors.torch import load_file

from peftcli.export import load_adapter, merge_adapter
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@dataclass(frozen=True)
class Option:
    """One row: peft's options (peft's names; ``lora_alpha`` becomes our ``alpha``) on a tiny model."""

    arch: str
    options: dict
    merges: bool = True
    marks: tuple = field(default_factory=tuple)


OPTIONS: dict[str, Option] = {
    # GPT-2's Conv1D layers all carry biases, so B's bias folds into them on merge
    "lora_bias": Option("gpt2", {"target_modules": ["c_attn", "c_fc"], "lora_bias": True}),
    "rank_alpha_pattern-conv1d": Option(
        "gpt2",
        {
            "target_modules": ["c_attn", "c_proj"],
            "rank_pattern": {"c_proj": 2},
            "alpha_pattern": {"c_attn": 4},
        },
    ),
    "rank_pattern-rslora": Option(
        "llama",
        {"target_modules": ["q_proj", "down_proj"], "rank_pattern": {"down_proj": 6}, "use_rslora": True},
    ),
    "rank_pattern-dora": Option(
        "llama", {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2}, "use_dora": True}
    ),
    "layers_to_transform": Option(
        "llama", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]}
    ),
    "layers_pattern": Option(
        "gpt2", {"target_modules": ["c_attn"], "layers_to_transform": 0, "layers_pattern": "h"}
    ),
    "exclude_modules": Option(
        "llama", {"target_modules": ["q_proj", "o_proj", "down_proj"], "exclude_modules": ["o_proj"]}
    ),
    "exclude_modules-regex": Option(
        "llama", {"target_modules": ["q_proj", "down_proj"], "exclude_modules": r".*layers\.0\.mlp.*"}
    ),
    "trainable_token_indices": Option(
        "llama", {"target_modules": ["q_proj"], "trainable_token_indices": [5, 7, 9]}
    ),
    "trainable_token_indices-dict": Option(
        "llama",
        {"target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokens": [5], "lm_head": [6, 8]}},
    ),
    # GPT-2 ties its LM head to wte: the head reads the same trained rows
    "trainable_token_indices-tied": Option(
        "gpt2", {"target_modules": ["c_attn"], "trainable_token_indices": [5, 7, 9]}
    ),
    "target_parameters": Option(
        "mixtral", {"target_modules": [], "target_parameters": EXPERTS}, marks=(pytest.mark.slow,)
    ),
    "layer_replication": Option(
        "llama", {"target_modules": ["q_proj", "v_proj"], "layer_replication": [[0, 2], [1, 2]]}, merges=False
    ),
    "modules_to_save-tied": Option(
        "gpt2", {"target_modules": ["c_attn"], "modules_to_save": ["lm_head"], "ensure_weight_tying": True}
    ),
    "modules_to_save-untied": Option("gpt2", {"target_modules": ["c_attn"], "modules_to_save": ["lm_head"]}),
    # peft ties by the names embed_tokens / lm_head only: GPT-2's wte trains alone, the head stays the base's
    "modules_to_save-tied-wte": Option(
        "gpt2", {"target_modules": ["c_attn"], "modules_to_save": ["wte"], "ensure_weight_tying": True}
    ),
    "modules_to_save-tied-embed_tokens": Option(
        "llama-tied",
        {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"], "ensure_weight_tying": True},
    ),
    "trainable_token_indices-tied-embed_tokens": Option(
        "llama-tied", {"target_modules": ["q_proj"], "trainable_token_indices": [5, 7, 9]}
    ),
}

BASE = {"r": 4, "lora_alpha": 8}


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory) -> str:
    """tiny:llama with its LM head tied to embed_tokens (tie_word_embeddings), saved as a model dir."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tied-llama")
    model = kit.tiny("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(path)
    kit.tokenizer("llama").save_pretrained(path)
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    return str(path)


def model_name(row: Option, request) -> str:
    return request.getfixturevalue("tied_llama") if row.arch == "llama-tied" else f"tiny:{row.arch}"


def rows():
    return [pytest.param(name, id=name, marks=list(row.marks)) for name, row in OPTIONS.items()]


def recipe_method(options: dict) -> dict:
    """Our recipe's method section for peft's options."""
    method = {"name": "lora", **options}
    method["alpha"] = method.pop("lora_alpha")
    return method


def batch_for(model) -> dict[str, torch.Tensor]:
    """The oracle batch with ids 5 … 10 at positions 1 … 6, so the trainable token rows are read."""
    batch = kit.batch_of(model.config.vocab_size)
    batch["input_ids"][:, 1:7] = torch.arange(5, 11)
    batch["labels"][:, 1:7] = torch.arange(5, 11)
    return batch


def peft_made(row: Option, name: str, tmp_path):
    """(peft's adapter dir, peft's logits, the batch, what we build for the base): made and saved by peft."""
    from peft import LoraConfig, get_peft_model

    built = kit.build_inline("causal_lm", {"name": "lora"}, {"name": name})
    base = kit.base_model(built.base_path, built.recipe)
    options = {**BASE, **row.options}
    fan_in_fan_out = row.arch == "gpt2"
    model = get_peft_model(base, LoraConfig(fan_in_fan_out=fan_in_fan_out, **options))
    kit.perturb(model, seed=3)
    batch = batch_for(base)
    expected = kit.peft_logits(model, batch)
    model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", expected, batch, built


def merged_logits(adapter, out, batch) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    merge_adapter(adapter, out)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return kit.logits(merged, batch)


def saved_shapes(adapter) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}


@pytest.mark.parametrize("name", rows())
def test_option_round_trips_with_peft(name, tmp_path, request):
    row = OPTIONS[name]
    base_name = model_name(row, request)
    # (a) peft's adapter loads here with peft's logits
    peft_dir, expected, batch, built = peft_made(row, base_name, tmp_path)
    loaded = load_adapter(peft_dir)
    theirs_here = kit.logits(loaded.model, batch)
    assert kit.max_diff(theirs_here, expected) <= 1e-5
    base = kit.logits(kit.base_model(built.base_path, built.recipe), batch)
    assert kit.max_diff(theirs_here, base) > 1e-4

    # (b) our recipe with the option: a step moves every trainable tensor; peft loads ours with our logits
    ours = kit.build_inline("causal_lm", recipe_method({**BASE, **row.options}), {"name": base_name})
    trainable = sum(p.numel() for p in ours.model.parameters() if p.requires_grad)
    assert trainable == ours.method.expected_trainable_parameters(ours.model)
    kit.perturb(ours.model, seed=4)  # off B = 0 first, so that every tensor has a gradient
    before = {n: p.detach().clone() for n, p in ours.model.named_parameters() if p.requires_grad}
    kit.train_step(ours.model, ours.method, batch)
    still = [n for n, p in ours.model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not still, f"a step left {still[:3]} where they were"
    our_logits = kit.logits(ours.model, batch)
    adapter = kit.save(
        tmp_path / "ours", ours.model, ours.method, ours.tokenizer, ours.base_path, ours.recipe
    )
    assert saved_shapes(adapter) == saved_shapes(peft_dir)
    in_peft = kit.load_in_peft(adapter, ours.base_path)
    assert kit.max_diff(kit.peft_logits(in_peft, batch), our_logits) <= 1e-5

    # (c) merge
    if row.merges:
        assert kit.max_diff(merged_logits(peft_dir, tmp_path / "merged-peft", batch), expected) <= 1e-4
        assert kit.max_diff(merged_logits(adapter, tmp_path / "merged-ours", batch), our_logits) <= 1e-4
    else:
        with pytest.raises(RecipeError) as err:
            merge_adapter(adapter, tmp_path / "merged")
        assert err.value.key == "merge" and "\n" not in str(err.value)


def test_layer_replication_copies_share_base_weights(tmp_path):
    """[[0, 2], [1, 2]]: blocks 0, 1, 1, the last two sharing every base tensor, each with its own A, B,
    and the KV-cache slot of each copy its new position."""
    built = kit.build_inline(
        "causal_lm", {"name": "lora", "target_modules": ["q_proj"], "layer_replication": [[0, 2], [1, 2]]}
    )
    layers = built.model.model.layers
    assert len(layers) == 3 and built.model.config.num_hidden_layers == 3
    assert layers[1].mlp.down_proj.weight is layers[2].mlp.down_proj.weight
    assert layers[1].self_attn.q_proj.lora_A is not layers[2].self_attn.q_proj.lora_A
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    # each copy has its own KV-cache slot: cached greedy decoding equals decoding by full recompute
    kit.perturb(built.model, seed=6)
    ids = torch.tensor([[5, 6, 7, 8]])
    cached = built.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False
    )
    sequence = ids
    for _ in range(5):
        with torch.no_grad():
            logits = built.model(input_ids=sequence, use_cache=False).logits
        sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached.tolist() == sequence.tolist()


def test_tied_modules_to_save_trains_one_copy(tmp_path):
    """ensure_weight_tying: the LM head reads the trained embedding (the same tensor), not the base."""
    built = kit.build_inline(
        "causal_lm",
        {
            "name": "lora",
            "target_modules": ["c_attn"],
            "modules_to_save": ["lm_head"],
            "ensure_weight_tying": True,
        },
        {"name": "tiny:gpt2"},
    )
    model = built.model
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.requires_grad
    config = built.method.adapter_config(model)
    assert config["modules_to_save"] == ["transformer.wte"] and config["ensure_weight_tying"] is True


def test_trainable_tokens_change_only_their_rows(tmp_path):
    """Rows 5, 7, 9 of the embedding train; every other row of the effective weight stays the base's."""
    built = kit.build_inline(
        "causal_lm", {"name": "lora", "target_modules": ["q_proj"], "trainable_token_indices": [5, 7, 9]}
    )
    kit.perturb(built.model, seed=5)
    wrapper = built.model.model.embed_tokens
    weight, base = wrapper.current_weight(), wrapper.base_layer.weight
    changed = (weight != base).any(dim=1).nonzero().flatten().tolist()
    assert changed == [5, 7, 9]


BAD = [
    ({"lora_biass": True}, "method.lora_biass", "did you mean 'lora_bias'"),
    ({"lora_bias": True, "use_dora": True}, "method.use_dora", None),
    ({"lora_bias": True, "init": "gaussian"}, "method.init", None),
    ({"layers_pattern": "layers"}, "method.layers_pattern", None),
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "method.layers_to_transform", None),
    ({"layers_to_transform": [7]}, "method.layers_to_transform", None),
    ({"exclude_modules": ["o_prj"]}, "method.exclude_modules", "did you mean 'o_proj'"),
    ({"exclude_modules": "(bad"}, "method.exclude_modules", None),
    ({"trainable_token_indices": [5, 9999]}, "method.trainable_token_indices", None),
    (
        {"trainable_token_indices": {"embed_tokns": [5]}},
        "method.trainable_token_indices.embed_tokns",
        "embed_tokens",
    ),
    (
        {"trainable_token_indices": [5], "modules_to_save": ["embed_tokens"]},
        "method.trainable_token_indices",
        None,
    ),
    ({"layer_replication": [[0, 5]]}, "method.layer_replication[0]", None),
    ({"layer_replication": [[1, 1]]}, "method.layer_replication[0]", None),
]


@pytest.mark.parametrize(
    ("options", "key", "hint"), BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)]
)
def test_bad_options_are_one_line_errors(options, key, hint):
    with pytest.raises(RecipeError) as err:
        kit.build_inline("causal_lm", {"name": "lora", "target_modules": ["q_proj", "o_proj"], **options})
    assert err.value.key == key, str(err.value)
    assert "\n" not in str(err.value)
    if hint:
        assert hint in str(err.value)


@pytest.mark.parametrize("option", [{"layer_replication": [[0, 2]]}, {"trainable_token_indices": [5]}])
def test_model_surgery_is_refused_with_fsdp(option):
    from peftcli.recipe_loader import recipe_from_dict

    with pytest.raises(RecipeError) as err:
        recipe_from_dict(
            {
                "model": {"name": "tiny:llama"},
                "data": {"train": "unused.jsonl"},
                "method": {"name": "lora", **option},
                "train": {"distributed": "fsdp"},
            }
        )
    assert err.value.key == "train.distributed" and next(iter(option)) in str(err.value)


def test_options_round_trip_through_adapter_config(tmp_path):
    """The options are written under peft's names in adapter_config.json."""
    options = {
        "lora_bias": False,
        "exclude_modules": ["o_proj"],
        "layers_to_transform": [0],
        "trainable_token_indices": [5],
    }
    built = kit.build_inline("causal_lm", {"name": "lora", "target_modules": ["q_proj", "o_proj"], **options})
    adapter = kit.save(tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert {k: config[k] for k in options} == options
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]


def test_lora_bias_on_bias_free_layers_refuses_to_merge(tmp_path):
    """Llama's projections have no bias: the adapter trains and loads, but merge is a one-line error,
    raised before any layer folds (peft raises too)."""
    built = kit.build_inline("causal_lm", {"name": "lora", "target_modules": ["q_proj"], "lora_bias": True})
    adapter = kit.save(tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe)
    with pytest.raises(RecipeError) as err:
        merge_adapter(adapter, tmp_path / "merged")
    assert err.value.key == "merge" and "lora_bias" in str(err.value) and "\n" not in str(err.value)
