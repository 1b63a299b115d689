"""LN tuning: train only the normalization layers (Zhao et al., 2023, "Tuning LayerNorm in Attention",
arXiv 2312.11420).

Each targeted norm (LayerNorm, RMSNorm) gets a trainable copy that replaces it in the forward pass; the
original stays frozen beside it, so the adapter is the copies' γ (and β) alone::

    y = norm'(x)    with norm' = a copy of norm whose weight (and bias) train

Merging swaps the copy into the base's place (the base then *is* the tuned norm), and unmerging swaps
it back: nothing is added or subtracted, so both are exact. Saved as peft names them:
``<module>.ln_tuning_layers.weight`` (``.bias``) under ``base_model.model.``, ``peft_type`` ``LN_TUNING``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftcli.inject import match_targets
from peftcli.methods.kit import AdapterLayer, LayerMethod
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc

ALL_NORMS = "all-norms"


@dataclass
class LnTuningConfig(MethodConfig):
    """peft's ``LNTuningConfig`` fields."""

    target_modules: str | list[str] = field(
        default=ALL_NORMS,
        metadata=doc(
            "norm module names (list), a regex on full names, or all-norms (every LayerNorm / RMSNorm; "
            "on llama the same three peft picks: input_layernorm, post_attention_layernorm, norm)"
        ),
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=doc("modules trained in full and saved whole; seq_cls heads are added"),
    )


def is_norm(module: nn.Module) -> bool:
    """A normalization layer: its class is a *Norm (LayerNorm, RMSNorm, LlamaRMSNorm, T5LayerNorm) with a
    weight; the criterion is the class name because every model family writes its own RMSNorm."""
    return type(module).__name__.endswith("Norm") and isinstance(
        getattr(module, "weight", None), torch.Tensor
    )


class LnTuningLayer(AdapterLayer):
    """Runs a trainable copy of the frozen norm it wraps (``ln_tuning_layers``, peft's name)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.ln_tuning_layers = copy.deepcopy(base_layer)
        self.ln_tuning_layers.requires_grad_(True)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self.ln_tuning_layers(x, *args, **kwargs)

    def swap(self) -> None:
        """Exchange the copy and the base: merge and unmerge are both this swap, exact both ways."""
        self.base_layer, self.ln_tuning_layers = self.ln_tuning_layers, self.base_layer

    def merge(self) -> None:
        self.swap()

    def unmerge(self) -> None:
        self.swap()


@register
class LnTuning(LayerMethod):
    name = "ln_tuning"
    description = "LN tuning: train a copy of each LayerNorm / RMSNorm, nothing else (arXiv 2312.11420)"
    config_cls = LnTuningConfig
    mergeable = True
    peft_type = "LN_TUNING"
    supports_quantized_base = True  # 4-bit quantization leaves norms in full precision: they train as is
    supports_packing = True  # a norm acts on each token alone: packed examples never meet
    supports_fsdp = True  # the copies are ordinary parameters of their blocks, sharded with them
    trainable_formula = "the targeted norms' weights (and biases), plus modules_to_save"
    parameter_prefix = "ln_tuning_layers"  # saved as base_model.model.<module>.ln_tuning_layers.weight
    layer_types = (LnTuningLayer,)

    cfg: LnTuningConfig

    def resolve_targets(self, model: nn.Module) -> list[str]:
        targets = self.cfg.target_modules
        if targets == ALL_NORMS or targets == [ALL_NORMS]:
            found = [n for n, m in model.named_modules() if n and is_norm(m)]
            if not found:
                raise RecipeError(
                    "method.target_modules",
                    f"{type(model).__name__} has no LayerNorm / RMSNorm",
                    "name the modules to tune in method.target_modules",
                )
            return found
        return match_targets(model, targets, accept=is_norm, what="norm layer")

    def create_layer(self, name: str, base: nn.Module) -> LnTuningLayer:
        return LnTuningLayer(base)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(p.numel() for _, m in self.layers(model) for p in m.ln_tuning_layers.parameters())
        return count + self.saved_modules_count(model)


__all__ = ["LnTuning", "LnTuningConfig", "LnTuningLayer", "is_norm"]
