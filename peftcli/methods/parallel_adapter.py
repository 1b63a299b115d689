"""Parallel adapters (He et al., 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning", arXiv 2110.04366).

The bottleneck runs beside a sublayer ``f`` instead of after it: it reads the sublayer's *input*
``x`` and its scaled output is added to the sublayer's output::

    h = f(x) + s · (W_up ReLU(W_down x + b_down) + b_up)        W_down ∈ R^{m×d}, W_up ∈ R^{d×m}

The paper finds the feed-forward placement
with ``s = 4`` the best use of a parameter budget ("scaled PA"), so ``positions: [ffn]`` and
``scaling: 4`` are the defaults. ``W_up``, ``b_up`` start at zero (the paper's code uses this
LoRA-style init), so step 0 equals the base. Where ``x`` is read and ``h`` replaced in each model
family is tabled in :mod:`peftcli.methods.bottleneck` (for BERT the FFN input is the input of
``intermediate`` and the result goes in before the output's dropout, residual and LayerNorm).

Saved tensors: ``base_model.model.<sublayer output module>.adapter.{down,up}.{weight,bias}`` (and a
seq_cls head). ``adapter_config.json`` carries no ``peft_type``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from peftcli.inject import PREFIX, classifier_heads, make_trainable_copies
from peftcli.methods.bottleneck import (
    ADAPTER_ATTR,
    POSITIONS,
    Bottleneck,
    Sublayer,
    attach,
    blocks_parameter_count,
    bottleneck_width,
    find_sublayers,
    serial_block_key,
)
from peftcli.methods.registry import Method, register
from peftcli.recipe import MethodConfig, Recipe, RecipeError, doc


@dataclass
class ParallelAdapterConfig(MethodConfig):
    positions: list[Literal["attn", "ffn"]] = field(
        default_factory=lambda: ["ffn"],
        metadata=doc("sublayers that get a parallel adapter: [ffn] (paper's best), [attn] or both"),
    )
    reduction_factor: float | None = field(
        default=None,
        metadata=doc("bottleneck width m = hidden_size / reduction_factor (default 16)", min=1.0),
    )
    bottleneck_size: int | None = field(default=None, metadata=doc("bottleneck width m directly", min=1))
    scaling: float = field(
        default=4.0, metadata=doc("s, the scale of the adapter's output (paper: 4)", min_exclusive=0.0)
    )
    nonlinearity: Literal["relu", "gelu", "swish", "tanh"] = field(
        default="relu", metadata=doc("σ in the bottleneck (paper: relu)")
    )


class ParallelAdapterBlock(nn.Module):
    """``h + s · bottleneck(x)`` where ``x`` is the sublayer input and ``h`` its output."""

    needs_input = True

    def __init__(self, hidden_size: int, bottleneck_size: int, nonlinearity: str, scaling: float):
        super().__init__()
        self.bottleneck = Bottleneck(hidden_size, bottleneck_size, nonlinearity)
        self.scaling = scaling

    def forward(self, h: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        # x: (B, T, d) sublayer input, h: (B, T, d) sublayer output -> (B, T, d)
        delta = self.bottleneck(x.to(self.bottleneck.up.weight.dtype)) * self.scaling
        return h + delta.to(h.dtype)


@register
class ParallelAdapter(Method):
    name = "parallel_adapter"
    description = "Parallel bottleneck adapter beside the FFN (or attention), scaled by s (arXiv 2110.04366)"
    config_cls = ParallelAdapterConfig
    parameter_prefix = ADAPTER_ATTR  # the blocks are children named "adapter"
    trainable_formula = "per adapted sublayer 2·d·m + d + m (m = d / reduction_factor), plus a seq_cls head"

    cfg: ParallelAdapterConfig

    def __init__(self, cfg: ParallelAdapterConfig, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.sublayers: list[Sublayer] = []

    @classmethod
    def validate_config(cls, cfg: ParallelAdapterConfig, recipe: Recipe) -> None:
        if cfg.reduction_factor is not None and cfg.bottleneck_size is not None:
            raise RecipeError(
                "method.bottleneck_size",
                "set either reduction_factor or bottleneck_size, not both",
                "remove one of them",
            )
        if not cfg.positions:
            raise RecipeError("method.positions", "needs at least one sublayer", "e.g. positions: [ffn]")

    def apply(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        device = next(model.parameters()).device
        self.sublayers = find_sublayers(model, tuple(p for p in POSITIONS if p in cfg.positions))
        for sub in self.sublayers:
            m = bottleneck_width(sub.hidden_size, cfg.reduction_factor, cfg.bottleneck_size)
            attach(
                model, sub, ParallelAdapterBlock(sub.hidden_size, m, cfg.nonlinearity, cfg.scaling).to(device)
            )
        self.saved_modules = make_trainable_copies(model, classifier_heads(model, self.task))
        return model

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        return blocks_parameter_count(model, self.sublayers) + self.saved_modules_count(model)

    # -- saving: the blocks under ADAPTER_ATTR and the modules trained whole (Method's default) -----
    def stored_key(self, parameter_name: str) -> str:
        return PREFIX + serial_block_key(parameter_name)


__all__ = ["ParallelAdapter", "ParallelAdapterBlock", "ParallelAdapterConfig"]
