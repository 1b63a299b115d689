"""LoHa: low-rank Hadamard product (FedPara, Hyeon-Woo et al., 2022, arXiv 2108.06098; LyCORIS).

The update of a frozen linear layer is the elementwise (Hadamard) product of two rank-r products::

    y = W0 x + b + (alpha / r) · ((W1a W1b) ⊙ (W2a W2b)) x

W1a, W2a are (out, r) and W1b, W2b are (r, in): 2·r·(out + in) numbers per layer, as many as a LoRA of
rank 2r, but the Hadamard product reaches rank up to r², so ΔW can be full rank. Initialisation follows
peft (and FedPara's He init): W1a, W1b, W2a Kaiming-uniform, W2b zero, so ΔW = 0 at step 0.
The tensors are saved as peft names them (``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``).
Options shared with LoKr (rank/module dropout, patterns) are in :mod:`peftcli.methods.lycoris`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from peftcli.methods.lycoris import LycorisConfig, LycorisLinear, LycorisMethod
from peftcli.methods.registry import register


@dataclass
class LoHaConfig(LycorisConfig):
    """peft's ``LoHaConfig`` fields (r, alpha, rank_dropout, module_dropout, target_modules, patterns)."""


class LoHaLinear(LycorisLinear):
    """ΔW = (W1a W1b) ⊙ (W2a W2b), scaled by alpha / r."""

    def __init__(
        self, base_layer: nn.Module, r: int, alpha: float, rank_dropout: float, module_dropout: float
    ):
        super().__init__(base_layer, r, alpha, rank_dropout, module_dropout)
        out_features, in_features = self.out_features, self.in_features
        self.hada_w1_a = self.factor(out_features, r)
        self.hada_w1_b = self.factor(r, in_features)
        self.hada_w2_a = self.factor(out_features, r)
        self.hada_w2_b = self.factor(r, in_features)
        for factor in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
        nn.init.zeros_(self.hada_w2_b)  # ΔW = 0: step 0 equals the base

    def update(self):
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)

    def factor_count(self) -> int:
        return 2 * self.r * (self.out_features + self.in_features)


@register
class LoHa(LycorisMethod):
    name = "loha"
    description = "LoHa: the update is a Hadamard product of two low-rank products (arXiv 2108.06098)"
    config_cls = LoHaConfig
    peft_type = "LOHA"
    trainable_formula = (
        "2·r·(in + out) per adapted layer (r from rank_pattern where set), plus modules_to_save"
    )
    parameter_prefix = "hada_"  # saved as base_model.model.<module>.hada_w1_a, ..., peft's keys
    layer_types = (LoHaLinear,)

    cfg: LoHaConfig

    def create_layer(self, name: str, base: nn.Module) -> LoHaLinear:
        r, alpha = self.rank_and_alpha(name)
        return LoHaLinear(base, r, alpha, self.cfg.rank_dropout, self.cfg.module_dropout)


__all__ = ["LoHa", "LoHaConfig", "LoHaLinear"]
