"""Load what a user points at (an adapter directory or a model directory) for inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftcli.recipe import ModelConfig, RecipeError


@dataclass
class Loaded:
    model: torch.nn.Module  # in eval mode, on ``device``
    tokenizer: Any
    task: str  # causal_lm | seq2seq | seq_cls
    kind: str  # "adapter" (base + our method, unmerged) or "model" (a transformers model directory)
    use_cache: bool = True  # decode over a KV cache: the adapter's method's ``decodes_with_cache``


def load_model_or_adapter(
    path: str | Path, device: str | torch.device = "cpu", base: str | None = None, allow_pickle: bool = False
) -> Loaded:
    """An adapter directory (its base resolved from its config, ``base`` to override) or a model directory.
    ``allow_pickle`` lets .bin (pickle) weights load, as a recipe's ``model.allow_pickle`` does."""
    from peftcli.export import is_adapter_dir, load_adapter
    from peftcli.models import load_model, load_tokenizer, task_of_model_dir

    path = Path(path)
    device = torch.device(device)
    if is_adapter_dir(path):
        loaded = load_adapter(path, base=base, device=device, allow_pickle=allow_pickle)
        use_cache = loaded.method.decodes_with_cache
        return Loaded(loaded.model, loaded.tokenizer, loaded.task, "adapter", use_cache)
    if (path / "config.json").is_file():
        cfg = ModelConfig(
            name=str(path), task=task_of_model_dir(str(path)), dtype="float32", allow_pickle=allow_pickle
        )
        tokenizer = load_tokenizer(str(path), cfg)
        model = load_model(str(path), cfg, device, pad_token_id=tokenizer.pad_token_id)
        model.eval()
        return Loaded(model, tokenizer, cfg.task, "model")
    raise RecipeError(
        "MODEL_OR_ADAPTER",
        f"{path} is neither an adapter directory nor a model directory",
        "pass RUN/adapter, a merged model directory, or a saved transformers model",
    )


def require_causal_lm(loaded: Loaded, path: str | Path, command: str) -> None:
    if loaded.task != "causal_lm":
        raise RecipeError(
            "MODEL_OR_ADAPTER",
            f"{path} is a {loaded.task} model; peftcli {command} generates with causal LMs",
            "pass a causal LM adapter or model (seq2seq: peftcli eval measures exact match)",
        )
