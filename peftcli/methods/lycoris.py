"""What LoHa and LoKr share (the LyCORIS family, as peft's ``LycorisLayer`` / ``LycorisTuner`` group
them): a full-size update ΔW built from small factors, added to a frozen linear layer, scaled by
``alpha / r``, with LyCORIS's two training-only dropouts.

    y = W0 x + b + (alpha / r) · ΔW x

- ``rank_dropout`` zeroes whole output rows of ΔW during training (a fresh mask per forward); LoHa
  rescales the kept rows by 1/mean(mask) always, LoKr only with ``rank_dropout_scale``, as peft does.
- ``module_dropout`` skips the whole update of a layer during training with that probability.

Neither acts in eval, so evaluation, saving and merging never see them. Merging adds the scaled ΔW to
W in place; unmerging subtracts the same ΔW (recomputed from the unchanged factors), so it is exact up
to rounding. Only ``nn.Linear`` layers are adapted, as in peft (which has no LyCORIS layer for GPT-2's
Conv1D); convolutions (``use_effective_conv2d``) do not occur in the language models peftcli tunes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

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
from peftcli.recipe import MethodConfig, doc


@dataclass
class LycorisConfig(MethodConfig):
    """The recipe keys LoHa and LoKr share, spelled as peft's ``LycorisConfig`` fields."""

    r: int = field(
        default=8, metadata=doc("rank of the factors (typical 4–16; LoHa's update reaches rank r²)", min=1)
    )
    alpha: float = field(
        default=8.0, metadata=doc("scale numerator: the update is multiplied by alpha/r", min_exclusive=0.0)
    )
    rank_dropout: float = field(
        default=0.0,
        metadata=doc(
            "training only: probability of zeroing each output row of the update", min=0.0, max=0.99
        ),
    )
    module_dropout: float = field(
        default=0.0,
        metadata=doc("training only: probability of skipping a layer's whole update", min=0.0, max=0.99),
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
    alpha_pattern: dict[str, float] = field(
        default_factory=dict,
        metadata=doc("per-module alpha: {regex or name suffix: alpha}", min_exclusive=0.0),
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=doc("modules trained in full and saved whole; seq_cls heads are added"),
    )


class LycorisLinear(AdapterLayer):
    """``base_layer(x) + F.linear(x, ΔW)`` around a frozen ``nn.Linear``. Subclasses create their
    factors and write :meth:`update` (ΔW without the scale, shaped like W: (out, in))."""

    rescale_rank_dropout: ClassVar[bool] = True

    def __init__(
        self, base_layer: nn.Module, r: int, alpha: float, rank_dropout: float, module_dropout: float
    ):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout

    def factor(self, *shape: int) -> nn.Parameter:
        """A new fp32 factor on the base weight's device (initialised by the subclass)."""
        return nn.Parameter(torch.empty(*shape, device=self.base_layer.weight.device, dtype=torch.float32))

    def update(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The scaled update (alpha / r) · ΔW, (out, in), fp32."""
        return self.update() * self.scaling

    def _dropped_rows(self, delta: torch.Tensor) -> torch.Tensor:
        """Rank dropout: each output row kept with probability 1 - p (peft draws the mask on the CPU)."""
        keep = (torch.rand(delta.shape[0]) > self.rank_dropout).to(delta.dtype)
        if self.rescale_rank_dropout:
            keep = keep / keep.mean()
        return delta * keep.to(delta.device).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        # peft draws the module-dropout number on every training forward (even at p = 0): so do we, and
        # the same seed gives the same dropped layers and rows as peft's
        if self.training and torch.rand(1).item() <= self.module_dropout:
            return result
        delta = self.delta_weight()
        if self.training and self.rank_dropout > 0:
            delta = self._dropped_rows(delta)
        return (result + F.linear(x.to(delta.dtype), delta)).to(result.dtype)

    def merge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() + self.delta_weight().detach())

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() - self.delta_weight().detach())


class LycorisMethod(LayerMethod):
    """Targets, per-module r / alpha (peft's ``rank_pattern`` / ``alpha_pattern``) and the adapter
    config, for a method whose layer is a :class:`LycorisLinear`."""

    mergeable = True
    # refused at start: peft's LyCORIS layers size their factors by the packed 4-bit weight, so peft could
    # not load the adapter (tests/test_quantized_methods.py)
    supports_quantized_base = False
    supports_packing = True  # a per-token linear update: packed examples never meet
    supports_fsdp = True  # plain parameters in each layer, which FSDP2 shards like the base
    target_kind = "nn.Linear layers"
    target_hint = (
        "target the model's nn.Linear layers, or use lora (peft has no LyCORIS layer for others either)"
    )
    accepts_target = staticmethod(lambda module: isinstance(module, nn.Linear))

    @classmethod
    def validate_config(cls, cfg: LycorisConfig, recipe) -> None:
        validate_patterns(cfg)

    def resolve_targets(self, model: nn.Module) -> list[str]:
        targets = super().resolve_targets(model)
        check_patterns_match(self.cfg, targets)
        return targets

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        cfg = self.cfg
        r_key, a_key = pattern_key(cfg.rank_pattern, name), pattern_key(cfg.alpha_pattern, name)
        return (cfg.rank_pattern[r_key] if r_key else cfg.r), (
            cfg.alpha_pattern[a_key] if a_key else cfg.alpha
        )

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        return sum(m.factor_count() for _, m in self.layers(model)) + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        # peft's keys for what peftcli fixes: its default init, and no convolution decomposition
        return {"init_weights": True, "use_effective_conv2d": False, **super().adapter_config(model)}


__all__ = ["LycorisConfig", "LycorisLinear", "LycorisMethod"]
