"""Data stage: loaders, formats, loss masks, truncation, splits, collation and resumable batching.

Expected label arrays are built by hand from the tiny byte-level tokenizer (one token per byte,
``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2), never by calling the code under test.
"""

from __future__ import annotations

import json

import kit
import pytest
import torch
from kit import DATA

from peftcli.data.collate import collate
from peftcli.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, infer_label_names
from peftcli.data.pipeline import load_data, split_eval
from peftcli.data.sampler import BatchSampler
from peftcli.data.sources import load_records
from peftcli.recipe import DataConfig, RecipeError

PAD, BOS, EOS, M = 0, 1, 2, -100


@pytest.fixture(scope="module")
def llama_tok():
    return kit.tokenizer("llama")


@pytest.fixture(scope="module")
def bert_tok():
    return kit.tokenizer("bert")


@pytest.fixture(scope="module")
def t5_tok():
    return kit.tokenizer("t5")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

ROWS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]


def test_tiny_tokenizer_is_byte_level(llama_tok):
    # printable ASCII sits at ord - 29 after the 4 specials (ByteLevel's alphabet order)
    assert llama_tok("hi", add_special_tokens=False)["input_ids"] == [ord("h") - 29, ord("i") - 29]
    assert llama_tok("hi")["input_ids"] == [ord("h") - 29, ord("i") - 29]  # adds no BOS itself


def test_every_file_format_gives_the_same_records(tmp_path):
    import datasets
    import pyarrow
    import pyarrow.parquet

    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": ROWS}))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in ROWS))
    kit.write_jsonl(tmp_path / "rows.jsonl", ROWS)
    (tmp_path / "rows.csv").write_text("prompt,completion\na,b\nc,d\n")
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(ROWS), tmp_path / "rows.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    for name in [
        "list.json",
        "wrapped.json",
        "lines.json",
        "rows.jsonl",
        "rows.csv",
        "rows.parquet",
        "saved",
        "saved_dict",
    ]:
        assert load_records(str(tmp_path / name), "train", "data.train") == ROWS, name

    with pytest.raises(RecipeError) as err:
        load_records(str(tmp_path / "saved_dict"), "validation", "data.eval")
    assert err.value.key == "data.eval_split" and "available splits: train" in str(err.value)


