"""RoAd: 2D Rotary Adaptation (Liao et al., 2024, arXiv 2409.00119).

Each adapted layer keeps W frozen and rotates (and scales) pairs of its outputs with trained angles θ
and scales α. The outputs are cut into groups of ``group_size``; inside a group, element i is paired with
element i + group_size/2, and each pair (h₁, h₂) turns by a scaled 2-D rotation::

    y = R (W0 x + b0),     (y₁, y₂) = (c₁ h₁ − c₂ h₂,  c₁' h₂ + c₂' h₁),     c = α cos θ,  c₂ = α sin θ

in vector form y = h ⊙ c₁ + rot_half(h) ⊙ c₂ with rot_half(h) = (−h₂, h₁) per group (the paper's eq. 4).
``variant`` sets how many numbers a pair has: ``road_1`` one θ and one α per pair (out/2 each), shared
by both elements; ``road_2`` one per element (out each); ``road_4`` separate (α, θ) for c₁ and for c₂
(2·out each). θ starts at 0 and α at 1, so step 0 is the base (``init_weights: false``: θ ~ N(0, 0.5),
α ~ N(1, 0.5), peft's test init). The map is linear in h, so merging writes R W and R b into the layer
and unmerging multiplies by R⁻¹ (R is block 2×2, invertible while no pair's scale is zero). Saved as peft
names them: ``road_theta`` and ``road_alpha`` under each module, ``peft_type`` ``ROAD``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from peftcli.methods.kit import AdapterLayer, LayerMethod, write_weight
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc

Variant = Literal["road_1", "road_2", "road_4"]
# numbers of θ (and of α) per output feature, by variant
PER_OUTPUT = {"road_1": 0.5, "road_2": 1, "road_4": 2}


@dataclass
class RoadConfig(MethodConfig):
    """peft's ``RoadConfig`` fields."""

    variant: Variant = field(
        default="road_1",
        metadata=doc(
            "road_1: one angle and scale per output pair (out numbers per layer); road_2: per output "
            "(2 * out); road_4: two per output (4 * out)"
        ),
    )
    group_size: int = field(
        default=64,
        metadata=doc(
            "outputs are paired inside groups of this size (i with i + group_size/2); even, and dividing "
            "every adapted layer's out_features. Changes no result, only inference speed",
            min=2,
        ),
    )
    init_weights: bool = field(
        default=True,
        metadata=doc("true: θ = 0 and α = 1 (step 0 = base); false: θ ~ N(0, 0.5), α ~ N(1, 0.5)"),
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


def coefficients(
    variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c₁, c₂), each (out,): the factor of h and of rot_half(h) for every output."""
    if variant == "road_1":  # one (θ, α) per pair: both halves of a group reuse the group's numbers
        theta = theta.reshape(-1, group_size // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, group_size // 2).repeat_interleave(2, dim=0).flatten()
    if variant in ("road_1", "road_2"):
        return alpha * theta.cos(), alpha * theta.sin()
    # road_4: each group holds group_size numbers for c₁, then group_size for c₂
    theta, alpha = theta.reshape(-1, 2, group_size), alpha.reshape(-1, 2, group_size)
    return (alpha[:, 0] * theta[:, 0].cos()).flatten(), (alpha[:, 1] * theta[:, 1].sin()).flatten()


def rotate_half(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """(−h₂, h₁) inside every group of the last dimension, h₁/h₂ its first/second half."""
    grouped = h.reshape(*h.shape[:-1], -1, 2, group_size // 2)
    first, second = grouped[..., 0, :], grouped[..., 1, :]
    return torch.stack((-second, first), dim=-2).reshape(h.shape)


class RoadLinear(AdapterLayer):
    """``R base_layer(x)``, R the grouped 2-D rotations, applied elementwise (never built) around a frozen
    ``nn.Linear``."""

    def __init__(self, base_layer: nn.Module, variant: str, group_size: int, init_weights: bool):
        super().__init__()
        self.base_layer = base_layer
        self.variant, self.group_size = variant, group_size
        size = int(self.out_features * PER_OUTPUT[variant])
        device = base_layer.weight.device
        if init_weights:
            theta, alpha = torch.zeros(size), torch.ones(size)
        else:
            theta, alpha = torch.randn(size) * 0.5, torch.randn(size) * 0.5 + 1.0
        self.road_theta = nn.Parameter(theta.to(device))
        self.road_alpha = nn.Parameter(alpha.to(device))

    def rotate(self, h: torch.Tensor) -> torch.Tensor:
        """R h on the last dimension, in θ's dtype."""
        first, second = coefficients(self.variant, self.group_size, self.road_theta, self.road_alpha)
        h = h.to(first.dtype)
        return h * first + rotate_half(h, self.group_size) * second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        return self.rotate(result).to(result.dtype)

    def rotation(self) -> torch.Tensor:
        """R (out, out) in fp32: column k is R e_k, the rotation of the identity's rows."""
        with torch.no_grad():
            eye = torch.eye(self.out_features, device=self.road_theta.device, dtype=self.road_theta.dtype)
            return self.rotate(eye).float().T

    def transform(self, matrix: torch.Tensor) -> None:
        """W ← M W and b ← M b (the map the merged layer must apply after the base), in fp64: R⁻¹ of a
        pair whose scale is small amplifies fp32 rounding past what an unmerge should leave."""
        weight, bias = self.base_layer.weight, self.base_layer.bias
        write_weight(weight, matrix @ weight.double())
        if bias is not None:
            write_weight(bias, matrix @ bias.double())

    def merge(self) -> None:
        self.transform(self.rotation().double())

    def unmerge(self) -> None:
        self.transform(torch.linalg.inv(self.rotation().double()))


@register
class Road(LayerMethod):
    name = "road"
    description = (
        "RoAd: each layer's outputs turned in pairs by trained 2-D rotations and scales (arXiv 2409.00119)"
    )
    config_cls = RoadConfig
    mergeable = True
    peft_type = "ROAD"
    supports_quantized_base = True  # R acts on the 4-bit layer's output, as peft's bitsandbytes RoAd
    supports_packing = True  # a per-token map of the layer's output: packed examples never meet
    supports_fsdp = True  # θ and α are plain parameters of their layer; forward calls the layer
    trainable_formula = (
        "out (road_1), 2 × out (road_2) or 4 × out (road_4) per adapted layer (θ and α), plus modules_to_save"
    )
    parameter_prefix = "road_"  # saved as base_model.model.<module>.road_theta / road_alpha, peft's keys
    layer_types = (RoadLinear,)
    target_kind = "nn.Linear layers"
    target_hint = "use LoRA or FourierFT for GPT-2's Conv1D (peft's RoAd adapts nn.Linear only too)"
    accepts_target = staticmethod(lambda module: isinstance(module, nn.Linear))  # 4-bit layers are too

    cfg: RoadConfig

    @classmethod
    def validate_config(cls, cfg: RoadConfig, recipe) -> None:
        super().validate_config(cfg, recipe)
        if cfg.group_size % 2:
            raise RecipeError(
                "method.group_size",
                f"must be even (outputs pair up inside a group), got {cfg.group_size}",
                "use a power of two such as 64, or 16 for tiny models",
            )

    def create_layer(self, name: str, base: nn.Module) -> RoadLinear:
        cfg = self.cfg
        if base.out_features % cfg.group_size:
            raise RecipeError(
                "method.group_size",
                f"{cfg.group_size} does not divide {name}'s {base.out_features} outputs",
                "use a group_size that divides every adapted layer's out_features",
            )
        return RoadLinear(base, cfg.variant, cfg.group_size, cfg.init_weights)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        per_output = 2 * PER_OUTPUT[self.cfg.variant]  # θ and α
        count = sum(int(m.out_features * per_output) for _, m in self.layers(model))
        return count + self.saved_modules_count(model)


__all__ = ["Road", "RoadConfig", "RoadLinear", "coefficients", "rotate_half"]
