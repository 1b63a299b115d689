"""BitFit: bias-terms fine-tuning (Ben Zaken et al., 2021, arXiv 2106.10199).

Only the bias vectors train; every weight stays frozen::

    h = W0 x + (b0 + Δb)

All biases (attention, feed-forward and LayerNorm, as in the paper), or those of the modules that
``target_modules`` names. Step 0 is the base. The adapter file holds only the deltas ``Δb = b − b0``
(a few KB), so it reapplies to its base; merging writes the full model with ``b0 + Δb``. peft has no
BitFit: the adapter directory names our method in ``peftcli_method``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftcli.inject import PREFIX, classifier_heads, load_prefixed, make_trainable_copies, match_targets
from peftcli.methods.registry import Method, register
from peftcli.recipe import MethodConfig, RecipeError, doc


@dataclass
class BitFitConfig(MethodConfig):
    target_modules: str | list[str] = field(
        default="all",
        metadata=doc("whose biases train: all (every bias, LayerNorm included), module names, or a regex"),
    )
    modules_to_save: list[str] = field(
        default_factory=list, metadata=doc("modules trained in full and saved whole; seq_cls heads are added")
    )


def has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), nn.Parameter)


@register
class BitFit(Method):
    name = "bitfit"
    description = "BitFit: train only the bias terms; the adapter stores their deltas (arXiv 2106.10199)"
    config_cls = BitFitConfig
    mergeable = True
    peft_type = None  # peft has no BitFit
    trainable_formula = "sum of the sizes of the targeted bias vectors, plus modules_to_save"

    cfg: BitFitConfig

    def __init__(self, cfg: BitFitConfig, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.bias_names: list[str] = []  # parameter names, e.g. model.layers.0.self_attn.q_proj.bias
        self.original: dict[str, torch.Tensor] = {}  # b0, to save Δb = b − b0

    def apply(self, model: nn.Module) -> nn.Module:
        targets = self.cfg.target_modules
        model_type = type(model).__name__
        if targets in ("all", ["all"]):
            modules = [n for n, m in model.named_modules() if has_bias(m)]
            if not modules:
                raise RecipeError(
                    "model.name",
                    f"{model_type} has no bias terms, and BitFit trains only biases",
                    "pick a model with biases (e.g. tiny:qwen2, tiny:gpt2, tiny:bert) or method lora",
                )
        else:
            modules = match_targets(model, targets, accept=has_bias, what="module with a bias")
        to_save = list(self.cfg.modules_to_save)
        to_save += [
            h for h in classifier_heads(model, self.task) if h not in to_save
        ]  # the paper trains it too
        saved = tuple(f"{m}." for m in to_save)
        self.bias_names = [f"{n}.bias" for n in modules if not f"{n}.".startswith(saved)]
        params = dict(model.named_parameters())
        for name in self.bias_names:
            self.original[name] = params[name].detach().clone()
            params[name].requires_grad_(True)
        self.saved_modules = make_trainable_copies(model, to_save)
        return model

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        params = dict(model.named_parameters())
        return sum(params[n].numel() for n in self.bias_names) + self.saved_modules_count(model)

    # -- saving --------------------------------------------------------------------------
    def owns(self, parameter_name: str) -> bool:
        return parameter_name in self.bias_names

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained biases as deltas Δb = b − b0, and the modules trained whole."""
        params = dict(model.named_parameters())
        state = super().adapter_state_dict(model)
        for n in self.bias_names:
            state[f"{PREFIX}{n}"] = params[n].detach() - self.original[n].to(params[n].device)
        return state

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """``state`` holds Δb: the bias becomes b0 + Δb (the base's own bias plus the delta)."""
        expected = {k: v.detach() for k, v in self.live_state_dict(model).items()}
        state = dict(state)
        for n in self.bias_names:
            key = f"{PREFIX}{n}"
            if key in state and state[key].shape == self.original[n].shape:
                state[key] = self.original[n].to(state[key].dtype) + state[key]
        load_prefixed(model, state, expected)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {
            **super().adapter_config(model),
            "target_modules": [n.removesuffix(".bias") for n in self.bias_names],
            "bias_delta": True,  # tensors are b − b0, to be added to the base's biases
        }

    # -- merging -------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> nn.Module:
        """The trained biases already sit in the base's own modules: the model is plain as it is."""
        for p in model.parameters():
            p.requires_grad_(False)
        return model