def test_missing_file_and_empty_file_errors(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_records("data/nope.jsonl", "train", "data.train")
    assert err.value.key == "data.train"
    assert err.value.message == "file not found: data/nope.jsonl" and "check the path" in err.value.hint
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(RecipeError, match="no examples") as err:
        load_records(str(tmp_path / "empty.jsonl"), "train", "data.eval")
    assert err.value.key == "data.eval"


def test_unreachable_hub_dataset_is_a_recipe_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/name' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RecipeError) as err:
        load_records("org/name", "train", "data.train")  # one slash, no suffix: a hub id
    assert err.value.key == "data.train"
    assert "not found or the hub cannot be reached" in err.value.message
    with pytest.raises(RecipeError, match="hub cannot be reached"):
        load_records("org/ds-1.5", "train", "data.train")  # a dot in a hub id is not a file suffix


# --------------------------------------------------------------------------------------------
# Formats and masks
# --------------------------------------------------------------------------------------------


def test_completion_mask_with_column_mapping(llama_tok):
    cfg = DataConfig(
        train=str(DATA / "completion.jsonl"),
        format="completion",
        columns={"prompt": "question", "completion": "answer"},
    )
    bundle = load_data(cfg, llama_tok, "causal_lm")
    prompt, answer = kit.ids(llama_tok, "2+2="), kit.ids(llama_tok, "4")
    assert bundle.train[0] == {"input_ids": [BOS, *prompt, *answer, EOS], "labels": [M] * 5 + [*answer, EOS]}
    assert bundle.eval is None and bundle.eval_examples is None and bundle.label_names is None
    assert bundle.stats["train_examples"] == 4
    assert bundle.stats["train_tokens"] == sum(len(e["input_ids"]) for e in bundle.train)

    cfg.train_on_prompt, cfg.add_eos = True, False
    example = load_data(cfg, llama_tok, "causal_lm").train[0]
    assert example["input_ids"] == [BOS, *prompt, *answer] and example["labels"] == example["input_ids"]


def test_missing_column_errors(llama_tok):
    cfg = DataConfig(train=str(DATA / "completion.jsonl"), format="completion")
    with pytest.raises(RecipeError) as err:
        load_data(cfg, llama_tok, "causal_lm")
    assert err.value.key == "data.columns"
    assert err.value.message == "column 'prompt' not found in data.train (columns: question, answer)"
    assert err.value.hint == "map it with data.columns: {prompt: <your column>}"

    cfg.columns = {"prompt": "query", "completion": "answer"}
    with pytest.raises(RecipeError) as err:
        load_data(cfg, llama_tok, "causal_lm")
    assert err.value.key == "data.columns.prompt" and "column 'query' not found" in err.value.message

    cfg.columns = {"promt": "question"}
    with pytest.raises(RecipeError) as err:
        load_data(cfg, llama_tok, "causal_lm")
    assert err.value.key == "data.columns.promt" and err.value.hint == "did you mean 'prompt'?"


def test_text_format_trains_every_token(llama_tok):
    bundle = load_data(DataConfig(train=str(DATA / "text.jsonl")), llama_tok, "causal_lm")
    expected = [BOS, *kit.ids(llama_tok, "the quick brown fox"), EOS]
    assert bundle.train[0] == {"input_ids": expected, "labels": expected}


def test_instruction_format_uses_alpaca_template(llama_tok):
    bundle = load_data(
        DataConfig(
            train=str(DATA / "instruction.json"), format="instruction", eval=str(DATA / "instruction.json")
        ),
        llama_tok,
        "causal_lm",
    )
    with_input = ALPACA_PROMPT.format(instruction="Add the numbers.", input="2 and 3")
    assert with_input.endswith("### Input:\n2 and 3\n\n### Response:\n")
    prompt, answer = kit.ids(llama_tok, with_input), kit.ids(llama_tok, "5")
    assert bundle.train[0]["input_ids"] == [BOS, *prompt, *answer, EOS]
    assert bundle.train[0]["labels"] == [M] * (1 + len(prompt)) + [*answer, EOS]
    no_input = ALPACA_PROMPT_NO_INPUT.format(instruction="Say hello.")  # empty input: no Input section
    assert "### Input" not in no_input
    assert bundle.eval_examples == [
        {"prompt": with_input, "answer": "5"},
        {"prompt": no_input, "answer": "Hello!"},
    ]


def test_chat_masks_every_assistant_turn(llama_tok):
    bundle = load_data(
        DataConfig(train=str(DATA / "chat.jsonl"), format="chat", eval=str(DATA / "chat.jsonl")),
        llama_tok,
        "causal_lm",
    )
    # template: "<|role|>\n" + content (+ "</s>" for the assistant) + "\n"; BOS is prepended as the template
    # lacks it. An assistant span runs to where the rendered turn ends, so it includes the turn's "\n".
    user1, turn1 = kit.ids(llama_tok, "<|user|>\nhi\n<|assistant|>\n"), kit.ids(llama_tok, "hello")
    user2, turn2 = kit.ids(llama_tok, "<|user|>\nbye\n<|assistant|>\n"), kit.ids(llama_tok, "ciao")
    newline = kit.ids(llama_tok, "\n")
    assert bundle.train[0]["input_ids"] == [BOS, *user1, *turn1, EOS, *newline, *user2, *turn2, EOS, *newline]
    assert bundle.train[0]["labels"] == (
        [M] * (1 + len(user1)) + [*turn1, EOS, *newline] + [M] * len(user2) + [*turn2, EOS, *newline]
    )
    assert bundle.eval_examples[0] == {
        "prompt": "<|user|>\nhi\n<|assistant|>\nhello</s>\n<|user|>\nbye\n<|assistant|>\n",
        "answer": "ciao",
    }
    system = kit.ids(llama_tok, "<|system|>\nbe brief\n<|user|>\nname?\n<|assistant|>\n")
    assert bundle.train[1]["labels"] == [M] * (1 + len(system)) + [*kit.ids(llama_tok, "Tiny"), EOS, *newline]


def test_classification_labels_and_pairs(bert_tok, tmp_path):
    cfg = DataConfig(
        train=str(DATA / "classification.csv"), format="classification", columns={"text": "sentence"}
    )
    bundle = load_data(cfg, bert_tok, "seq_cls")
    assert bundle.label_names == ["neg", "pos"]
    assert [e["label"] for e in bundle.train] == [1, 0, 1, 0]
    cls, sep = bert_tok.cls_token_id, bert_tok.sep_token_id
    assert bundle.train[0]["input_ids"] == [cls, *kit.ids(bert_tok, "a fine film"), sep]

    assert infer_label_names([2, 10, 1]) == ["1", "2", "10"]  # numeric order, not string order
    path = kit.write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"text": "a", "text_pair": "b", "label": 10}, {"text": "c", "text_pair": "d", "label": 9}],
    )
    bundle = load_data(DataConfig(train=path, format="classification"), bert_tok, "seq_cls")
    assert bundle.label_names == ["9", "10"] and [e["label"] for e in bundle.train] == [1, 0]
    a, b = kit.ids(bert_tok, "a"), kit.ids(bert_tok, "b")
    assert bundle.train[0]["input_ids"] == [cls, *a, sep, *b, sep]

    bad = kit.write_jsonl(tmp_path / "bad.jsonl", [{"text": "e", "label": 7}])
    with pytest.raises(RecipeError, match="label '7' is not one of the training labels"):
        load_data(DataConfig(train=path, eval=bad, format="classification"), bert_tok, "seq_cls")


