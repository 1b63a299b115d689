"""`peftcli preprocess` (tokenize and cache ahead of training, with statistics) and the data check of
`peftcli validate` (the first rows of every source through the real format code)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from peftcli.data.formats import (
    BadRow,
    FormatSpec,
    check_chat_template,
    infer_label_names,
    map_columns,
    tokenize_row,
)
from peftcli.data.pipeline import DataBundle, TokenizedRows, load_data
from peftcli.data.sampler import BatchSampler
from peftcli.data.sources import load_source, looks_like_local_path
from peftcli.recipe import Recipe, RecipeError, SourceConfig

VALIDATE_ROWS = 100  # rows of each source `peftcli validate` renders and tokenizes


def padding_fraction(lengths: np.ndarray, batch_size: int, seed: int, mixture=None) -> float:
    """Share of a right-padded batch that is padding, over epoch 0's batches as the sampler draws them."""
    sampler = BatchSampler(lengths, batch_size, seed, mixture=mixture)
    ordered = lengths[sampler.epoch_order(0)].astype(np.int64)
    padded_rows = -(-len(ordered) // batch_size) * batch_size
    grid = np.zeros(padded_rows, dtype=np.int64)
    grid[: len(ordered)] = ordered
    grid = grid.reshape(-1, batch_size)
    real = np.count_nonzero(grid, axis=1)  # the last batch may be short
    cells = int((grid.max(axis=1) * real).sum())
    return 1.0 - float(grid.sum()) / max(cells, 1)


def trained_tokens(rows: TokenizedRows) -> int:
    """Tokens that carry loss: masked answer tokens past position 0 (causal), targets (seq2seq),
    examples (classification)."""
    import pyarrow.compute as pc

    table = rows.dataset.data
    if rows.task == "causal_lm":
        mask = table.column("loss_mask")
        total = pc.sum(pc.list_flatten(mask)).as_py() or 0
        first = pc.sum(pc.list_element(mask, 0)).as_py() or 0  # a causal LM never predicts position 0
        return int(total - first)
    if rows.task == "seq2seq":
        return int(pc.sum(pc.list_value_length(table.column("labels"))).as_py() or 0)
    return len(rows)


def data_summary(bundle: DataBundle, recipe: Recipe, seconds: float) -> dict[str, Any]:
    lengths = bundle.train.lengths
    p50, p90, p99 = (int(np.percentile(lengths, q, method="higher")) for q in (50, 90, 99))
    summary = {
        "examples": len(bundle.train),
        "eval_examples": bundle.stats["eval_examples"],
        "tokens": int(lengths.sum()),
        "trained_tokens": trained_tokens(bundle.train),
        "length_p50": p50,
        "length_p90": p90,
        "length_p99": p99,
        "length_max": int(lengths.max()),
        "truncated": bundle.stats["train_truncated"],
        "dropped": bundle.stats["train_dropped"],
        "skipped": bundle.stats.get("skipped_rows", {}),
        "max_length": recipe.data.max_length,
        "batch_size": recipe.train.batch_size,
        "padding_fraction": round(
            padding_fraction(lengths, recipe.train.batch_size, recipe.train.seed, bundle.mixture), 4
        ),
        "sources": bundle.sources,
        "seconds": round(seconds, 3),
    }
    return summary


def preprocess(recipe: Recipe, log=None, console=None) -> dict[str, Any]:
    """Tokenize and cache a recipe's data (train and eval) and describe it."""
    from peftcli.models import load_tokenizer, resolve_model_name

    start = time.perf_counter()
    tokenizer = load_tokenizer(resolve_model_name(recipe.model.name), recipe.model)
    bundle = load_data(
        recipe.data, tokenizer, recipe.model.task, log=log, console=console, model_name=recipe.model.name
    )
    return data_summary(bundle, recipe, time.perf_counter() - start)


def validate_data(recipe: Recipe) -> list[str]:
    """`peftcli validate`'s data check: load the tokenizer (no weights) and run ``check_data``."""
    from peftcli.models import load_tokenizer, resolve_model_name

    try:
        tokenizer = load_tokenizer(resolve_model_name(recipe.model.name), recipe.model)
    except RecipeError as err:
        return [f"data not checked: the tokenizer could not be loaded ({err})"]
    return check_data(recipe, tokenizer)


def check_data(recipe: Recipe, tokenizer) -> list[str]:
    """Render and tokenize the first rows of every source as training would; raise on the first problem.

    Returns one line per source (rows checked). Works on the first ``VALIDATE_ROWS`` rows only, so it
    is quick on any file size; bad rows later in a file are found by the full build.
    """
    data = recipe.data
    sources = data.sources()
    keys = (
        ["data.train"] if isinstance(data.train, str) else [f"data.train[{i}]" for i in range(len(sources))]
    )
    if data.eval:
        sources.append(SourceConfig(data.eval, data.eval_split, sources[0].format, sources[0].columns))
        keys.append("data.eval")
    lines = []
    label_names: list[str] = []
    for source, key in zip(sources, keys, strict=True):
        check_chat_template(tokenizer, source.format, recipe.model.name)
        try:
            loaded = load_source(source.path, source.split, key, data.on_bad_row, limit=VALIDATE_ROWS)
        except RecipeError as err:
            if looks_like_local_path(source.path) or "hub cannot be reached" not in err.message:
                raise
            lines.append(f"{key}: {source.path} not checked (the hub cannot be reached)")
            continue
        rows = loaded.dataset
        spec = FormatSpec(
            format=source.format,
            task=recipe.model.task,
            columns=map_columns(list(rows.column_names), source.format, source.columns or {}, key),
            max_length=data.max_length,
            train_on_prompt=data.train_on_prompt,
            add_eos=data.add_eos,
            roles=dict(data.roles),
        )
        if source.format == "classification":
            # Only the first rows are read, so the label set is what they show (the build checks all).
            label_names = infer_label_names([*label_names, *rows.unique(spec.columns["label"])])
            spec.label_names = label_names
        bad = 0
        for index, record in enumerate(rows):
            row = {ours: record[theirs] for ours, theirs in spec.columns.items()}
            try:
                tokenize_row(tokenizer, row, spec)
            except BadRow as problem:
                if data.on_bad_row == "skip":
                    bad += 1
                    continue
                hint = f"{problem.hint}, or set data.on_bad_row: skip" if problem.hint else "fix the row"
                raise RecipeError(key, f"{loaded.where(index)}: {problem.detail}", hint) from None
        skipped = sum(loaded.skipped.values()) + bad
        lines.append(
            f"{key}: {len(rows)} rows of {source.path} read as {source.format}"
            + (f" ({skipped} would be skipped)" if skipped else "")
        )
    return lines
