"""The wrapped-layer kit: what every method that replaces layers (LoRA, AdaLoRA, (IA)3, and the LoHa,
LoKr, VeRA, OFT to come) shares, written once, as peft's ``BaseTuner`` does for its tuners.

:class:`LayerMethod` owns the story: build the model-level shared state, resolve the targets, wrap each
matched layer (create-and-replace), train the ``modules_to_save`` whole; then merge, unmerge and unload
the layers, and name the saved tensors by ``parameter_prefix``. A method writes its layer class (an
:class:`AdapterLayer`, which looks like the layer it wraps) and :meth:`LayerMethod.create_layer`.

Model-level shared state (VeRA's projections, shared by every layer) lives in one :class:`SharedState`
module set on the model as ``adapter_shared``. Layers keep a plain reference to it (not a submodule),
so each tensor has one name and is saved once, under peft's key for a tuner attribute:
``base_model.<name>`` (peft saves VeRA's as ``base_model.vera_A`` and ``base_model.vera_B``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from peftcli.inject import (
    PREFIX,
    WrappedLayer,
    classifier_heads,
    freeze,
    make_trainable_copies,
    match_targets,
    modules_to_save_state,
    set_module,
)
from peftcli.methods.registry import Method
from peftcli.recipe import RecipeError

SHARED_ATTR = "adapter_shared"  # the model attribute that holds the shared state
SHARED_PREFIX = "base_model."  # peft's prefix for tensors held by the tuner itself (not by a layer)


class SharedState(nn.Module):
    """Tensors shared by every adapted layer: frozen ones as buffers, trained ones as parameters, and
    containers of them (TinyLoRA's per-group vectors, saved as ``base_model.tinylora_v.<group>``; FRoD's
    per-category bases, a ``SharedState`` of buffers each, saved as ``base_model.frod_V.<category>``)."""

    def add(self, name: str, value: torch.Tensor | nn.Module) -> None:
        if isinstance(value, nn.Parameter):
            self.register_parameter(name, value)
        elif isinstance(value, nn.Module):
            self.add_module(name, value)
        else:
            self.register_buffer(name, value)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**dict(self.named_buffers()), **dict(self.named_parameters())}


class Foldable:
    """The merge protocol of a kit layer. ``merge`` folds the update into the base weight in place and
    the layer then runs the base alone; ``unmerge`` takes it out again (where the algebra allows)."""

    merged: bool = False

    def merge(self) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise RecipeError(
            "merge",
            f"{type(self).__name__} cannot take its update back out of the base weight",
            "reload the base model instead",
        )


class AdapterLayer(WrappedLayer, Foldable):
    """The base of a kit layer around a frozen linear-like layer (looks like it: ``weight``, ``bias``,
    ``in_features``, ...). Subclasses set ``self.base_layer`` and write ``forward``, ``merge`` and, where
    the update can be taken back out, ``unmerge``."""


def write_weight(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy an fp32 result into a frozen tensor in its own dtype (the merge loops' one write)."""
    with torch.no_grad():
        target.copy_(value.to(target.dtype))


class DeltaLayer(AdapterLayer):
    """A kit layer whose update is an additive ΔW on the base weight: subclasses write ``stored_delta``
    (fp32, in the weight's own layout); merge adds it and unmerge subtracts it."""

    def stored_delta(self) -> torch.Tensor:
        raise NotImplementedError

    def merge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() + self.stored_delta())

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() - self.stored_delta())


def pattern_key(patterns: dict[str, Any] | list[str], name: str) -> str | None:
    r"""The first key (in sorted order) such that ``name`` matches ``(.*\.)?(key)$``, as peft matches
    ``rank_pattern`` keys. Sorted, because peft reads them back from a JSON file written with sorted keys."""
    for key in sorted(patterns):
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def validate_patterns(cfg: Any, keys: tuple[str, ...] = ("rank_pattern", "alpha_pattern")) -> None:
    """Recipe checks of peft's per-module ``rank_pattern`` / ``alpha_pattern``: each key a valid regex,
    each value positive."""
    for key in keys:
        for pattern, value in getattr(cfg, key).items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise RecipeError(
                    f"method.{key}.{pattern}",
                    f"not a valid regular expression ({err})",
                    "use a module name suffix such as down_proj, or fix the regex",
                ) from None
            if value <= 0:
                raise RecipeError(
                    f"method.{key}.{pattern}",
                    f"must be > 0, got {value}",
                    "ranks are integers >= 1 and alphas positive numbers",
                )


