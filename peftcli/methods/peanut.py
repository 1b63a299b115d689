"""PEANuT: Parameter-Efficient Adaptation with Weight-aware Neural Tweakers (Zhong et al., 2024,
arXiv 2410.01870).

LoRA's update B·A ignores the weight it updates. PEANuT makes the update a function of that weight: a
small network f reads the frozen W0 (out × in) column by column (the rows of W0ᵀ, each a vector of
``out`` numbers) and writes ΔW::

    h_0 = σ(W0ᵀ Aᵀ)                                  (in × r)      A: r × out
    h_i = σ(h_{i-1} E_iᵀ)            i = 1..depth                  E_i: r × r   (encoders)
    g_0 = h_depth
    g_i = σ(g_{i-1} D_iᵀ) + h_{depth-i}    i = 1..depth            D_i: r × r   (decoders)
    ΔW  = s · (g_depth Bᵀ)ᵀ                                        B: out × r

    y = W0 x + b0 + ΔW x

with σ the activation (``act_fn``), s ``scaling``, and skip connections from each encoder level to its
mirror decoder level (a U-Net over r-dimensional codes). ``depth: 0`` is A then B: ΔW = s·(σ(W0ᵀAᵀ)Bᵀ)ᵀ.
B starts at zero (``init_weights: true``), so step 0 is the base; A, the encoders and decoders are
Kaiming-uniform (a = √5), drawn in peft's order so a seed gives peft's numbers. ΔW is rebuilt from W0
on every forward (O(in·out·r) per layer per step, not per token). Merging adds ΔW to W and keeps W0
aside, since ΔW depends on it; unmerging puts W0 back exactly. Saved as peft names it: ``peanut_A``,
``peanut_B``, ``peanut_encoders.<i>``, ``peanut_decoders.<i>`` (each ``.weight``) under each module,
``peft_type`` ``PEANUT``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from peftcli.methods.kit import AdapterLayer, LayerMethod, write_weight
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, did_you_mean, doc


@dataclass
class PeanutConfig(MethodConfig):
    """peft's ``PeanutConfig`` fields."""

    r: int = field(default=32, metadata=doc("width r of the weight-reading network's codes", min=1))
    depth: int = field(
        default=0,
        metadata=doc("encoder/decoder r × r layers on each side between A and B (0: A then B)", min=0),
    )
    act_fn: str = field(
        default="relu",
        metadata=doc("the network's activation, a transformers ACT2FN name (relu, gelu, silu, tanh, ...)"),
    )
    scaling: float = field(default=1.0, metadata=doc("s: ΔW = s · f(W0)"))
    init_weights: bool = field(
        default=True,
        metadata=doc("true: B = 0, step 0 is the base; false: B Kaiming-uniform too (step 0 moves)"),
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


def kaiming(linear: nn.Linear) -> None:
    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))


class PeanutLinear(AdapterLayer):
    """``base_layer(x) + ΔW x`` with ΔW = s·f(W0) around a frozen ``nn.Linear``."""

    def __init__(self, base_layer: nn.Linear, cfg: PeanutConfig):
        super().__init__()
        self.base_layer = base_layer
        self.scaling = cfg.scaling
        self.act = ACT2FN[cfg.act_fn]
        out, r = self.out_features, cfg.r
        device = base_layer.weight.device
        # created, then drawn, in peft's order (A, encoders, decoders, B) so a seed gives its numbers
        self.peanut_A = nn.Linear(out, r, bias=False, device=device)
        self.peanut_encoders = nn.ModuleList(
            nn.Linear(r, r, bias=False, device=device) for _ in range(cfg.depth)
        )
        self.peanut_decoders = nn.ModuleList(
            nn.Linear(r, r, bias=False, device=device) for _ in range(cfg.depth)
        )
        self.peanut_B = nn.Linear(r, out, bias=False, device=device)
        for linear in (self.peanut_A, *self.peanut_encoders, *self.peanut_decoders):
            kaiming(linear)
        if cfg.init_weights:
            nn.init.zeros_(self.peanut_B.weight)
        else:
            kaiming(self.peanut_B)
        self.base_before_merge: torch.Tensor | None = None

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """ΔW (out, in) in the adapter's dtype: the U-Net over the columns of W0 (module docstring)."""
        columns = base_weight.T.to(self.peanut_A.weight.dtype)  # (in, out): one row per input unit
        h = self.act(self.peanut_A(columns))
        skips = []
        for encoder in self.peanut_encoders:
            skips.append(h)
            h = self.act(encoder(h))
        for decoder, skip in zip(self.peanut_decoders, reversed(skips), strict=True):
            h = self.act(decoder(h)) + skip
        return (self.peanut_B(h) * self.scaling).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        delta = self.delta_weight(self.base_layer.weight)
        return result + F.linear(x.to(delta.dtype), delta).to(result.dtype)

    def merge(self) -> None:
        weight = self.base_layer.weight
        self.base_before_merge = weight.detach().clone()
        with torch.no_grad():
            delta = self.delta_weight(self.base_before_merge).float()
        write_weight(weight, weight.float() + delta)

    def unmerge(self) -> None:
        write_weight(self.base_layer.weight, self.base_before_merge)
        self.base_before_merge = None


@register
class Peanut(LayerMethod):
    name = "peanut"
    description = "PEANuT: each layer's update is a small network of its own frozen weight, ΔW = f(W0) (arXiv 2410.01870)"
    config_cls = PeanutConfig
    mergeable = True
    peft_type = "PEANUT"
    supports_quantized_base = False  # f reads W0 as a dense matrix; a 4-bit W has none to read
    supports_packing = True  # a per-token linear update: packed examples never meet
    supports_fsdp = True  # plain parameters of their layer, sharded with it; W0 is gathered in its forward
    trainable_formula = (
        "2·out·r + 2·depth·r² per adapted layer (A, B, encoders, decoders), plus modules_to_save"
    )
    parameter_prefix = "peanut_"  # saved as base_model.model.<module>.peanut_A.weight etc., peft's keys
    layer_types = (PeanutLinear,)
    target_kind = "nn.Linear layers"
    target_hint = "target the model's nn.Linear layers, or use lora (peft's PEANuT adapts nn.Linear only too)"
    accepts_target = staticmethod(lambda module: type(module) is nn.Linear)

    cfg: PeanutConfig

    @classmethod
    def validate_config(cls, cfg: PeanutConfig, recipe) -> None:
        super().validate_config(cfg, recipe)
        if cfg.act_fn not in ACT2FN:
            hint = did_you_mean(cfg.act_fn, ACT2FN) or "e.g. relu, gelu, silu, tanh"
            raise RecipeError("method.act_fn", f"unknown activation {cfg.act_fn!r}", hint)

    def create_layer(self, name: str, base: nn.Module) -> PeanutLinear:
        return PeanutLinear(base, self.cfg)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        r, depth = self.cfg.r, self.cfg.depth
        count = sum(2 * m.out_features * r + 2 * depth * r * r for _, m in self.layers(model))
        return count + self.saved_modules_count(model)


__all__ = ["Peanut", "PeanutConfig", "PeanutLinear"]
