"""The public Python API: load, train, merge, evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from peftcli.recipe import DataConfig, EvalConfig, ModelConfig, Recipe, RecipeError, load_recipe


def load(path: str | Path, device: str | torch.device = "cpu", base: str | None = None):
    """Load an adapter directory (its base resolved from its config) or a model directory.

    Returns ``(model, tokenizer)``; the model answers ``model(input_ids=..., attention_mask=...)``
    with ``.logits``.
    """
    from peftcli.export import is_adapter_dir, load_adapter
    from peftcli.models import load_model, load_tokenizer, task_of_model_dir

    path = Path(path)
    if is_adapter_dir(path):
        loaded = load_adapter(path, base=base, device=device)
        return loaded.model, loaded.tokenizer
    if (path / "config.json").is_file():
        cfg = ModelConfig(name=str(path), task=task_of_model_dir(str(path)), dtype="float32")
        tokenizer = load_tokenizer(str(path), cfg)
        model = load_model(str(path), cfg, torch.device(device), pad_token_id=tokenizer.pad_token_id)
        model.eval()
        return model, tokenizer
    raise RecipeError(
        "path",
        f"{path} is neither an adapter directory nor a model directory",
        "pass RUN/adapter, a merged model directory, or a saved transformers model",
    )


def train(
    recipe: str | Path | Recipe,
    overrides: list[str] | None = None,
    output_dir: str | None = None,
    resume: bool = False,
    reporter=None,
):
    from peftcli.loop import train as run

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides, output_dir)
    return run(recipe, resume=resume, reporter=reporter)


def merge(
    adapter_dir: str | Path, output: str | Path, base: str | None = None, dtype: str = "float32"
) -> dict:
    from peftcli.export import merge_adapter

    return merge_adapter(adapter_dir, output, base=base, dtype=dtype)


def detect_format(record: dict[str, Any]) -> str:
    """Guess a data format from the columns of one record (for `peftcli eval --data`)."""
    keys = set(record)
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys:
        return "instruction"
    if {"prompt", "completion"} <= keys:
        return "completion"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "text"
    raise RecipeError(
        "--data",
        f"cannot tell the format from the columns {sorted(keys)}",
        "evaluate through a recipe (peftcli eval RECIPE) with data.format and data.columns",
    )


def evaluate_target(
    target: str | Path,
    data: str | None = None,
    max_examples: int | None = None,
    overrides: list[str] | None = None,
    ensemble: list[str] | None = None,
    vote: bool = False,
    log=None,
) -> dict[str, Any]:
    """Evaluate a recipe (its trained adapter if the run finished, else its base), an adapter
    directory or a model directory on ``data`` (default: the recipe's eval data).

    ``ensemble`` names more adapters over the same base: the target and these are evaluated as one
    model with averaged logits, or by majority vote (``vote``, classification only). ``log`` receives
    the data stage's lines (whether the tokenized cache was reused)."""
    from peftcli.data import load_data, load_source
    from peftcli.evaluate import evaluate
    from peftcli.export import is_adapter_dir, load_adapter
    from peftcli.models import (
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_model_name,
        task_of_model_dir,
    )

    target = Path(target)
    device = resolve_device("auto")
    recipe: Recipe | None = None
    if target.is_file():
        recipe = load_recipe(target, overrides)
        adapter = Path(recipe.output_dir) / "adapter"
        if is_adapter_dir(adapter):
            kind, target = "adapter", adapter
        else:
            kind = "base"
    elif is_adapter_dir(target):
        kind = "adapter"
        run_recipe = target.parent / "recipe.yaml"
        if run_recipe.is_file():
            recipe = load_recipe(run_recipe, overrides)
    elif (target / "config.json").is_file():
        kind = "model"
    else:
        raise RecipeError(
            "TARGET",
            f"{target} is not a recipe, an adapter directory or a model directory",
            "pass recipe.yaml, RUN/adapter or a merged model directory",
        )

    if (ensemble or vote) and kind != "adapter":
        raise RecipeError(
            "--ensemble",
            f"ensembling needs adapter directories; {target} is a {kind}",
            "pass RUN/adapter as the target and the other adapters with --ensemble",
        )
    if kind == "adapter":
        loaded = load_adapter(target, device=device)
        model, tokenizer, task, label_names = loaded.model, loaded.tokenizer, loaded.task, loaded.label_names
        if ensemble or vote:
            model = _ensemble(loaded, ensemble or [], vote, device)
    elif kind == "base":
        assert recipe is not None
        path = resolve_model_name(recipe.model.name)
        tokenizer = load_tokenizer(path, recipe.model)
        task, label_names = recipe.model.task, None
        model = None
    else:
        task = task_of_model_dir(str(target))
        cfg = ModelConfig(name=str(target), task=task)
        tokenizer = load_tokenizer(str(target), cfg)
        model = load_model(str(target), cfg, device, pad_token_id=tokenizer.pad_token_id)
        label_names = (
            [model.config.id2label[i] for i in range(model.config.num_labels)] if task == "seq_cls" else None
        )

    if data:
        fmt = detect_format(load_source(data, "train", "--data", limit=1).dataset[0])
        data_cfg = DataConfig(
            train=data,
            eval=data,
            format=fmt,
            max_length=recipe.data.max_length if recipe else 512,
            columns={} if not recipe else recipe.data.columns,
        )
    elif recipe is not None:
        data_cfg = recipe.data
    else:
        raise RecipeError("--data", f"no eval data known for {target}", "pass --data FILE")
    if max_examples:
        data_cfg.max_eval_examples = max_examples
    bundle = load_data(data_cfg, tokenizer, task, label_names=label_names, log=log)
    if not bundle.eval:
        raise RecipeError(
            "data.eval", "there is no eval data", "set data.eval or data.eval_fraction, or pass --data"
        )
    if model is None:  # the recipe's base model, untrained
        model = load_model(
            resolve_model_name(recipe.model.name),
            recipe.model,
            device,
            label_names=bundle.label_names,
            pad_token_id=tokenizer.pad_token_id,
        )
    eval_cfg = recipe.eval if recipe else EvalConfig()
    metrics = evaluate(model, tokenizer, bundle, task, eval_cfg, device)
    return {"target": str(target), "kind": kind, "task": task, **metrics}


def _ensemble(first, others: list[str], vote: bool, device):
    """The target adapter and ``others`` (same base, task and labels) as one EnsembleModel."""
    from peftcli.evaluate import EnsembleModel
    from peftcli.export import load_adapter

    if vote and first.task != "seq_cls":
        raise RecipeError(
            "--vote",
            "majority vote is for classification adapters (seq_cls)",
            "drop --vote to average the logits",
        )
    members = [first.model]
    for path in others:
        loaded = load_adapter(path, device=device)
        if (loaded.base_path, loaded.task, loaded.label_names) != (
            first.base_path,
            first.task,
            first.label_names,
        ):
            raise RecipeError(
                "--ensemble",
                f"{path} was trained on {loaded.base_path} ({loaded.task}), the target "
                f"on {first.base_path} ({first.task})",
                "ensemble adapters of one base model, task and label set",
            )
        members.append(loaded.model)
    return EnsembleModel(members, vote=vote)


def recipe_yaml(recipe: Recipe) -> str:
    from peftcli.recipe import to_dict

    return yaml.safe_dump(to_dict(recipe), sort_keys=False)
