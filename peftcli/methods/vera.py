"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., 2024, arXiv 2310.11454).

One pair of frozen random matrices A (r, in_max) and B (out_max, r) is shared by every adapted layer;
each layer trains only two scaling vectors, d (r) and b (out)::

    y = W0 x + b0 + Λ_b B Λ_d A x,     Λ_b = diag(b), Λ_d = diag(d)

A layer of shape (out, in) uses the top-left slice A[:, :in] and B[:out, :]. A and B are drawn
Kaiming-uniform (bound √(6 / fan_in)) from a CPU generator seeded with ``projection_prng_key``, A
first, as peft draws them, so the key alone rebuilds them: with ``save_projection: false`` the adapter
holds only the vectors and loading redraws A and B. b starts at zero (step 0 is the base) and d at
``d_initial``. Saved as peft names them: ``vera_lambda_b`` / ``vera_lambda_d`` under each module, and
``base_model.vera_A`` / ``base_model.vera_B`` once (the kit's shared state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.inject import is_linear, linear_dims
from peftcli.methods.kit import AdapterLayer, LayerMethod, SharedState, write_weight
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, doc


@dataclass
class VeraConfig(MethodConfig):
    """peft's ``VeraConfig`` fields."""

    r: int = field(
        default=256,
        metadata=doc(
            "rank of the shared random A and B (peft's default 256; each layer trains r + out)", min=1
        ),
    )
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata=doc(
            "module names (list), a regex on full names, or all-linear (every linear layer but the head)"
        ),
    )
    projection_prng_key: int = field(
        default=0, metadata=doc("seed of the generator that draws the shared A and B", min=0)
    )
    save_projection: bool = field(
        default=True,
        metadata=doc("store A and B in the adapter; false: only the vectors, A and B redrawn from the key"),
    )
    vera_dropout: float = field(
        default=0.0, metadata=doc("dropout on the VeRA input path", min=0.0, max=0.99)
    )
    d_initial: float = field(
        default=0.1, metadata=doc("initial value of every entry of d (the paper and peft: 0.1)")
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=doc("modules trained in full and saved whole; seq_cls heads are added"),
    )


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-√(6 / fan_in), √(6 / fan_in)) drawn from ``generator`` (fan_in = shape[1], gain √2), the
    draw peft makes for its projections: one ``uniform_`` per tensor, in this order, reproduces them."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def shared_projections(
    r: int, in_max: int, out_max: int, key: int, a_rows: int | None = None, prefix: str = "vera"
) -> dict[str, torch.Tensor]:
    """A (a_rows, in_max) then B (out_max, r) from one CPU generator seeded with ``key``, named
    ``<prefix>_A`` / ``<prefix>_B``. A has r rows (VeRA) unless ``a_rows`` says otherwise (PVeRA's A
    has 2r: a mean and a log-variance half)."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    projection_a = kaiming_uniform((a_rows or r, in_max), generator)
    projection_b = kaiming_uniform((out_max, r), generator)
    return {f"{prefix}_A": projection_a, f"{prefix}_B": projection_b}


class VeraLinear(AdapterLayer):
    """``base_layer(x) + b ⊙ (B[:out] (d ⊙ (A[:, :in] dropout(x))))`` around a frozen linear-like layer."""

    def __init__(self, base_layer: nn.Module, shared: SharedState, r: int, d_initial: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "shared", shared)  # a reference, not a submodule: A and B have one name
        self.r = r
        device = base_layer.weight.device
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device))  # step 0 = base
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=device))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices of the shared A (r, in) and B (out, r)."""
        return self.shared.vera_A[:, : self.in_features], self.shared.vera_B[: self.out_features, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        vera_a, vera_b = self.projections()
        x = self.vera_dropout(x.to(self.vera_lambda_d.dtype))
        update = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, vera_a), vera_b)
        return (result + update).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Λ_b B Λ_d A as W stores it: (out, in), or (in, out) for GPT-2's Conv1D."""
        vera_a, vera_b = self.projections()
        delta = (self.vera_lambda_b[:, None] * vera_b) @ (self.vera_lambda_d[:, None] * vera_a)
        return delta.T if self.fan_in_fan_out else delta

    def merge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() + self.delta_weight().detach().float())

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() - self.delta_weight().detach().float())


@register
class Vera(LayerMethod):
    name = "vera"
    description = (
        "VeRA: frozen random A, B shared by all layers; each layer trains two vectors (arXiv 2310.11454)"
    )
    config_cls = VeraConfig
    mergeable = True
    peft_type = "VERA"
    supports_quantized_base = True  # the vectors act beside the layer: a 4-bit base works as in peft
    supports_packing = True  # a per-token linear update: packed examples never meet
    supports_fsdp = True  # b, d shard with their layers; A, B are buffers every rank holds whole
    trainable_formula = (
        "out + r per adapted layer (b and d; A and B are frozen and shared), plus modules_to_save"
    )
    parameter_prefix = "vera_lambda_"  # saved as base_model.model.<module>.vera_lambda_b / _d, peft's keys
    layer_types = (VeraLinear,)
    target_kind = "linear layers (nn.Linear, GPT-2's Conv1D)"
    target_hint = "target the model's linear layers"
    accepts_target = staticmethod(is_linear)

    cfg: VeraConfig

    def build_shared(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A and B, sized for the largest in and out among the targets (each layer slices its own)."""
        self.targets = self.resolve_targets(model)
        dims = [linear_dims(model.get_submodule(name)) for name in self.targets]
        in_max, out_max = max(d[0] for d in dims), max(d[1] for d in dims)
        return self.projections(in_max, out_max)

    def projections(self, in_max: int, out_max: int) -> dict[str, torch.Tensor]:
        """The shared tensors by their peft names, drawn from ``projection_prng_key``."""
        return shared_projections(self.cfg.r, in_max, out_max, self.cfg.projection_prng_key)

    def vector_sizes(self, layer: nn.Module) -> int:
        """The trained numbers of one layer: b (out) and d (r)."""
        return layer.out_features + self.cfg.r

    def create_layer(self, name: str, base: nn.Module) -> VeraLinear:
        cfg = self.cfg
        return VeraLinear(base, self.shared_state, cfg.r, cfg.d_initial, cfg.vera_dropout)

    def shared_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A and B as ``base_model.vera_A`` / ``base_model.vera_B``, or nothing when they are redrawn
        from ``projection_prng_key`` on loading (``save_projection: false``)."""
        return super().shared_state_dict(model) if self.cfg.save_projection else {}

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(self.vector_sizes(m) for _, m in self.layers(model))
        return count + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {
            **super().adapter_config(model),
            "fan_in_fan_out": self.fan_in_fan_out(model),
            "bias": "none",
            "init_weights": True,
        }


__all__ = ["Vera", "VeraConfig", "VeraLinear", "kaiming_uniform", "shared_projections"]
