"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., 2022, arXiv 2205.05638).

Learned vectors rescale activations elementwise: the keys and values of attention and the input of
the feed-forward output projection::

    k = l_k ⊙ (W_k x),   v = l_v ⊙ (W_v x),   y = W_down (l_ff ⊙ x_ff)

Every ``l`` starts at one, so step 0 equals the base. A layer named in ``feedforward_modules`` scales
its *input* (peft stores ``ia3_l`` as [1, in]); any other target scales its *output* ([out, 1]).
Merging multiplies the weight's columns (feed-forward) or rows and bias (others) by ``l``; afterwards
the model is a plain transformers model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftcli.inject import attention_projections, down_projections, match_targets, name_matches
from peftcli.methods.kit import AdapterLayer, LayerMethod, write_weight
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc

# Defaults for model types whose attention names ``default_targets`` does not know (``k_lin`` is not in
# ``inject.KEY_VALUE_NAMES``): (targets, feed-forward targets), as peft's per-family tables give them.
FALLBACK_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "distilbert": (["k_lin", "v_lin", "ffn.lin2"], ["ffn.lin2"]),
    "xlm": (["k_lin", "v_lin", "lin2"], ["lin2"]),
    "flaubert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
}


def default_targets(model: nn.Module) -> tuple[list[str], list[str]] | None:
    """(targets, feed-forward targets) as the paper places (IA)3, read from the model's structure: the
    attention's key and value projections (a fused query-key-value layer where there is one) and the
    feed-forward down projections, which scale their input. ``None`` when no key/value projection is
    found. MoE experts held as 3-D parameters are not layers, so there only keys and values are scaled."""
    keys_values = attention_projections(model)
    if not keys_values:
        return None
    down = down_projections(model)
    return keys_values + down, down


@dataclass
class IA3Config(MethodConfig):
    target_modules: str | list[str] | None = field(
        default=None,
        metadata=doc(
            "modules whose activations are rescaled (names or a regex); default: the attention's key and "
            "value projections and the FFN down projection, found from the model's structure"
        ),
    )
    feedforward_modules: list[str] | None = field(
        default=None,
        metadata=doc("targets whose INPUT is scaled; default: the FFN down projections among the targets"),
    )
    modules_to_save: list[str] = field(
        default_factory=list, metadata=doc("modules trained in full and saved whole; seq_cls heads are added")
    )


class IA3Linear(AdapterLayer):
    """``base_layer(x ⊙ l)`` (feed-forward) or ``base_layer(x) ⊙ l`` around a frozen linear-like layer."""

    def __init__(self, base_layer: nn.Module, is_feedforward: bool):
        super().__init__()
        self.base_layer = base_layer
        self.is_feedforward = is_feedforward
        shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)
        # l = 1: step 0 equals the base
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base_layer.weight.device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        if self.merged:
            return self.base_layer(x)
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        result = self.base_layer(x)
        return (result * scale).to(result.dtype)

    def _rescale(self, inverse: bool) -> None:
        """Multiply W's columns (feed-forward, l is (1, in)) or rows and bias (l is (out, 1)) by l, or
        divide them by l to take a merge back out (peft's unmerge divides by l + 1e-8 the same way)."""
        base = self.base_layer
        scale = self.ia3_l.detach().float()
        factor = scale.T if self.fan_in_fan_out else scale  # Conv1D stores W as (in, out)
        if inverse:
            factor, scale = 1 / (factor + 1e-8), 1 / (scale + 1e-8)
        write_weight(base.weight, base.weight.float() * factor)
        if not self.is_feedforward and getattr(base, "bias", None) is not None:
            write_weight(base.bias, base.bias.float() * scale.flatten())

    def merge(self) -> None:
        self._rescale(inverse=False)

    def unmerge(self) -> None:
        self._rescale(inverse=True)


@register
class IA3(LayerMethod):
    name = "ia3"
    description = "(IA)3: learned vectors rescale keys, values and the FFN input (arXiv 2205.05638)"
    config_cls = IA3Config
    mergeable = True
    peft_type = "IA3"
    trainable_formula = "out per adapted attention layer + in per feed-forward layer, plus modules_to_save"
    parameter_prefix = "ia3_"  # saved as base_model.model.<module>.ia3_l, peft's key
    layer_types = (IA3Linear,)

    cfg: IA3Config

    def __init__(self, cfg: IA3Config, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.feedforward: list[str] = []

    def _resolve_defaults(self, model: nn.Module) -> tuple[str | list[str], list[str]]:
        """The recipe's targets, else the structural defaults (else the fallback table); the feed-forward
        set defaults to the down projections among the targets."""
        cfg = self.cfg
        if cfg.target_modules is not None and cfg.feedforward_modules is not None:
            return cfg.target_modules, cfg.feedforward_modules
        model_type = getattr(getattr(model, "config", None), "model_type", "")
        defaults = default_targets(model) or FALLBACK_TARGETS.get(model_type)
        if cfg.target_modules is not None:
            targets = cfg.target_modules
        elif defaults is not None:
            targets = defaults[0]
        else:
            raise RecipeError(
                "method.target_modules",
                f"found no key/value projections in {type(model).__name__}",
                "set method.target_modules (keys, values, FFN down projection) and "
                "method.feedforward_modules",
            )
        if cfg.feedforward_modules is not None:
            return targets, cfg.feedforward_modules
        down_names = defaults[1] if defaults is not None else down_projections(model)
        down = set(match_targets(model, down_names)) if down_names else set()
        return targets, [n for n in match_targets(model, targets) if n in down]

    def resolve_targets(self, model: nn.Module) -> list[str]:
        targets, feedforward = self._resolve_defaults(model)
        targets = match_targets(model, targets)
        self.feedforward = [n for n in targets if any(name_matches(n, f) for f in feedforward)]
        stray = [f for f in feedforward if not any(name_matches(n, f) for n in targets)]
        if stray:
            raise RecipeError(
                "method.feedforward_modules",
                f"{stray[0]!r} is not one of the target modules",
                "feedforward_modules must be a subset of target_modules",
            )
        return targets

    def create_layer(self, name: str, base: nn.Module) -> IA3Linear:
        return IA3Linear(base, name in self.feedforward)

    def ia3_layers(self, model: nn.Module) -> list[tuple[str, IA3Linear]]:
        return self.layers(model)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(m.in_features if m.is_feedforward else m.out_features for _, m in self.ia3_layers(model))
        return count + self.saved_modules_count(model)

    # -- saving (the ia3_l vectors and the modules trained whole: the kit's default) -------------
    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {
            **super().adapter_config(model),
            "feedforward_modules": list(self.feedforward),
            "init_ia3_weights": True,
            "fan_in_fan_out": self.fan_in_fan_out(model),
        }
