"""Evaluation: loss against transformers' own loss, accuracy, greedy decoding against ``generate``.

All in fp32 on the CPU with tiny randomly initialised models (fixed seed 0 in ``peftcli.tiny``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kit import CPU
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from peftcli.data.formats import encode_prompt
from peftcli.data.pipeline import DataBundle
from peftcli.evaluate import evaluate, greedy_generate
from peftcli.recipe import EvalConfig
from peftcli.tiny import ensure_tiny

M = -100


def load(arch: str, auto):
    path = ensure_tiny(arch)
    return auto.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def llama():
    return load("llama", AutoModelForCausalLM)


def bundle_of(examples: list[dict], eval_examples: list[dict] | None = None) -> DataBundle:
    return DataBundle(
        train=examples,
        eval=examples,
        eval_examples=eval_examples,
        label_names=None,
        stats={"max_length": 512},
    )


def test_causal_loss_matches_transformers(llama):
    model, tokenizer = llama
    short = {"input_ids": [1, 40, 41, 42, 43, 2], "labels": [M, M, M, 42, 43, 2]}
    long = {"input_ids": [1, 50, 51, 52, 53, 54, 55, 56, 2], "labels": [M, M, 51, 52, 53, 54, 55, 56, 2]}
    config = EvalConfig(batch_size=2, generate=False)

    # Reference: transformers' loss on one unpadded example (mean over its label tokens).
    def hf_loss(example: dict) -> float:
        return model(
            input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]])
        ).loss.item()

    metrics = evaluate(model, tokenizer, bundle_of([short]), "causal_lm", config, CPU)
    assert metrics["eval_loss"] == pytest.approx(hf_loss(short), abs=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-6)
    assert metrics["eval_examples"] == 1 and "exact_match" not in metrics

    # Token-weighted over a padded batch: 3 and 7 label tokens, not the mean of the two means.
    metrics = evaluate(model, tokenizer, bundle_of([short, long]), "causal_lm", config, CPU)
    expected = (3 * hf_loss(short) + 7 * hf_loss(long)) / 10
    assert metrics["eval_loss"] == pytest.approx(expected, abs=1e-5)
    assert metrics["eval_loss"] != pytest.approx((hf_loss(short) + hf_loss(long)) / 2, abs=1e-4)
    one_by_one = evaluate(
        model, tokenizer, bundle_of([short, long]), "causal_lm", EvalConfig(batch_size=1, generate=False), CPU
    )
    assert one_by_one["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-5)


def test_eval_restores_train_mode(llama):
    model, tokenizer = llama
    model.train()
    example = {"input_ids": [1, 40, 41, 2], "labels": [M, 40, 41, 2]}
    evaluate(model, tokenizer, bundle_of([example]), "causal_lm", EvalConfig(generate=False), CPU)
    assert model.training
    model.eval()
    evaluate(model, tokenizer, bundle_of([example]), "causal_lm", EvalConfig(generate=False), CPU)
    assert not model.training


def test_greedy_decode_matches_generate_on_padded_batches(llama):
    model, tokenizer = llama
    model.eval()
    prompts = [[1, 40, 41, 42, 43, 44, 45], [1, 70], [1, 80, 81, 82]]
    eos = {tokenizer.eos_token_id}
    ours = greedy_generate(model, prompts, 8, eos, tokenizer.pad_token_id, CPU)

    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention_mask = (
        torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]
    ).long()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    reference = []
    for row in out[:, width:].tolist():
        reference.append(row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row)
    assert ours == reference
    assert all(len(row) == 8 for row in ours if tokenizer.eos_token_id not in row)

    # EOS stops a row: with the first generated token declared EOS, rows end empty.
    first = {row[0] for row in ours}
    stopped = greedy_generate(model, prompts, 8, first, tokenizer.pad_token_id, CPU)
    assert stopped == [[], [], []]


def test_exact_match_scores_greedy_answers(llama):
    model, tokenizer = llama
    model.eval()
    prompts = ["2+2=", "the sky is", "hello"]
    answers = []
    for prompt in prompts:  # reference answers: what generate produces for each prompt alone
        ids = torch.tensor([encode_prompt(tokenizer, prompt, "causal_lm")])
        out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    eval_examples = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=False)]
    eval_examples[2]["answer"] = answers[2] + "wrong"
    examples = [{"input_ids": [1, 40, 41, 2], "labels": [M, 40, 41, 2]}] * 3
    config = EvalConfig(batch_size=3, max_new_tokens=5)
    metrics = evaluate(model, tokenizer, bundle_of(examples, eval_examples), "causal_lm", config, CPU)
    assert metrics["exact_match"] == pytest.approx(2 / 3) and metrics["generated_examples"] == 3

    # generate_fn replaces decoding; max_generate_examples caps how many are generated.
    seen = []

    def echo_answer(model, prompt_ids, max_new_tokens):
        seen.extend(prompt_ids)
        return [tokenizer(" " + answers[0] + " ", add_special_tokens=False)["input_ids"] for _ in prompt_ids]

    config = EvalConfig(batch_size=1, max_new_tokens=5, max_generate_examples=2)
    metrics = evaluate(
        model, tokenizer, bundle_of(examples, eval_examples), "causal_lm", config, CPU, echo_answer
    )
    assert metrics["exact_match"] == pytest.approx(1 / 2) and metrics["generated_examples"] == 2
    assert seen == [encode_prompt(tokenizer, p, "causal_lm") for p in prompts[:2]]


def test_seq_cls_loss_and_accuracy():
    model, tokenizer = load("bert", AutoModelForSequenceClassification)
    model.eval()
    texts = ["a fine film", "dull", "truly great fun", "not good at all"]
    examples = [{"input_ids": tokenizer(t)["input_ids"], "label": i % 2} for i, t in enumerate(texts)]
    # Reference: each example alone, unpadded.
    logits = torch.cat([model(input_ids=torch.tensor([e["input_ids"]])).logits for e in examples])  # (4, 2)
    labels = torch.tensor([e["label"] for e in examples])
    expected_accuracy = (logits.argmax(-1) == labels).float().mean().item()
    metrics = evaluate(model, tokenizer, bundle_of(examples), "seq_cls", EvalConfig(batch_size=3), CPU)
    assert metrics["accuracy"] == pytest.approx(expected_accuracy)
    assert metrics["eval_loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-5)
    assert metrics["eval_examples"] == 4 and "exact_match" not in metrics
    flipped = [dict(e, label=1 - e["label"]) for e in examples]
    flipped_accuracy = evaluate(model, tokenizer, bundle_of(flipped), "seq_cls", EvalConfig(), CPU)[
        "accuracy"
    ]
    assert flipped_accuracy == pytest.approx(1 - expected_accuracy)


def test_seq2seq_loss_and_exact_match():
    model, tokenizer = load("t5", AutoModelForSeq2SeqLM)
    model.eval()
    examples = [
        {"input_ids": tokenizer("2+2=")["input_ids"], "labels": tokenizer("4")["input_ids"]},
        {"input_ids": tokenizer("hello there")["input_ids"], "labels": tokenizer("hi you")["input_ids"]},
    ]
    hf = [
        model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss.item()
        for e in examples
    ]
    expected = (2 * hf[0] + 7 * hf[1]) / 9  # "4</s>" and "hi you</s>" label tokens
    prompts = ["2+2=", "hello there"]
    answers = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        answers.append(tokenizer.decode(out[0], skip_special_tokens=True))
    eval_examples = [{"prompt": prompts[0], "answer": answers[0]}, {"prompt": prompts[1], "answer": "nope"}]
    metrics = evaluate(
        model,
        tokenizer,
        bundle_of(examples, eval_examples),
        "seq2seq",
        EvalConfig(batch_size=2, max_new_tokens=4),
        CPU,
    )
    assert metrics["eval_loss"] == pytest.approx(expected, abs=1e-5)
    assert metrics["exact_match"] == pytest.approx(0.5) and metrics["generated_examples"] == 2
