"""HiRA: Hadamard High-Rank Adaptation (Huang et al., ICLR 2025, openreview.net/forum?id=TwJrTz9cRS).

The update is the pretrained weight itself, modulated entry by entry by a low-rank product::

    ΔW = W0 ⊙ (B A),   y = W0 x + b0 + ΔW x      (A: r × in, B: out × r)

B A has rank r, but W0 ⊙ (B A) generally has full rank: HiRA trains a LoRA's number of parameters for
a high-rank update that follows the structure (and the scale) of W0. As in peft, A is Kaiming-uniform
(a = √5) and B zero, so step 0 is the base; peft first fills both with a standard-normal draw and then
re-initialises them, and so do we, so the same seed gives peft's tensors. Merging writes W0 + W0 ⊙ (B A)
into W and keeps W0 (on the CPU) to restore on unmerge, as peft does: the product cannot be divided back
out where 1 + (B A)_ij is near zero. Saved as peft names them: ``hira_A``, ``hira_B`` under each module,
``peft_type`` ``HIRA``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.inject import is_linear
from peftcli.methods.kit import AdapterLayer, LayerMethod, write_weight
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, doc


@dataclass
class HiraConfig(MethodConfig):
    """peft's ``HiraConfig`` fields."""

    r: int = field(default=32, metadata=doc("rank of B·A, the modulation of W0 (peft's default 32)", min=1))
    hira_dropout: float = field(
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


def hira_factors(in_features: int, out_features: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in) Kaiming-uniform and B (out, r) zero, drawn as peft draws them: both filled from
    ``randn`` first (peft's placeholders), then A re-drawn, so the global stream advances alike."""
    a, b = torch.randn(r, in_features), torch.randn(out_features, r)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a, torch.zeros_like(b)


class HiraLinear(AdapterLayer):
    """``base_layer(x) + x (W0 ⊙ B A)ᵀ`` around a frozen linear-like layer."""

    def __init__(self, base_layer: nn.Module, r: int, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        device = base_layer.weight.device
        a, b = hira_factors(self.in_features, self.out_features, r)
        self.hira_A, self.hira_B = nn.Parameter(a.to(device)), nn.Parameter(b.to(device))
        self.hira_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.base_before_merge: torch.Tensor | None = None  # W0, kept on the CPU while merged

    def base_weight(self) -> torch.Tensor:
        """W0 as (out, in), whatever the layer stores (GPT-2's Conv1D stores (in, out))."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def delta_weight(self) -> torch.Tensor:
        """ΔW = W0 ⊙ (B A), (out, in), in the factors' dtype."""
        return self.base_weight().to(self.hira_A.dtype) * (self.hira_B @ self.hira_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        update = F.linear(self.hira_dropout(x.to(self.hira_A.dtype)), self.delta_weight())
        return (result + update).to(result.dtype)

    def merge(self) -> None:
        weight = self.base_layer.weight
        delta = self.delta_weight().detach().float()
        self.base_before_merge = weight.detach().clone().cpu()
        write_weight(weight, weight.float() + (delta.T if self.fan_in_fan_out else delta))

    def unmerge(self) -> None:
        """W0 restored from the copy taken at merge (exact), as peft restores it."""
        write_weight(self.base_layer.weight, self.base_before_merge.to(self.base_layer.weight.device))
        self.base_before_merge = None


@register
class Hira(LayerMethod):
    name = "hira"
    description = (
        "HiRA: the update is W0 ⊙ (B·A), a high-rank change at LoRA's size (ICLR 2025, openreview TwJrTz9cRS)"
    )
    config_cls = HiraConfig
    mergeable = True
    peft_type = "HIRA"
    supports_quantized_base = False  # the update reads the dense W0, which a 4-bit layer does not hold
    supports_packing = True  # a per-token linear update: packed examples never meet
    supports_fsdp = False  # the update reads the whole W0 outside the base layer's own forward
    trainable_formula = "r·(in + out) per adapted layer (A and B), plus modules_to_save"
    parameter_prefix = "hira_"  # saved as base_model.model.<module>.hira_A / hira_B, peft's keys
    layer_types = (HiraLinear,)
    target_kind = "linear layers (nn.Linear, GPT-2's Conv1D)"
    target_hint = "target the model's linear layers"
    accepts_target = staticmethod(is_linear)

    cfg: HiraConfig

    def create_layer(self, name: str, base: nn.Module) -> HiraLinear:
        return HiraLinear(base, self.cfg.r, self.cfg.hira_dropout)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(m.r * (m.in_features + m.out_features) for _, m in self.layers(model))
        return count + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {
            **super().adapter_config(model),
            "fan_in_fan_out": self.fan_in_fan_out(model),
            "init_weights": True,
            "rank_pattern": {},  # peft 0.21's HiRA layers read config.r only, so we offer no pattern
        }


__all__ = ["Hira", "HiraConfig", "HiraLinear", "hira_factors"]
