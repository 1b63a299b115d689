"""GraLoRA: Granular Low-Rank Adaptation (Jung et al., 2025, arXiv 2505.20355).

The weight is cut into a k × k grid of blocks (``gralora_k``), and every block (j, n) gets its own LoRA
of rank s = r/k: output block j reads input block n only through B_jn A_jn. The parameter count is a
rank-r LoRA's, r·(in + out), but the update reaches rank k·r, and a large input in one block no longer
drives the gradient of the whole layer (the paper's diagnosis of LoRA at high rank)::

    ΔW[j, n] = B_jn A_jn   (B_jn: out/k × s, A_jn: s × in/k),   y = W0 x + b0 + (α / (r + h)) ΔW x

Stored as peft stores it: ``gralora_A`` (k, in/k, r), whose n-th slab holds A_jn for every j (columns
j·s … j·s + s − 1), and ``gralora_B`` (k, r, out/k), whose j-th slab holds B_jn for every n (rows
n·s …). With ``hybrid_r`` = h > 0 a plain LoRA of rank h is added beside the grid (Hybrid GraLoRA,
``gralora_A_general`` / ``gralora_B_general``, nn.Linear weights), and the scale is α/(r + h). As in
peft, each A_jn slab is drawn Kaiming-uniform (a = √5) from the global generator and B is zero, so step
0 is the base; the same seed draws peft's tensors. Merging adds ΔW to W (transposed for GPT-2's Conv1D);
unmerging subtracts it. ``peft_type`` ``GRALORA``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftcli.inject import is_linear
from peftcli.methods.kit import DeltaLayer, LayerMethod
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc


@dataclass
class GraloraConfig(MethodConfig):
    """peft's ``GraloraConfig`` fields."""

    r: int = field(
        default=32,
        metadata=doc("total rank r: each of the k×k blocks gets rank r/k (r divisible by gralora_k)", min=1),
    )
    alpha: float = field(
        default=64.0,
        metadata=doc("scale numerator: the update is times alpha/(r + hybrid_r)", min_exclusive=0.0),
    )
    gralora_k: int = field(
        default=2,
        metadata=doc("blocks per side (k×k grid); peft: 2 up to r = 32, 4 from r = 64", min=1),
    )
    hybrid_r: int = field(
        default=0, metadata=doc("rank of a plain LoRA beside the grid (Hybrid GraLoRA); 0: none", min=0)
    )
    gralora_dropout: float = field(
        default=0.0, metadata=doc("dropout on the input of the update path", min=0.0, max=0.99)
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


def block_factors(in_features: int, out_features: int, r: int, k: int, device) -> tuple[torch.Tensor, ...]:
    """A (k, in/k, r) and B (k, r, out/k) as peft draws them: per input block n, a Kaiming-uniform
    (a = √5) (r, in/k) slab from the global generator, transposed; B zero."""
    slabs = []
    for _ in range(k):
        slab = torch.empty(r, in_features // k)
        nn.init.kaiming_uniform_(slab, a=math.sqrt(5))
        slabs.append(slab)
    a = torch.stack(slabs).transpose(1, 2).contiguous()
    return a.to(device), torch.zeros(k, r, out_features // k, device=device)


class GraloraLinear(DeltaLayer):
    """``base_layer(x) + scale · (grid update + hybrid LoRA)`` around a frozen linear-like layer."""

    def __init__(self, base_layer: nn.Module, r: int, k: int, alpha: float, hybrid_r: int, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.k, self.hybrid_r = r, k, hybrid_r
        self.scaling = alpha / (r + hybrid_r)
        device = base_layer.weight.device
        a, b = block_factors(self.in_features, self.out_features, r, k, device)
        self.gralora_A, self.gralora_B = nn.Parameter(a), nn.Parameter(b)
        if hybrid_r > 0:  # nn.Linear weights, peft's keys (…gralora_A_general.weight) and peft's draws
            self.gralora_A_general = nn.Linear(self.in_features, hybrid_r, bias=False)
            self.gralora_B_general = nn.Linear(hybrid_r, self.out_features, bias=False)
            nn.init.kaiming_uniform_(self.gralora_A_general.weight, a=math.sqrt(5))
            nn.init.zeros_(self.gralora_B_general.weight)
            self.gralora_A_general.to(device)
            self.gralora_B_general.to(device)
        self.gralora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A as (n, i, j, s) and B as (j, n, s, o): A_jn = A[n, :, j, :]ᵀ, B_jn = B[j, n]ᵀ."""
        k, s = self.k, self.r // self.k
        a = self.gralora_A.view(k, self.in_features // k, k, s)
        b = self.gralora_B.view(k, k, s, self.out_features // k)
        return a, b

    def grid_update(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_n B_jn A_jn x_n for every output block j: (…, in) -> (…, out)."""
        a, b = self.blocks()
        x_blocks = x.unflatten(-1, (self.k, self.in_features // self.k))  # (…, n, i)
        h = torch.einsum("...ni,nijs->...njs", x_blocks, a)
        return torch.einsum("...njs,jnso->...jo", h, b).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        x = x.to(self.gralora_A.dtype)
        update = self.grid_update(self.gralora_dropout(x))
        if self.hybrid_r > 0:  # its own dropout draw, as peft's
            update = update + self.gralora_B_general(self.gralora_A_general(self.gralora_dropout(x)))
        return (result + self.scaling * update).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale · ΔW (out, in), fp32: block (j, n) is B_jn A_jn, plus the hybrid B·A."""
        a, b = self.blocks()
        grid = torch.einsum("jnso,nijs->joni", b, a).reshape(self.out_features, self.in_features)
        if self.hybrid_r > 0:
            grid = grid + self.gralora_B_general.weight @ self.gralora_A_general.weight
        return (grid * self.scaling).float()

    def stored_delta(self) -> torch.Tensor:
        """ΔW as W stores it: (out, in), or (in, out) for GPT-2's Conv1D."""
        delta = self.delta_weight().detach()
        return delta.T if self.fan_in_fan_out else delta


@register
class Gralora(LayerMethod):
    name = "gralora"
    description = (
        "GraLoRA: a k×k grid of small LoRAs per layer, LoRA's size at k times its rank (arXiv 2505.20355)"
    )
    config_cls = GraloraConfig
    mergeable = True
    peft_type = "GRALORA"
    supports_quantized_base = False  # peft's GraLoRA wraps nn.Linear and Conv1D only, never a 4-bit layer
    supports_packing = True  # a per-token linear update: packed examples never meet
    supports_fsdp = True  # A, B (and the hybrid pair) are plain parameters of their layer, sharded with it
    trainable_formula = "(r + hybrid_r)·(in + out) per adapted layer, plus modules_to_save"
    parameter_prefix = "gralora_"  # saved as base_model.model.<module>.gralora_A / _B (/ _A_general.weight)
    layer_types = (GraloraLinear,)
    target_kind = "linear layers (nn.Linear, GPT-2's Conv1D)"
    target_hint = "target the model's linear layers"
    accepts_target = staticmethod(is_linear)

    cfg: GraloraConfig

    @classmethod
    def validate_config(cls, cfg: GraloraConfig, recipe) -> None:
        if cfg.r % cfg.gralora_k:
            raise RecipeError(
                "method.r",
                f"r ({cfg.r}) must be divisible by gralora_k ({cfg.gralora_k}): each block gets rank r/k",
                f"use r = {max(1, cfg.r // cfg.gralora_k) * cfg.gralora_k} or another multiple of {cfg.gralora_k}",
            )

    def create_layer(self, name: str, base: nn.Module) -> GraloraLinear:
        cfg = self.cfg
        layer = GraloraLinear(base, cfg.r, cfg.gralora_k, cfg.alpha, cfg.hybrid_r, cfg.gralora_dropout)
        if layer.in_features % cfg.gralora_k or layer.out_features % cfg.gralora_k:
            raise RecipeError(
                "method.gralora_k",
                f"{name} is {layer.in_features} -> {layer.out_features}, not divisible into {cfg.gralora_k} blocks",
                "use a gralora_k that divides every target's in and out features, or target other modules",
            )
        return layer

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        rank = self.cfg.r + self.cfg.hybrid_r
        count = sum(rank * (m.in_features + m.out_features) for _, m in self.layers(model))
        return count + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {
            **super().adapter_config(model),
            "fan_in_fan_out": self.fan_in_fan_out(model),
            "bias": "none",
            "init_weights": True,
        }


__all__ = ["Gralora", "GraloraConfig", "GraloraLinear", "block_factors"]
