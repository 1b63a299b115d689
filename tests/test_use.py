"""``peftcli generate`` and ``peftcli chat`` (peftcli/use/, peftcli/decoding.py).

References:
- greedy output: peft. Our adapters (made by peftcli on tiny:llama, weights moved off init) loaded by
  ``peft.PeftModel.from_pretrained``; greedy decoding through peft's forward over the whole sequence
  at every step (no cache), and peft's own ``generate`` where it works (LoRA; prefix tuning only on
  transformers < 5.24, whose ``generate`` passes its own ``cache`` and so drops peft's prefix). Token
  ids must be equal; our side decodes batched and left-padded with a KV cache.
- sampling: ``transformers``' TemperatureLogitsWarper + TopPLogitsWarper give the distribution we
  sample from (to 1e-6); the same seed gives the same file, a resumed file equals an uninterrupted one.
- chat: a piped two-turn conversation (with /system between the turns) gives, token for token, greedy
  decoding of the templated conversation by ``transformers``' ``generate`` on the same model.
All in fp32 on the CPU, fixed seeds.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from kit import CPU
from packaging.version import Version
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.data.formats import encode_prompt
from peftcli.decoding import Sampling, decode, eos_token_ids, nucleus_probabilities
from peftcli.recipe import RecipeError
from peftcli.tiny import ensure_tiny
from peftcli.use.chat import TextStream
from peftcli.use.generate import GenerateOptions, generate_file, prompt_ids
from peftcli.use.load import load_model_or_adapter

ROWS = [
    {"prompt": "reverse apple ="},
    {"prompt": "hi"},  # short: left-padded in the batch
    {"messages": [{"role": "user", "content": "hello there"}], "id": 7},
    {"prompt": "a longer prompt, so that the batch is ragged"},
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def base_dir() -> str:
    return str(ensure_tiny("llama"))


# -- greedy parity with peft ---------------------------------------------------------------------


def peft_greedy_by_recompute(peft_model, prompt: list[int], steps: int, eos: set[int]) -> list[int]:
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.tensor([sequence])
            token = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()
            if token.item() in eos:
                break
            sequence.append(token.item())
    return sequence[len(prompt) :]


def peft_generate(peft_model, prompt: list[int], steps: int, eos: set[int], pad: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = peft_model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=steps,
        do_sample=False,
        pad_token_id=pad,
    )
    new = out[0, len(prompt) :].tolist()
    return new[: next((i for i, t in enumerate(new) if t in eos), len(new))]


PEFT_GENERATE_KEEPS_PREFIX = Version(version("transformers")) < Version("5.24")


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,use_peft_generate", [("lora", True), ("prefix_tuning", PEFT_GENERATE_KEEPS_PREFIX)]
)
def test_greedy_generate_equals_peft(method, use_peft_generate, tmp_path):
    pytest.importorskip("peft")
    from kit import build, load_in_peft, perturb, save

    recipe, base_path, tokenizer, model, method_obj = build(method, tmp_path)
    perturb(model)
    adapter = save(tmp_path, model, method_obj, tokenizer, base_path, recipe)
    steps = 12

    output = tmp_path / "out.jsonl"
    summary = generate_file(
        adapter, write_rows(tmp_path / "in.jsonl", ROWS), output, GenerateOptions(steps, batch_size=4)
    )
    assert summary["generated"] == len(ROWS) and summary["already_written"] == 0

    loaded = load_model_or_adapter(adapter)
    prompts = [prompt_ids(loaded.tokenizer, row, "row") for row in ROWS]
    # Prompts are tokenized as training tokenized them: BOS, then the text (chat rows templated).
    assert prompts[0] == [
        tokenizer.bos_token_id,
        *tokenizer("reverse apple =", add_special_tokens=False).input_ids,
    ]
    templated = tokenizer.apply_chat_template(ROWS[2]["messages"], tokenize=False, add_generation_prompt=True)
    assert prompts[2] == encode_prompt(tokenizer, templated, "causal_lm")
    eos, pad = eos_token_ids(loaded.model, loaded.tokenizer), loaded.tokenizer.pad_token_id
    ours = decode(loaded.model, prompts, steps, eos, pad, CPU)  # batched, left-padded, KV cache

    peft_model = load_in_peft(adapter, base_path)
    reference = [peft_greedy_by_recompute(peft_model, prompt, steps, eos) for prompt in prompts]
    assert ours == reference
    if use_peft_generate:
        assert [peft_generate(peft_model, p, steps, eos, pad) for p in prompts] == reference

    written = read_rows(output)
    for row, record, tokens in zip(ROWS, written, reference, strict=True):
        assert {k: v for k, v in record.items() if k in row} == row  # the input row, as written
        assert record["completion"] == tokenizer.decode(tokens, skip_special_tokens=True)
        assert record["completion_tokens"] == len(tokens)
        assert record["prompt_tokens"] == len(prompt_ids(tokenizer, row, "row"))
        assert record["finish_reason"] == ("length" if len(tokens) == steps else "stop")


def test_decoding_without_a_cache_gives_the_cached_tokens(tmp_path):
    """decode's path for methods that cannot cache (X-LoRA) re-runs the whole left-padded sequence at every
    step; on a LoRA model its greedy tokens must be the cached path's, row for row."""
    from kit import build, perturb

    built = build("lora", tmp_path)
    perturb(built.model)
    widths: list[int] = []
    built.model.register_forward_pre_hook(
        lambda _module, _args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    prompts = [prompt_ids(built.tokenizer, row, "row") for row in ROWS]
    pad, steps, width = built.tokenizer.pad_token_id, 12, max(map(len, prompts))
    for eos in (eos_token_ids(built.model, built.tokenizer), set()):  # the callers' EOS; every step
        widths.clear()
        cached = decode(built.model, prompts, steps, eos, pad, CPU)
        cached_widths = list(widths)
        widths.clear()
        recomputed = decode(built.model, prompts, steps, eos, pad, CPU, use_cache=False)
        assert recomputed == cached
        assert cached_widths == [width] + [1] * (len(cached_widths) - 1)  # one new token over the cache
        assert widths == [width + i for i in range(len(cached_widths))]  # the whole sequence each step
    assert len(widths) == steps and all(len(row) == steps for row in cached)  # set(): all steps ran


# -- sampling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (0.5, 1e-6)])
def test_sampling_distribution_equals_transformers_warpers(temperature, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0)) * 3
    scores = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    reference = torch.softmax(scores, dim=-1)
    ours = nucleus_probabilities(logits, temperature, top_p)
    assert torch.allclose(ours, reference, atol=1e-6)
    if top_p == 1e-6:  # a vanishing nucleus keeps only the argmax: sampling is greedy
        assert torch.equal(ours.argmax(-1), logits.argmax(-1)) and torch.all(ours.max(-1).values == 1)


