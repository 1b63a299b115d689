"""The data stage: sources -> (cached) tokenized Arrow datasets -> what the loop and evaluation read.

    data.train (one source or a list) ──► cache key ──hit──► memory-mapped Arrow ──► TokenizedRows
        load_dataset / load_from_disk      │                                       (+ lengths array)
        split (eval_fraction), limit       └─miss─► datasets.map(tokenize_batch, num_proc) ─► cache

Nothing here holds Python lists of all token ids: a split keeps an index array, the lengths array is
numpy, and rows become lists only when a batch is collated.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from peftcli.data.cache import build_entry, cache_key, default_cache_dir, open_entry, tokenizer_fingerprint
from peftcli.data.formats import (
    IGNORE_INDEX,
    TASK_FORMATS,
    FormatSpec,
    check_chat_template,
    infer_label_names,
    map_columns,
    output_columns,
    tokenize_batch,
)
from peftcli.data.progress import datasets_progress
from peftcli.data.sampler import Mixture
from peftcli.data.sources import Source, load_source, quiet_datasets, source_fingerprint
from peftcli.recipe import DataConfig, RecipeError, SourceConfig, did_you_mean

Log = Callable[[str], None]
MAP_BATCH_ROWS = 4096  # rows per tokenizer call and per Arrow record batch of the cache


class TokenizedRows(Sequence):
    """A read-only sequence view of a tokenized, memory-mapped dataset.

    ``rows[i]`` is ``{"input_ids", "labels"}`` (causal_lm, seq2seq) or ``{"input_ids", "label"}``
    (seq_cls) as Python lists; ``rows.take(indices)`` reads a batch of them in one Arrow gather;
    ``rows.lengths`` is the lengths array (int32, one per example).
    """

    def __init__(self, dataset, task: str):
        self.dataset, self.task = dataset, task
        self.lengths: np.ndarray = dataset.data.column("length").to_numpy().astype(np.int32, copy=False)
        # Precomputed reference log-probs (objective.precompute_reference), one row per example:
        # [chosen, rejected]; collated as the batch's "reference" (peftcli.training.objectives.precompute).
        self.reference: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def take(self, indices: Sequence[int]) -> list[dict]:
        indices = [int(i) for i in indices]
        if not indices:
            return []
        names = self.dataset.column_names
        pairs = self.task == "causal_lm" and "rejected_ids" in names
        unpaired = self.task == "causal_lm" and "desirable" in names
        prompts = "references" in names  # prompt data (grpo)
        task_ids = "task_id" in names  # data.task_id_column
        wanted = (
            _row_columns(self.task, pairs, unpaired)
            + (["references"] if prompts else [])
            + (["task_id"] if task_ids else [])
        )
        columns = self.dataset.select_columns(wanted)[indices]
        examples = []
        for i in range(len(indices)):
            input_ids = columns["input_ids"][i]
            if self.task == "causal_lm":
                example = {"input_ids": input_ids, "labels": _labels(input_ids, columns["loss_mask"][i])}
                if pairs:  # a preference pair: the chosen sequence above, the rejected one here
                    rejected = columns["rejected_ids"][i]
                    example["rejected_ids"] = rejected
                    example["rejected_labels"] = _labels(rejected, columns["rejected_mask"][i])
                if prompts:  # a prompt: what its completions' rewards compare with
                    example["references"] = json.loads(columns["references"][i] or "{}")
                if unpaired:  # a KTO example: where its completion starts, and its label
                    example["prompt_length"] = columns["prompt_length"][i]
                    example["desirable"] = columns["desirable"][i]
                if self.reference is not None:
                    example["reference"] = self.reference[indices[i]].tolist()
                examples.append(example)
            elif self.task == "seq2seq":
                examples.append({"input_ids": input_ids, "labels": columns["labels"][i]})
            else:
                examples.append({"input_ids": input_ids, "label": columns["label"][i]})
            if task_ids:
                examples[-1]["task_id"] = columns["task_id"][i]
        return examples

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(range(len(self))[index])
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.take([index])[0]

    def __iter__(self):
        for start in range(0, len(self), 1024):
            yield from self.take(range(start, min(start + 1024, len(self))))

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, (list, TokenizedRows)) else NotImplemented

    __hash__ = None  # type: ignore[assignment]


def _row_columns(task: str, pairs: bool = False, unpaired: bool = False) -> list[str]:
    columns = ["input_ids", {"causal_lm": "loss_mask", "seq2seq": "labels"}.get(task, "label")]
    return (
        columns
        + (["rejected_ids", "rejected_mask"] if pairs else [])
        + (["prompt_length", "desirable"] if unpaired else [])
    )


def _labels(input_ids: list[int], mask: list[int]) -> list[int]:
    """The unshifted labels: the ids where the loss mask is set, -100 elsewhere."""
    return [t if m else IGNORE_INDEX for t, m in zip(input_ids, mask, strict=True)]


@dataclass
class DataBundle:
    """Everything the training loop and evaluation need from the data stage."""

    train: Sequence[dict]  # TokenizedRows (memory-mapped) or a list of examples
    eval: Sequence[dict] | None
    # Per eval example, for generation metrics: {"prompt", "answer"} (completion, instruction, chat)
    # or {"text", "label"} (classification); None for the text format, which has no answers.
    eval_examples: list[dict] | None
    label_names: list[str] | None  # classification: class index -> name
    stats: dict = field(default_factory=dict)
    sources: list[dict] = field(default_factory=list)  # per training source: rows, tokens, share, cache
    mixture: Mixture | None = None  # set when data.train has weighted sources


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def split_eval(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, eval indices), both in file order; the held-out set depends only on n, fraction, seed."""
    train, held_out = _split_arrays(n, fraction, seed)
    return train.tolist(), held_out.tolist()


