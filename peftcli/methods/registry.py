"""The method contract: one ``Method`` base class with no-op hooks and one decorator.

A method turns a frozen transformers model into a tuned one (:meth:`Method.attach`, which freezes and
then calls the method's :meth:`Method.apply`), names its trainable parameters, saves and loads them (in
peft's format where ``peft_type`` is set), and optionally merges itself away. The training loop,
export, reporting and the contract test only ever talk to this interface.

The list of methods lives in :mod:`peftcli.methods.catalog`; this module imports no method, so that a
module needing only the contract (or ``count_parameters``) loads none of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterable
from pathlib import Path
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
    # why, in the refusal's words after "method <name> " (Poly: one task id per row)
    packing_refusal: ClassVar[str] = (
        "prepends virtual tokens per row, so packed examples would see each other"
    )
    supports_fsdp: ClassVar[bool] = False  # can train with the base sharded by FSDP2 (train.distributed)
    # generation (peftcli.decoding.decode) feeds one new token a step over a KV cache; a method whose
    # forward needs the whole sequence for every token (X-LoRA's scaling pass) sets this False, and
    # decoding re-runs the whole sequence at every step instead
    decodes_with_cache: ClassVar[bool] = True
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

    def adapter_file_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An adapter file's tensors as this method loads them (``peftcli.export.load_adapter`` checks
        and loads what this returns): as they are by default. A method whose peft files hold tensors it
        keeps elsewhere drops them here (peft's RandLoRA saves its shared bases once per layer too)."""
        return state

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

    def adapter_disabled(self, model: nn.Module) -> contextlib.AbstractContextManager | None:
        """A context in which ``model`` runs as the base model alone (the reference of dpo/ipo with
        ``objective.reference: base``), or None when the method cannot switch itself off (the default)."""
        return None

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The method's own training loss of one micro-batch, summed over what it scores (CPT: the
        context's labels and the row's, decay-weighted), or None for the loop's loss path (the default).
        ``model`` is what forward runs through (the DDP wrapper under torchrun)."""
        return None

    def loss_targets(self, batch: dict[str, torch.Tensor]) -> int | None:
        """How many positions :meth:`loss_sum` scores in ``batch`` (the window's normaliser counts these),
        or None for the loop's count (labelled tokens)."""
        return None

    def auxiliary_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """A loss term of the method's own that reads the micro-batch the loop just ran forward (sft
        only; Shadow: its shadow path's loss on the batch's labels), *summed* over the batch's scored
        targets: the loop adds it to the task loss's sum before normalising both over the window's
        targets, so gradient accumulation and DDP see one loss. None (the default): nothing."""
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Called after backward, before the optimizer step and zero_grad (gradients present)."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after the optimizer step, before zero_grad (updated weights and gradients present);
        ``step`` is the 0-based index of the step just taken (e.g. AdaLoRA's rank allocation, as peft)."""

    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        """Called once by the loop before the first step with the run's optimizer-step count."""

    def data_init_examples(self) -> int:
        """How many training examples the method's init reads (LoRA's eva, corda, lora_ga); 0: none."""
        return 0

    def init_from_data(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """Initialise from ``batches`` (the first :meth:`data_init_examples` training examples, collated as
        training collates them, on the model's device). The loop calls it once, after the model is built and
        before the optimizer exists, on a resumed run too (so the init must be deterministic)."""

    def on_save(self, model: nn.Module) -> None:
        """Called before an adapter is written (e.g. AdaLoRA fixes its final rank pattern)."""

    def as_saved(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A loaded file's tensors in the form :meth:`adapter_state_dict` writes them, for the check after
        loading (LoRA: peft's unconverted PiSSA / OLoRA file, rank r, as our rank-2r export); the
        default: as they are."""
        return state

    def adapter_files(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """Extra safetensors files written into the adapter directory beside the adapter, {file name:
        tensors} (LoRA's ``init: loftq``: the quantized base it pairs with); none by default."""
        return {}

    def adapter_parts(self, model: nn.Module, directory: Path, final: Path) -> dict[str, Any]:
        """Write what the adapter directory holds beyond files of tensors (X-LoRA: its experts, each a
        LoRA adapter in a subdirectory) into ``directory``, the temporary directory that becomes
        ``final``; return the ``adapter_config.json`` entries that name them. Nothing by default."""
        return {}

    @classmethod
    def config_at(cls, cfg: MethodConfig, adapter_dir: Path) -> MethodConfig:
        """The config of an adapter peftcli wrote into ``adapter_dir``, with what it keeps there (see
        :meth:`adapter_parts`) in place of the paths it was trained with; as it is by default."""
        return cfg

    def method_state(self) -> dict[str, Any]:
        """Non-parameter state that exact resume needs (tensors, numbers, strings; no objects)."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`method_state` returned."""


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: check that ``cls`` provides what every method must (:func:`contract_problems`)
    and add it to the registry (``peftcli.methods.catalog`` imports every file)."""
    problems = contract_problems(cls)
    if problems:
        raise TypeError(f"method {getattr(cls, 'name', cls.__name__)!r}: {problems[0]}")
    _REGISTRY[cls.name] = cls
    return cls


def overrides(cls: type, attribute: str, base: type | None = None) -> bool:
    """Whether ``cls`` has its own ``attribute``, not the one of ``base`` (default :class:`Method`)."""

    def function(owner: type) -> Any:
        found = inspect.getattr_static(owner, attribute, None)
        return getattr(found, "__func__", found)  # a classmethod or staticmethod: its function

    return function(cls) is not function(base or Method)


def contract_problems(cls: type[Method]) -> list[str]:
    """What ``cls`` lacks of the method contract, one sentence each (empty when it is complete). Checked
    at import, so a method that forgets something fails on the first ``import peftcli``, not in a test."""
    checks = (_identity_problems, _config_problems, _hook_problems, _flag_problems)
    return [problem for check in checks for problem in check(cls)]


def _identity_problems(cls: type[Method]) -> list[str]:
    name, description = getattr(cls, "name", None), getattr(cls, "description", None)
    if not isinstance(name, str) or not name.isidentifier():
        return [f"name must be a Python identifier (it names the file and the recipe), got {name!r}"]
    problems = []
    if name in _REGISTRY:
        problems.append(f"registered twice (by {_REGISTRY[name].__module__} and {cls.__module__})")
    if not isinstance(description, str) or not description.strip() or "\n" in description:
        problems.append("description must be one non-empty line (shown by `peftcli methods`)")
    formula = getattr(cls, "trainable_formula", "")
    if not isinstance(formula, str) or not formula.strip():
        problems.append("trainable_formula must say how the trainable parameters are counted")
    return problems


def _config_problems(cls: type[Method]) -> list[str]:
    config = getattr(cls, "config_cls", None)
    if not (
        isinstance(config, type) and dataclasses.is_dataclass(config) and issubclass(config, MethodConfig)
    ):
        return [f"config_cls must be a dataclass subclass of MethodConfig, got {config!r}"]
    fields = {f.name: f for f in dataclasses.fields(config)}
    problems = []
    if "name" in vars(config).get("__annotations__", {}) and fields["name"].default != cls.name:
        problems.append(
            f"config_cls redeclares name with default {fields['name'].default!r}, not {cls.name!r}"
        )
    for kind, keys in (("adapter_renames", cls.adapter_renames), ("adapter_omits", cls.adapter_omits)):
        stray = [k for k in keys if k not in fields]
        if stray:
            problems.append(f"{kind} names {stray[0]!r}, not a field of {config.__name__}")
    return problems


def _hook_problems(cls: type[Method]) -> list[str]:
    problems = []
    if not overrides(cls, "apply"):
        problems.append("apply is not overridden: the method adds nothing to the model")
    prefix = cls.parameter_prefix
    if prefix is not None and (not isinstance(prefix, str) or not prefix):
        problems.append(f"parameter_prefix must be a non-empty string or None, got {prefix!r}")
    saving = ("live_state_dict", "owns", "adapter_state_dict")
    if prefix is None and not any(overrides(cls, hook) for hook in saving):
        problems.append("set parameter_prefix or override live_state_dict: nothing says what to save")
    if bool(cls.mergeable) != overrides(cls, "merge"):
        problems.append(
            "mergeable is True but merge is not overridden"
            if cls.mergeable
            else "merge is overridden but mergeable is False"
        )
    if hasattr(cls, "create_layer"):  # a wrapped-layer method (peftcli.methods.kit.LayerMethod)
        kit = next(k for k in reversed(cls.__mro__) if "create_layer" in vars(k))
        if not overrides(cls, "create_layer", kit):
            problems.append("create_layer is not overridden: the kit does not know what to wrap with")
        if not cls.layer_types:
            problems.append("layer_types is empty: the kit cannot find the layers create_layer makes")
    return problems


def _flag_problems(cls: type[Method]) -> list[str]:
    problems = []
    peft_type = cls.peft_type
    if peft_type is not None and (not isinstance(peft_type, str) or not peft_type.isupper()):
        problems.append(f"peft_type must be None or peft's upper-case name (e.g. 'LORA'), got {peft_type!r}")
    flags = ("mergeable", "identity_at_init", "supports_quantized_base", "supports_packing", "supports_fsdp")
    for flag in flags:
        if not isinstance(getattr(cls, flag), bool):
            problems.append(f"{flag} must be True or False, got {getattr(cls, flag)!r}")
    return problems


def unregister(name: str) -> None:
    """Remove a method from the registry (tests register throwaway methods and take them out again)."""
    _REGISTRY.pop(name, None)


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