def test_seq2seq_targets_end_in_eos(t5_tok):
    cfg = DataConfig(
        train=str(DATA / "completion.jsonl"),
        format="completion",
        columns={"prompt": "question", "completion": "answer"},
    )
    bundle = load_data(cfg, t5_tok, "seq2seq")
    t5_eos = t5_tok.eos_token_id
    assert bundle.train[1] == {
        "input_ids": [*kit.ids(t5_tok, "capital of France?"), t5_eos],
        "labels": [*kit.ids(t5_tok, "Paris"), t5_eos],
    }

    cfg.max_length = 8  # truncation keeps the closing EOS on both sides
    bundle = load_data(cfg, t5_tok, "seq2seq")
    assert bundle.train[1]["input_ids"] == [*kit.ids(t5_tok, "capital"), t5_eos]
    assert bundle.stats["train_truncated"] == 2  # "capital of France?" and "color of the sky?"


def test_format_must_fit_the_task(llama_tok):
    with pytest.raises(RecipeError) as err:
        load_data(DataConfig(train=str(DATA / "text.jsonl")), llama_tok, "seq2seq")
    assert err.value.key == "data.format"


# --------------------------------------------------------------------------------------------
# Truncation, splits, limits
# --------------------------------------------------------------------------------------------


def test_truncation_is_counted_and_answerless_examples_dropped(llama_tok, tmp_path):
    path = kit.write_jsonl(
        tmp_path / "long.jsonl",
        [
            {"prompt": "ab", "completion": "cd"},  # 1 + 2 + 2 + 1 = 6 tokens: fits
            {"prompt": "abcd", "completion": "efghij"},  # 12 tokens: cut to 8, answer partly kept
            {"prompt": "abcdefghij", "completion": "k"},  # the answer is cut away entirely: dropped
        ],
    )
    bundle = load_data(DataConfig(train=path, format="completion", max_length=8), llama_tok, "causal_lm")
    assert bundle.stats | {"train_tokens": None} == {
        "train_examples": 2,
        "eval_examples": 0,
        "train_tokens": None,
        "train_truncated": 2,
        "eval_truncated": 0,
        "train_dropped": 1,
        "eval_dropped": 0,
        "max_length": 8,
    }
    assert bundle.stats["train_tokens"] == 6 + 8
    assert bundle.train[1]["labels"] == [M] * 5 + kit.ids(llama_tok, "efg")


