"""ShadowPEFT against peft 0.21 as the oracle, fp32 on the CPU:

- the init: for a seed, the mirror backbone, the bottleneck and the update MLPs are the numbers peft
  draws (W_up zero with ``init_weights: true``), under peft's key names;
- training: one window's gradients through the loop's own ``Stepper`` equal peft's
  ``(task loss + auxiliary_loss_weight · shadow loss).backward()`` with the batch's labels (≤ 1e-5), on
  causal_lm and seq_cls: the auxiliary loss (Eq. 8–9) is peft's, and the exit block's update, which
  peft never trains (no gradient reaches it), is frozen here; a window of two micro-batches gives the
  gradients of one batch (the auxiliary loss is normalised over the window's targets, as the task loss);
- with each option that changes the numbers (``r``, ``shadow_alpha``, ``update_hidden_size``,
  ``init_weights``, the mirror's depth / width / heads / feed-forward width, ``share_embeddings``,
  ``layers_to_transform``, ``exclude_modules``, ``modules_to_save``; gpt2's tuple-returning blocks,
  qwen3's and gemma2's ``layer_types``, opt's nested block list, seq_cls), our adapter moved off init
  loads in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5), and an adapter peft wrote loads in
  ``peftcli.export.load_adapter`` with peft's logits (≤ 1e-5); ``peftcli merge`` refuses in one line, as
  peft refuses to merge;
- ``shadow_model`` as a pretrained backbone (a model directory, loaded by ``AutoModel``; a "projected"
  shadow checkpoint with its trained projection) loads both ways with peft's logits (≤ 1e-5);
- decoding with the KV cache (the shadow backbone's cache kept beside the base's) gives the tokens of
  greedy decoding that recomputes the whole sequence each step;
- ``adapter_disabled`` runs the base exactly; gradient checkpointing gives the same gradients;
- what cannot work is refused at start in one line.
"""

from __future__ import annotations

import kit
import pytest
import torch

from peftcli.decoding import decode
from peftcli.methods.shadow import Shadow, ShadowConfig
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

SEQ_CLS = ["model.task=seq_cls", "data.format=classification"]

OPTION_RUNS = {
    "default": [],
    "r4-alpha-update": ["method.r=4", "method.shadow_alpha=0.5", "method.update_hidden_size=12"],
    "no-zero-up": ["method.init_weights=false"],
    "deep-own-embeddings": ["method.shadow_num_hidden_layers=2", "method.share_embeddings=false"],
    "narrow-mirror": [
        "method.shadow_hidden_size=32",
        "method.shadow_intermediate_size=48",
        "method.shadow_num_attention_heads=2",
    ],
    "last-block": ["method.layers_to_transform=[1]"],
    "exclude-first-train-head": [
        "method.exclude_modules=[model.layers.0]",
        "method.modules_to_save=[lm_head]",
    ],
    "gpt2": ["model.name=tiny:gpt2"],
    "qwen3": ["model.name=tiny:qwen3"],
    "gemma2": ["model.name=tiny:gemma2"],  # sliding / global layer_types, embeddings scaled by √d
    "opt": ["model.name=tiny:opt"],  # the block list one level deeper (model.decoder.layers)
    "seq_cls": SEQ_CLS,
}

# run id -> (task, model, peft ShadowConfig options)
PEFT_RUNS = {
    "llama": ("causal_lm", "tiny:llama", {"r": 4}),
    "llama-deep-own-embeddings": (
        "causal_lm",
        "tiny:llama",
        {"r": 6, "shadow_num_hidden_layers": 2, "share_embeddings": False, "shadow_alpha": 0.3},
    ),
    "llama-narrow-first-block": (
        "causal_lm",
        "tiny:llama",
        {"shadow_hidden_size": 48, "update_hidden_size": 5, "target_modules": ["model.layers.0"]},
    ),
    "gpt2": ("causal_lm", "tiny:gpt2", {"r": 4, "init_weights": False}),
    "llama-exclude-train-head": (
        "causal_lm",
        "tiny:llama",
        {"exclude_modules": ["model.layers.1"], "modules_to_save": ["lm_head"], "auxiliary_loss_weight": 0.0},
    ),
    "llama-seq_cls": ("seq_cls", "tiny:llama", {"r": 4}),
}


def peft_shadow(model_name: str, task: str, seed: int, **options):
    base = kit.tiny(model_name.removeprefix("tiny:"), task)
    torch.manual_seed(seed)
    return peft.get_peft_model(base, peft.ShadowConfig(task_type=kit.parity.PEFT_TASK_TYPES[task], **options))


