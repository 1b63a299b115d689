"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv 2106.09685).

A frozen linear layer ``W0 ∈ R^{out×in}`` gets a trainable low-rank update::

    h = W0 x + (α / r) · B A x          A ∈ R^{r×in}, B ∈ R^{out×r}

``A`` starts random and ``B`` at zero, so the tuned model equals the base at step 0. With rsLoRA
(Kalajievo, 2023, arXiv 2312.03732) the scale is ``α / √r``, which keeps the update's magnitude
stable as ``r`` grows. Merging folds ``(α / r) · B A`` into ``W0``; afterwards the model is a plain
transformers model with no extra latency.

Parameter names mirror peft's (``<module>.base_layer``, ``<module>.lora_A``, ``<module>.lora_B``) so
that our state-dict keys, prefixed with ``base_model.model.``, are peft's on-disk keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from peftcli.methods.inject import (
    freeze,
    is_linear,
    linear_dims,
    make_trainable_copies,
    match_targets,
    modules_to_save_state,
    set_module,
)
from peftcli.methods.registry import Method, register
from peftcli.recipe import MethodConfig, RecipeError, doc

PREFIX = "base_model.model."


@dataclass
class LoraConfig(MethodConfig):
    r: int = field(default=8, metadata=doc("rank of the update B·A (typical 8–64)", min=1))
    alpha: float = field(default=16.0, metadata=doc("scale numerator: the update is multiplied by alpha/r", min_exclusive=0.0))
    dropout: float = field(default=0.0, metadata=doc("dropout on the LoRA input path", min=0.0, max=0.99))
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata=doc("module names (list), a regex on full names, or all-linear (every linear layer but the head)"),
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=doc("modules trained in full and saved whole (e.g. [embed_tokens]); seq_cls heads are added"),
    )
    use_rslora: bool = field(default=False, metadata=doc("rank-stabilised scale alpha/sqrt(r) instead of alpha/r"))
    init: Literal["kaiming", "gaussian"] = field(
        default="kaiming", metadata=doc("init of A (B is zero): kaiming (uniform, peft's default) or gaussian (std 1/r)")
    )
    bias: Literal["none", "all", "lora_only"] = field(
        default="none", metadata=doc("also train biases: none, all, or lora_only (those of adapted layers)")
    )


class LoRALinear(nn.Module):
    """``base_layer(x) + scaling · lora_B(lora_A(dropout(x)))`` around a frozen linear-like layer."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_dims(base_layer)
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        self.r = r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, self.out_features, bias=False)
        weight = base_layer.weight
        dtype = torch.float32 if not weight.is_floating_point() else weight.dtype
        self.lora_A.to(device=weight.device, dtype=dtype)
        self.lora_B.to(device=weight.device, dtype=dtype)

    def reset_parameters(self, init: str) -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:  # kaiming-uniform, as nn.Linear and peft's default
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # B = 0: step 0 equals the base

    def delta_weight(self) -> torch.Tensor:
        """(α/r)·B·A in the layout of ``base_layer.weight`` (transposed for Conv1D)."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        result_dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        result = result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        return result.to(result_dtype)


