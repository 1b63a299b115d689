"""The public Python API: load, train, merge, combine, evaluate, generate, chat."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftcli.recipe import DataConfig, EvalConfig, ModelConfig, Recipe, RecipeError
from peftcli.recipe_loader import load_recipe


def load(
    path: str | Path, device: str | torch.device = "cpu", base: str | None = None, allow_pickle: bool = False
):
    """Load an adapter directory (its base resolved from its config) or a model directory.

    Returns ``(model, tokenizer)``; the model answers ``model(input_ids=..., attention_mask=...)``
    with ``.logits``. Weights load from safetensors only; ``allow_pickle=True`` (the recipe's
    ``model.allow_pickle``, the CLI's ``--allow-pickle``) also loads .bin pickle weights, with a warning.
    """
    from peftcli.use.load import load_model_or_adapter

    loaded = load_model_or_adapter(path, device, base, allow_pickle)
    return loaded.model, loaded.tokenizer


def train(
    recipe: str | Path | Recipe,
    overrides: list[str] | None = None,
    output_dir: str | None = None,
    resume: bool = False,
    reporter=None,
    overwrite: bool = False,
    allow_code: bool = False,
):
    from peftcli.training.loop import train as run

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides, output_dir)
    return run(recipe, resume=resume, reporter=reporter, overwrite=overwrite, allow_code=allow_code)


def merge(
    adapter_dir: str | Path,
    output: str | Path,
    base: str | None = None,
    dtype: str = "float32",
    dequantize: bool = False,
    allow_pickle: bool = False,
) -> dict:
    from peftcli.export import merge_adapter

    return merge_adapter(
        adapter_dir, output, base=base, dtype=dtype, dequantize=dequantize, allow_pickle=allow_pickle
    )


def combine(
    adapters: list[str | Path],
    output: str | Path,
    weights: list[float],
    how: str,
    density: float | None = None,
    seed: int = 0,
    rank: int | None = None,
    majority_sign: str = "total",
) -> dict[str, Any]:
    """Combine LoRA adapters of one base into one LoRA adapter at ``output``, as peft's
    ``add_weighted_adapter`` (``how``: linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune;
    docs/merging.md, "Combining adapters")."""
    from peftcli.combining import combine_adapters

    return combine_adapters(adapters, weights, how, output, density, seed, rank, majority_sign)


def generate(
    target: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    options=None,
    console=None,
    log=None,
) -> dict[str, Any]:
    """Complete every row of a JSON-lines file (``{"prompt"}`` or ``{"messages"}``) into ``output_path``;
    a rerun continues after the rows already written (see docs/use.md)."""
    from peftcli.use.generate import GenerateOptions, generate_file

    return generate_file(target, input_path, output_path, options or GenerateOptions(), console, log)


def chat(target: str | Path, lines, write, note=None, system: str | None = None, options=None):
    """Answer each user line of ``lines`` through the chat template, streaming replies to ``write``."""
    from peftcli.use.chat import chat as run
    from peftcli.use.generate import GenerateOptions

    return run(
        target,
        lines,
        write,
        note or (lambda text: None),
        system,
        options or GenerateOptions(max_new_tokens=256),
    )


def evaluate_tasks(
    target: str | Path,
    tasks: list[str],
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    allow_code: bool = False,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """lm-evaluation-harness tasks on a recipe's adapter, an adapter directory or a model directory,
    as peftcli loads it (unmerged). Needs ``pip install 'peftcli[eval]'``."""
    from peftcli.harness import TaskOptions, check_tasks, run_tasks
    from peftcli.models import resolve_device

    batch_size = EvalConfig().batch_size
    options = TaskOptions(tasks, include_path, num_fewshot, limit, batch_size, allow_code)
    check_tasks(options)  # before any weights load
    device = resolve_device("auto")
    resolved = resolve_eval_target(Path(target), overrides, device, [], False)
    if resolved.recipe is not None:
        options = TaskOptions(
            tasks, include_path, num_fewshot, limit, resolved.recipe.eval.batch_size, allow_code
        )
    model = resolved.build_model(resolved.label_names)
    result = run_tasks(model, resolved.tokenizer, resolved.task, device, options, resolved.use_cache)
    return {"target": str(resolved.path), "kind": resolved.kind, "task": resolved.task, **result}


def preprocess(recipe: Recipe, log=None, console=None) -> dict[str, Any]:
    """Tokenize and cache ``recipe``'s data ahead of training; return its statistics (see docs/data.md)."""
    from peftcli.data.preprocess import preprocess as run

    return run(recipe, log=log, console=console)


def validate_data(recipe: Recipe) -> list[str]:
    """Read the first rows of every data source through the format code; one line per source."""
    from peftcli.data.preprocess import validate_data as run

    return run(recipe)


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


@dataclass
class EvalTarget:
    """What ``peftcli eval TARGET`` evaluates, resolved before any data is read."""

    path: Path  # the adapter dir when a recipe's run has finished, else TARGET itself
    kind: str  # "adapter", "base" (a recipe's untrained base model) or "model" (a model directory)
    task: str
    tokenizer: Any
    label_names: list[str] | None  # None: taken from the eval data (the untrained base)
    recipe: Recipe | None  # the recipe, or the run's recipe.yaml beside an adapter
    build_model: Callable[[list[str] | None], Any]  # label names of the eval data -> model
    use_cache: bool = True  # decode over a KV cache (False: an adapter whose method decodes without one)


def evaluate_target(
    target: str | Path,
    data: str | None = None,
    max_examples: int | None = None,
    overrides: list[str] | None = None,
    ensemble: list[str] | None = None,
    vote: bool = False,
    log=None,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Evaluate a recipe (its trained adapter if the run finished, else its base), an adapter
    directory or a model directory on ``data`` (default: the recipe's eval data).

    ``ensemble`` names more adapters over the same base: the target and these are evaluated as one
    model with averaged logits, or by majority vote (``vote``, classification only). ``log`` receives
    the data stage's lines (whether the tokenized cache was reused). ``allow_pickle`` lets an adapter's
    base or a model directory load from .bin pickle weights (a recipe says so with model.allow_pickle)."""
    from peftcli.data.pipeline import load_data
    from peftcli.evaluate import evaluate
    from peftcli.models import resolve_device

    device = resolve_device("auto")
    resolved = resolve_eval_target(Path(target), overrides, device, ensemble or [], vote, allow_pickle)
    data_cfg = _eval_data_config(resolved, data)
    if max_examples:
        data_cfg.max_eval_examples = max_examples
    bundle = load_data(data_cfg, resolved.tokenizer, resolved.task, label_names=resolved.label_names, log=log)
    if not bundle.eval:
        raise RecipeError(
            "data.eval", "there is no eval data", "set data.eval or data.eval_fraction, or pass --data"
        )
    model = resolved.build_model(bundle.label_names)
    eval_cfg = resolved.recipe.eval if resolved.recipe else EvalConfig()
    metrics = evaluate(
        model, resolved.tokenizer, bundle, resolved.task, eval_cfg, device, use_cache=resolved.use_cache
    )
    return {"target": str(resolved.path), "kind": resolved.kind, "task": resolved.task, **metrics}


def resolve_eval_target(
    target: Path,
    overrides: list[str] | None,
    device,
    ensemble: list[str],
    vote: bool,
    allow_pickle: bool = False,
) -> EvalTarget:
    """A recipe, an adapter directory or a model directory as an :class:`EvalTarget`."""
    from peftcli.export import is_adapter_dir, load_adapter
    from peftcli.models import load_model, load_tokenizer, resolve_model_name, task_of_model_dir

    recipe: Recipe | None = None
    if target.is_file():
        recipe = load_recipe(target, overrides)
        if is_adapter_dir(Path(recipe.output_dir) / "adapter"):
            target = Path(recipe.output_dir) / "adapter"
    elif is_adapter_dir(target):
        run_recipe = target.parent / "recipe.yaml"
        recipe = load_recipe(run_recipe, overrides) if run_recipe.is_file() else None
    elif not (target / "config.json").is_file():
        raise RecipeError(
            "TARGET",
            f"{target} is not a recipe, an adapter directory or a model directory",
            "pass recipe.yaml, RUN/adapter or a merged model directory",
        )
    kind = "adapter" if is_adapter_dir(target) else "base" if recipe is not None else "model"
    if (ensemble or vote) and kind != "adapter":
        raise RecipeError(
            "--ensemble",
            f"ensembling needs adapter directories; {target} is a {kind}",
            "pass RUN/adapter as the target and the other adapters with --ensemble",
        )

    if recipe is not None:
        allow_pickle = allow_pickle or recipe.model.allow_pickle
    if kind == "adapter":
        loaded = load_adapter(target, device=device, allow_pickle=allow_pickle)
        model, use_cache = loaded.model, loaded.method.decodes_with_cache
        if ensemble or vote:
            model, use_cache = _ensemble(loaded, ensemble, vote, device)
        labels, build = loaded.label_names, lambda _labels: model
        return EvalTarget(target, kind, loaded.task, loaded.tokenizer, labels, recipe, build, use_cache)
    if kind == "base":
        assert recipe is not None
        base = recipe.model
        path = resolve_model_name(base.name)
        tokenizer = load_tokenizer(path, base)

        def untrained_base(labels: list[str] | None):
            return load_model(path, base, device, label_names=labels, pad_token_id=tokenizer.pad_token_id)

        return EvalTarget(target, kind, base.task, tokenizer, None, recipe, untrained_base)
    task = task_of_model_dir(str(target))
    cfg = ModelConfig(name=str(target), task=task, allow_pickle=allow_pickle)
    tokenizer = load_tokenizer(str(target), cfg)
    model = load_model(str(target), cfg, device, pad_token_id=tokenizer.pad_token_id)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)] if task == "seq_cls" else None
    return EvalTarget(target, kind, task, tokenizer, labels, None, lambda _labels: model)


def _eval_data_config(target: EvalTarget, data: str | None) -> DataConfig:
    """``--data FILE`` (its format guessed from its columns), else the recipe's data section."""
    from peftcli.data.sources import load_source

    recipe = target.recipe
    if data:
        return DataConfig(
            train=data,
            eval=data,
            format=detect_format(load_source(data, "train", "--data", limit=1).dataset[0]),
            max_length=recipe.data.max_length if recipe else 512,
            columns={} if not recipe else recipe.data.columns,
        )
    if recipe is None:
        raise RecipeError("--data", f"no eval data known for {target.path}", "pass --data FILE")
    return recipe.data


def _ensemble(first, others: list[str], vote: bool, device):
    """The target adapter and ``others`` (same base, task and labels) as one EnsembleModel, and whether
    it decodes over a KV cache (every member's method does)."""
    from peftcli.evaluate import EnsembleModel
    from peftcli.export import load_adapter

    if vote and first.task != "seq_cls":
        raise RecipeError(
            "--vote",
            "majority vote is for classification adapters (seq_cls)",
            "drop --vote to average the logits",
        )
    members, use_cache = [first.model], first.method.decodes_with_cache
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
        use_cache = use_cache and loaded.method.decodes_with_cache
    return EnsembleModel(members, vote=vote), use_cache


def export(
    target: str | Path,
    output: str | Path,
    format: str = "gguf",
    quant: str | None = None,
    base: str | None = None,
    system: str | None = None,
    progress=None,
) -> dict[str, Any]:
    """Export for llama.cpp / Ollama (docs/export.md): ``gguf`` (the merged model), ``gguf-lora`` (the
    adapter alone) or ``ollama`` (a directory with the GGUF and a Modelfile)."""
    from peftcli import gguf

    if format == "gguf":
        return gguf.export_gguf(target, output, quant or "f16", base, progress)
    if format == "gguf-lora":
        return gguf.export_gguf_lora(target, output, quant or "f32", base, progress)
    return gguf.export_ollama(target, output, quant or "q8_0", base, system, progress)