@pytest.mark.slow
@pytest.mark.parametrize("init_weights", [True, False], ids=["zero-up", "random-up"])
def test_init_is_peft_draw(init_weights):
    options = {"r": 4, "shadow_num_hidden_layers": 2, "init_weights": init_weights}
    theirs = peft.get_peft_model_state_dict(peft_shadow("tiny:llama", "causal_lm", 3, **options))
    model = kit.tiny("llama")
    method = Shadow(ShadowConfig(**options))
    torch.manual_seed(3)
    ours = method.adapter_state_dict(method.attach(model))
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    up = ours["base_model.model.model.layers.0.shadow_up.default.weight"]
    assert (torch.count_nonzero(up).item() == 0) == init_weights


@pytest.mark.slow
@pytest.mark.parametrize("task", ["causal_lm", "seq_cls"])
def test_gradients_with_the_auxiliary_loss_equal_peft(task, tmp_path):
    from peft import PeftModel

    overrides = ["method.shadow_dropout=0.0", "method.auxiliary_loss_weight=0.3"]
    built = kit.build("shadow", tmp_path, overrides + (SEQ_CLS if task == "seq_cls" else []))
    kit.perturb(built.model)
    adapter = kit.save(
        tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe, built.labels
    )
    extra = {"num_labels": len(built.labels)} if built.labels else {}
    base = kit.auto_class(task).from_pretrained(built.base_path, dtype=torch.float32, **extra)
    theirs = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    batch = kit.batch(task, built.model.config.vocab_size, lengths=(10, 7))
    theirs.train()
    theirs(**kit.inputs(batch, task), labels=batch["labels"]).loss.backward()
    peft_grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    _, _, ours = kit.window_gradients(built.model, built.method, [batch], task)
    assert ours, "nothing trained"
    for name, grad in ours.items():
        key = built.method.stored_key(name) if built.method.owns(name) else None
        if key is None:  # the seq_cls head, trained whole on both sides
            module, parameter = name.rsplit(".", 1)
            key = f"base_model.model.{module}.modules_to_save.default.{parameter}"
        assert kit.max_diff(grad, peft_grads[key]) <= 1e-5, name
    exit_update = [n for n in peft_grads if "layers.1.shadow_update" in n]
    assert not exit_update  # peft never trains the exit block's update either


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    assert kit.peft_loads_ours("shadow", tmp_path, OPTION_RUNS[run]).diff <= 1e-5


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    task, model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(peft.ShadowConfig, task, tmp_path, model_name, merges=False, **options)
    assert result.method == "shadow" and result.loaded <= 1e-5


@pytest.mark.slow
def test_accumulated_window_equals_one_batch(tmp_path):
    """The auxiliary loss is summed and normalised over the window's targets with the task loss: two
    micro-batches of one row give the gradients of the one batch of both rows."""
    built = kit.build("shadow", tmp_path, ["method.shadow_dropout=0.0", "method.auxiliary_loss_weight=0.5"])
    kit.perturb(built.model)
    built.model.train()
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    rows = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2)]
    _, _, whole = kit.window_gradients(built.model, built.method, [batch])
    _, _, split = kit.window_gradients(built.model, built.method, rows)
    assert whole.keys() == split.keys()
    assert max(kit.max_diff(whole[k], split[k]) for k in whole) <= 1e-6


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    """The frozen blocks recompute inside the wrappers; the injection, the update and the shadow
    backbone's graph are kept: the same window gradients with and without checkpointing."""
    grads = []
    for checkpointing in ("false", "true"):
        overrides = [f"model.gradient_checkpointing={checkpointing}", "method.shadow_dropout=0.0"]
        built = kit.build("shadow", tmp_path / checkpointing, overrides)
        kit.perturb(built.model)
        built.model.train()
        batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
        grads.append(kit.window_gradients(built.model, built.method, [batch])[2])
    assert built.model.is_gradient_checkpointing and grads[0].keys() == grads[1].keys()
    assert max(kit.max_diff(grads[0][k], grads[1][k]) for k in grads[0]) <= 1e-6


