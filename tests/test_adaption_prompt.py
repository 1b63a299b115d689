"""Adaption prompt (LLaMA-Adapter) against the paper's equation and peft 0.21 as the oracle, fp32 on
the CPU:

- the equation: with one prompt vector the softmax over the prompt is 1 for every query, so an adapted
  attention's output is the frozen attention's plus ``g · W_o · W_v P`` (each key/value head repeated for
  its query group), ≤ 1e-6; at g = 0 (the init) it is the frozen attention's exactly;
- only the top ``adapter_layers`` attention modules are adapted, as peft picks them;
- with each option that changes the numbers (``adapter_len``, ``adapter_layers``), on tiny:mistral and
  on tiny:gpt2 (fused c_attn, the branch left unprojected as peft leaves it), our adapter loads in ``PeftModel.from_pretrained`` with our logits (≤ 1e-5) and holds exactly peft's
  keys and shapes; an adapter peft wrote loads in ``peftcli.export.load_adapter`` with peft's logits
  (≤ 1e-5);
- cached greedy decoding (the prompt branch on one new token at a time) equals decoding that reruns
  the whole sequence at every step;
- what cannot work is refused in one line at start: another family (qwen2), another task, more layers
  than the model has, and ``peftcli merge`` (no weight to fold a second attention branch into).
"""

from __future__ import annotations

import kit
import pytest
import torch
from safetensors.torch import load_file

from peftcli.evaluate import greedy_generate
from peftcli.export import merge_adapter
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

OPTION_RUNS = {
    "default": [],
    "adapter_len-adapter_layers": ["method.adapter_len=3", "method.adapter_layers=1"],
    "mistral": ["model.name=tiny:mistral"],
    "gpt2": ["model.name=tiny:gpt2", "method.adapter_layers=1"],  # fused c_attn, no output projection
}

# run id -> (model, peft AdaptionPromptConfig options)
PEFT_RUNS = {
    "llama": ("tiny:llama", {"adapter_len": 4, "adapter_layers": 2}),
    "llama-top-layer": ("tiny:llama", {"adapter_len": 10, "adapter_layers": 1}),
    "mistral": ("tiny:mistral", {"adapter_len": 6, "adapter_layers": 1}),
    "gpt2": ("tiny:gpt2", {"adapter_len": 4, "adapter_layers": 2}),
}


def top_attention(built: kit.Built):
    return built.model.get_submodule(built.method.targets[-1])


def attention_inputs(built: kit.Built, length: int = 7) -> dict:
    """Keyword arguments of a llama attention call: hidden states, rotary (cos, sin), causal mask."""
    model = built.model
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, length, model.config.hidden_size, generator=gen)
    positions = torch.arange(length).expand(2, -1)
    cos, sin = model.model.rotary_emb(hidden, positions)
    causal = torch.full((length, length), float("-inf")).triu(1).expand(2, 1, -1, -1)
    return {"hidden_states": hidden, "position_embeddings": (cos, sin), "attention_mask": causal}


def test_one_prompt_vector_adds_the_gated_projected_value(tmp_path):
    built = kit.build("adaption_prompt", tmp_path, ["method.adapter_len=1"])
    layer = top_attention(built)
    inputs = attention_inputs(built)
    with torch.no_grad():
        frozen = layer.base_layer(**inputs)[0]
        assert torch.equal(layer(**inputs)[0], frozen)  # g = 0: the base attention exactly
        layer.adaption_gate.fill_(0.7)
        layer.adaption_prompt.normal_()
        adapted = layer(**inputs)[0]
        attention = layer.base_layer
        value = attention.v_proj(layer.adaption_prompt[0, 0])  # (kv_heads · d)
        heads = built.model.config.num_attention_heads
        per_head = value.view(-1, attention.head_dim)
        value = per_head.repeat_interleave(heads // per_head.shape[0], dim=0).reshape(-1)
        expected = frozen + 0.7 * attention.o_proj(value)
    assert kit.max_diff(adapted, expected) <= 1e-6
    assert kit.max_diff(adapted, frozen) > 1e-3


def test_only_the_top_layers_are_adapted(tmp_path):
    built = kit.build("adaption_prompt", tmp_path, ["method.adapter_layers=1"])
    assert built.method.targets == ["model.layers.1.self_attn"]
    trained = sorted(n for n, p in built.model.named_parameters() if p.requires_grad)
    assert trained == ["model.layers.1.self_attn.adaption_gate", "model.layers.1.self_attn.adaption_prompt"]


@pytest.mark.parametrize("run", list(OPTION_RUNS))
def test_peft_loads_our_adapter_with_each_option(run, tmp_path):
    result = kit.peft_loads_ours("adaption_prompt", tmp_path, OPTION_RUNS[run])
    assert result.diff <= 1e-5
    ours = {
        k: tuple(v.shape)
        for k, v in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).items()
    }
    theirs = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(result.peft_model).items()}
    assert ours == theirs


@pytest.mark.parametrize("run", list(PEFT_RUNS))
def test_we_load_peft_adapters_with_each_option(run, tmp_path):
    model_name, options = PEFT_RUNS[run]
    result = kit.we_load_peft(
        peft.AdaptionPromptConfig, "causal_lm", tmp_path, model_name, merges=False, **options
    )
    assert result.method == "adaption_prompt" and result.loaded <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_generation_equals_recomputing_the_sequence(family, tmp_path):
    built = kit.build("adaption_prompt", tmp_path, [f"model.name=tiny:{family}"])
    kit.perturb(built.model, scale=0.5)  # the gates well open
    prompts = [[40, 41, 42, 43, 44], [50, 51, 52]]
    pad = built.tokenizer.pad_token_id
    cached = greedy_generate(built.model, prompts, 6, set(), pad, torch.device("cpu"))
    for prompt, tokens in zip(prompts, cached, strict=True):
        sequence = list(prompt)
        for _ in range(6):
            with torch.no_grad():
                logits = built.model(input_ids=torch.tensor([sequence])).logits
            sequence.append(int(logits[0, -1].argmax()))
        assert tokens == sequence[len(prompt) :]


@pytest.mark.parametrize(
    "overrides,key,words",
    [
        (["model.name=tiny:qwen2"], "method.name", "llama, mistral and gpt2 families"),
        (
            ["model.name=tiny:bert", "model.task=seq_cls", "data.format=classification"],
            "model.task",
            "decoder-only causal LMs",
        ),
        (["method.adapter_layers=3"], "method.adapter_layers", "has 2 layers"),
    ],
)
def test_what_cannot_work_is_refused_in_one_line(overrides, key, words, tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.build("adaption_prompt", tmp_path, overrides)
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value)


def test_merge_is_refused_in_one_line(tmp_path):
    built = kit.build("adaption_prompt", tmp_path, [])
    adapter = kit.save(tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe)
    with pytest.raises(RecipeError) as err:
        merge_adapter(adapter, tmp_path / "merged")
    assert "cannot be merged" in str(err.value) and "\n" not in str(err.value)
