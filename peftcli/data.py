"""Training data: load records, render a format, tokenize, mask the loss, collate, batch.

The pipeline is plain Python over lists of dicts (fine-tuning sets are small), so nothing is cached
to disk and every step can be checked by hand:

    load_records ──► split (data.eval or eval_fraction) ──► render format ──► tokenize + mask ──► collate
     jsonl/json/csv/      deterministic, seeded by             text, completion,     labels = -100 where
     parquet/saved dir/   data.shuffle_seed                    instruction (alpaca), no loss is taken
     hub dataset id                                            chat, classification

Tokenized examples, by task:

* ``causal_lm``: ``{"input_ids": [...], "labels": [...]}``. ``labels`` equals ``input_ids`` with the
  positions that carry no loss set to -100, *unshifted*: Hugging Face causal LMs shift internally.
  The prompt and the answer are tokenized separately and concatenated, so the mask boundary falls
  exactly between them (tokenizing the joined string could merge a token across the boundary).
* ``seq2seq``: ``{"input_ids": encoder ids, "labels": target ids}``.
* ``seq_cls``: ``{"input_ids": [...], "label": class index}``.

Batches come from :class:`BatchSampler`, whose order is a pure function of ``(seed, epoch)``, so a
run resumes at ``epoch_batches(epoch)[batch_index:]`` and sees exactly the batches it would have.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftcli.recipe import DataConfig, RecipeError, did_you_mean

IGNORE_INDEX = -100  # cross_entropy's default ignore_index: positions that carry no loss

# The Alpaca template (Taori et al., 2023, github.com/tatsu-lab/stanford_alpaca), verbatim, so
# adapters trained here prompt the same way as the many Alpaca-style checkpoints. The prompt is
# everything up to and including "### Response:\n"; the answer is the ``output`` column.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# Our column names per format: required first, then optional ones.
FORMAT_COLUMNS: dict[str, tuple[list[str], list[str]]] = {
    "text": (["text"], []),
    "completion": (["prompt", "completion"], []),
    "instruction": (["instruction", "output"], ["input"]),
    "chat": (["messages"], []),
    "classification": (["text", "label"], ["text_pair"]),
}

# Which formats each task can train on.
TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "causal_lm": ("text", "completion", "instruction", "chat"),
    "seq2seq": ("completion", "instruction"),
    "seq_cls": ("classification",),
}

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Suffixes that mark a missing local file rather than a hub id (hub ids may contain dots: "org/ds-1.5").
_FILE_LIKE_SUFFIXES = (*FILE_SUFFIXES, ".txt", ".tsv", ".arrow", ".gz", ".zip", ".yaml", ".yml")


@dataclass
class DataBundle:
    """Everything the training loop and evaluation need from the data stage."""

    train: list[dict]
    eval: list[dict] | None
    # Per eval example, for generation metrics: {"prompt", "answer"} (completion, instruction, chat)
    # or {"text", "label"} (classification); None for the text format, which has no answers.
    eval_examples: list[dict] | None
    label_names: list[str] | None  # classification: class index -> name
    stats: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Loading records
# --------------------------------------------------------------------------------------------


def _looks_like_local_path(source: str) -> bool:
    """True when ``source`` was meant as a file or directory rather than a hub id like ``org/name``.

    A hub id has at most one slash and no file suffix, so a plain ``org/name`` still goes to the hub.
    """
    return (
        source.lower().endswith(_FILE_LIKE_SUFFIXES)
        or ("/" not in source and Path(source).suffix != "")
        or source.startswith(("/", ".", "~"))
        or source.count("/") >= 2
        or "\\" in source
    )


def _read_json(path: Path, key: str) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # not one JSON document: read it as JSON lines below
        if isinstance(data, list):
            return data
        if isinstance(data, dict):
            if isinstance(data.get("data"), list):
                return data["data"]
            raise RecipeError(
                key,
                f"{path} is a JSON object without a 'data' list",
                'use a list of objects, {"data": [...]}, or one object per line (.jsonl)',
            )
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise RecipeError(
                key, f"{path} line {number} is not valid JSON: {err.msg}", "write one JSON object per line"
            ) from None
    return records


def _from_datasets(data: Any, source: str, split: str, key: str) -> list[dict]:
    """Turn a ``datasets`` Dataset or DatasetDict into a list of dicts (picking ``split``)."""
    import datasets

    if isinstance(data, datasets.DatasetDict):
        splits = list(data.keys())
        if split not in splits:
            hint = did_you_mean(split, splits) or f"available splits: {', '.join(splits)}"
            split_key = key.replace("data.train", "data.train_split").replace("data.eval", "data.eval_split")
            raise RecipeError(split_key, f"split {split!r} not in {source}", hint)
        data = data[split]
    return data.to_list()


def load_records(source: str, split: str, key: str) -> list[dict]:
    """Read the records of ``source`` as a list of dicts; ``key`` (``data.train``) names it in errors.

    ``source`` is a .jsonl/.json/.csv/.parquet file, a directory written by ``datasets``'
    ``save_to_disk`` (a Dataset, or a DatasetDict read at ``split``), or else a hub dataset id.
    """
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        import datasets

        try:
            data = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise RecipeError(
                key,
                f"{path} is a directory but not a dataset saved with save_to_disk",
                "point at a data file, or save the dataset with Dataset.save_to_disk",
            ) from None
        records = _from_datasets(data, source, split, key)
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            records = _read_json(path, key)
        elif suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                records = list(csv.DictReader(handle))
        elif suffix == ".parquet":
            import pyarrow.parquet

            records = pyarrow.parquet.read_table(path).to_pylist()
        else:
            raise RecipeError(
                key,
                f"unsupported file type {suffix or '(none)'}: {path}",
                f"use one of {', '.join(FILE_SUFFIXES)}",
            )
    elif _looks_like_local_path(source):
        raise RecipeError(
            key, f"file not found: {path}", "check the path (relative paths start from the current directory)"
        )
    else:
        import datasets

        try:
            data = datasets.load_dataset(source, split=split)
        except Exception as err:
            detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise RecipeError(
                key,
                f"{source!r} is not a local file or directory, and the hub dataset was not found "
                f"or the hub cannot be reached ({detail})",
                "check the path or the dataset id; offline, point at a local file",
            ) from None
        records = _from_datasets(data, source, split, key)
    if not records:
        raise RecipeError(key, f"no examples in {source}", "check that the file or split has data")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise RecipeError(
                key,
                f"example {index} of {source} is a {type(record).__name__}, not an object",
                "each example must be an object with named columns",
            )
    return records


# --------------------------------------------------------------------------------------------
# Columns and formats
# --------------------------------------------------------------------------------------------


def _select_columns(records: list[dict], cfg: DataConfig, key: str) -> list[dict]:
    """Rename the user's columns to ours (``cfg.columns`` maps ours -> theirs) and check they exist."""
    required, optional = FORMAT_COLUMNS[cfg.format]
    ours = required + optional
    for name in cfg.columns:
        if name not in ours:
            hint = did_you_mean(name, ours) or f"the {cfg.format} format reads: {', '.join(ours)}"
            raise RecipeError(f"data.columns.{name}", f"not a column of the {cfg.format} format", hint)
    present = list(records[0])
    selected = []
    for index, record in enumerate(records):
        row = {}
        for name in ours:
            theirs = cfg.columns.get(name, name)
            if theirs in record and record[theirs] is not None:
                row[name] = record[theirs]
                continue
            if name in optional and name not in cfg.columns:
                continue
            where = f"column '{theirs}' not found in {key}"
            if index:
                where = f"column '{theirs}' missing in example {index} of {key}"
            if name in cfg.columns:
                raise RecipeError(
                    f"data.columns.{name}",
                    f"{where} (columns: {', '.join(present)})",
                    f"map it with data.columns: {{{name}: <your column>}}",
                )
            raise RecipeError(
                "data.columns",
                f"{where} (columns: {', '.join(present)})",
                f"map it with data.columns: {{{name}: <your column>}}",
            )
        selected.append(row)
    return selected