def projected_checkpoint(path) -> str:
    """A "projected" shadow checkpoint as peft reads it: a 32-wide qwen2 backbone's config inside a
    ``causal_lm_with_hidden_projection`` config, its weights under ``shadow_model.`` and a trained
    32 → 64 ``shadow_hidden_projection``."""
    import json

    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(4)
    inner = Qwen2Config(
        vocab_size=kit.tiny("llama").config.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    weights = {f"shadow_model.{k}": v.contiguous() for k, v in Qwen2Model(inner).state_dict().items()}
    weights["shadow_hidden_projection.weight"] = torch.randn(64, 32) * 0.1
    path.mkdir()
    save_file(weights, path / "model.safetensors")
    config = {"model_type": "causal_lm_with_hidden_projection", "shadow_model_config": inner.to_dict()}
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["auto-model", "projected"])
def test_pretrained_shadow_backbones_both_ways(kind, tmp_path):
    """``shadow_model`` as a model directory (tiny:qwen2's, loaded by ``AutoModel``, beside a llama)
    or a projected shadow checkpoint: embeddings frozen, everything saved, peft's logits both ways."""
    from peftcli.tiny import ensure_tiny

    name = str(ensure_tiny("qwen2")) if kind == "auto-model" else projected_checkpoint(tmp_path / "shadow")
    ours = kit.peft_loads_ours("shadow", tmp_path / "ours", [f"method.shadow_model={name}"])
    assert ours.diff <= 1e-5
    backbone = ours.built.model.shadow_backbone
    assert not backbone.get_input_embeddings().weight.requires_grad
    theirs = kit.we_load_peft(
        peft.ShadowConfig, "causal_lm", tmp_path / "theirs", "tiny:llama", merges=False, shadow_model=name
    )
    assert theirs.method == "shadow" and theirs.loaded <= 1e-5


@pytest.mark.slow
def test_cached_decoding_equals_recompute(tmp_path):
    built = kit.build("shadow", tmp_path, ["method.init_weights=false"])
    kit.perturb(built.model, scale=0.3)
    prompts = [[40, 41, 42, 43, 44], [50, 51, 52]]
    cached = decode(built.model, prompts, 6, set(), 0, torch.device("cpu"))
    for prompt, tokens in zip(prompts, cached, strict=True):
        ids = list(prompt)
        for _ in range(6):
            with torch.no_grad():
                ids.append(
                    int(built.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
                )
        assert tokens == ids[len(prompt) :]
    generated = built.model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=6, do_sample=False)
    assert generated[0, len(prompts[0]) :].tolist() == cached[0]  # transformers' loop keeps the pairing too


@pytest.mark.slow
def test_adapter_disabled_runs_the_base(tmp_path):
    built = kit.build("shadow", tmp_path, ["method.init_weights=false"])
    kit.perturb(built.model)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    with built.method.adapter_disabled(built.model):
        off = kit.logits(built.model, batch)
    assert kit.max_diff(off, kit.logits(base, batch)) <= 1e-6
    assert kit.max_diff(kit.logits(built.model, batch), off) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["model.name=tiny:t5", "model.task=seq2seq"], "model.task", "decoder-only"),
        (["model.name=tiny:bert", *SEQ_CLS], "model.name", "BertForSequenceClassification has none"),
        (["method.shadow_model=/no/such/model"], "method.shadow_model", "cannot load '/no/such/model'"),
        (
            ["method.shadow_model=/some/model", "method.shadow_hidden_size=32"],
            "method.shadow_hidden_size",
            "sizes a mirror backbone",
        ),
        (
            ["method.target_modules=[model.layers.0]", "method.exclude_modules=[model.layers.0]"],
            "method.target_modules",
            "no decoder block",
        ),
        (["method.target_modules=[q_proj]"], "method.target_modules", "not a decoder block"),
        (
            ["objective.name=dpo", "data.format=preference"],
            "method.auxiliary_loss_weight",
            "objective dpo has none",
        ),
        (["model.quantization.bits=4"], "model.quantization", ""),
    ],
    ids=[
        "seq2seq",
        "encoder",
        "missing-backbone",
        "mirror-size-on-pretrained",
        "nothing-left",
        "not-a-block",
        "dpo",
        "4bit",
    ],
)
def test_what_cannot_work_is_refused_in_one_line(overrides, key, words, tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("shadow", tmp_path, overrides)
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_merge_is_refused_in_one_line(tmp_path):
    from peftcli.export import merge_adapter

    built = kit.build("shadow", tmp_path)
    adapter = kit.save(tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe)
    with pytest.raises(RecipeError) as err:
        merge_adapter(adapter, tmp_path / "merged")
    assert "shadow cannot be merged" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_blocks_must_be_contiguous():
    model = kit.tiny("llama")
    model.config.num_hidden_layers = 3  # a third block: 0 and 2 leave a gap
    model.model.layers.append(model.model.layers[1].__class__(model.config, 2))
    with pytest.raises(RecipeError) as err:
        Shadow(ShadowConfig(layers_to_transform=[0, 2])).attach(model)
    assert err.value.key == "method.layers_to_transform" and "not contiguous" in str(err.value)