def check_patterns_match(
    cfg: Any, adapted: list[str], keys: tuple[str, ...] = ("rank_pattern", "alpha_pattern")
):
    """peft ignores a pattern key that matches no adapted module; we say so, naming what is adapted."""
    for key in keys:
        for pattern in getattr(cfg, key):
            if not any(pattern_key([pattern], name) for name in adapted):
                raise RecipeError(
                    f"method.{key}.{pattern}",
                    "matches none of the adapted modules",
                    f"adapted: {', '.join(dict.fromkeys(n.split('.')[-1] for n in adapted))}",
                )


class LayerMethod(Method):
    """A method that replaces matched layers by its :attr:`layer_types` (the first one is what
    :meth:`create_layer` returns). Subclasses set ``layer_types`` and write :meth:`create_layer`; they
    override :meth:`resolve_targets` when their targets need more than ``cfg.target_modules``, and
    :meth:`build_shared` when their layers share model-level tensors. Kit layers fold (``merge``), so a
    layer method is ``mergeable``; one whose layers cannot sets ``mergeable = False`` and
    ``merge = Method.merge`` (``register`` checks the two agree)."""

    layer_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    mergeable: ClassVar[bool] = True
    # What create_layer can wrap, checked on every matched target before anything is replaced: a
    # predicate, what it accepts in words ("nn.Linear layers"), and what to do instead. Empty: anything.
    target_kind: ClassVar[str] = ""
    target_hint: ClassVar[str] = "target other modules"

    @staticmethod
    def accepts_target(module: nn.Module) -> bool:
        return True

    def __init__(self, cfg, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.targets: list[str] = []
        # the model's shared state while apply runs, for create_layer to hand its layers (as a reference)
        self.shared_state: SharedState | None = None

    # -- building ------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        shared = self.build_shared(model)
        if shared:
            self.shared_state = SharedState()
            for name, value in shared.items():
                self.shared_state.add(name, value)
            device = next(model.parameters()).device  # where the layers that read it run
            model.add_module(SHARED_ATTR, self.shared_state.to(device))
        self.targets = self.resolve_targets(model)
        self.wrap(model)
        self.saved_modules = self.train_whole(model)
        return model

    def build_shared(self, model: nn.Module) -> dict[str, torch.Tensor | nn.Module]:
        """Model-level tensors (or containers of them) every layer uses, by their peft names (none by default). They are set on
        the model before any layer is created; :meth:`create_layer` finds them in :attr:`shared_state`."""
        return {}

    def shared(self, model: nn.Module) -> SharedState | None:
        """The model's shared state (none when the method builds none)."""
        return getattr(model, SHARED_ATTR, None)

    def resolve_targets(self, model: nn.Module) -> list[str]:
        """Full names of the layers to wrap: ``cfg.target_modules`` matched by peft's rules, each one a
        layer :meth:`accepts_target` (else one line naming it and :attr:`target_kind`)."""
        targets = match_targets(model, self.cfg.target_modules)
        for name in targets:
            module = model.get_submodule(name)
            if not self.accepts_target(module):
                raise RecipeError(
                    "method.target_modules",
                    f"{name} is a {type(module).__name__}; {self.name} adapts {self.target_kind} only",
                    self.target_hint,
                )
        return targets

    def create_layer(self, name: str, base: nn.Module) -> nn.Module:
        """The layer that replaces ``base`` (the module named ``name``)."""
        raise NotImplementedError

    def wrap(self, model: nn.Module) -> None:
        for name in self.targets:
            set_module(model, name, self.create_layer(name, model.get_submodule(name)))

    def train_whole(self, model: nn.Module) -> list[str]:
        """``modules_to_save`` and a seq_cls head (peft adds it too), as trainable copies."""
        to_save = list(getattr(self.cfg, "modules_to_save", None) or [])
        to_save += [h for h in classifier_heads(model, self.task) if h not in to_save]
        return make_trainable_copies(model, to_save)

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every kit layer of the model, in model order, nested ones included."""
        return [(n, m) for n, m in model.named_modules() if isinstance(m, self.layer_types)]

    # -- saving --------------------------------------------------------------------------
    def owns(self, parameter_name: str) -> bool:
        return not parameter_name.startswith(f"{SHARED_ATTR}.") and super().owns(parameter_name)

    def live_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The layers' own tensors (by ``parameter_prefix``), the shared state once as
        ``base_model.<name>``, and the modules trained whole."""
        state = {self.stored_key(n): p for n, p in model.named_parameters() if self.owns(n)}
        state.update(self.shared_state_dict(model))
        state.update(modules_to_save_state(model, self.saved_modules, PREFIX))
        return state

    def shared_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The shared tensors as saved and loaded: each once, as ``base_model.<name>`` (peft's key for a
        tensor its tuner holds). A method that rebuilds them from a seed instead (VeRA's
        ``save_projection: false``) returns none."""
        shared = self.shared(model)
        return {} if shared is None else {SHARED_PREFIX + n: t for n, t in shared.tensors().items()}

    # -- merging -------------------------------------------------------------------------
    def merge_adapter(self, model: nn.Module) -> nn.Module:
        """Fold every layer's update into its base weight in place; the layers stay (reversible)."""
        for _, layer in self.layers(model):
            if not layer.merged:
                layer.merge()
                layer.merged = True
        return model

    def unmerge_adapter(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`merge_adapter`: the base weights as they were, the adapter active again."""
        for _, layer in reversed(self.layers(model)):
            if layer.merged:
                layer.unmerge()
                layer.merged = False
        return model

    def unload(self, model: nn.Module) -> nn.Module:
        """Put each base layer back in its wrapper's place (through nested wrappers) and drop the shared
        state: the model becomes a plain transformers model again."""
        layers = self.layers(model)
        nested = {f"{name}.base_layer" for name, _ in layers}
        for name, layer in layers:
            if name in nested:
                continue
            module = layer
            while isinstance(module, self.layer_types):
                module = module.base_layer
            set_module(model, name, module)
        if hasattr(model, SHARED_ATTR):
            delattr(model, SHARED_ATTR)
        return model

    def adapter_disabled(self, model: nn.Module) -> contextlib.AbstractContextManager | None:
        """The base layers put back in the wrappers' places for the block (module references only, no
        weights copied), then the wrappers again. None when the method trains whole modules
        (``modules_to_save``): their base values are not kept, so the base model cannot be run."""
        if self.saved_modules or any(layer.merged for _, layer in self.layers(model)):
            return None
        return self._layers_unplugged(model)

    @contextlib.contextmanager
    def _layers_unplugged(self, model: nn.Module) -> Iterator[None]:
        layers = self.layers(model)
        nested = {f"{name}.base_layer" for name, _ in layers}
        outer = [(name, layer) for name, layer in layers if name not in nested]
        try:
            for name, layer in outer:
                module = layer
                while isinstance(module, self.layer_types):
                    module = module.base_layer
                set_module(model, name, module)
            yield
        finally:
            for name, layer in outer:
                set_module(model, name, layer)

    def merge(self, model: nn.Module) -> nn.Module:
        self.merge_adapter(model)
        self.unload(model)
        freeze(model)
        return model

    def fan_in_fan_out(self, model: nn.Module) -> bool:
        """peft's ``fan_in_fan_out``: whether the adapted layers store W as (in, out) (GPT-2's Conv1D)."""
        return any(getattr(m, "fan_in_fan_out", False) for _, m in self.layers(model))

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        """The config's fields, with the targets as matched (peft writes the resolved names too)."""
        return {**super().adapter_config(model), "target_modules": list(self.targets)}


__all__ = [
    "SHARED_ATTR",
    "AdapterLayer",
    "Foldable",
    "LayerMethod",
    "SharedState",
    "check_patterns_match",
    "pattern_key",
    "validate_patterns",
    "write_weight",
]
