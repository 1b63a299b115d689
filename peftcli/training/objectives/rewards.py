"""GRPO's rewards (``objective.rewards``): each scores every sampled completion of a window, and the
rewards are summed with their weights (docs/objectives.md defines each).

Built in, reading the completion's text (special tokens dropped) and the prompt row's reference columns:

* ``exact_match: COLUMN``: 1 when the stripped completion equals the stripped reference, else 0;
* ``contains: COLUMN``: 1 when the completion contains the reference, else 0;
* ``regex: PATTERN``: 1 when ``re.search`` finds the pattern in the completion, else 0;
* ``length: N``: −|n − N| / N, n the completion's tokens (its EOS not counted).

``python: module:function`` imports the user's function and calls it as TRL's GRPOTrainer calls reward
functions: ``f(prompts=..., completions=..., completion_ids=..., **references)`` (one list per reference
column), returning one float (or None: unscored) per completion. Importing it runs the user's code, so it
happens only when ``peftcli train`` got ``--allow-code`` (:func:`check_code`, before the run starts).
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

from peftcli.recipe import Recipe, RecipeError, RewardConfig

__all__ = ["Completions", "Reward", "build_rewards", "check_code", "check_reference_columns"]


@dataclass
class Completions:
    """A window's sampled completions, one entry each; a prompt's group sits on consecutive rows."""

    prompts: list[str]  # the prompt text of each completion's prompt
    texts: list[str]  # the completion's text (special tokens and EOS dropped)
    token_ids: list[list[int]]  # its tokens, EOS not counted
    references: list[dict]  # its prompt row's reference columns


Score = Callable[[Completions], list[float]]


@dataclass
class Reward:
    name: str
    weight: float
    score: Score  # one value per completion; NaN: this reward does not score that completion


def check_code(recipe: Recipe, allow_code: bool) -> None:
    """A Python reward runs the user's code: refused, naming the flag, unless ``--allow-code`` was given."""
    if recipe.objective.name != "grpo" or allow_code:
        return
    for i, reward in enumerate(recipe.objective.rewards):
        if reward.python is not None:
            raise RecipeError(
                f"objective.rewards[{i}].python",
                f"{reward.python} is Python code, which peftcli runs only when asked",
                "pass --allow-code to peftcli train (or allow_code=True to peftcli.train)",
            )


def check_reference_columns(rewards: list[RewardConfig], first_row: dict) -> None:
    """Every column a built-in reward compares with is one of the prompt data's columns."""
    references = first_row.get("references", {})
    for i, reward in enumerate(rewards):
        column = reward.exact_match if reward.exact_match is not None else reward.contains
        if column is not None and column not in references:
            have = ", ".join(references) or "none but the prompt"
            raise RecipeError(
                f"objective.rewards[{i}].{reward.kind()}",
                f"column {column!r} is not in the training data (reference columns: {have})",
                "name a column of data.train, or map one with data.columns",
            )


def build_rewards(rewards: list[RewardConfig]) -> list[Reward]:
    """The recipe's rewards, each named (its ``name``, else its kind; repeats numbered)."""
    built, seen = [], {}
    for reward in rewards:
        kind = reward.kind()
        name = reward.name or (reward.python.split(":")[-1] if kind == "python" else kind)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}_{seen[name]}"
        built.append(Reward(name, reward.weight, scorer(reward)))
    return built


def scorer(reward: RewardConfig) -> Score:
    kind, value = reward.kind(), getattr(reward, reward.kind())
    if kind == "exact_match":
        return lambda c: [
            float(t.strip() == str(r[value]).strip()) for t, r in zip(c.texts, c.references, strict=False)
        ]
    if kind == "contains":
        return lambda c: [float(str(r[value]) in t) for t, r in zip(c.texts, c.references, strict=False)]
    if kind == "regex":
        pattern = re.compile(value)
        return lambda c: [float(pattern.search(t) is not None) for t in c.texts]
    if kind == "length":
        return lambda c: [-abs(len(ids) - value) / value for ids in c.token_ids]
    return python_scorer(value)


def python_scorer(target: str) -> Score:
    """The user's ``module:function`` (the working directory importable, as ``python -m`` has it)."""
    module_name, function_name = target.split(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise RecipeError(
            "objective.rewards", f"cannot load {target}: {err}", "check the module and function"
        ) from None

    def score(c: Completions) -> list[float]:
        columns = {k: [r.get(k) for r in c.references] for k in (c.references[0] if c.references else {})}
        values = function(prompts=c.prompts, completions=c.texts, completion_ids=c.token_ids, **columns)
        values = list(values)
        if len(values) != len(c.texts):
            raise RecipeError(
                "objective.rewards",
                f"{target} returned {len(values)} rewards for {len(c.texts)} completions",
                "return one value per completion",
            )
        return [math.nan if v is None else float(v) for v in values]

    return score
