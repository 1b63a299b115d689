"""The method contract: one ``Method`` base class with no-op hooks and one decorator.

A method turns a frozen transformers model into a tuned one (:meth:`Method.attach`, which freezes and
then calls the method's :meth:`Method.apply`), names its trainable parameters, saves and loads them (in
peft's format where ``peft_type`` is set), and optionally merges itself away. The training loop,
export, reporting and the contract test only ever talk to this interface.

The list of methods lives in :mod:`peftcli.methods.catalog`; this module imports no method, so that a
module needing only the contract (or ``count_parameters``) loads none of them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from peftcli.inject import PREFIX, freeze, load_prefixed, modules_to_save_state, saved_modules_count
from peftcli.recipe import MethodConfig, RecipeError, from_dict, to_dict

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
    # train.packing lays several examples in one row; methods that prepend virtual tokens or cache
    # per-example keys/values would let them attend across examples, so they set this False
    supports_packing: ClassVar[bool] = True
    supports_fsdp: ClassVar[bool] = False  # can train with the base sharded by FSDP2 (train.distributed)
    trainable_formula: ClassVar[str] = ""  # human-readable count formula, printed by `peftcli methods`
    # peft's idea (``prefix = "lora_"``): a parameter is the method's own when a component of its dotted
    # name starts with this. It drives the default saving (``adapter_state_dict``) and loading.
    parameter_prefix: ClassVar[str | None] = None

    def __init__(self, cfg: MethodConfig, task: str = "causal_lm"):
        self.cfg = cfg
        self.task = task
        # Modules trained whole (peft's modules_to_save, e.g. a seq_cls head), by their full names in the
        # model ``apply`` received; ``apply`` fills it (via ``inject.make_trainable_copies``).
        self.saved_modules: list[str] = []

    # -- recipe --------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, cfg: MethodConfig, recipe: Recipe) -> None:
        """Cross-field checks that need the whole recipe; raise RecipeError."""

    # -- building ------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> nn.Module:
        """Freeze every parameter of ``model``, then :meth:`apply` the method: the one way a method gets
        onto a model (training, loading an adapter for eval or merge, tests). Not overridden."""
        freeze(model)
        return self.apply(model)

    def apply(self, model: nn.Module) -> nn.Module:
        """Add the method to the frozen ``model`` and return the model to train. Only adds: the base
        arrives frozen (see :meth:`attach`); what ``apply`` creates or copies is what trains."""
        raise NotImplementedError

    def expected_trainable_parameters(self, model: nn.Module) -> int | None:
        """The method's formula for its trainable-parameter count, computed on the applied model."""
        return None

    def saved_modules_count(self, model: nn.Module) -> int:
        """Parameters of the modules trained whole (:attr:`saved_modules`)."""
        return saved_modules_count(model, self.saved_modules)

    def summary_lines(self) -> list[str]:
        """Extra lines for the start-of-training summary table (none by default)."""
        return []

    # -- saving --------------------------------------------------------------------------
    def owns(self, parameter_name: str) -> bool:
        """Whether a parameter of the applied model is the method's own (see ``parameter_prefix``)."""
        prefix = self.parameter_prefix
        return prefix is not None and any(part.startswith(prefix) for part in parameter_name.split("."))

    def stored_key(self, parameter_name: str) -> str:
        """The on-disk key of one of the method's parameters: peft's naming by default."""
        return PREFIX + parameter_name

    def live_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The method's own parameters and the modules trained whole, keyed as on disk. The default
        selects by ``parameter_prefix``; a method whose file holds more (LoRA's biases) extends it."""
        state = {self.stored_key(n): p for n, p in model.named_parameters() if self.owns(n)}
        state.update(modules_to_save_state(model, self.saved_modules, PREFIX))
        return state

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trainable state to save, keyed in peft's naming where ``peft_type`` is set."""
        return {k: v.detach() for k, v in self.live_state_dict(model).items()}

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Copy a saved state into the model; every key must match (``inject.load_prefixed``)."""
        load_prefixed(model, state, {k: v.detach() for k, v in self.live_state_dict(model).items()})

    # peft's names for the config's fields in ``adapter_config.json`` ({our field: peft's key}), and the
    # fields that stay out of it (options peft has no key for); see :meth:`adapter_config`.
    adapter_renames: ClassVar[dict[str, str]] = {}
    adapter_omits: ClassVar[tuple[str, ...]] = ()

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        """Method fields of ``adapter_config.json`` (peft's names where peft has the method): by default
        every field of the config dataclass (renamed by ``adapter_renames``, less ``adapter_omits``) and
        the modules trained whole. A method adds or rewrites what it resolves on the model (targets)."""
        return {**self.config_fields(self.cfg), "modules_to_save": list(self.saved_modules) or None}

    @classmethod
    def config_fields(cls, cfg: MethodConfig) -> dict[str, Any]:
        """The fields of ``cfg`` keyed as in ``adapter_config.json``."""
        values = to_dict(cfg)
        return {cls.adapter_renames.get(k, k): v for k, v in values.items() if k in cls._round_trip_fields()}

    @classmethod
    def _round_trip_fields(cls) -> list[str]:
        omitted = {"name", *cls.adapter_omits}
        return [f.name for f in dataclasses.fields(cls.config_cls) if f.name not in omitted]

    @classmethod
    def config_from_adapter(cls, adapter_config: dict[str, Any]) -> MethodConfig:
        """Rebuild the recipe section from a saved ``adapter_config.json``: each field from its key (the
        dataclass default where the key is missing or null), checked as a recipe's would be."""
        values = {}
        for field_name in cls._round_trip_fields():
            value = adapter_config.get(cls.adapter_renames.get(field_name, field_name))
            if value is not None:
                values[field_name] = value
        return from_dict(cls.config_cls, {"name": cls.name, **values}, "method")

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
    """Class decorator: add a method to the registry (``peftcli.methods.catalog`` imports every file)."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Method]]:
    """The methods registered so far, by name (complete once ``peftcli.methods.catalog`` is imported)."""
    return dict(_REGISTRY)


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
