"""DEFT: "Decompositional Efficient Fine-Tuning for Text-to-Image Models" (NeurIPS 2025, the paper peft
cites; with ``para: true`` it is PaRa, parameter rank reduction, the removal term alone, which DEFT
extends with an injection term).

Each adapted linear layer trains a projection direction P (out, r) and an injection matrix R (r, in).
The adapted weight removes a rank-r subspace of W's output space and injects a new one::

    W' = (I − P_proj) W + s · Q_P R,        s = alpha / r (1 without alpha)

- ``decomposition_method: relu`` (default): Q_P = P, P_proj = P relu(P)ᵀ (not an orthogonal projector);
- ``qr``: Q_P = qr(P).Q, P_proj = Q_P Q_Pᵀ (orthogonal).

``para: true`` keeps only the removal, W' = (I − P_proj) W (P alone trains; step 0 is not the base).
Otherwise R starts at ``rightᵀ W / s`` (right = relu(P) or Q_P), so s·Q_P R = P_proj W and step 0 is the
base; ``init_weights: false`` draws R from N(0, (0.02·init_scale)²) instead. P starts N(0, 0.02²). The
forward never builds an (out, out) matrix: with h = W x, ``y = h + b − Q_P (rightᵀ h) + s·Q_P (R x)``.
Merging adds ``Q_P (s R − rightᵀ W)`` into W; unmerging subtracts it, with ``rightᵀ W`` kept from the
merge (the base weight has changed by then). Saved as peft names it: ``deft_P``, ``deft_R`` under each
module, ``peft_type`` ``DEFT``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.inject import is_linear
from peftcli.methods.kit import AdapterLayer, LayerMethod, write_weight
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, doc


@dataclass
class DeftConfig(MethodConfig):
    """peft's ``DeftConfig`` fields."""

    r: int = field(default=8, metadata=doc("rank of the removed and injected subspaces", min=1))
    decomposition_method: Literal["relu", "qr"] = field(
        default="relu",
        metadata=doc("P_proj from P: relu (P relu(P)^T, not orthogonal) or qr (Q_P Q_P^T, orthogonal)"),
    )
    alpha: int | None = field(
        default=None, metadata=doc("scale s = alpha / r on the injection term; null: s = 1", min=1)
    )
    para: bool = field(
        default=False,
        metadata=doc("PaRa: remove the subspace only, no injection (P alone trains; step 0 is not the base)"),
    )
    init_scale: float = field(
        default=1.0, metadata=doc("std multiplier of R's random draw (init_weights: false only)")
    )
    deft_dropout: float = field(
        default=0.0, metadata=doc("dropout on the injection path's input", min=0.0, max=0.99)
    )
    init_weights: bool = field(
        default=True,
        metadata=doc("start R so that the injection cancels the removal (step 0 is the base); false: random"),
    )
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata=doc(
            "module names (list), a regex on full names, or all-linear (every linear layer but the head)"
        ),
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=doc("modules trained in full and saved whole; seq_cls heads are added"),
    )


class DeftLinear(AdapterLayer):
    """``h + b − Q_P (rightᵀ h) + s·Q_P (R x)`` with h = W x, around a frozen linear-like layer."""

    def __init__(self, base_layer: nn.Module, cfg: DeftConfig):
        super().__init__()
        self.base_layer = base_layer
        self.r = min(cfg.r, self.out_features)
        self.method = cfg.decomposition_method
        self.para = cfg.para
        self.scaling = cfg.alpha / self.r if cfg.alpha else 1.0
        device = base_layer.weight.device
        self.deft_P = nn.Parameter((torch.randn(self.out_features, self.r) * 0.02).to(device))
        self.deft_dropout = nn.Dropout(cfg.deft_dropout) if cfg.deft_dropout > 0 else nn.Identity()
        self.register_buffer("merge_factor", None, persistent=False)  # rightᵀ W0 while merged
        if not cfg.para:
            if cfg.init_weights:
                start = self.factor() / self.scaling
            else:
                start = torch.randn(self.r, self.in_features) * 0.02 * cfg.init_scale
            self.deft_R = nn.Parameter(start.detach().to(device))

    def projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_P, right) in fp32 with P_proj = Q_P rightᵀ."""
        p = self.deft_P.float()
        if self.method == "relu":
            return p, torch.relu(p)
        q, _ = torch.linalg.qr(p)
        return q, q

    def base_weight(self) -> torch.Tensor:
        """W as (out, in), fp32 (GPT-2's Conv1D stores its transpose)."""
        weight = self.base_layer.weight.float()
        return weight.T if self.fan_in_fan_out else weight

    def factor(self) -> torch.Tensor:
        """rightᵀ W (r, in): the only part of the update that reads the base weight."""
        return self.projection()[1].T @ self.base_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out), computed in fp32
        result = self.base_layer(x)
        if self.merged:
            return result
        dtype, out = result.dtype, result.float()
        bias = self.base_layer.bias
        product = out if bias is None else out - bias.float()  # W x
        q, right = self.projection()
        out = out - (product @ right) @ q.T
        if not self.para:
            injected = F.linear(self.deft_dropout(x.float()), self.deft_R.float() * self.scaling)
            out = out + injected @ q.T
        return out.to(dtype)

    def delta_weight(self, factor: torch.Tensor) -> torch.Tensor:
        """Q_P (s R − rightᵀ W) (or −Q_P rightᵀ W with PaRa), as W stores it."""
        q, _ = self.projection()
        inner = -factor if self.para else self.deft_R.float() * self.scaling - factor
        delta = (q @ inner).detach()
        return delta.T if self.fan_in_fan_out else delta

    def merge(self) -> None:
        with torch.no_grad():
            factor = self.factor()
            self.merge_factor = factor
            weight = self.base_layer.weight
            write_weight(weight, weight.float() + self.delta_weight(factor))

    def unmerge(self) -> None:
        with torch.no_grad():
            weight = self.base_layer.weight
            write_weight(weight, weight.float() - self.delta_weight(self.merge_factor))
            self.merge_factor = None


@register
class Deft(LayerMethod):
    name = "deft"
    description = (
        "DEFT: each layer removes a trained rank-r output subspace of W and injects a new one (NeurIPS 2025)"
    )
    config_cls = DeftConfig
    mergeable = True
    peft_type = "DEFT"
    supports_quantized_base = False  # rightᵀ W reads W as a dense matrix
    supports_packing = True  # a per-token linear map: packed examples never meet
    supports_fsdp = False  # the forward reads the whole W (merge factor, init): not checked sharded
    trainable_formula = (
        "out·r + r·in per adapted layer (out·r with para), r capped at out; plus modules_to_save"
    )
    parameter_prefix = "deft_"  # saved as base_model.model.<module>.deft_P / deft_R, peft's keys
    layer_types = (DeftLinear,)
    target_kind = "linear layers (nn.Linear, GPT-2's Conv1D)"
    accepts_target = staticmethod(is_linear)

    cfg: DeftConfig

    def create_layer(self, name: str, base: nn.Module) -> DeftLinear:
        return DeftLinear(base, self.cfg)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(
            m.out_features * m.r + (0 if self.cfg.para else m.r * m.in_features)
            for _, m in self.layers(model)
        )
        return count + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {**super().adapter_config(model), "fan_in_fan_out": self.fan_in_fan_out(model), "bias": "none"}


__all__ = ["Deft", "DeftConfig", "DeftLinear"]
