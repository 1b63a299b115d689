"""``model.adapter``: a run that continues from a trained adapter (SFT → DPO, or more SFT) instead of a
fresh one. The recipe's method attaches as usual, then the adapter's tensors are loaded into it, before
the optimizer exists and before ``objective.reference: start`` keeps its copy, so the run starts from
the adapter's weights and ``start`` is that adapter, frozen.

The recipe names the method the adapter was trained with (its name and, where the method has one, its
``init``: an init that rewrites the base, such as PiSSA, is replayed so the loaded tensors sit on the
same base) and the same base model; the tensors' names and shapes are checked as ``peftcli merge``
checks them, so any other mismatch is a one-line error naming the adapter.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from peftcli.checkpoint import check_tensors, read_adapter_state
from peftcli.export import read_adapter_info
from peftcli.methods.registry import Method
from peftcli.models import resolve_model_name
from peftcli.recipe import Recipe, RecipeError

__all__ = ["check_start_adapter", "load_start_adapter"]


def check_start_adapter(recipe: Recipe) -> None:
    """Before anything loads: the directory is an adapter, of the recipe's method (and init), trained on
    the recipe's base."""
    path = recipe.model.adapter
    if not path:
        return
    try:
        info = read_adapter_info(path)
    except RecipeError as err:
        raise RecipeError("model.adapter", err.message, err.hint) from None
    name = info["method_cls"].name
    if name != recipe.method.name:
        raise RecipeError(
            "model.adapter",
            f"{path} is a {name} adapter, not {recipe.method.name}",
            f"set method.name: {name} (with the options it was trained with)",
        )
    trained_init = getattr(info["method_cfg"], "init", None)
    if getattr(recipe.method, "init", None) != trained_init:
        raise RecipeError(
            "method.init",
            f"{path} was trained with init {trained_init}, not {recipe.method.init}",
            f"set method.init: {trained_init} (the loaded weights replace the init's)",
        )
    check_same_base(recipe, info, path)


def check_same_base(recipe: Recipe, info: dict, path: str) -> None:
    names = {n for n in (info["model_name"], info["base_path"]) if n}
    if not names or recipe.model.name in names:
        return
    if info["base_path"] and resolve_model_name(recipe.model.name) == info["base_path"]:
        return
    trained_on = info["model_name"] or info["base_path"]
    raise RecipeError(
        "model.adapter",
        f"{path} was trained on {trained_on}, not {recipe.model.name}",
        f"set model.name: {trained_on}",
    )


def load_start_adapter(recipe: Recipe, method: Method, model: nn.Module) -> None:
    """Load ``model.adapter``'s tensors into the freshly attached method (names, kinds and shapes
    checked, as ``peftcli merge`` loads them)."""
    path = Path(recipe.model.adapter)
    state = read_adapter_state(path)
    source = f"model.adapter {path}"
    check_tensors(state, method.adapter_state_dict(model), source, exact_dtype=False, shapes=False)
    method.load_adapter_state_dict(model, state)
    check_tensors(state, method.adapter_state_dict(model), source, exact_dtype=False)