@register
class LoRA(Method):
    name = "lora"
    description = "LoRA: trainable low-rank updates B·A beside frozen linear layers (arXiv 2106.09685)"
    config_cls = LoraConfig
    mergeable = True
    peft_type = "LORA"
    supports_quantized_base = True
    trainable_formula = "sum over adapted layers of r·(in + out), plus modules_to_save and trained biases"

    cfg: LoraConfig

    def __init__(self, cfg: LoraConfig, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.targets: list[str] = []
        self.saved_modules: list[str] = []

    # -- building ------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        freeze(model)
        self.targets = match_targets(model, cfg.target_modules)
        for name in self.targets:
            layer = LoRALinear(model.get_submodule(name), cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora)
            layer.reset_parameters(cfg.init)
            set_module(model, name, layer)
        to_save = list(cfg.modules_to_save)
        if self.task == "seq_cls":  # a new classification head must train (peft adds it too)
            to_save += [h for h in ("classifier", "score") if _has_module(model, h) and h not in to_save]
        self.saved_modules = make_trainable_copies(model, to_save)
        self._enable_biases(model)
        return model

    def _enable_biases(self, model: nn.Module) -> None:
        if self.cfg.bias == "none":
            return
        for name, module in model.named_modules():
            if self.cfg.bias == "lora_only" and not isinstance(module, LoRALinear):
                continue
            owner = module.base_layer if isinstance(module, LoRALinear) else module
            bias = getattr(owner, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
        if not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("bias")):
            raise RecipeError("method.bias", f"bias: {self.cfg.bias} but the adapted modules have no biases",
                              "set method.bias: none")

    def lora_layers(self, model: nn.Module) -> list[tuple[str, LoRALinear]]:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(m.r * (m.in_features + m.out_features) for _, m in self.lora_layers(model))
        count += sum(p.numel() for name in self.saved_modules for p in model.get_submodule(name).parameters())
        count += sum(p.numel() for n, p in self._bias_params(model))
        return count

    def _bias_params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        saved = tuple(f"{m}." for m in self.saved_modules)
        return [(n, p) for n, p in model.named_parameters()
                if p.requires_grad and n.endswith("bias") and "lora_" not in n and not n.startswith(saved)]

    # -- saving --------------------------------------------------------------------------
    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = {}
        for name, layer in self.lora_layers(model):
            state[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach()
            state[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach()
        for name, param in self._bias_params(model):
            state[f"{PREFIX}{name}"] = param.detach()
        state.update(modules_to_save_state(model, self.saved_modules, PREFIX))
        return state

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_prefixed(model, state, self.adapter_state_dict(model))

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": list(self.targets),
            "modules_to_save": list(self.saved_modules) or None,
            "use_rslora": cfg.use_rslora,
            "use_dora": False,
            "bias": cfg.bias,
            "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
            "fan_in_fan_out": any(m.fan_in_fan_out for _, m in self.lora_layers(model)),
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @classmethod
    def config_from_adapter(cls, adapter_config: dict[str, Any]) -> LoraConfig:
        init = adapter_config.get("init_lora_weights", True)
        return LoraConfig(
            name=cls.name,
            r=int(adapter_config.get("r", 8)),
            alpha=float(adapter_config.get("lora_alpha", 8)),
            dropout=float(adapter_config.get("lora_dropout", 0.0)),
            target_modules=adapter_config.get("target_modules") or "all-linear",
            modules_to_save=list(adapter_config.get("modules_to_save") or []),
            use_rslora=bool(adapter_config.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else "kaiming",
            bias=adapter_config.get("bias", "none"),
        )

    # -- merging -------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> nn.Module:
        for name, layer in self.lora_layers(model):
            base = layer.base_layer
            if not base.weight.is_floating_point() or type(base).__name__ in ("Linear4bit", "Linear8bitLt"):
                raise RecipeError("merge", "cannot fold LoRA into a quantized layer in place",
                                  "merge reloads the base in full precision; use `peftcli merge`")
            with torch.no_grad():
                delta = layer.delta_weight().to(torch.float32)
                base.weight.copy_((base.weight.to(torch.float32) + delta).to(base.weight.dtype))
            set_module(model, name, base)
        for p in model.parameters():
            p.requires_grad_(False)
        return model


def _has_module(model: nn.Module, name: str) -> bool:
    return any(n == name or n.endswith("." + name) for n, _ in model.named_modules())


def load_prefixed(model: nn.Module, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the tensors that ``expected`` (our own adapter_state_dict) names.

    Keys must match exactly: a missing or unexpected key is an error, never a silent no-op (peft only
    warns, and the adapter then stays at its init).
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise RecipeError("adapter", f"adapter weights do not fit this model ({detail})",
                          "load it on the base model it was trained on, with the same method options")
    with torch.no_grad():
        for key, target in expected.items():
            value = state[key]
            if value.shape != target.shape:
                raise RecipeError("adapter", f"{key} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}",
                                  "load it on the base model it was trained on")
            target.copy_(value.to(target.dtype))


def lora_layers_of(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


__all__ = ["LoRA", "LoRALinear", "LoraConfig", "load_prefixed", "is_linear"]
