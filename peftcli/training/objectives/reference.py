"""The reference of dpo/ipo, with no second copy of the model:

* ``base``: the same weights with the adapter switched off (:meth:`Method.adapter_disabled`);
* ``start``: the adapter as the run started (its trainable tensors, kept once at set-up: a fresh
  adapter, or ``model.adapter``'s trained one), swapped in for the reference forward and swapped back
  out after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from peftcli.methods.registry import Method
from peftcli.recipe import RecipeError

# LoRA inits that move the adapter's start into the base weight (W − B₀A₀): with the adapter off, the
# model is that residual, not the base, so only ``reference: start`` (= the base at step 0) is right.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga")  # LoRA inits that keep W0 − s·B·A as the base


def check_base_reference(method_cfg) -> None:
    """Refuse ``reference: base`` where switching the adapter off does not give the base model back."""
    init = getattr(method_cfg, "init", None)
    if init in BASE_REWRITING_INITS:
        raise RecipeError(
            "objective.reference",
            f"method.init {init} rewrites the base weights, so with the adapter off the model is not the base",
            "set objective.reference: start (the model as the run starts is the base)",
        )


def reference_context(
    kind: str, method: Method, model: nn.Module
) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory of the context in which ``model`` computes the reference's log-probs."""
    if kind == "start":
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return lambda: swapped_in(model, start)
    if method.adapter_disabled(model) is None:
        raise RecipeError(
            "objective.reference",
            f"{method.name} cannot switch its adapter off, so the base model is no reference",
            "set objective.reference: start",
        )
    return lambda: method.adapter_disabled(model)


@contextlib.contextmanager
def swapped_in(model: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """``values`` in place of the named parameters' data inside the block (no copies)."""
    params = dict(model.named_parameters())
    kept = {n: params[n].data for n in values}
    try:
        for n, v in values.items():
            params[n].data = v
        yield
    finally:
        for n, v in kept.items():
            params[n].data = v