@pytest.mark.slow
def test_seeded_sampling_repeats_and_resumes_after_a_crash(base_dir, tmp_path):
    inputs = write_rows(tmp_path / "in.jsonl", ROWS)
    options = GenerateOptions(max_new_tokens=4, temperature=1.0, top_p=0.95, batch_size=2, seed=7)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    generate_file(base_dir, inputs, first, options)
    generate_file(base_dir, inputs, second, options)
    assert first.read_bytes() == second.read_bytes()  # same seed, same file
    other = tmp_path / "c.jsonl"
    generate_file(base_dir, inputs, other, GenerateOptions(4, 1.0, 0.95, 2, seed=8))
    assert [r["completion"] for r in read_rows(other)] != [r["completion"] for r in read_rows(first)]

    # A crash after two rows, mid-way through the third line: the rerun keeps the two, drops the
    # partial line and writes what an uninterrupted run wrote (draws are per row, not per batch).
    full = first.read_bytes()
    lines = full.splitlines(keepends=True)
    crashed = tmp_path / "crashed.jsonl"
    crashed.write_bytes(b"".join(lines[:2]) + lines[2][:20])
    summary = generate_file(base_dir, inputs, crashed, GenerateOptions(4, 1.0, 0.95, batch_size=1, seed=7))
    assert summary["already_written"] == 2 and summary["generated"] == len(ROWS) - 2
    assert crashed.read_bytes() == full
    # A finished file is left alone, without loading the model.
    assert generate_file("no/such/model", inputs, crashed, options)["generated"] == 0


