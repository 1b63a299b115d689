"""``objective.precompute_reference``: the reference's log-probs of every pair, computed once before the
first step and cached beside the tokenized data, so no step runs a reference forward.

The cache is ``<data cache dir>/reference/<key>.npy``, one row per example ([chosen, rejected]). The key
hashes everything the numbers depend on: the tokenized rows themselves (their Arrow buffers), the base
model (the recipe's model settings and its weight files' names, sizes and modification times), the
method's config, the reference kind and, for ``start``, the start adapter's tensors, and the precision
the forward runs in. A changed model, adapter or data therefore misses and recomputes; nothing stale
is read. The file is written to a temporary name and renamed, so a killed run leaves none half-written.

The forward runs with the model in eval mode (no dropout, and no draw from the random generators, so
the run's random stream is the same as without precomputing) and under the run's autocast, on batches
of ``eval.batch_size`` pairs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from peftcli.data.cache import default_cache_dir
from peftcli.data.collate import collate_rows
from peftcli.recipe import Recipe, to_dict
from peftcli.training.objectives.base import Objective, sequence_logps

__all__ = ["attach_references", "reference_key", "rows_digest"]

VERSION = 1  # bump when what the cached numbers mean changes
ROW_COLUMNS = ("input_ids", "loss_mask", "rejected_ids", "rejected_mask")


def rows_digest(rows) -> str:
    """A hash of the tokenized pairs' columns (the Arrow buffers, so it costs a read of the ids, no
    decoding) and of the row selection when the dataset holds one."""
    digest = hashlib.sha256()
    dataset = rows.dataset
    for name in ROW_COLUMNS:
        for chunk in dataset.data.column(name).chunks:
            for buffer in chunk.buffers():
                if buffer is not None:
                    digest.update(memoryview(buffer))
    indices = getattr(dataset, "_indices", None)
    if indices is not None:
        for chunk in indices.column(0).chunks:
            digest.update(memoryview(chunk.buffers()[1]))
    digest.update(str(len(rows)).encode())
    return digest.hexdigest()


def model_digest(recipe: Recipe, base_path: str) -> str:
    """The base model's identity: the recipe's model settings and the base's files (names, sizes,
    modification times; hashing the weights themselves would read gigabytes)."""
    files = []
    path = Path(base_path)
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.is_file():
                stat = f.stat()
                files.append([str(f.relative_to(path)), stat.st_size, stat.st_mtime_ns])
    text = json.dumps({"model": to_dict(recipe.model), "base": str(base_path), "files": files}, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def tensors_digest(model: nn.Module) -> str:
    """A hash of the trainable tensors as they are now (the run's start adapter, at set-up)."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def reference_key(
    recipe: Recipe, base_path: str, model: nn.Module, rows, amp_dtype: torch.dtype | None
) -> str:
    parts = {
        "version": VERSION,
        "rows": rows_digest(rows),
        "model": model_digest(recipe, base_path),
        "method": to_dict(recipe.method),
        "reference": recipe.objective.reference,
        "start": tensors_digest(model) if recipe.objective.reference == "start" else None,
        "amp": str(amp_dtype),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def compute_reference(
    objective: Objective,
    model: nn.Module,
    rows,
    tokenizer,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> np.ndarray:
    """(N, 2) float32: the reference's summed log-probs of each pair's chosen and rejected answer."""
    out = np.zeros((len(rows), 2), dtype=np.float32)
    was_training = model.training
    model.eval()
    with (
        torch.no_grad(),
        objective.reference(),
        torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
    ):
        for start in range(0, len(rows), batch_size):
            indices = range(start, min(start + batch_size, len(rows)))
            batch = collate_rows(rows, indices, tokenizer, "causal_lm")
            batch = {k: v.to(device) for k, v in batch.items()}
            logps, _ = sequence_logps(model, batch)
            half = len(indices)
            out[start : start + half] = torch.stack([logps[:half], logps[half:]], 1).float().cpu().numpy()
    model.train(was_training)
    return out


def cached(path: Path, build: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
    """(the array at ``path``, True) when present; else ``build()`` written there atomically, False."""
    if path.is_file():
        return np.load(path), True
    values = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.stem}-{os.getpid()}.npy")
    np.save(tmp, values)
    os.replace(tmp, path)
    return values, False


def attach_references(
    recipe: Recipe,
    objective: Objective | None,
    model: nn.Module,
    data: Any,
    tokenizer,
    base_path: str,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    dist: Any,
    note: Callable[[str], None],
) -> None:
    """Give the train (and eval) rows their cached reference log-probs (``rows.reference``), computing
    them first on a miss (rank 0 first under torchrun; the others then read its file)."""
    if objective is None or not recipe.objective.precompute_reference:
        return
    root = default_cache_dir(recipe.data.cache_dir) / "reference"
    for split, rows in (("train", data.train), ("eval", data.eval)):
        if not rows:
            continue
        key = reference_key(recipe, base_path, model, rows, amp_dtype)
        with dist.main_first():
            rows.reference, hit = cached(
                root / f"{key}.npy",
                lambda rows=rows: compute_reference(
                    objective, model, rows, tokenizer, recipe.eval.batch_size, device, amp_dtype
                ),
            )
        state = "read from the cache" if hit else "computed and cached"
        note(f"reference log-probs of {len(rows)} {split} pairs {state} ({root / key}.npy)")
