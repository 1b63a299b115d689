"""X-LoRA (a classifier mixes frozen LoRA experts per token): peft parity both ways for each option that
changes results (≤ 1e-5, fp32), with experts written by peftcli (the tiny recipe's) and by peft; the
paper's mixture on one layer from the scalings (≤ 1e-6) and the classifier reading the scaling pass's
last hidden state (the base's, at scaling_pass_value 0); one-line refusals at start. Generation (no KV
cache: the whole sequence again at every step): our batched, left-padded greedy tokens equal peft's own
``generate`` on our adapter, prompt by prompt, ``peftcli generate`` writes those continuations, and GRPO
samples (a cached step would stop in one line).

peft 0.21's ``save_pretrained`` drops the classifier tensors whose names hold an expert's name (its
experts are named "0", "1", ..., so ``layers.0`` always goes, and at depth 1 the whole classifier): we
refuse such a file in one line, and check our loading on peft's file with those tensors put back.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import kit
import pytest
import torch
from kit.parity import max_diff
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.decoding import decode, eos_token_ids
from peftcli.export import load_adapter
from peftcli.methods.xlora import XLora
from peftcli.models import resolve_model_name
from peftcli.recipe import RecipeError
from peftcli.training.distributed import check_method
from peftcli.use.generate import prompt_ids
from peftcli.use.load import load_model_or_adapter

EXPERTS = kit.TINY / "xlora_experts"

# the options that change results (the tiny recipe: depth 2, layerwise scalings, dropout 0.1)
ROWS = {
    "depth1-broadcast-top1": [
        "method.xlora_depth=1",
        "method.layerwise_scalings=false",
        "method.top_k_lora=1",
        "method.enable_softmax_topk=true",
    ],
    "depth3-pass-value-weight-trainable": [
        "method.xlora_depth=3",
        "method.xlora_dropout_p=0",
        "method.scaling_pass_value=0.5",
        "method.global_scaling_weight=0.7",
        "method.enable_softmax=false",
        "method.use_trainable_adapters=true",
    ],
    # experts written by peft: other ranks, alphas, rsLoRA, other targets
    "peft-experts-temperature": ["method.softmax_temperature=0.5"],
}


def peft_experts(tmp_path) -> list[str]:
    """Two LoRA adapters written by peft on tiny:llama: ranks 2 and 3, rsLoRA on the second."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for n, (r, rslora) in enumerate(((2, False), (3, True))):
        torch.manual_seed(n)
        base = AutoModelForCausalLM.from_pretrained(resolve_model_name("tiny:llama"), dtype=torch.float32)
        options = {"r": r, "lora_alpha": 5, "use_rslora": rslora, "init_lora_weights": False}
        model = get_peft_model(base, LoraConfig(target_modules=["k_proj", "o_proj", "up_proj"], **options))
        model.save_pretrained(tmp_path / f"peft-expert-{n}")
        paths.append(str(tmp_path / f"peft-expert-{n}"))
    return paths


def overrides_for(row: str, tmp_path) -> list[str]:
    if not row.startswith("peft-experts"):
        return ROWS[row]
    first, second = peft_experts(tmp_path)
    return [*ROWS[row], f"method.adapters={{a: {first}, b: {second}}}"]


def classifier_of(peft_model) -> dict[str, torch.Tensor]:
    """peft's classifier tensors as peft names them in its adapter file."""
    return {
        k.replace("base_model.model.", "base_model."): v.detach().contiguous()
        for k, v in peft_model.state_dict().items()
        if "internal_xlora_classifier" in k
    }