def render_instruction(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt for one example, ending in ``"### Response:\\n"``."""
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _check_messages(messages: Any, key: str, index: int) -> list[dict]:
    if isinstance(messages, str):  # CSV and some exports store the conversation as a JSON string
        with contextlib.suppress(json.JSONDecodeError):
            messages = json.loads(messages)
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise RecipeError(
            key,
            f"example {index}: 'messages' must be a list of {{role, content}} objects",
            "e.g. [{role: user, content: Hi}, {role: assistant, content: Hello}]",
        )
    return messages


def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages and not add_generation_prompt:
        return ""
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception:
        if not messages:
            return ""  # some templates reject an empty conversation; it renders to nothing
        raise


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added (special tokens *in* the text are kept)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer) -> list[int]:
    # Pieces are encoded without special tokens, so BOS is added here once, at the very start,
    # whether or not the tokenizer would have added it itself.
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _eos(tokenizer, add_eos: bool) -> list[int]:
    return [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []


def encode_prompt(tokenizer, prompt: str, task: str, max_length: int | None = None) -> list[int]:
    """Prompt ids exactly as training saw them before the answer (used for generation at eval).

    Causal LMs keep the *end* of an over-long prompt (after BOS): the answer continues from there.
    """
    if task == "seq2seq":
        kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
        return list(tokenizer(prompt, **kwargs)["input_ids"])
    bos = _bos(tokenizer)
    ids = _encode(tokenizer, prompt)
    if ids[: len(bos)] == bos:
        bos = []  # the prompt (a rendered chat template) already starts with BOS
    if max_length and len(bos) + len(ids) > max_length:
        ids = ids[len(ids) - (max_length - len(bos)) :]
    return bos + ids


def _causal_pair(tokenizer, prompt: str, answer: str, cfg: DataConfig) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) for prompt + answer; the prompt is masked unless train_on_prompt."""
    prompt_ids = _bos(tokenizer) + _encode(tokenizer, prompt)
    answer_ids = _encode(tokenizer, answer) + _eos(tokenizer, cfg.add_eos)
    input_ids = prompt_ids + answer_ids
    if cfg.train_on_prompt:
        labels = list(input_ids)
    else:
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return _truncate(input_ids, labels, cfg.max_length)


def _causal_chat(tokenizer, messages: list[dict], cfg: DataConfig) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) for a conversation; only assistant turns carry loss by default.

    Assistant spans are found by rendering prefixes: turn ``i`` starts where ``messages[:i]`` rendered
    with the generation prompt ends and stops where ``messages[:i+1]`` ends. This works for every chat
    template (``{% generation %}`` markers are rare). The span includes what the template puts after
    the content (an EOS or end-of-turn token), so the model learns to stop.
    """
    text = _render_chat(tokenizer, messages, add_generation_prompt=False)
    input_ids = _encode(tokenizer, text)
    bos = _bos(tokenizer)
    if input_ids[: len(bos)] == bos:
        bos = []  # the template writes BOS itself
    input_ids = bos + input_ids
    if cfg.train_on_prompt:
        labels = list(input_ids)
    else:
        labels = [IGNORE_INDEX] * len(input_ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(bos) + len(_encode(tokenizer, _render_chat(tokenizer, messages[:i], True)))
            end = len(bos) + len(_encode(tokenizer, _render_chat(tokenizer, messages[: i + 1], False)))
            labels[start:end] = input_ids[start:end]
    return _truncate(input_ids, labels, cfg.max_length)


def _encode_seq2seq(tokenizer, text: str, max_length: int) -> tuple[list[int], bool]:
    """Ids with the tokenizer's own special tokens; truncation by the tokenizer keeps its closing EOS."""
    ids = list(tokenizer(text)["input_ids"])
    if len(ids) <= max_length:
        return ids, False
    return list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"]), True


