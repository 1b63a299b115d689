"""LoKr: low-rank Kronecker product (Edalati et al., 2022, "KronA", arXiv 2212.10650; LyCORIS, Yeh et al.,
2023, arXiv 2309.14859).

The update of a frozen linear layer is a Kronecker product of a small and a larger factor::

    y = W0 x + b + (alpha / r) · (W1 ⊗ W2) x,     W1: (a, c),  W2: (b, d),  out = a·b,  in = c·d

(a, b) and (c, d) split out and in into two divisors (``decompose_factor``: the smaller one as close to
it as the divisors allow; -1: near the square root). W2 is stored as a rank-r product W2a W2b when r is
below half its larger side; W1 too with ``decompose_both``. peft's initialisation: W1 (or W1a) zero,
the rest Kaiming-uniform, so ΔW = 0 at step 0; ``init_weights: lycoris`` zeroes W2 (or W2b) instead.
The tensors are saved as peft names them (``lokr_w1`` or ``lokr_w1_a`` / ``lokr_w1_b``, ``lokr_w2`` or
``lokr_w2_a`` / ``lokr_w2_b``). Options shared with LoHa are in :mod:`peftcli.methods.lycoris`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from peftcli.methods.lycoris import LycorisConfig, LycorisLinear, LycorisMethod
from peftcli.methods.registry import register
from peftcli.recipe import RecipeError, doc


@dataclass
class LoKrConfig(LycorisConfig):
    """peft's ``LoKrConfig`` fields."""

    decompose_both: bool = field(
        default=False, metadata=doc("also store the small Kronecker factor W1 as a rank-r product")
    )
    decompose_factor: int = field(
        default=-1,
        metadata=doc(
            "split in/out so the smaller divisor is at most this (-1: near the square root)", min=-1
        ),
    )
    rank_dropout_scale: bool = field(
        default=False,
        metadata=doc("rescale the rows rank_dropout keeps by 1/mean(mask), as LoHa always does"),
    )
    init_weights: bool | Literal["lycoris"] = field(
        default=True, metadata=doc("true: W1 starts at zero (peft's default); lycoris: W2 starts at zero")
    )


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension and m ≤ n, as peft and LyCORIS split a layer's side: ``factor`` itself
    when it divides; otherwise walk the divisors upwards, never past ``factor`` (-1: no limit), and stop
    at the first one that reaches the square root. factorization(128) = (8, 16), (127) = (1, 127)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for divisor in range(2, dimension + 1):
        if dimension % divisor:
            continue
        if divisor > limit:
            break
        m = divisor
        if divisor >= dimension // divisor:
            break
    return min(m, dimension // m), max(m, dimension // m)


class LoKrLinear(LycorisLinear):
    """ΔW = W1 ⊗ W2 (each stored whole or as a rank-r product), scaled by alpha / r."""

    rescale_rank_dropout = False  # per layer: set from rank_dropout_scale

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, cfg: LoKrConfig):
        super().__init__(base_layer, r, alpha, cfg.rank_dropout, cfg.module_dropout)
        self.rescale_rank_dropout = cfg.rank_dropout_scale
        in_m, in_n = factorization(self.in_features, cfg.decompose_factor)
        out_l, out_k = factorization(self.out_features, cfg.decompose_factor)
        self.shapes = ((out_l, in_m), (out_k, in_n))  # W1, W2
        self.whole_w1 = not (cfg.decompose_both and r < max(out_l, in_m) / 2)
        self.whole_w2 = not r < max(out_k, in_n) / 2
        self._create_factors()
        self._init_factors(lycoris=cfg.init_weights == "lycoris")

    def _create_factors(self) -> None:
        (out_l, in_m), (out_k, in_n) = self.shapes
        r = self.r
        if self.whole_w1:
            self.lokr_w1 = self.factor(out_l, in_m)
        else:
            self.lokr_w1_a, self.lokr_w1_b = self.factor(out_l, r), self.factor(r, in_m)
        if self.whole_w2:
            self.lokr_w2 = self.factor(out_k, in_n)
        else:
            self.lokr_w2_a, self.lokr_w2_b = self.factor(out_k, r), self.factor(r, in_n)

    def _init_factors(self, lycoris: bool) -> None:
        """Kaiming-uniform everywhere but one zero tensor, so that ΔW = 0: W1 (or W1a) by default,
        W2 (or W2b) in the LyCORIS way."""
        for _, p in self.named_parameters(recurse=False):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        if lycoris:
            zero = self.lokr_w2 if self.whole_w2 else self.lokr_w2_b
        else:
            zero = self.lokr_w1 if self.whole_w1 else self.lokr_w1_a
        nn.init.zeros_(zero)

    def w1(self) -> torch.Tensor:
        return self.lokr_w1 if self.whole_w1 else self.lokr_w1_a @ self.lokr_w1_b

    def w2(self) -> torch.Tensor:
        return self.lokr_w2 if self.whole_w2 else self.lokr_w2_a @ self.lokr_w2_b

    def update(self) -> torch.Tensor:
        return torch.kron(self.w1(), self.w2())

    def factor_count(self) -> int:
        (out_l, in_m), (out_k, in_n) = self.shapes
        w1 = out_l * in_m if self.whole_w1 else self.r * (out_l + in_m)
        w2 = out_k * in_n if self.whole_w2 else self.r * (out_k + in_n)
        return w1 + w2


@register
class LoKr(LycorisMethod):
    name = "lokr"
    description = (
        "LoKr: the update is a Kronecker product of a small and a low-rank factor (arXiv 2309.14859)"
    )
    config_cls = LoKrConfig
    peft_type = "LOKR"
    trainable_formula = (
        "per adapted layer, with out = a·b, in = c·d split by decompose_factor: W1 a·c (r·(a+c) with "
        "decompose_both when r < max(a,c)/2) + W2 b·d, or r·(b+d) when r < max(b,d)/2; plus modules_to_save"
    )
    parameter_prefix = "lokr_"  # saved as base_model.model.<module>.lokr_w1, ..., peft's keys
    layer_types = (LoKrLinear,)

    cfg: LoKrConfig

    @classmethod
    def validate_config(cls, cfg: LoKrConfig, recipe) -> None:
        super().validate_config(cfg, recipe)
        if cfg.decompose_factor == 0:
            raise RecipeError(
                "method.decompose_factor",
                "must be -1 or a positive integer, got 0",
                "use -1 (near the square root)",
            )
        if cfg.init_weights is False:
            raise RecipeError(
                "method.init_weights",
                "false starts from a random update (not the base model); peft discourages it too",
                "use true (W1 = 0) or lycoris (W2 = 0)",
            )

    def create_layer(self, name: str, base: nn.Module) -> LoKrLinear:
        r, alpha = self.rank_and_alpha(name)
        return LoKrLinear(base, r, alpha, self.cfg)


__all__ = ["LoKr", "LoKrConfig", "LoKrLinear", "factorization"]
