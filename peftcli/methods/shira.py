"""SHiRA: Sparse High Rank Adapters (Bhardwaj et al., 2024, arXiv 2406.13175).

Each adapted layer trains a sparse update: n = r·(in + out) entries of W (as many numbers as a rank-r
LoRA, but the update is high-rank), at fixed positions P chosen once by a mask::

    y = W0 x + b0 + ΔW x,     ΔW[p_k] = w_k for the n positions p_k ∈ P, zero elsewhere

``mask_type`` picks P: ``random`` (the paper's SHiRA-Rand and peft's only built-in mask) takes the first n
cells of a permutation of the out·in grid drawn from a CPU generator seeded with ``random_seed`` (an
unseeded one when null, which torch starts from a fixed default seed); ``weight_magnitude`` (the paper's
SHiRA-WM) takes the n cells of W0 largest in magnitude. Either way the positions are kept in row-major
order, as peft derives them from its mask, and saved: ``shira_indices`` (2, n) int32 beside
``shira_weight`` (n) under each module, ``peft_type`` ``SHIRA``, so peft loads an adapter of either mask
(it reads the positions from the file, whatever the mask). w starts at zero (step 0 is the base) or, with
``init_weights: false``, N(0, 1). Merging adds ΔW to W; unmerging subtracts it (exact up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.methods.kit import AdapterLayer, LayerMethod, write_weight
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc


@dataclass
class ShiraConfig(MethodConfig):
    """peft's ``ShiraConfig`` fields."""

    r: int = field(
        default=32,
        metadata=doc(
            "sizes the update like a rank-r LoRA: r * (in + out) trained entries per layer (not a rank)",
            min=1,
        ),
    )
    mask_type: Literal["random", "weight_magnitude"] = field(
        default="random",
        metadata=doc(
            "which entries train: random (seeded by random_seed, peft's mask) or weight_magnitude "
            "(the largest |W|, the paper's SHiRA-WM)"
        ),
    )
    random_seed: int | None = field(
        default=None,
        metadata=doc("seed of the random mask (null: torch's fixed default seed, as peft)", min=0),
    )
    init_weights: bool = field(
        default=True,
        metadata=doc("true: the update starts at zero (step 0 = base); false: N(0, 1) (peft's test init)"),
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


def random_positions(out_features: int, in_features: int, n: int, seed: int | None) -> torch.Tensor:
    """(2, n) row and column of each trained entry: the first n cells of a permutation of the out·in grid
    drawn from a fresh CPU generator (seeded when ``seed`` is set), in row-major order (peft's mask)."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    cells = torch.randperm(out_features * in_features, generator=generator)[:n]
    return cells_to_positions(cells, in_features)


def magnitude_positions(weight: torch.Tensor, n: int) -> torch.Tensor:
    """(2, n) positions of the n entries of W (out, in) largest in magnitude, in row-major order."""
    cells = weight.detach().float().abs().flatten().topk(n).indices
    return cells_to_positions(cells, weight.shape[1])


def cells_to_positions(cells: torch.Tensor, in_features: int) -> torch.Tensor:
    cells = cells.sort().values
    return torch.stack([cells // in_features, cells % in_features]).to(torch.int32)


class ShiraLinear(AdapterLayer):
    """``x (W0 + ΔW)ᵀ + b0`` with ΔW zero except w at its positions, around a frozen ``nn.Linear``."""

    def __init__(self, base_layer: nn.Module, positions: torch.Tensor, zero_init: bool):
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        n = positions.shape[1]
        self.register_buffer("shira_indices", positions.to(device), persistent=False)
        self.shira_weight = nn.Parameter((torch.zeros(n) if zero_init else torch.randn(n)).to(device))

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in) in w's dtype: w scattered onto a zero grid at the saved positions."""
        weight = self.shira_weight
        grid = torch.zeros(self.out_features, self.in_features, device=weight.device, dtype=weight.dtype)
        rows, cols = self.shira_indices.long()
        return grid.index_put((rows, cols), weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        if self.merged:
            return self.base_layer(x)
        # (W0 + ΔW) x + b0 in one product, as peft computes it (W0 x + ΔW x rounds differently)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        delta = self.delta_weight()
        bias = None if bias is None else bias.to(delta.dtype)
        return F.linear(x.to(delta.dtype), weight.to(delta.dtype) + delta, bias).to(x.dtype)

    def merge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() + self.delta_weight().detach().float())

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() - self.delta_weight().detach().float())


@register
class Shira(LayerMethod):
    name = "shira"
    description = (
        "SHiRA: each layer trains r*(in+out) sparse entries of W at fixed positions (arXiv 2406.13175)"
    )
    config_cls = ShiraConfig
    mergeable = True
    peft_type = "SHIRA"
    supports_quantized_base = (
        False  # peft's SHiRA reads W0 to place (and, with weight_magnitude, pick) entries
    )
    supports_packing = True  # a per-token linear update: packed examples never meet
    supports_fsdp = (
        True  # w is a plain parameter of its layer; W0 is read inside its block's forward, unsharded
    )
    trainable_formula = "r × (in + out) per adapted layer (the sparse entries), plus modules_to_save"
    parameter_prefix = "shira_weight"  # saved as base_model.model.<module>.shira_weight, peft's key
    layer_types = (ShiraLinear,)
    target_kind = "nn.Linear layers"
    target_hint = "use LoRA or FourierFT for GPT-2's Conv1D (peft's SHiRA adapts nn.Linear only too)"
    accepts_target = staticmethod(lambda module: type(module) is nn.Linear)

    cfg: ShiraConfig

    def create_layer(self, name: str, base: nn.Module) -> ShiraLinear:
        cfg = self.cfg
        out_features, in_features = base.weight.shape
        n = cfg.r * (in_features + out_features)
        if n > in_features * out_features:
            raise RecipeError(
                "method.r",
                f"r={cfg.r} trains {n} entries of {name}, more than its {in_features * out_features}",
                f"use r <= {in_features * out_features // (in_features + out_features)}",
            )
        if cfg.mask_type == "weight_magnitude":
            positions = magnitude_positions(base.weight, n)
        else:
            positions = random_positions(out_features, in_features, n, cfg.random_seed)
        return ShiraLinear(base, positions, cfg.init_weights)

    def live_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The entries and their positions (peft saves both: the positions are the mask)."""
        state = super().live_state_dict(model)
        for name, layer in self.layers(model):
            state[self.stored_key(f"{name}.shira_indices")] = layer.shira_indices
        return state

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(self.cfg.r * (m.in_features + m.out_features) for _, m in self.layers(model))
        return count + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {**super().adapter_config(model), "fan_in_fan_out": False}


__all__ = [
    "Shira",
    "ShiraConfig",
    "ShiraLinear",
    "magnitude_positions",
    "random_positions",
]
