"""Every method peftcli ships: importing this module registers them all (one line per method).

Adding a method: its file in ``peftcli/methods/``, whose class carries ``@register``, and one import
line below. Code that needs a method by name (the recipe loader, the loop, export, the CLI) imports
this module; code that needs only the contract imports :mod:`peftcli.methods.registry`.
"""

from __future__ import annotations

from peftcli.methods import (  # noqa: F401  (imported to register)
    adalora,
    adamss,
    adapter_fusion,
    adaption_prompt,
    beft,
    bitfit,
    boft,
    c3a,
    cartridge,
    cpt,
    deft,
    delora,
    fourierft,
    frod,
    glora,
    gralora,
    hira,
    houlsby_adapter,
    hra,
    ia3,
    ladder_side_tuning,
    lily,
    ln_tuning,
    loha,
    lokr,
    lora,
    mam_adapter,
    miss,
    multitask_prompt_tuning,
    oft,
    osf,
    p_tuning,
    p_tuning_v2,
    parallel_adapter,
    peanut,
    poly,
    prefix_tuning,
    prompt_tuning,
    psoft,
    pvera,
    randlora,
    road,
    shadow,
    shira,
    supertuning,
    tinylora,
    trainable_tokens,
    unilora,
    unipelt,
    vblora,
    vera,
    waveft,
    xlora,
)
from peftcli.methods.registry import Method, registered
from peftcli.recipe import Recipe, RecipeError, did_you_mean


def get_method_class(name: str) -> type[Method]:
    """The method registered as ``name``, or a RecipeError with a did-you-mean."""
    methods = registered()
    if name not in methods:
        hint = did_you_mean(name, methods) or f"run `peftcli methods`; known: {', '.join(sorted(methods))}"
        raise RecipeError("method.name", f"unknown method {name!r}", hint)
    return methods[name]


def method_for(recipe: Recipe) -> Method:
    """The recipe's method, configured and ready to ``attach`` (``peftcli.models.build_model``)."""
    return get_method_class(recipe.method.name)(recipe.method, recipe.model.task)


def list_methods() -> list[type[Method]]:
    """Every method, sorted by name."""
    methods = registered()
    return [methods[k] for k in sorted(methods)]