def test_greedy_is_the_zero_temperature_and_ignores_the_seed(base_dir, tmp_path):
    inputs = write_rows(tmp_path / "in.jsonl", ROWS)
    outputs = []
    for seed in (0, 1):
        path = tmp_path / f"greedy{seed}.jsonl"
        args = ["generate", base_dir, "-i", str(inputs), "-o", str(path), "--max-new-tokens", "4", "--json"]
        result = CliRunner().invoke(app, [*args, "--seed", str(seed)])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["generated"] == summary["rows"] == len(ROWS) and summary["already_written"] == 0
        outputs.append(path.read_bytes())
    assert outputs[0] == outputs[1]
    loaded = load_model_or_adapter(base_dir)
    prompts = [prompt_ids(loaded.tokenizer, row, "row") for row in ROWS]
    eos = eos_token_ids(loaded.model, loaded.tokenizer)
    one_by_one = [decode(loaded.model, [p], 4, eos, 0, CPU, Sampling())[0] for p in prompts]
    assert [r["completion_tokens"] for r in read_rows(tmp_path / "greedy0.jsonl")] == list(
        map(len, one_by_one)
    )
    texts = [loaded.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in one_by_one]
    assert [r["completion"] for r in read_rows(tmp_path / "greedy0.jsonl")] == texts


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines,needles",
    [
        (['{"prompt": "a"}', "{not json"], ["line 2", "is not valid JSON"]),
        (['{"prompt": "a"}', '{"text": "b"}'], ["line 2", "neither a 'prompt' string nor 'messages'"]),
        (['{"messages": [{"role": "robot", "content": "x"}]}'], ["line 1", "role 'robot'"]),
        (['{"prompt": "a", "completion": "b"}'], ["line 1", "already has 'completion'"]),
    ],
)
def test_bad_input_is_one_line_naming_file_and_line(lines, needles, base_dir, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(
        app, ["generate", base_dir, "--input", str(path), "--output", str(tmp_path / "o.jsonl")]
    )
    out = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(out) == 1 and out[0].startswith("error: --input") and str(path) in out[0]
    for needle in needles:
        assert needle in out[0]
    assert not (tmp_path / "o.jsonl").exists()


def test_output_of_other_input_is_refused_not_overwritten(base_dir, tmp_path):
    inputs = write_rows(tmp_path / "in.jsonl", ROWS[:2])
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps({"prompt": "something else", "completion": "x"}) + "\n")
    with pytest.raises(RecipeError, match="line 1 is not the output of input row 1"):
        generate_file(base_dir, inputs, output, GenerateOptions(max_new_tokens=2))
    assert read_rows(output) == [{"prompt": "something else", "completion": "x"}]
    with pytest.raises(RecipeError, match="--temperature"):
        generate_file(base_dir, inputs, tmp_path / "n.jsonl", GenerateOptions(temperature=-1))


# -- chat -----------------------------------------------------------------------------------------


def test_text_stream_adds_up_to_the_final_decode():
    tokenizer = load_model_or_adapter(ensure_tiny("llama")).tokenizer
    text = "héllo → wörld"
    ids = tokenizer(text, add_special_tokens=False).input_ids  # multi-byte characters span tokens
    pieces: list[str] = []
    stream = TextStream(tokenizer, pieces.append, {tokenizer.eos_token_id})
    for token in [*ids, tokenizer.eos_token_id, 65]:
        stream.add([token])
    stream.finish(tokenizer.decode(ids))
    assert "".join(pieces) == text and all("\ufffd" not in piece for piece in pieces)
    assert stream.tokens == ids  # nothing after EOS


def test_piped_chat_equals_greedy_decoding_of_the_templated_conversation(base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = 8
    result = CliRunner().invoke(
        app,
        ["chat", base_dir, "--max-new-tokens", str(steps)],
        input="hello there\n/system You answer briefly.\nand again?\n",
    )
    assert result.exit_code == 0, result.output

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    eos = tokenizer.eos_token_id

    def greedy(messages: list[dict]) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([encode_prompt(tokenizer, text, "causal_lm")])
        out = model.generate(input_ids=ids, max_new_tokens=steps, do_sample=False, pad_token_id=0)
        new = out[0, ids.shape[1] :].tolist()
        return new[: new.index(eos)] if eos in new else new

    first = greedy([{"role": "user", "content": "hello there"}])
    first_text = tokenizer.decode(first, skip_special_tokens=True)
    second = greedy(
        [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": first_text},
            {"role": "user", "content": "and again?"},
        ]
    )
    expected = first_text + "\n" + tokenizer.decode(second, skip_special_tokens=True) + "\n"
    assert result.stdout == expected

    from peftcli.api import chat

    turns = chat(
        base_dir,
        ["hello there", "/system You answer briefly.", "and again?"],
        lambda t: None,
        options=GenerateOptions(max_new_tokens=steps),
    )
    assert [turn.reply_ids for turn in turns] == [first, second]
    turns = chat(
        base_dir,
        ["hello there", "/reset", "hello there", "/exit", "never read"],
        lambda t: None,
        options=GenerateOptions(max_new_tokens=steps),
    )
    assert [turn.reply_ids for turn in turns] == [first, first]  # /reset: the same first turn again