def _truncate(input_ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    # Keep the start: the prompt the answer depends on comes first.
    truncated = len(input_ids) > max_length
    return input_ids[:max_length], labels[:max_length], truncated


def _label_index(label: Any, label_names: list[str], key: str) -> int:
    name = str(label)
    if name not in label_names:
        hint = did_you_mean(name, label_names) or f"known labels: {', '.join(label_names)}"
        raise RecipeError(key, f"label {name!r} is not one of the training labels", hint)
    return label_names.index(name)


def infer_label_names(labels: list[Any]) -> list[str]:
    """Sorted distinct label names; integer labels (also "0", "1" from CSV) sort as numbers."""
    names = {str(label) for label in labels}
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def _tokenize(
    rows: list[dict], tokenizer, task: str, cfg: DataConfig, label_names: list[str] | None, key: str
) -> tuple[list[dict], list[dict] | None, int, int]:
    """Tokenize rows; returns (examples, eval_examples, truncated count, dropped count)."""
    examples: list[dict] = []
    answers: list[dict] | None = None if cfg.format == "text" else []
    truncated = dropped = 0
    for index, row in enumerate(rows):
        answer_record: dict | None = None
        if cfg.format == "classification":
            text, pair = str(row["text"]), row.get("text_pair")
            pair = None if pair is None or pair == "" else str(pair)  # CSV writes a missing pair as ""
            label = _label_index(row["label"], label_names, key)
            full = tokenizer(text, pair)["input_ids"]
            if len(full) > cfg.max_length:
                truncated += 1
                full = tokenizer(text, pair, truncation=True, max_length=cfg.max_length)["input_ids"]
            examples.append({"input_ids": list(full), "label": label})
            answers.append({"text": text, "label": label} | ({"text_pair": pair} if pair is not None else {}))
            continue
        if cfg.format == "text":
            ids = _bos(tokenizer) + _encode(tokenizer, str(row["text"])) + _eos(tokenizer, cfg.add_eos)
            input_ids, labels, cut = _truncate(ids, list(ids), cfg.max_length)
        elif cfg.format == "chat":
            messages = _check_messages(row["messages"], key, index)
            input_ids, labels, cut = _causal_chat(tokenizer, messages, cfg)
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if last is not None:
                answer_record = {
                    "prompt": _render_chat(tokenizer, messages[:last], True),
                    "answer": str(messages[last]["content"]),
                }
        else:
            if cfg.format == "completion":
                prompt, answer = str(row["prompt"]), str(row["completion"])
            else:
                prompt = render_instruction(str(row["instruction"]), row.get("input") and str(row["input"]))
                answer = str(row["output"])
            answer_record = {"prompt": prompt, "answer": answer}
            if task == "seq2seq":
                input_ids, prompt_cut = _encode_seq2seq(tokenizer, prompt, cfg.max_length)
                labels, answer_cut = _encode_seq2seq(tokenizer, answer, cfg.max_length)
                eos = _eos(tokenizer, cfg.add_eos)
                if eos and labels[-1:] != eos:  # the tokenizer did not close the target itself
                    labels = labels[: cfg.max_length - 1] + eos
                cut = prompt_cut or answer_cut
            else:
                input_ids, labels, cut = _causal_pair(tokenizer, prompt, answer, cfg)
        truncated += cut
        # A causal LM never predicts position 0, so a label there alone trains nothing.
        trainable = labels if task == "seq2seq" else labels[1:]
        if not any(label != IGNORE_INDEX for label in trainable):
            dropped += 1
            continue
        examples.append({"input_ids": input_ids, "labels": labels})
        if answers is not None and answer_record is not None:
            answers.append(answer_record)
    return examples, answers, truncated, dropped


# --------------------------------------------------------------------------------------------
# The data stage
# --------------------------------------------------------------------------------------------


def split_eval(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, eval indices), both in file order; the held-out set depends only on n, fraction, seed."""
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise RecipeError(
            "data.eval_fraction",
            f"holding out {n_eval} of {n} examples leaves none to train on",
            "lower data.eval_fraction or add data",
        )
    generator = torch.Generator().manual_seed(seed)
    held_out = set(torch.randperm(n, generator=generator)[:n_eval].tolist())
    return [i for i in range(n) if i not in held_out], sorted(held_out)


def load_data(cfg: DataConfig, tokenizer, task: str, label_names: list[str] | None = None) -> DataBundle:
    """Load, split, format and tokenize the data of a recipe.

    ``label_names`` fixes the class order for classification (e.g. from a model being resumed);
    by default it is inferred from the training labels.
    """
    if cfg.format not in TASK_FORMATS.get(task, ()):
        formats = ", ".join(TASK_FORMATS.get(task, ()))
        raise RecipeError(
            "data.format", f"model.task {task} cannot train on {cfg.format} data", f"use one of: {formats}"
        )
    if cfg.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise RecipeError(
            "data.format",
            "the tokenizer has no chat template",
            "use a chat model's tokenizer, or the completion/instruction format",
        )

    train_records = load_records(cfg.train, cfg.train_split, "data.train")
    if cfg.eval:
        eval_records = load_records(cfg.eval, cfg.eval_split, "data.eval")
    elif cfg.eval_fraction > 0:
        train_index, eval_index = split_eval(len(train_records), cfg.eval_fraction, cfg.shuffle_seed)
        eval_records = [train_records[i] for i in eval_index]
        train_records = [train_records[i] for i in train_index]
    else:
        eval_records = None
    if cfg.max_train_examples:
        train_records = train_records[: cfg.max_train_examples]
    if eval_records is not None and cfg.max_eval_examples:
        eval_records = eval_records[: cfg.max_eval_examples]

    train_rows = _select_columns(train_records, cfg, "data.train")
    eval_rows = _select_columns(eval_records, cfg, "data.eval") if eval_records else None
    if cfg.format == "classification" and label_names is None:
        label_names = infer_label_names([row["label"] for row in train_rows])
    elif cfg.format != "classification":
        label_names = None

    train, _, train_truncated, train_dropped = _tokenize(
        train_rows, tokenizer, task, cfg, label_names, "data.train"
    )
    if not train:
        raise RecipeError(
            "data.train",
            f"all {train_dropped} examples lost their answer to truncation",
            "raise data.max_length or shorten the prompts",
        )
    evaluation = eval_examples = None
    eval_truncated = eval_dropped = 0
    if eval_rows:
        evaluation, eval_examples, eval_truncated, eval_dropped = _tokenize(
            eval_rows, tokenizer, task, cfg, label_names, "data.eval"
        )
    stats = {
        "train_examples": len(train),
        "eval_examples": len(evaluation) if evaluation is not None else 0,
        "train_tokens": sum(len(example["input_ids"]) for example in train),
        "train_truncated": train_truncated,
        "eval_truncated": eval_truncated,
        "train_dropped": train_dropped,
        "eval_dropped": eval_dropped,
        "max_length": cfg.max_length,
    }
    return DataBundle(
        train=train, eval=evaluation, eval_examples=eval_examples, label_names=label_names, stats=stats
    )


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the pad token, else EOS, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0  # any id works: padded positions are masked out and carry no loss


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def collate(examples: list[dict], tokenizer, task: str) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into long tensors.

    Returns ``input_ids`` and ``attention_mask`` (B, T) and ``labels``: (B, T') padded with -100 for
    causal_lm (T' = T) and seq2seq (T' = longest target), or (B,) class indices for seq_cls.
    """
    input_rows = [example["input_ids"] for example in examples]
    batch = {
        "input_ids": _pad(input_rows, pad_token_id(tokenizer)),  # (B, T)
        "attention_mask": _pad([[1] * len(row) for row in input_rows], 0),  # (B, T)
    }
    if task == "seq_cls":
        batch["labels"] = torch.tensor([example["label"] for example in examples], dtype=torch.long)  # (B,)
    else:
        batch["labels"] = _pad([example["labels"] for example in examples], IGNORE_INDEX)  # (B, T')
    return batch


class BatchSampler:
    """Shuffled batches of example indices, a pure function of ``(seed, epoch)``.

    The loop checkpoints ``(epoch, batch_index)`` and resumes with
    ``epoch_batches(epoch)[batch_index:]``; nothing else about the data order needs saving.
    """

    def __init__(self, n_examples: int, batch_size: int, seed: int, drop_last: bool = False):
        assert n_examples > 0 and batch_size > 0, (n_examples, batch_size)
        self.n_examples, self.batch_size, self.seed, self.drop_last = n_examples, batch_size, seed, drop_last

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.n_examples // self.batch_size
        return math.ceil(self.n_examples / self.batch_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch``: a permutation from a generator seeded with ``seed + epoch``."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n_examples, generator=generator).tolist()
        batches = [order[i : i + self.batch_size] for i in range(0, self.n_examples, self.batch_size)]
        return batches[: len(self)]