@pytest.mark.slow
@pytest.mark.parametrize("row", list(ROWS))
def test_peft_loads_ours_and_we_load_peft(row, tmp_path):
    built = kit.build("xlora", tmp_path, overrides_for(row, tmp_path))
    kit.perturb(built.model, scale=0.5)  # the classifier (and the experts, where they train)
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    ours = kit.logits(built.model, batch)
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    assert max_diff(ours, kit.logits(base, batch)) > 1e-3
    adapter = kit.save(tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "XLORA" and list(config["adapters"]) == ["0", "1"]
    theirs = kit.load_in_peft(adapter, built.base_path)
    assert max_diff(ours, kit.peft_logits(theirs, batch)) <= 1e-5  # peft loads ours
    reloaded = load_adapter(adapter)  # the experts from the adapter's own subdirectories
    assert reloaded.method.cfg.adapters == {
        name: str(adapter / str(i)) for i, name in enumerate(built.recipe.method.adapters)
    }
    assert max_diff(ours, kit.logits(reloaded.model, batch)) <= 1e-6

    gen = torch.Generator().manual_seed(3)  # peft's classifier, moved: saved by peft, loaded by us
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "internal_xlora_classifier" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    expected = kit.peft_logits(theirs, batch)
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.raises(RecipeError, match="layers.0.weight is missing"):
        load_adapter(tmp_path / "peft")  # peft's file as written: its save dropped layers.0
    save_file(classifier_of(theirs), str(tmp_path / "peft" / "adapter_model.safetensors"))
    loaded = load_adapter(tmp_path / "peft")
    assert loaded.method.name == "xlora"
    assert max_diff(expected, kit.logits(loaded.model, batch)) <= 1e-5


def test_the_papers_mixture_on_one_layer(tmp_path):
    """y = W0 x + g Σ_n s_n B_n A_n (λ_n ⊙ x), λ kept to the top-k per token then renormalised."""
    built = kit.build("xlora", tmp_path, ["method.top_k_lora=1", "method.enable_softmax_topk=true"])
    layer = built.model.get_submodule("model.layers.1.self_attn.v_proj")
    state, n_layers = built.method.state, built.method.classifier().n_layers
    scalings = torch.rand(2, 5, n_layers, 2)
    state.current = scalings
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        got = layer(x)
    lam = scalings[:, :, layer.layer_number]
    top = (lam == lam.max(dim=-1, keepdim=True).values).float()  # top-1 renormalised: 1 on the largest
    want = layer.base_layer(x)
    for n, path in enumerate(("reverse", "upper")):
        weights = load_file(str(EXPERTS / path / "adapter_model.safetensors"))
        key = "base_model.model.model.layers.1.self_attn.v_proj.lora_{}.weight"
        a, b = weights[key.format("A")], weights[key.format("B")]
        want = want + (top[..., n : n + 1] * x) @ a.T @ b.T * (8 / 4)  # α/r of the tiny experts
    assert max_diff(got, want) <= 1e-6


@pytest.mark.slow
def test_the_classifier_reads_the_scaling_pass_hidden_state(tmp_path):
    """scaling_pass_value 0: the first pass is the base model, so the classifier sees its last hidden
    state, and the layers get softmax(classifier(h)) per token and layer."""
    built = kit.build("xlora", tmp_path)
    seen = {}
    classifier = built.method.classifier()
    classifier.register_forward_hook(lambda _m, args, out: seen.update(h=args[0], scalings=out))
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    kit.logits(built.model, batch)
    base = kit.base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    with torch.no_grad():
        h = base.model(**kit.inputs(batch), output_hidden_states=True).hidden_states[-1]
        want = classifier.layers(h).reshape(*h.shape[:2], classifier.n_layers, 2).softmax(dim=-1)
    assert max_diff(seen["h"], h) <= 1e-6
    assert max_diff(seen["scalings"], want) <= 1e-6


def houlsby_dir() -> str:
    return str(kit.TINY / "fusion_sources" / "reverse")


REFUSALS = {
    "missing-dir": (["method.adapters={a: /nonexistent/expert}"], "method.adapters.a", "no adapter_config"),
    "not-lora": ([f"method.adapters={{a: {houlsby_dir()}}}"], "method.adapters.a", "X-LoRA mixes LoRA"),
    "no-experts": (["method.adapters={}"], "method.adapters", "names no LoRA experts"),
    "top-k-over-n": (["method.top_k_lora=3"], "method.top_k_lora", "keeps 3 of 2"),
    "softmax-topk-alone": (["method.enable_softmax_topk=true"], "method.enable_softmax_topk", "top_k_lora"),
    "checkpointing": (["model.gradient_checkpointing=true"], "model.gradient_checkpointing", "scalings"),
    "seq_cls": (["model.task=seq_cls", "data.format=classification"], "model.task", "causal_lm"),
    "qlora": (["model.quantization={bits: 4}"], "model.quantization", "xlora"),
}


@pytest.mark.parametrize("row", list(REFUSALS))
def test_refusals_at_start_are_one_line(row, tmp_path):
    overrides, key, words = REFUSALS[row]
    with pytest.raises(RecipeError) as caught:
        kit.tiny_recipe("xlora", tmp_path, overrides)
    assert caught.value.key == key and words in str(caught.value) and "\n" not in str(caught.value)


def test_fsdp_is_refused_before_any_weights_load():
    with pytest.raises(RecipeError, match="method xlora cannot run under fsdp"):
        check_method(SimpleNamespace(mode="fsdp"), XLora)


def test_experts_with_other_targets_are_refused(tmp_path):
    """The classifier gives every adapted layer one scaling per expert: the experts' layers must agree."""
    weights = load_file(str(EXPERTS / "upper" / "adapter_model.safetensors"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text((EXPERTS / "upper" / "adapter_config.json").read_text())
    save_file(
        {k: v for k, v in weights.items() if "down_proj" not in k}, str(other / "adapter_model.safetensors")
    )
    reverse = EXPERTS / "reverse"
    with pytest.raises(RecipeError, match="adapt different modules") as caught:
        kit.tiny_recipe("xlora", tmp_path, [f"method.adapters={{a: {reverse}, b: {other}}}"])
    assert caught.value.key == "method.adapters.b"


def test_experts_on_the_output_head_are_refused(tmp_path):
    """The scalings live while the transformer body runs; the loss's chunked path runs the head after."""
    weights = load_file(str(EXPERTS / "reverse" / "adapter_model.safetensors"))
    weights["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
    weights["base_model.model.lm_head.lora_B.weight"] = torch.zeros(260, 4)
    head = tmp_path / "head"
    head.mkdir()
    (head / "adapter_config.json").write_text((EXPERTS / "reverse" / "adapter_config.json").read_text())
    save_file(weights, str(head / "adapter_model.safetensors"))
    with pytest.raises(RecipeError, match="lm_head, outside the transformer body"):
        kit.build("xlora", tmp_path, [f"method.adapters={{a: {head}, b: {head}}}"])


@pytest.mark.slow
def test_decoding_with_a_kv_cache_is_refused(tmp_path):
    """Each token's scalings come from a pass over the whole sequence: a cached step cannot have it."""
    built = kit.build("xlora", tmp_path)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        cache = built.model(input_ids=ids, use_cache=True).past_key_values
        with pytest.raises(RecipeError, match="KV cache"):
            built.model(input_ids=torch.tensor([[8]]), past_key_values=cache, use_cache=True)


# -- generation: the whole sequence at every step -------------------------------------------------

PROMPTS = ["reverse apple =", "hi", "upper grape =", "a longer prompt, so that the batch is ragged"]
STEPS = 12


@pytest.fixture(scope="module")
def moved_adapter(tmp_path_factory) -> tuple[Path, str]:
    """The tiny X-LoRA, its classifier moved off init, saved as training saves it; and its base."""
    tmp = tmp_path_factory.mktemp("xlora-generate")
    built = kit.build("xlora", tmp)
    kit.perturb(built.model, scale=0.5)
    return kit.save(
        tmp, built.model, built.method, built.tokenizer, built.base_path, built.recipe
    ), built.base_path


def peft_generate(peft_model, prompt: list[int], eos: set[int], pad: int) -> list[int]:
    """peft's X-LoRA ``generate`` (it turns the cache off) on one unpadded prompt, cut before EOS."""
    ids = torch.tensor([prompt])
    out = peft_model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=STEPS,
        do_sample=False,
        pad_token_id=pad,
    )
    new = out[0, len(prompt) :].tolist()
    return new[: next((i for i, t in enumerate(new) if t in eos), len(new))]


@pytest.mark.slow
def test_greedy_decoding_equals_peft_generate(moved_adapter):
    """Batched and left-padded, without a cache: each row's tokens are peft's for that prompt alone."""
    adapter, base_path = moved_adapter
    loaded = load_adapter(adapter)
    assert loaded.method.decodes_with_cache is False
    tokenizer = loaded.tokenizer
    prompts = [[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False).input_ids] for t in PROMPTS]
    eos, pad = eos_token_ids(loaded.model, tokenizer), tokenizer.pad_token_id
    ours = decode(loaded.model, prompts, STEPS, eos, pad, kit.CPU, use_cache=False)
    theirs = kit.load_in_peft(adapter, base_path)
    assert ours == [peft_generate(theirs, prompt, eos, pad) for prompt in prompts]
    assert sum(map(len, ours)) >= 20 and len({len(row) for row in ours}) > 1  # rows end at different steps
    base = kit.base_model(base_path, kit.tiny_recipe("xlora"), pad_token_id=pad)
    assert decode(base, prompts, STEPS, eos, pad, kit.CPU) != ours  # the experts change the tokens


def test_peftcli_generate_writes_the_decoded_continuations(moved_adapter, tmp_path):
    """``peftcli generate`` on the adapter decodes without a cache: its file holds decode's tokens; the
    cached path still stops in one line."""
    adapter, _ = moved_adapter
    rows = [{"prompt": text} for text in PROMPTS]
    inputs, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inputs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["generate", str(adapter), "-i", str(inputs), "-o", str(output), "--max-new-tokens", str(STEPS)]
    result = CliRunner().invoke(app, [*args, "--batch-size", "3"])  # a batch of 3, then one of 1
    assert result.exit_code == 0, result.output
    loaded = load_model_or_adapter(adapter)
    assert loaded.use_cache is False
    tokenizer = loaded.tokenizer
    prompts = [prompt_ids(tokenizer, row, "row") for row in rows]
    eos, pad = eos_token_ids(loaded.model, tokenizer), tokenizer.pad_token_id
    want = decode(loaded.model, prompts, STEPS, eos, pad, kit.CPU, use_cache=False)
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["completion"] for r in written] == [tokenizer.decode(t, skip_special_tokens=True) for t in want]
    assert [r["completion_tokens"] for r in written] == [len(t) for t in want]
    with pytest.raises(RecipeError, match="cannot decode with a KV cache"):
        decode(loaded.model, prompts, 2, eos, pad, kit.CPU)


@pytest.mark.slow
def test_grpo_rolls_out_without_a_cache(tmp_path, monkeypatch):
    """GRPO's sampling and its greedy eval take the method's path: a cached step would stop in one line."""
    from peftcli import api

    monkeypatch.chdir(kit.ROOT)
    grpo = [
        "objective.name=grpo",
        "objective.rewards=[{contains: answer}]",
        "objective.max_new_tokens=6",
        "data.format=prompt",
        "data.train=recipes/data/tiny_grpo_train.jsonl",
        "data.eval=recipes/data/tiny_grpo_eval.jsonl",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.log_every=1",
    ]
    result = api.train(kit.TINY / "xlora.yaml", overrides=[f"output_dir={tmp_path / 'run'}", *grpo])
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    lengths = [e["completion_length"] for e in logged if e["event"] == "train"]
    assert len(lengths) == 2 and all(0 < n <= 6 for n in lengths)
    assert result.eval_after["eval_examples"] == 12
