"""Houlsby bottleneck adapters (Houlsby et al., 2019, arXiv 1902.00751), with the Pfeiffer preset.

After the attention sublayer and after the feed-forward sublayer of every transformer layer, the
sublayer output ``h ∈ R^d`` passes through a bottleneck with a skip connection::

    h ← h + W_up σ(W_down h + b_down) + b_up        W_down ∈ R^{m×d}, W_up ∈ R^{d×m}, m = d / reduction_factor

before the layer's residual add (and, in BERT, before its LayerNorm). ``W_up`` and ``b_up`` start at
zero, so the tuned model equals the base at step 0 (the paper's near-identity init, made exact).
Houlsby et al. also train the layer norms (``train_layer_norms``).

Presets (``config``):

- ``houlsby``: both positions (attn, ffn), swish, reduction factor 16, layer norms trained.
- ``pfeiffer`` (Pfeiffer et al., 2021, arXiv 2005.00247): the feed-forward position only, relu,
  reduction factor 16, layer norms frozen. AdapterHub's Pfeiffer adapter also re-applies the layer's
  LayerNorm before the bottleneck; we keep one placement for every family and do not.

Any option set explicitly overrides the preset. Where the adapter goes in each model family is
tabled in :mod:`peftcli.methods.bottleneck`.

Saved tensors: ``base_model.model.<sublayer output module>.adapter.{down,up}.{weight,bias}``, plus
the trained layer norms and classification head under their own module paths. ``adapter_config.json``
carries no ``peft_type`` (peft has no such method).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

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
from peftcli.recipe import MethodConfig, Recipe, RecipeError, doc, from_dict, to_dict

Nonlinearity = Literal["relu", "gelu", "swish", "tanh"]

PRESETS: dict[str, dict[str, Any]] = {
    "houlsby": {
        "positions": ["attn", "ffn"],
        "nonlinearity": "swish",
        "reduction_factor": 16.0,
        "train_layer_norms": True,
    },
    "pfeiffer": {
        "positions": ["ffn"],
        "nonlinearity": "relu",
        "reduction_factor": 16.0,
        "train_layer_norms": False,
    },
}


@dataclass
class HoulsbyConfig(MethodConfig):
    config: Literal["houlsby", "pfeiffer"] = field(
        default="houlsby",
        metadata=doc("preset: houlsby (attn+ffn, swish, layer norms trained) or pfeiffer (ffn only, relu)"),
    )
    reduction_factor: float | None = field(
        default=None,
        metadata=doc("bottleneck width m = hidden_size / reduction_factor (preset: 16)", min=1.0),
    )
    bottleneck_size: int | None = field(
        default=None, metadata=doc("bottleneck width m directly (instead of reduction_factor)", min=1)
    )
    nonlinearity: Nonlinearity | None = field(
        default=None, metadata=doc("σ in the bottleneck: relu, gelu, swish or tanh (preset: swish / relu)")
    )
    positions: list[Literal["attn", "ffn"]] | None = field(
        default=None, metadata=doc("sublayers that get an adapter: [attn, ffn] (houlsby) or [ffn] (pfeiffer)")
    )
    train_layer_norms: bool | None = field(
        default=None, metadata=doc("also train every layer's norms (Houlsby et al. do; preset: true / false)")
    )


def resolved(cfg: HoulsbyConfig) -> HoulsbyConfig:
    """The config with the preset's values filled into the unset options."""
    preset = PRESETS[cfg.config]
    values = to_dict(cfg)
    for key, value in preset.items():
        if values.get(key) is None:
            values[key] = value
    if cfg.bottleneck_size is not None:
        values["reduction_factor"] = None
    return from_dict(HoulsbyConfig, values, "method")


class SerialAdapter(nn.Module):
    """``h + bottleneck(h)``: Houlsby's adapter on a sublayer output."""

    needs_input = False

    def __init__(self, hidden_size: int, bottleneck_size: int, nonlinearity: str):
        super().__init__()
        self.bottleneck = Bottleneck(hidden_size, bottleneck_size, nonlinearity)

    def forward(self, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        # h: (B, T, d) -> (B, T, d)
        delta = self.bottleneck(h.to(self.bottleneck.up.weight.dtype))
        return h + delta.to(h.dtype)


@register
class HoulsbyAdapter(Method):
    name = "houlsby_adapter"
    description = "Houlsby/Pfeiffer bottleneck adapters after attention and FFN sublayers (arXiv 1902.00751)"
    config_cls = HoulsbyConfig
    parameter_prefix = ADAPTER_ATTR  # the blocks are children named "adapter"
    trainable_formula = (
        "per adapted sublayer 2·d·m + d + m (m = d / reduction_factor), plus the layer norms "
        "when train_layer_norms and a seq_cls head"
    )

    cfg: HoulsbyConfig

    def __init__(self, cfg: HoulsbyConfig, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.options = resolved(cfg)
        self.sublayers: list[Sublayer] = []

    @classmethod
    def validate_config(cls, cfg: HoulsbyConfig, recipe: Recipe) -> None:
        if cfg.reduction_factor is not None and cfg.bottleneck_size is not None:
            raise RecipeError(
                "method.bottleneck_size",
                "set either reduction_factor or bottleneck_size, not both",
                "remove one of them",
            )
        if cfg.positions is not None and not cfg.positions:
            raise RecipeError(
                "method.positions", "needs at least one sublayer", "e.g. positions: [attn, ffn]"
            )

    def apply(self, model: nn.Module) -> nn.Module:
        opts = self.options
        self.sublayers = find_sublayers(model, tuple(p for p in POSITIONS if p in opts.positions))
        for sub in self.sublayers:
            m = bottleneck_width(sub.hidden_size, opts.reduction_factor, opts.bottleneck_size)
            block = SerialAdapter(sub.hidden_size, m, opts.nonlinearity)
            block.to(device=_device_of(model))
            attach(model, sub, block)
        norms = (
            list(dict.fromkeys(n for sub in self.sublayers for n in sub.layer_norms))
            if opts.train_layer_norms
            else []
        )
        self.saved_modules = make_trainable_copies(model, norms + classifier_heads(model, self.task))
        return model

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        return blocks_parameter_count(model, self.sublayers) + self.saved_modules_count(model)

    # -- saving: the blocks under ADAPTER_ATTR and the modules trained whole (Method's default) -----
    def stored_key(self, parameter_name: str) -> str:
        return PREFIX + serial_block_key(parameter_name)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        """The options as resolved from the preset, so the file says what was built."""
        return {**super().adapter_config(model), **self.config_fields(self.options)}


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


__all__ = ["HoulsbyAdapter", "HoulsbyConfig", "SerialAdapter", "resolved"]
