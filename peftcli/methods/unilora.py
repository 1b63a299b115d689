"""Uni-LoRA: One Vector is All You Need (Li et al., 2025, arXiv 2506.00799).

Every adapted layer is a plain LoRA, y = W0 x + b0 + B A x, but none of the A and B entries is a
parameter of its own: all of them, over the whole model (D numbers), are read from one trained vector
θ of length d ≪ D through a fixed projection P (D × d) with exactly one non-zero per row::

    vec(A_1, B_1, …, A_L, B_L) = P θ,   P[k, idx_k] = 1 / √(count of idx_k)

The index map idx is balanced (each of the d entries is used ⌊D/d⌋ or ⌈D/d⌉ times) and shuffled by
``proj_seed``; dividing by √count makes P's columns orthonormal, so P is an isometry: a step on θ is a
step of the same length on the LoRA weights (the paper's argument for it over hashing-based sharing).
The indices are drawn as peft draws them (NumPy's ``default_rng(proj_seed)``: the balanced counts, the
remainder by ``choice`` without replacement, then ``shuffle``) and laid out layer by layer in model
order, A (r × in) then B (out × r), so the seed alone rebuilds them. θ starts U(−bound, bound)
(``init_theta_d_bound``), or N(0, 1) with ``init_weights: false``: step 0 is *not* the base (B is not
zero), as in peft. Saved as peft saves it: ``base_model.unilora_theta_d`` once (the kit's shared state),
and with ``save_indices`` each layer's ``unilora_indices_A/B`` and ``unilora_scales_A/B``. Merging adds
B A to W (transposed for GPT-2's Conv1D); unmerging subtracts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from peftcli.inject import is_linear, linear_dims
from peftcli.methods.kit import DeltaLayer, LayerMethod, SharedState
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, doc

SAVED_INDEX_BUFFERS = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")


@dataclass
class UniLoraConfig(MethodConfig):
    """peft's ``UniLoraConfig`` fields."""

    r: int = field(default=4, metadata=doc("rank of every layer's LoRA (its entries come from θ)", min=1))
    theta_d_length: int = field(
        default=256, metadata=doc("d, the length of the one trained vector θ (all that trains)", min=1)
    )
    proj_seed: int = field(default=42, metadata=doc("seed of the index map from LoRA entries to θ", min=0))
    init_theta_d_bound: float = field(
        default=0.02, metadata=doc("θ starts U(-bound, bound)", min_exclusive=0.0)
    )
    init_weights: bool = field(
        default=True, metadata=doc("true: θ ~ U(-init_theta_d_bound, bound); false: θ ~ N(0, 1)")
    )
    save_indices: bool = field(
        default=False,
        metadata=doc("store each layer's indices and scales; false: rebuilt from proj_seed on load"),
    )
    unilora_dropout: float = field(
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


def balanced_indices(count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` indices into θ (length ``length``), each used ⌊count/length⌋ or ⌈count/length⌉
    times, shuffled: NumPy's ``default_rng(seed)`` draws the remainder then the order (peft's draw)."""
    rng = np.random.default_rng(seed)
    indices = np.repeat(np.arange(length), count // length)
    if count % length:
        indices = np.concatenate([indices, rng.choice(length, size=count % length, replace=False)])
    rng.shuffle(indices)
    return torch.as_tensor(indices, dtype=torch.long)


def isometric_scales(indices: torch.Tensor, length: int) -> torch.Tensor:
    """(length,): 1/√(uses of each θ entry), 0 for an unused one: P's columns become orthonormal."""
    counts = torch.bincount(indices, minlength=length).float()
    return torch.where(counts > 0, counts.clamp(min=1).rsqrt(), torch.zeros_like(counts))


class UniLoraLinear(DeltaLayer):
    """``base_layer(x) + B A x`` with A = θ[idx_A]·s_A, B = θ[idx_B]·s_B, θ from the shared state."""

    def __init__(
        self,
        base_layer: nn.Module,
        shared: SharedState,
        r: int,
        indices: tuple[torch.Tensor, torch.Tensor],
        scales: torch.Tensor,
        dropout: float,
    ):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "shared", shared)  # a reference, not a submodule: θ has one name
        self.r = r
        device, dtype = base_layer.weight.device, base_layer.weight.dtype
        index_a = indices[0].view(r, self.in_features)
        index_b = indices[1].view(self.out_features, r)
        self.register_buffer("unilora_indices_A", index_a.to(device))
        self.register_buffer("unilora_indices_B", index_b.to(device))
        self.register_buffer("unilora_scales_A", scales[index_a].to(device, dtype))
        self.register_buffer("unilora_scales_B", scales[index_b].to(device, dtype))
        self.unilora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r, in) and B (out, r), read from θ."""
        theta = self.shared.unilora_theta_d
        a = theta[self.unilora_indices_A] * self.unilora_scales_A.to(theta.dtype)
        b = theta[self.unilora_indices_B] * self.unilora_scales_B.to(theta.dtype)
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        a, b = self.factors()
        update = F.linear(F.linear(self.unilora_dropout(x.to(a.dtype)), a), b)
        return (result + update).to(result.dtype)

    def stored_delta(self) -> torch.Tensor:
        """B A as W stores it: (out, in), or (in, out) for GPT-2's Conv1D, fp32."""
        a, b = self.factors()
        delta = (b @ a).detach().float()
        return delta.T if self.fan_in_fan_out else delta


@register
class UniLora(LayerMethod):
    name = "unilora"
    description = "Uni-LoRA: every layer's LoRA entries read from one trained vector through an isometric projection (arXiv 2506.00799)"
    config_cls = UniLoraConfig
    mergeable = True
    identity_at_init = False  # θ starts uniform, so B is not zero: step 0 is not the base (peft too)
    peft_type = "UNILORA"
    supports_quantized_base = False  # peft's Uni-LoRA wraps nn.Linear and Conv1D only, never a 4-bit layer
    supports_packing = True  # a per-token linear update: packed examples never meet
    supports_fsdp = False  # θ feeds the layers of every block: no one FSDP unit owns it
    trainable_formula = (
        "theta_d_length (the one vector θ; every layer's A and B are read from it), plus modules_to_save"
    )
    parameter_prefix = "unilora_"  # θ as base_model.unilora_theta_d; with save_indices the per-module maps
    layer_types = (UniLoraLinear,)
    target_kind = "linear layers (nn.Linear, GPT-2's Conv1D)"
    target_hint = "target the model's linear layers"
    accepts_target = staticmethod(is_linear)

    cfg: UniLoraConfig

    def build_shared(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """θ (drawn first, as peft draws it), and the index map of every target, laid out in order."""
        cfg = self.cfg
        theta = torch.empty(cfg.theta_d_length)
        if cfg.init_weights:
            nn.init.uniform_(theta, -cfg.init_theta_d_bound, cfg.init_theta_d_bound)
        else:
            theta = torch.randn(cfg.theta_d_length)
        self.targets = self.resolve_targets(model)
        self.layout = self.index_layout(model)
        return {"unilora_theta_d": nn.Parameter(theta)}

    def index_layout(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each target's (A indices, B indices), flat, cut from one balanced draw; and the scales."""
        r, sizes = self.cfg.r, []
        for name in self.targets:
            in_features, out_features = linear_dims(model.get_submodule(name))
            sizes += [r * in_features, out_features * r]
        indices = balanced_indices(sum(sizes), self.cfg.theta_d_length, self.cfg.proj_seed)
        self.scales = isometric_scales(indices, self.cfg.theta_d_length)
        chunks = indices.split(sizes)
        return {name: (chunks[2 * i], chunks[2 * i + 1]) for i, name in enumerate(self.targets)}

    def create_layer(self, name: str, base: nn.Module) -> UniLoraLinear:
        cfg = self.cfg
        return UniLoraLinear(
            base, self.shared_state, cfg.r, self.layout[name], self.scales, cfg.unilora_dropout
        )

    def live_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """θ once; with ``save_indices`` each layer's indices and scales too, as peft."""
        state = super().live_state_dict(model)
        if self.cfg.save_indices:
            for name, buffer in model.named_buffers():
                if name.rsplit(".", 1)[-1] in SAVED_INDEX_BUFFERS:
                    state[self.stored_key(name)] = buffer
        return state

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        return self.cfg.theta_d_length + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {
            **super().adapter_config(model),
            "fan_in_fan_out": self.fan_in_fan_out(model),
            "bias": "none",
        }


__all__ = ["UniLora", "UniLoraConfig", "UniLoraLinear", "balanced_indices", "isometric_scales"]