def _split_arrays(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise RecipeError(
            "data.eval_fraction",
            f"holding out {n_eval} of {n} examples leaves none to train on",
            "lower data.eval_fraction or add data",
        )
    generator = torch.Generator().manual_seed(seed)
    held_out = np.sort(torch.randperm(n, generator=generator)[:n_eval].numpy())
    keep = np.ones(n, dtype=bool)
    keep[held_out] = False
    return np.flatnonzero(keep), held_out


# --------------------------------------------------------------------------------------------
# One source, one part (train or eval): cached tokenization
# --------------------------------------------------------------------------------------------


@dataclass
class Part:
    """A source and which of its rows to use: ``select`` is "all", "train" or "eval" (eval_fraction)."""

    source: SourceConfig
    key: str  # data.train, data.train[1], data.eval: names it in errors
    select: str = "all"
    fraction: float = 0.0
    split_seed: int = 0
    limit: int | None = None


def tokenized_part(
    part: Part,
    spec: FormatSpec,
    tokenizer,
    cfg: DataConfig,
    log: Log,
    console,
    label_names_given: bool,
) -> tuple[Any, dict]:
    """The tokenized dataset of one part, from the cache or built (and cached) now."""
    root = default_cache_dir(cfg.cache_dir)
    key, loaded = _part_cache_key(part, spec, tokenizer, cfg, label_names_given, root)
    opened = open_entry(root, key)
    if opened is not None:
        dataset, meta = opened
        log(
            f"data: {part.key} ({part.source.path}): reusing the tokenized cache {root / key} ({len(dataset)} rows)"
        )
        meta["cache"] = "reused"
        return dataset, meta

    dataset, meta = build_entry(
        root, key, lambda tmp: _build_part(tmp, part, spec, tokenizer, cfg, console, loaded)
    )
    log(
        f"data: {part.key} ({part.source.path}): tokenized {meta['rows']} rows in {meta['build_seconds']:.1f} s "
        f"with num_proc {cfg.num_proc}, cached at {root / key}"
    )
    meta["cache"] = "built"
    return dataset, meta


def _part_cache_key(
    part: Part, spec: FormatSpec, tokenizer, cfg: DataConfig, label_names_given: bool, root
) -> tuple[str, Source | None]:
    """The part's cache key (its source's fingerprint, the rows it selects, the format, the tokenizer), and
    the source when it had to be loaded to be fingerprinted (a hub dataset: datasets' own cache does it)."""
    fingerprint = source_fingerprint(part.source.path, part.source.split, part.key)
    loaded: Source | None = None
    if fingerprint is None:
        loaded = load_source(part.source.path, part.source.split, part.key, cfg.on_bad_row, root)
        fingerprint = loaded.dataset._fingerprint
    identity = spec.identity()
    if not label_names_given:
        identity["label_names"] = "inferred"  # a function of the data, which the key covers
    key = cache_key(
        {
            "source": fingerprint,
            "split": part.source.split,
            "select": [part.select, part.fraction, part.split_seed, part.limit],
            "spec": identity,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "on_bad_row": cfg.on_bad_row,
        }
    )
    return key, loaded


def _build_part(
    tmp, part: Part, spec: FormatSpec, tokenizer, cfg: DataConfig, console, loaded: Source | None
) -> tuple[Any, dict]:
    """A cache miss: load the source (unless fingerprinting did), select the part's rows, tokenize them
    into ``tmp`` and drop the bad and answerless rows."""
    start = time.perf_counter()
    with datasets_progress(console):
        if loaded is None:
            root = default_cache_dir(cfg.cache_dir)
            loaded = load_source(part.source.path, part.source.split, part.key, cfg.on_bad_row, root)
        raw = _select_rows(loaded.dataset, part)
        mapped = _tokenize_rows(raw, part, spec, tokenizer, cfg, tmp)
        dataset, meta = _drop_rows(mapped, loaded, part, raw, cfg, tmp)
    meta |= {
        "source": part.source.path,
        "format": spec.format,
        "label_names": spec.label_names,
        "build_seconds": round(time.perf_counter() - start, 3),
        "num_proc": cfg.num_proc,
    }
    return dataset, meta


def _tokenize_rows(raw, part: Part, spec: FormatSpec, tokenizer, cfg: DataConfig, tmp):
    """``raw``'s columns mapped to the format's, classification labels inferred when not given, and every
    row tokenized (datasets.map, ``num_proc`` workers) into ``tmp/rows.arrow``."""
    spec.columns = map_columns(list(raw.column_names), spec.format, part.source.columns or {}, part.key)
    if spec.task_id_column:
        spec.columns["task_id"] = task_id_source(list(raw.column_names), spec.task_id_column, part.key)
    if spec.format == "classification" and spec.label_names is None:
        spec.label_names = infer_label_names(raw.unique(spec.columns["label"]))
    return raw.map(
        tokenize_batch,
        fn_kwargs={"tokenizer": tokenizer, "spec": spec},
        batched=True,
        # Rows per Arrow record batch too. Opening a memory-mapped table touches every record
        # batch's header, and the kernel maps 64 KiB around each touched page: with 256-row
        # batches a 1M-row cache put 250 MB into RSS before the first step.
        batch_size=MAP_BATCH_ROWS,
        writer_batch_size=MAP_BATCH_ROWS,
        num_proc=cfg.num_proc if cfg.num_proc > 1 and len(raw) >= 2 * cfg.num_proc else None,
        remove_columns=list(raw.column_names),
        features=output_columns(spec, len(tokenizer)),
        cache_file_name=str(tmp / "rows.arrow"),
        load_from_cache_file=False,
        desc=f"tokenizing {part.key}",
    )


def task_id_source(column_names: list[str], column: str, key: str) -> str:
    """``data.task_id_column``, checked to exist in the part's source (one line naming what does)."""
    if column not in column_names:
        raise RecipeError(
            "data.task_id_column",
            f"column '{column}' not found in {key} (columns: {', '.join(column_names)})",
            did_you_mean(column, column_names) or "add each example's task index (0, 1, …) as a column",
        )
    return column


def _select_rows(raw, part: Part):
    if part.select != "all":
        train_rows, eval_rows = _split_arrays(len(raw), part.fraction, part.split_seed)
        raw = raw.select(train_rows if part.select == "train" else eval_rows)
    if part.limit is not None and len(raw) > part.limit:
        raw = raw.select(range(part.limit))
    return raw


def _drop_rows(mapped, loaded: Source, part: Part, raw, cfg: DataConfig, tmp) -> tuple[Any, dict]:
    """Raise on the first bad row (on_bad_row: error) or leave bad and answerless rows out, counted."""
    import pyarrow.compute as pc

    truncated = int(pc.sum(mapped.data.column("truncated")).as_py() or 0)  # counted before dropping
    status = mapped.data.column("status")
    keep = pc.equal(status, "").to_numpy(zero_copy_only=False)
    skipped: Counter = Counter(loaded.skipped)
    dropped = 0
    examples: list[str] = []
    if not keep.all():
        for row in np.flatnonzero(~keep):
            value = status[int(row)].as_py()
            if value == "dropped":
                dropped += 1
                continue
            reason, detail, hint = value.removeprefix("bad:").split("\t", 2)
            where = loaded.where(_source_row(raw, int(row)))
            if cfg.on_bad_row != "skip":
                hint = (
                    f"{hint}, or set data.on_bad_row: skip"
                    if hint
                    else "fix it, or set data.on_bad_row: skip"
                )
                raise RecipeError(part.key, f"{where}: {detail}", hint)
            skipped[reason] += 1
            if len(examples) < 5:
                examples.append(f"{where}: {detail}")
        mapped = mapped.select(np.flatnonzero(keep)).flatten_indices(cache_file_name=str(tmp / "kept.arrow"))
    lengths = mapped.data.column("length").to_numpy()
    meta = {
        "rows": len(mapped),
        "tokens": int(lengths.sum()),
        "truncated": truncated,
        "dropped": dropped,
        "skipped": dict(skipped),
        "skipped_examples": examples,
    }
    return mapped, meta


def _source_row(raw, row: int) -> int:
    """The row of the source file that row ``row`` of the (split, limited) selection came from."""
    if raw._indices is None:
        return row
    return int(raw._indices.column(0)[row].as_py())


# --------------------------------------------------------------------------------------------
# The data stage
# --------------------------------------------------------------------------------------------


def load_data(
    cfg: DataConfig,
    tokenizer,
    task: str,
    label_names: list[str] | None = None,
    log: Log | None = None,
    console=None,
    model_name: str = "the model",
) -> DataBundle:
    """Load, split, format, tokenize and cache the data of a recipe.

    ``label_names`` fixes the class order for classification (e.g. from a model being resumed);
    by default it is inferred from the training labels. ``log`` receives one line per source saying
    whether its tokenized cache was reused or built; ``console`` shows rich progress bars.
    """
    quiet_datasets()
    stage = Tokenize(cfg, tokenizer, task, log or (lambda line: None), console)
    sources, keys = cfg.sources(), source_keys(cfg)
    check_formats(sources, keys, task, tokenizer, model_name)
    train_parts, eval_parts = plan_parts(cfg, sources, keys)
    train, train_metas, label_names = tokenize_train(stage, train_parts, label_names)
    evaluation, eval_examples, eval_metas = tokenize_eval(stage, eval_parts, label_names)
    stats = data_stats(cfg, train, evaluation, train_metas, eval_metas, stage.log)
    summaries, mixture = _source_summaries(sources, keys, train_metas)
    if len(sources) > 1:
        stats["sources"] = summaries
    return DataBundle(
        train=train,
        eval=evaluation,
        eval_examples=eval_examples,
        label_names=label_names if task == "seq_cls" else None,
        stats=stats,
        sources=summaries,
        mixture=mixture,
    )


@dataclass
class Tokenize:
    """How every part of one recipe's data is tokenized: one DataConfig, tokenizer and task."""

    cfg: DataConfig
    tokenizer: Any
    task: str
    log: Log
    console: Any = None

    def spec(self, part: Part, keep_examples: bool, labels: list[str] | None) -> FormatSpec:
        """The format spec of ``part``: its format and columns, the recipe's length and prompt settings."""
        cfg = self.cfg
        return FormatSpec(
            format=part.source.format,
            task=self.task,
            columns=dict(part.source.columns or {}),
            max_length=cfg.max_length,
            train_on_prompt=cfg.train_on_prompt,
            add_eos=cfg.add_eos,
            roles=dict(cfg.roles) if part.source.format == "sharegpt" else {},
            label_names=labels,
            keep_examples=keep_examples,
            task_id_column=cfg.task_id_column,
        )

    def part(
        self, part: Part, keep_examples: bool, labels: list[str] | None, labels_given: bool
    ) -> tuple[Any, dict]:
        spec = self.spec(part, keep_examples, labels)
        return tokenized_part(part, spec, self.tokenizer, self.cfg, self.log, self.console, labels_given)


def source_keys(cfg: DataConfig) -> list[str]:
    """The recipe key that names each training source in errors: data.train, or data.train[i] in a list."""
    if isinstance(cfg.train, str):
        return ["data.train"]
    return [f"data.train[{i}]" for i in range(len(cfg.sources()))]


def check_formats(
    sources: list[SourceConfig], keys: list[str], task: str, tokenizer, model_name: str
) -> None:
    """Every source's format can train this task, and a chat format has a chat template to render it."""
    for source, key in zip(sources, keys, strict=True):
        if source.format not in TASK_FORMATS.get(task, ()):
            formats = ", ".join(TASK_FORMATS.get(task, ()))
            where = "data.format" if key == "data.train" else f"{key}.format"
            raise RecipeError(
                where, f"model.task {task} cannot train on {source.format} data", f"use one of: {formats}"
            )
        check_chat_template(tokenizer, source.format, model_name)


def plan_parts(
    cfg: DataConfig, sources: list[SourceConfig], keys: list[str]
) -> tuple[list[Part], list[Part]]:
    """The training and eval parts: each source whole, or split by data.eval_fraction; data.eval (read
    in the first source's format and columns) when given."""
    train_parts, eval_parts = [], []
    for source, key in zip(sources, keys, strict=True):
        if cfg.eval_fraction > 0 and not cfg.eval:
            train_parts.append(
                Part(source, key, "train", cfg.eval_fraction, cfg.shuffle_seed, cfg.max_train_examples)
            )
            eval_parts.append(
                Part(source, key, "eval", cfg.eval_fraction, cfg.shuffle_seed, cfg.max_eval_examples)
            )
        else:
            train_parts.append(Part(source, key, limit=cfg.max_train_examples))
    if cfg.eval:
        first = sources[0]
        eval_source = SourceConfig(cfg.eval, cfg.eval_split, first.format, first.columns)
        eval_parts.append(Part(eval_source, "data.eval", limit=cfg.max_eval_examples))
    return train_parts, eval_parts


def tokenize_train(
    stage: Tokenize, parts: list[Part], label_names: list[str] | None
) -> tuple[TokenizedRows, list[dict], list[str] | None]:
    """The training rows of every part, concatenated; their metas; the class names (classification: the
    first source's, which every other source must share)."""
    tables, metas = [], []
    for part in parts:
        dataset, meta = stage.part(part, False, label_names, label_names is not None)
        if stage.task == "seq_cls":
            label_names = label_names or meta["label_names"]
            if meta["label_names"] != label_names:  # a mixture whose sources disagree on the classes
                raise RecipeError(
                    part.key,
                    f"labels {meta['label_names']} differ from the first source's {label_names}",
                    "give every source the same label set",
                )
        tables.append(dataset)
        metas.append(meta)
    if sum(meta["rows"] for meta in metas) == 0:
        dropped = sum(meta["dropped"] for meta in metas)
        raise RecipeError(
            "data.train",
            f"all {dropped} examples lost their answer to truncation",
            "raise data.max_length or shorten the prompts",
        )
    return TokenizedRows(_concatenate(tables), stage.task), metas, label_names


def tokenize_eval(
    stage: Tokenize, parts: list[Part], label_names: list[str] | None
) -> tuple[TokenizedRows | None, list[dict] | None, list[dict]]:
    """The eval rows (None without eval parts), the eval examples for generation metrics (None for the
    text format, which has no answers), and the parts' metas."""
    if not parts:
        return None, None, []
    tables, metas = [], []
    for part in parts:
        dataset, meta = stage.part(part, True, label_names if stage.task == "seq_cls" else None, True)
        tables.append(dataset)
        metas.append(meta)
    dataset = _concatenate(tables)
    examples = None
    if all(
        part.source.format not in ("text", "preference", "unpaired_preference", "prompt") for part in parts
    ):
        examples = [json.loads(text) for text in dataset["example"] if text]
    return TokenizedRows(dataset, stage.task), examples, metas


def _concatenate(parts: list[Any]) -> Any:
    import datasets

    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def data_stats(
    cfg: DataConfig,
    train: TokenizedRows,
    evaluation: TokenizedRows | None,
    train_metas: list[dict],
    eval_metas: list[dict],
    log: Log,
) -> dict[str, Any]:
    """The data summary (examples, tokens, truncated, dropped, skipped rows by reason); logs the first
    skipped rows of each part."""
    stats = {
        "train_examples": len(train),
        "eval_examples": len(evaluation) if evaluation is not None else 0,
        "train_tokens": int(train.lengths.sum()),
        "train_truncated": sum(meta["truncated"] for meta in train_metas),
        "eval_truncated": sum(meta["truncated"] for meta in eval_metas),
        "train_dropped": sum(meta["dropped"] for meta in train_metas),
        "eval_dropped": sum(meta["dropped"] for meta in eval_metas),
        "max_length": cfg.max_length,
    }
    skipped = Counter()
    for meta in train_metas + eval_metas:
        skipped.update(meta["skipped"])
    if skipped:
        stats["skipped_rows"] = dict(skipped)  # on_bad_row: skip, by reason
        for meta in train_metas + eval_metas:
            for line in meta["skipped_examples"][:3]:
                log(f"data: skipped {line}")
    return stats


def _source_summaries(
    sources: list[SourceConfig], keys: list[str], metas: list[dict]
) -> tuple[list[dict], Mixture | None]:
    """Per source: rows, tokens, share of the tokens an epoch trains on; and the Mixture if weighted."""
    rows = [meta["rows"] for meta in metas]
    weighted = any(source.weight is not None for source in sources)
    mixture = None
    if weighted:
        raw = [1.0 if source.weight is None else source.weight for source in sources]
        if sum(raw) <= 0:
            raise RecipeError(
                "data.train", "the source weights sum to 0", "give at least one source a weight > 0"
            )
        offsets = [int(x) for x in np.cumsum([0, *rows[:-1]])]
        for key, n, weight in zip(keys, rows, raw, strict=True):
            if n == 0 and weight > 0:
                raise RecipeError(
                    key, "has no examples left to draw from", "check the source or set its weight to 0"
                )
        mixture = Mixture(offsets, rows, [w / sum(raw) for w in raw])
        counts = mixture.counts(sum(rows))
        epoch_tokens = [
            meta["tokens"] / max(1, meta["rows"]) * c for meta, c in zip(metas, counts, strict=True)
        ]
    else:
        counts = rows
        epoch_tokens = [meta["tokens"] for meta in metas]
    total = sum(epoch_tokens) or 1
    summaries = [
        {
            "source": source.path,
            "format": source.format,
            "rows": meta["rows"],
            "tokens": meta["tokens"],
            "weight": source.weight,
            "examples_per_epoch": count,
            "token_share": round(share / total, 4),
            "cache": meta.get("cache"),
        }
        for source, meta, count, share in zip(sources, metas, counts, epoch_tokens, strict=True)
    ]
    return summaries, mixture
