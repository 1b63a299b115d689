"""Super-Tuning: sparse fine-tuning of the largest (or smallest) weights, optionally beside a LoRA
("Supra") (arXiv 2607.09287).

Each adapted linear layer keeps W0 frozen and trains k scalars at fixed positions of it: the k entries of
largest |W0| (``select_top: true``; the smallest with ``false``), k = ⌊(1 − sparsity)·out·in⌋, chosen
once from the base weight's magnitudes (no data needed)::

    W' = W0 + S(v),   S(v)[p_j] = v_j  (j = 1..k; zero elsewhere)

With ``r`` set, a LoRA pair A (r × in), B (out × r) is added beside the sparse update (Supra)::

    y = W' x + b0 + (α/r)·B A x        α = lora_alpha, 2r by default

v starts at zero and B at zero (``init_weights: true``), so step 0 is the base; ``false`` draws v from
N(0, 1) and B Kaiming-uniform, as peft. The forward scatter-adds v into a copy of W0 (one per step, not per
token). Merging adds S(v) and (α/r)·B A to W; unmerging subtracts them. Saved as peft names it:
``supertuning_values`` (k, fp32) and, unless ``save_precomputed_indices: false``, the positions
``supertuning_indices`` (k, int32, flat into W) under each module; ``supertuning_lora_A.weight`` and
``supertuning_lora_B.weight`` with ``r``; ``peft_type`` ``SUPERTUNING``. Without saved positions they
are chosen again from the base at load time, which must then be the very base trained on.
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
class SupertuningConfig(MethodConfig):
    """peft's ``SupertuningConfig`` fields."""

    sparsity: float = field(
        default=0.99,
        metadata=doc("share of each weight left frozen, in [0, 1): 0.99 trains 1% of its entries", min=0.0),
    )
    select_top: bool = field(
        default=True,
        metadata=doc("train the largest-|W| entries (true, the paper's Super) or the smallest (false)"),
    )
    r: int | None = field(
        default=None,
        metadata=doc(
            "Supra: the rank of a LoRA added beside the sparse update (null: Super, sparse only)", min=1
        ),
    )
    lora_alpha: float | None = field(
        default=None,
        metadata=doc("Supra's LoRA scale α (update (α/r)·B·A); null: 2r. Needs r"),
    )
    lora_dropout: float = field(
        default=0.0, metadata=doc("dropout on the LoRA branch's input (Supra only)", min=0.0)
    )
    init_weights: bool = field(
        default=True,
        metadata=doc("true: v = 0 and B = 0, step 0 is the base; false: v ~ N(0, 1), B Kaiming-uniform"),
    )
    save_precomputed_indices: bool = field(
        default=True,
        metadata=doc("save the trained positions (int32); false: choose them again from the base at load"),
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


def support_size(numel: int, sparsity: float) -> int:
    """k, the number of trained entries: ⌊numel·(1 − sparsity)⌋ (peft's float expression, bit for bit)."""
    return int(numel * (1 - sparsity))


def magnitude_support(weight: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Flat positions (int32) of the k entries of W with the largest (or smallest) |W|, topk's order."""
    return torch.topk(weight.detach().abs().flatten(), k=k, largest=largest).indices.to(torch.int32)


class SupertuningLinear(AdapterLayer):
    """``(W0 + S(v)) x + b0`` (+ the Supra LoRA) around a frozen ``nn.Linear``."""

    def __init__(self, base_layer: nn.Linear, cfg: SupertuningConfig):
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        k = support_size(weight.numel(), cfg.sparsity)
        self.register_buffer("supertuning_indices", magnitude_support(weight, k, cfg.select_top))
        values = torch.zeros(k) if cfg.init_weights else torch.randn(k)
        self.supertuning_values = nn.Parameter(values.to(weight.device))
        self.rank = cfg.r or 0
        if self.rank:
            self.add_lora(cfg, weight.device)

    def add_lora(self, cfg: SupertuningConfig, device: torch.device) -> None:
        """Supra's pair: A Kaiming-uniform, B zero (or Kaiming-uniform without init_weights), fp32."""
        self.lora_scale = (cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.r) / cfg.r
        self.supertuning_lora_A = nn.Linear(self.in_features, cfg.r, bias=False, device=device)
        self.supertuning_lora_B = nn.Linear(cfg.r, self.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.supertuning_lora_A.weight, a=math.sqrt(5))
        if cfg.init_weights:
            nn.init.zeros_(self.supertuning_lora_B.weight)
        else:
            nn.init.kaiming_uniform_(self.supertuning_lora_B.weight, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()

    def sparse_weight(self, weight: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        """W + sign·S(v), out of place, in W's dtype."""
        values = self.supertuning_values.to(weight.dtype) * sign
        flat = weight.reshape(-1).scatter_add(0, self.supertuning_indices.long(), values)
        return flat.reshape_as(weight)

    def lora_delta(self) -> torch.Tensor:
        """(α/r)·B A, (out, in), fp32."""
        return self.lora_scale * (self.supertuning_lora_B.weight @ self.supertuning_lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        result = F.linear(x, self.sparse_weight(base.weight), base.bias)
        if self.rank:
            lora_in = self.lora_dropout(x).to(self.supertuning_lora_A.weight.dtype)
            lora = self.supertuning_lora_B(self.supertuning_lora_A(lora_in)) * self.lora_scale
            result = result + lora.to(result.dtype)
        return result

    def merge(self) -> None:
        self.fold(1.0)

    def unmerge(self) -> None:
        self.fold(-1.0)

    def fold(self, sign: float) -> None:
        """W ± (S(v) + (α/r)·B A), in fp32, written back in W's dtype."""
        weight = self.base_layer.weight
        with torch.no_grad():
            folded = self.sparse_weight(weight.float(), sign)
            if self.rank:
                folded = folded + sign * self.lora_delta()
        write_weight(weight, folded)


@register
class Supertuning(LayerMethod):
    name = "supertuning"
    description = (
        "Super-Tuning: train the top-magnitude 1% of each weight's entries, optionally beside a LoRA "
        "(arXiv 2607.09287)"
    )
    config_cls = SupertuningConfig
    mergeable = True
    peft_type = "SUPERTUNING"
    supports_quantized_base = False  # the positions come from |W0| and v is added into it: no 4-bit W
    supports_packing = True  # a per-token linear map: packed examples never meet
    supports_fsdp = True  # v (and A, B) are plain parameters of their layer; W0 is gathered in its forward
    trainable_formula = (
        "⌊(1 − sparsity)·out·in⌋ per adapted layer, + r·(in + out) with r (Supra), plus modules_to_save"
    )
    parameter_prefix = "supertuning_"  # base_model.model.<module>.supertuning_values etc., peft's keys
    layer_types = (SupertuningLinear,)
    target_kind = "nn.Linear layers"
    target_hint = (
        "target the model's nn.Linear layers, or use lora (peft's Super-Tuning adapts nn.Linear only too)"
    )
    accepts_target = staticmethod(lambda module: type(module) is nn.Linear)

    cfg: SupertuningConfig

    @classmethod
    def validate_config(cls, cfg: SupertuningConfig, recipe) -> None:
        super().validate_config(cfg, recipe)
        if not 0.0 <= cfg.sparsity < 1.0:
            raise RecipeError("method.sparsity", f"{cfg.sparsity} is not in [0, 1)", "e.g. 0.99: train 1%")
        if cfg.lora_alpha is not None and cfg.r is None:
            raise RecipeError("method.lora_alpha", "is set but r is not", "set r to add the LoRA (Supra)")
        if cfg.lora_dropout >= 1.0:
            raise RecipeError("method.lora_dropout", f"{cfg.lora_dropout} is not below 1", "e.g. 0.05")

    def create_layer(self, name: str, base: nn.Module) -> SupertuningLinear:
        if support_size(base.weight.numel(), self.cfg.sparsity) < 1:
            raise RecipeError(
                "method.sparsity",
                f"{self.cfg.sparsity} leaves no trainable entry of {name} ({base.weight.numel()} entries)",
                "lower the sparsity",
            )
        return SupertuningLinear(base, self.cfg)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        r = self.cfg.r or 0
        count = sum(
            support_size(m.out_features * m.in_features, self.cfg.sparsity)
            + r * (m.in_features + m.out_features)
            for _, m in self.layers(model)
        )
        return count + self.saved_modules_count(model)

    def live_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained tensors, and the positions where ``save_precomputed_indices`` keeps them."""
        state = super().live_state_dict(model)
        if self.cfg.save_precomputed_indices:
            for name, layer in self.layers(model):
                state[self.stored_key(f"{name}.supertuning_indices")] = layer.supertuning_indices
        return state

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        config = super().adapter_config(model)
        if self.cfg.r is not None and self.cfg.lora_alpha is None:
            config["lora_alpha"] = 2 * self.cfg.r  # peft resolves it the same way
        return config


__all__ = ["Supertuning", "SupertuningConfig", "SupertuningLinear", "magnitude_support", "support_size"]
