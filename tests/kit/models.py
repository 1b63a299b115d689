"""Tiny models: bare ones per family and task, and tuned ones built exactly as training builds them."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from kit.paths import CPU, TINY
from peftcli.methods.catalog import method_for
from peftcli.models import build_model, load_model, load_tokenizer, resolve_model_name
from peftcli.recipe import ModelConfig, Recipe
from peftcli.recipe_loader import load_recipe, recipe_from_dict
from peftcli.tiny import ensure_tiny

LABELS = ["negative", "positive"]  # the two classes every seq_cls test uses
TASK_MODELS = {"causal_lm": "tiny:llama", "seq_cls": "tiny:bert", "seq2seq": "tiny:t5"}
TASK_FORMATS = {"causal_lm": "completion", "seq_cls": "classification", "seq2seq": "completion"}


def labels_for(task: str) -> list[str] | None:
    return LABELS if task == "seq_cls" else None


def head_labels(recipe: Recipe, labels: list[str] | None) -> list[str] | None:
    """A reward model's head has one output, named as training names it."""
    return ["reward"] if recipe.objective.name == "reward" else labels


def tiny(arch: str = "llama", task: str = "causal_lm", seed: int | None = 0, labels=("a", "b")):
    """A bare tiny:<arch> model (no method) in eval mode; ``seed`` fixes a new classification head."""
    cfg = ModelConfig(name=f"tiny:{arch}", task=task)
    if seed is not None:
        torch.manual_seed(seed)
    model = load_model(resolve_model_name(cfg.name), cfg, CPU, label_names=list(labels))
    model.eval()
    return model


def tokenizer(arch: str = "llama"):
    """The tiny:<arch> tokenizer, as ``AutoTokenizer`` loads it (byte-level: one id per byte)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_tiny(arch))


def ids(tokenizer, text: str) -> list[int]:
    """Reference ids of plain text (no special tokens in it): the tiny tokenizer maps one byte to one id."""
    out = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(out) == len(text.encode()), "the tiny tokenizer is byte-level"
    return out


def tiny_recipe(name: str, tmp_path: Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """``recipes/tiny/<name>.yaml`` with ``overrides``; its output_dir under ``tmp_path`` when given."""
    where = [f"output_dir={tmp_path / 'run'}"] if tmp_path is not None else []
    return load_recipe(TINY / f"{name}.yaml", [*where, *(overrides or [])])


def inline_recipe(task: str, method: dict, model_extra: dict | None = None, seed: int = 0) -> Recipe:
    """A recipe for ``method`` on the task's tiny model (llama, bert, t5), written inline."""
    return recipe_from_dict(
        {
            "model": {"name": TASK_MODELS[task], "task": task, **(model_extra or {})},
            "data": {"train": "unused.jsonl", "format": TASK_FORMATS[task]},
            "method": method,
            "train": {"seed": seed},
        }
    )


class Built(NamedTuple):
    """What training builds from a recipe: unpack as ``recipe, base_path, tokenizer, model, method``."""

    recipe: Recipe
    base_path: str
    tokenizer: object
    model: torch.nn.Module
    method: object

    @property
    def task(self) -> str:
        return self.recipe.model.task

    @property
    def labels(self) -> list[str] | None:
        return head_labels(self.recipe, labels_for(self.task))


def build(recipe: str | Recipe, tmp_path: Path | None = None, overrides: list[str] | None = None) -> Built:
    """The tuned model for a tiny recipe name (+ overrides) or a Recipe, built by ``build_model`` with the
    recipe's seed, as training, export and the benches build it; in eval mode, on the CPU."""
    if isinstance(recipe, str):
        recipe = tiny_recipe(recipe, tmp_path, overrides)
    base_path = resolve_model_name(recipe.model.name)
    tokenizer = load_tokenizer(base_path, recipe.model)
    method = method_for(recipe)
    model = build_model(
        base_path,
        recipe.model,
        method,
        CPU,
        seed=recipe.train.seed,
        label_names=head_labels(recipe, labels_for(recipe.model.task)),
        pad_token_id=tokenizer.pad_token_id,
    )
    model.eval()
    return Built(recipe, base_path, tokenizer, model, method)


def build_inline(task: str, method: dict, model_extra: dict | None = None, seed: int = 0) -> Built:
    """``build`` for an inline recipe: ``method`` on the task's tiny model."""
    return build(inline_recipe(task, method, model_extra, seed))


def base_model(base_path: str, recipe: Recipe, pad_token_id: int | None = None):
    """The plain base the recipe names (no method), eval mode, fp32 on the CPU."""
    labels = labels_for(recipe.model.task)
    model = load_model(base_path, recipe.model, CPU, label_names=labels, pad_token_id=pad_token_id)
    model.eval()
    return model
