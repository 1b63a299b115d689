"""TinyLoRA: Learning to Reason in 13 Parameters (arXiv 2602.04118).

LoRA-XS taken to its limit. Each adapted layer keeps the top-r singular directions of its own frozen
weight, W0 ≈ U_r S_r V_rᵀ, and adapts only an r × r matrix R between them; R itself is not trained but
spanned by u fixed random matrices P_1 … P_u and a trained vector v of length u::

    ΔW = B R A,   A = √S_r V_rᵀ (r × in),   B = U_r √S_r (out × r),   R = Σ_i v_i P_i,
    y = W0 x + b0 + ΔW x

With ``weight_tying`` layers share v: the adapted layers, in model order, fall into
max(1, round(n·(1 − weight_tying))) consecutive groups (n // groups layers each, the last one taking
the rest), one v per group; 1.0 trains a single u-vector for the whole model. As in peft: P ~ N(0, 1/r)
from a CPU generator seeded with ``projection_seed`` + the layer's index; the SVD is taken in fp32 and
r is capped at min(in, out); v starts at zero (step 0 is the base), or U(−``init_v_bound``,
``init_v_bound``) with ``init_weights: uniform``. Saved as peft saves it: the frozen ``tinylora_A`` /
``tinylora_B`` (and ``tinylora_P`` unless ``save_projection: false``, when the seed rebuilds them) under
each module, and the trained vectors once, as ``base_model.tinylora_v.<group>`` (the kit's shared state).
Merging adds ΔW to W (transposed for GPT-2's Conv1D); unmerging subtracts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.inject import is_linear
from peftcli.methods.kit import DeltaLayer, LayerMethod, SharedState
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc


@dataclass
class TinyLoraConfig(MethodConfig):
    """peft's ``TinyLoraConfig`` fields."""

    r: int = field(default=2, metadata=doc("rank of the frozen SVD of each W0 (the paper: 2)", min=1))
    u: int = field(default=64, metadata=doc("length of each trained vector v (as low as 1–13)", min=1))
    weight_tying: float = field(
        default=0.0,
        metadata=doc("share v across layers: 0.0 one v per layer, 1.0 one v for the model", min=0.0, max=1.0),
    )
    projection_seed: int = field(
        default=42, metadata=doc("seed of the fixed random P (layer i uses seed + i)", min=0)
    )
    save_projection: bool = field(
        default=True, metadata=doc("store P in the adapter; false: rebuilt from projection_seed on load")
    )
    init_weights: bool | Literal["uniform"] = field(
        default=True,
        metadata=doc("true: v starts at zero (step 0 = base); uniform: U(-init_v_bound, init_v_bound)"),
    )
    init_v_bound: float = field(
        default=0.02, metadata=doc("bound of the uniform init of v", min_exclusive=0.0)
    )
    tinylora_dropout: float = field(
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


def group_of(index: int, layers: int, weight_tying: float) -> int:
    """The v group of the ``index``-th of ``layers`` adapted layers (peft's assignment)."""
    groups = max(1, round(layers * (1.0 - weight_tying)))
    size = max(1, layers // groups)
    return min(index // size, groups - 1)


def svd_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = √S_r V_rᵀ (r, in) and B = U_r √S_r (out, r) of W (out, in), in fp32, r ≤ min(out, in)."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    r = min(r, *weight.shape)
    root = s[:r].sqrt()
    return (root[:, None] * vh[:r]).contiguous(), (u[:, :r] * root[None, :]).contiguous()


def projections(u: int, r: int, seed: int) -> torch.Tensor:
    """P (u, r, r) ~ N(0, 1/r) from a CPU generator seeded with ``seed`` (peft's draw)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.normal(mean=0.0, std=1.0 / r**0.5, size=(u, r, r), generator=generator)


class TinyLoraLinear(DeltaLayer):
    """``base_layer(x) + B R A x`` with R = Σ v_i P_i, v shared through the model's shared state."""

    def __init__(
        self,
        base_layer: nn.Module,
        shared: SharedState,
        group: str,
        r: int,
        u: int,
        seed: int,
        dropout: float,
    ):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "shared", shared)  # a reference, not a submodule: v has one name
        self.group = group
        weight = base_layer.weight.detach()
        a, b = svd_factors(weight.T if self.fan_in_fan_out else weight, r)
        self.r = a.shape[0]
        self.register_buffer("tinylora_A", a)
        self.register_buffer("tinylora_B", b)
        self.register_buffer("tinylora_P", projections(u, self.r, seed).to(weight.device))
        self.tinylora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def mixing(self) -> torch.Tensor:
        """R (r, r) = Σ_i v_i P_i."""
        v = self.shared.tinylora_v[self.group]
        return torch.einsum("i,ijk->jk", v, self.tinylora_P.to(v.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        h = F.linear(self.tinylora_dropout(x.to(self.tinylora_A.dtype)), self.tinylora_A)
        update = F.linear(F.linear(h, self.mixing()), self.tinylora_B)
        return (result + update).to(result.dtype)

    def stored_delta(self) -> torch.Tensor:
        """ΔW = B R A as W stores it: (out, in), or (in, out) for GPT-2's Conv1D, fp32."""
        delta = (self.tinylora_B @ self.mixing() @ self.tinylora_A).detach().float()
        return delta.T if self.fan_in_fan_out else delta


@register
class TinyLora(LayerMethod):
    name = "tinylora"
    description = "TinyLoRA: frozen SVD of each W0, adapted by u fixed random r×r matrices mixed by one tiny trained vector (arXiv 2602.04118)"
    config_cls = TinyLoraConfig
    mergeable = True
    peft_type = "TINYLORA"
    supports_quantized_base = False  # the frozen factors are an SVD of the dense W0
    supports_packing = True  # a per-token linear update: packed examples never meet
    supports_fsdp = False  # v is shared by layers in different blocks: no one FSDP unit owns it
    trainable_formula = "u per group of layers sharing v (one group per layer at weight_tying 0, one for the model at 1), plus modules_to_save"
    parameter_prefix = "tinylora_"  # the frozen A, B, P under each module; v as base_model.tinylora_v.<g>
    layer_types = (TinyLoraLinear,)
    target_kind = "linear layers (nn.Linear, GPT-2's Conv1D)"
    target_hint = "target the model's linear layers"
    accepts_target = staticmethod(is_linear)

    cfg: TinyLoraConfig

    @classmethod
    def validate_config(cls, cfg: TinyLoraConfig, recipe) -> None:
        if cfg.init_weights is False:
            raise RecipeError(
                "method.init_weights",
                "false leaves v uninitialised (whatever memory holds), as in peft",
                "use true (v = 0, step 0 is the base) or uniform",
            )

    def build_shared(self, model: nn.Module) -> dict[str, nn.Module]:
        """One trained vector v per group of layers, as ``tinylora_v.<group>``."""
        self.targets = self.resolve_targets(model)
        groups = {group_of(i, len(self.targets), self.cfg.weight_tying) for i in range(len(self.targets))}
        vectors = nn.ParameterDict({str(g): nn.Parameter(self.initial_v()) for g in sorted(groups)})
        return {"tinylora_v": vectors}

    def initial_v(self) -> torch.Tensor:
        v = torch.zeros(self.cfg.u)
        if self.cfg.init_weights == "uniform":
            nn.init.uniform_(v, -self.cfg.init_v_bound, self.cfg.init_v_bound)
        return v

    def create_layer(self, name: str, base: nn.Module) -> TinyLoraLinear:
        cfg, index = self.cfg, self.targets.index(name)
        group = str(group_of(index, len(self.targets), cfg.weight_tying))
        seed = cfg.projection_seed + index
        return TinyLoraLinear(base, self.shared_state, group, cfg.r, cfg.u, seed, cfg.tinylora_dropout)

    def live_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """v once per group, plus each layer's frozen A and B (and P with ``save_projection``), as peft."""
        state = super().live_state_dict(model)
        kept = ("tinylora_A", "tinylora_B", *(("tinylora_P",) if self.cfg.save_projection else ()))
        for name, buffer in model.named_buffers():
            if name.rsplit(".", 1)[-1] in kept:
                state[self.stored_key(name)] = buffer
        return state

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        groups = {m.group for _, m in self.layers(model)}
        return self.cfg.u * len(groups) + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {
            **super().adapter_config(model),
            "fan_in_fan_out": self.fan_in_fan_out(model),
            "bias": "none",
        }


__all__ = ["TinyLora", "TinyLoraConfig", "TinyLoraLinear", "group_of", "projections", "svd_factors"]
