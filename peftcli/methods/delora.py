"""DeLoRA: Decoupled Low-rank Adaptation (Bini et al., 2025, arXiv 2503.18225).

A LoRA whose update has a bounded size: the r rank-one terms b_i a_iᵀ are each normalised to unit
Frobenius norm, so the direction (B, A) is decoupled from the strength λ, and the update is measured in
units of the pretrained weight's column norms::

    ΔW = (λ / r) · B Ξ A · diag(‖W0[:, j]‖),   Ξ = diag(1 / (‖b_i‖ ‖a_i‖)),   y = W0 x + b0 + ΔW x

A (r × in) and B (out × r) are trained, and so is the scalar λ (``delora_lambda``, 15 by default):
‖ΔW‖ is at most λ times the largest column norm, whatever A and B become. The column norms of W0 are
taken once, when the adapter is created, and saved with it (peft's ``delora_w_norm``), so merging W
does not move them. As in peft, the norms ‖a_i‖, ‖b_i‖ are clamped at 1e-4 (B starts at zero), A is
drawn Kaiming-uniform (a = √5) and B is zero, so step 0 is the base. peft's ``module_dropout`` is a
dropout on the input of the update path, as here. Merging adds ΔW to W; unmerging subtracts it.
Saved as peft names it: ``delora_A``, ``delora_B``, ``delora_lambda`` and ``delora_w_norm`` under each
module, ``peft_type`` ``DELORA``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.methods.kit import (
    AdapterLayer,
    LayerMethod,
    check_patterns_match,
    pattern_key,
    validate_patterns,
    write_weight,
)
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, doc

PATTERNS = ("rank_pattern", "lambda_pattern")
NORM_FLOOR = 1e-4  # peft's clamp of ‖a_i‖ and ‖b_i‖ (B starts at zero)


@dataclass
class DeloraConfig(MethodConfig):
    """peft's ``DeloraConfig`` fields."""

    r: int = field(default=8, metadata=doc("rank of B·A (peft's default 8)", min=1))
    delora_lambda: float = field(
        default=15.0,
        metadata=doc(
            "initial λ, the bound on the update's size in units of W's column norms (trained)",
            min_exclusive=0.0,
        ),
    )
    module_dropout: float = field(
        default=0.0,
        metadata=doc("dropout on the input of the update path (peft's name)", min=0.0, max=0.99),
    )
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata=doc(
            "module names (list), a regex on full names, or all-linear (every nn.Linear but the head)"
        ),
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata=doc("per-module r: {regex or name suffix: r}, e.g. {down_proj: 16}", min=1),
    )
    lambda_pattern: dict[str, float] = field(
        default_factory=dict,
        metadata=doc("per-module initial λ: {regex or name suffix: λ}", min_exclusive=0.0),
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=doc("modules trained in full and saved whole; seq_cls heads are added"),
    )


class DeloraLinear(AdapterLayer):
    """``base_layer(x) + B (s ⊙ (A (‖W0‖ ⊙ x)))`` with s_i = (λ/r) / (‖a_i‖ ‖b_i‖), around a frozen
    ``nn.Linear``."""

    def __init__(self, base_layer: nn.Linear, r: int, delora_lambda: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        device = base_layer.weight.device
        a = torch.empty(r, self.in_features, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft's draw, from the same global stream
        self.delora_A = nn.Parameter(a)
        self.delora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        self.delora_lambda = nn.Parameter(torch.full((1,), float(delora_lambda), device=device))
        # W0's column norms, taken once (merging W must not move them); saved, as peft saves them
        self.register_buffer("delora_w_norm", base_layer.weight.detach().float().norm(dim=0))
        self.delora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def rank_scales(self) -> torch.Tensor:
        """(r,): (λ / r) / (‖a_i‖ ‖b_i‖), each norm clamped at 1e-4."""
        a_norm = self.delora_A.norm(dim=1).clamp(min=NORM_FLOOR)
        b_norm = self.delora_B.norm(dim=0).clamp(min=NORM_FLOOR)
        return self.delora_lambda / self.r / (a_norm * b_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        h = self.delora_dropout(x.to(self.delora_A.dtype)) * self.delora_w_norm
        update = F.linear(F.linear(h, self.delora_A) * self.rank_scales(), self.delora_B)
        return (result + update).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in) = B diag(s) A diag(‖W0[:, j]‖), fp32."""
        b_scaled = self.delora_B * self.rank_scales()
        return (b_scaled @ self.delora_A * self.delora_w_norm).float()

    def merge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() + self.delta_weight().detach())

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() - self.delta_weight().detach())


@register
class Delora(LayerMethod):
    name = "delora"
    description = "DeLoRA: LoRA with normalised rank-one terms and a trained bound λ on the update's size (arXiv 2503.18225)"
    config_cls = DeloraConfig
    mergeable = True
    peft_type = "DELORA"
    supports_quantized_base = False  # peft's DeLoRA wraps nn.Linear only and reads W's column norms
    supports_packing = True  # a per-token linear update: packed examples never meet
    supports_fsdp = True  # A, B, λ and the norms are plain tensors of their layer, sharded with it
    trainable_formula = (
        "r·(in + out) + 1 per adapted layer (A, B and λ; r from rank_pattern where set), plus modules_to_save"
    )
    parameter_prefix = "delora_"  # saved as base_model.model.<module>.delora_A / _B / _lambda / _w_norm
    layer_types = (DeloraLinear,)
    target_kind = "nn.Linear layers"
    target_hint = "target the model's nn.Linear layers (peft's DeLoRA adapts nn.Linear only too)"
    accepts_target = staticmethod(lambda module: isinstance(module, nn.Linear))

    cfg: DeloraConfig

    @classmethod
    def validate_config(cls, cfg: DeloraConfig, recipe) -> None:
        validate_patterns(cfg, PATTERNS)

    def resolve_targets(self, model: nn.Module) -> list[str]:
        targets = super().resolve_targets(model)
        check_patterns_match(self.cfg, targets, PATTERNS)
        return targets

    def create_layer(self, name: str, base: nn.Module) -> DeloraLinear:
        cfg = self.cfg
        r_key, l_key = pattern_key(cfg.rank_pattern, name), pattern_key(cfg.lambda_pattern, name)
        r = cfg.rank_pattern[r_key] if r_key else cfg.r
        delora_lambda = cfg.lambda_pattern[l_key] if l_key else cfg.delora_lambda
        return DeloraLinear(base, r, delora_lambda, cfg.module_dropout)

    def live_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained tensors, plus each layer's ``delora_w_norm`` buffer (peft saves it too)."""
        state = super().live_state_dict(model)
        norms = {n: b for n, b in model.named_buffers() if n.endswith(".delora_w_norm")}
        state.update({self.stored_key(n): b for n, b in norms.items()})
        return state

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(m.r * (m.in_features + m.out_features) + 1 for _, m in self.layers(model))
        return count + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {**super().adapter_config(model), "bias": "none", "init_weights": True}


__all__ = ["Delora", "DeloraConfig", "DeloraLinear"]
