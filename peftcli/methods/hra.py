"""HRA: Householder Reflection Adaptation (Yuan et al., 2024, arXiv 2405.17484).

Each adapted linear layer keeps W frozen and trains r vectors u_1..u_r (the columns of U, in × r). The
adapted weight is W times a chain of Householder reflections, an orthogonal matrix::

    W' = W H,     H = H_1 H_2 … H_r,     H_i = I − 2 û_i û_iᵀ,   û_i = u_i / ‖u_i‖

With ``apply_GS`` the columns are first made orthonormal (Gram–Schmidt), and H = I − 2 Q Qᵀ. The
forward never builds H: y = W (Hᵀ x) + b, and Hᵀ x is r rank-one reflections of x, O(r·in) per token.
The default init draws r/2 Kaiming-uniform columns and repeats each one (u_1 = u_2, u_3 = u_4, …): two
equal reflections cancel, so step 0 is the base (an odd r has no such pairing and starts elsewhere, as in
peft). Merging writes W H into W; unmerging writes W Hᵀ back (H is orthogonal): exact up to rounding.
Saved as peft names it: ``hra_u`` (in, r) under each module, ``peft_type`` ``HRA``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.methods.kit import AdapterLayer, LayerMethod, write_weight
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc


@dataclass
class HraConfig(MethodConfig):
    """peft's ``HRAConfig`` fields."""

    r: int = field(
        default=8,
        metadata=doc("number of Householder reflections per layer (even: step 0 is the base)", min=1),
    )
    apply_GS: bool = field(
        default=False,
        metadata=doc("orthonormalise the r vectors (Gram-Schmidt): H = I - 2 Q Q^T instead of a chain"),
    )
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata=doc(
            "module names (list), a regex on full names, or all-linear (every nn.Linear but the head)"
        ),
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=doc("modules trained in full and saved whole; seq_cls heads are added"),
    )


def symmetric_init(in_features: int, r: int) -> torch.Tensor:
    """U (in, r) from the global generator, as peft draws it: for an even r, r/2 Kaiming-uniform
    (a = √5) columns each repeated twice, so the reflections cancel in pairs; for an odd r, r columns."""
    if r % 2:
        u = torch.empty(in_features, r)
        nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        return u
    half = torch.zeros(in_features, r // 2)
    nn.init.kaiming_uniform_(half, a=math.sqrt(5))
    return torch.repeat_interleave(half, 2, dim=1)


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """The columns of ``u`` made orthonormal in order (classical Gram-Schmidt, column by column)."""
    columns: list[torch.Tensor] = []
    for i in range(u.shape[1]):
        v = u[:, i]
        for q in columns:
            v = v - (q @ v) * q
        columns.append(v / v.norm())
    return torch.stack(columns, dim=1)


class HraLinear(AdapterLayer):
    """``base_layer(Hᵀ x)`` around a frozen ``nn.Linear``: W H x without building H."""

    def __init__(self, base_layer: nn.Linear, r: int, apply_gs: bool):
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.apply_gs = apply_gs
        device = base_layer.weight.device
        self.hra_u = nn.Parameter(symmetric_init(self.in_features, r).to(device))

    def reflect(self, x: torch.Tensor) -> torch.Tensor:
        """Hᵀ applied to each row of x (…, in): H_r first, H_1 last; or x − 2 (x Q) Qᵀ with GS."""
        u = self.hra_u
        if self.apply_gs:
            q = gram_schmidt(u)
            return x - 2 * (x @ q) @ q.T
        u = u / u.norm(dim=0)
        for i in reversed(range(self.r)):
            ui = u[:, i]
            x = x - 2 * (x @ ui)[..., None] * ui
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        if self.merged:
            return self.base_layer(x)
        dtype = x.dtype
        rotated = self.reflect(x.to(self.hra_u.dtype))
        weight = self.base_layer.weight
        return F.linear(rotated.to(weight.dtype), weight, self.base_layer.bias).to(dtype)

    def rotation(self) -> torch.Tensor:
        """H (in, in) in fp32: the identity's rows reflected (H is symmetric per factor, so Hᵀ I = Hᵀ)."""
        eye = torch.eye(self.in_features, device=self.hra_u.device, dtype=torch.float32)
        return self.reflect(eye).T  # reflect gives I Hᵀ (row-wise): its transpose is H

    def merge(self) -> None:
        weight = self.base_layer.weight
        h = self.rotation().detach()
        write_weight(weight, weight.float() @ h)

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        h = self.rotation().detach()
        write_weight(weight, weight.float() @ h.T)


@register
class Hra(LayerMethod):
    name = "hra"
    description = (
        "HRA: each layer's weight times a chain of r trained Householder reflections (arXiv 2405.17484)"
    )
    config_cls = HraConfig
    mergeable = True
    peft_type = "HRA"
    supports_quantized_base = False  # peft's HRA reads W as a dense matrix; a 4-bit W has no such path
    supports_packing = True  # a per-token map of x: packed examples never meet
    supports_fsdp = True  # U is a plain parameter of its layer, sharded with it; forward calls the layer
    trainable_formula = "in × r per adapted layer (the vectors u), plus modules_to_save"
    parameter_prefix = "hra_u"  # saved as base_model.model.<module>.hra_u, peft's key
    layer_types = (HraLinear,)
    target_kind = "nn.Linear layers"
    target_hint = "use LoRA or OFT for GPT-2's Conv1D (peft's HRA adapts nn.Linear only too)"
    accepts_target = staticmethod(lambda module: type(module) is nn.Linear)

    cfg: HraConfig

    @classmethod
    def validate_config(cls, cfg: HraConfig, recipe) -> None:
        super().validate_config(cfg, recipe)
        if cfg.apply_GS and cfg.r % 2 == 0:
            raise RecipeError(
                "method.apply_GS",
                f"with an even r ({cfg.r}) the paired init gives Gram-Schmidt a zero column: NaN from step 0 (peft too)",
                "use an odd r with apply_GS: true",
            )

    def create_layer(self, name: str, base: nn.Module) -> HraLinear:
        return HraLinear(base, self.cfg.r, self.cfg.apply_GS)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(m.in_features * self.cfg.r for _, m in self.layers(model))
        return count + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {**super().adapter_config(model), "bias": "none", "init_weights": True}


__all__ = ["Hra", "HraConfig", "HraLinear", "gram_schmidt", "symmetric_init"]