def test_eval_fraction_split_is_deterministic(llama_tok, tmp_path):
    path = kit.write_jsonl(tmp_path / "ten.jsonl", [{"text": f"row {i}"} for i in range(10)])

    def split(seed: int) -> tuple[list[str], list[str]]:
        cfg = DataConfig(train=path, eval_fraction=0.3, shuffle_seed=seed)
        bundle = load_data(cfg, llama_tok, "causal_lm")

        def decode(examples):
            return [llama_tok.decode(e["input_ids"], skip_special_tokens=True) for e in examples]

        return decode(bundle.train), decode(bundle.eval)

    train, held_out = split(0)
    assert len(held_out) == 3 and sorted(train + held_out) == sorted(f"row {i}" for i in range(10))
    assert split(0) == (train, held_out)
    assert split(1)[1] != held_out  # a different seed holds out different rows
    generator = torch.Generator().manual_seed(0)
    reference = sorted(torch.randperm(10, generator=generator)[:3].tolist())
    assert held_out == [f"row {i}" for i in reference] and split_eval(10, 0.3, 0)[1] == reference

    cfg = DataConfig(train=path, eval_fraction=0.3, max_train_examples=2, max_eval_examples=1)
    bundle = load_data(cfg, llama_tok, "causal_lm")
    assert (len(bundle.train), len(bundle.eval)) == (2, 1)


# --------------------------------------------------------------------------------------------
# Collation and batching
# --------------------------------------------------------------------------------------------


def test_collate_pads_right(llama_tok, bert_tok):
    batch = collate(
        [{"input_ids": [1, 5, 6], "labels": [M, 5, 6]}, {"input_ids": [1, 7], "labels": [M, 7]}],
        llama_tok,
        "causal_lm",
    )
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[M, 5, 6], [M, 7, M]]
    assert all(t.dtype == torch.long for t in batch.values())

    batch = collate(
        [{"input_ids": [4], "labels": [9, 9, 1]}, {"input_ids": [4, 5], "labels": [1]}], llama_tok, "seq2seq"
    )
    assert batch["input_ids"].tolist() == [[4, PAD], [4, 5]] and batch["labels"].tolist() == [
        [9, 9, 1],
        [1, M, M],
    ]

    batch = collate(
        [{"input_ids": [2, 8, 3], "label": 1}, {"input_ids": [2, 3], "label": 0}], bert_tok, "seq_cls"
    )
    assert batch["labels"].tolist() == [1, 0] and batch["input_ids"].tolist() == [[2, 8, 3], [2, 3, 0]]


def test_batch_sampler_is_deterministic_and_resumable():
    sampler = BatchSampler(10, 3, seed=7)
    assert len(sampler) == 4
    epoch0 = sampler.epoch_batches(0)
    order = [i for batch in epoch0 for i in batch]
    assert [len(b) for b in epoch0] == [3, 3, 3, 1] and sorted(order) == list(range(10))
    generator = torch.Generator().manual_seed(7)
    assert order == torch.randperm(10, generator=generator).tolist()
    assert BatchSampler(10, 3, seed=7).epoch_batches(0) == epoch0
    assert sampler.epoch_batches(1) != epoch0 and BatchSampler(10, 3, seed=8).epoch_batches(0) != epoch0
    assert BatchSampler(10, 3, seed=7, drop_last=True).epoch_batches(0) == epoch0[:3]

    # A run stopped after batch 2 of epoch 1 and resumed from (1, 2) sees the uninterrupted order.
    full = [b for epoch in range(3) for b in sampler.epoch_batches(epoch)]
    before = sampler.epoch_batches(0) + sampler.epoch_batches(1)[:2]
    resumed = BatchSampler(10, 3, seed=7)
    after = resumed.epoch_batches(1)[2:] + resumed.epoch_batches(2)
    assert before + after == full
