"""The method registry: one ``Method`` base class with no-op hooks, one decorator, one file per method.

A method turns a frozen transformers model into a tuned one (``apply``), names its trainable
parameters, saves and loads them (in peft's format where ``peft_type`` is set), and optionally
merges itself away. The training loop only ever talks to this interface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from peftcli.recipe import MethodConfig, RecipeError, did_you_mean

if TYPE_CHECKING:
    from peftcli.recipe import Recipe

_REGISTRY: dict[str, type[Method]] = {}


class Method:
    """Base class. Subclasses set the class attributes and override what they need."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line, shown by `peftcli methods`
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    mergeable: ClassVar[bool] = False
    peft_type: ClassVar[str | None] = None  # "LORA", "IA3", ... when peft loads our adapter
    identity_at_init: ClassVar[bool] = True  # step 0 equals the base model
    supports_quantized_base: ClassVar[bool] = False
    supports_fsdp: ClassVar[bool] = False  # can train with the base sharded by FSDP2 (train.distributed)
    trainable_formula: ClassVar[str] = ""  # human-readable count formula, printed by `peftcli methods`

    def __init__(self, cfg: MethodConfig, task: str = "causal_lm"):
        self.cfg = cfg
        self.task = task

    # -- recipe --------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, cfg: MethodConfig, recipe: Recipe) -> None:
        """Cross-field checks that need the whole recipe; raise RecipeError."""

    # -- building ------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Inject the method into ``model`` (frozen beforehand) and return the model to train."""
        raise NotImplementedError

    def expected_trainable_parameters(self, model: nn.Module) -> int | None:
        """The method's formula for its trainable-parameter count, computed on the applied model."""
        return None

    # -- saving --------------------------------------------------------------------------
    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trainable state to save, keyed in peft's naming where ``peft_type`` is set."""
        raise NotImplementedError

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        """Method fields of ``adapter_config.json`` (peft's names where peft has the method)."""
        raise NotImplementedError

    @classmethod
    def config_from_adapter(cls, adapter_config: dict[str, Any]) -> MethodConfig:
        """Rebuild the recipe section from a saved ``adapter_config.json``."""
        raise NotImplementedError

    # -- optional hooks ------------------------------------------------------------------
    def merge(self, model: nn.Module) -> nn.Module:
        raise RecipeError(
            "method",
            f"{self.name} cannot be merged into the base model",
            "load the adapter with peftcli.load instead",
        )

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Called after backward, before the optimizer step and zero_grad (gradients present)."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after the optimizer step, before zero_grad (updated weights and gradients present);
        ``step`` is the 0-based index of the step just taken (e.g. AdaLoRA's rank allocation, as peft)."""

    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        """Called once by the loop before the first step with the run's optimizer-step count."""

    def on_save(self, model: nn.Module) -> None:
        """Called before an adapter is written (e.g. AdaLoRA fixes its final rank pattern)."""

    def method_state(self) -> dict[str, Any]:
        """Non-parameter state that exact resume needs (tensors, numbers, strings; no objects)."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`method_state` returned."""


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        hint = (
            did_you_mean(name, _REGISTRY) or f"run `peftcli methods`; known: {', '.join(sorted(_REGISTRY))}"
        )
        raise RecipeError("method.name", f"unknown method {name!r}", hint)
    return _REGISTRY[name]


def list_methods() -> list[type[Method]]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) counting each parameter once; 4-bit weights count their logical size."""
    trainable = total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        quant_state = getattr(p, "quant_state", None)
        if quant_state is not None and hasattr(quant_state, "shape"):
            n = int(torch.Size(quant_state.shape).numel())
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
