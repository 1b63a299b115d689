"""Lily: Low-rank Interconnected adaptation across Layers (Zhong, Zhao & Zhou, arXiv 2407.09946).

LoRA gives every layer its own pair (A, B). Lily cuts the pairs apart and shares both sides across
depth: a low-rank projector A ("LP", r × in) is shared by ``stride_A`` neighbouring layers, and
``num_B`` high-rank projectors B_e ("HP experts", r × out each) are shared by every layer. Each layer
keeps a small router R (num_B × r) that decides, from its own low-rank features, how to mix the
experts::

    h = A x                                       (r per token)
    p = mean over every token of the call of softmax(R h)        (num_B weights, summing to 1)
    y = W0 x + b0 + s · h (Σ_e p_e B_e)

The mix p is one vector per layer and forward call: the softmax is averaged over all rows and positions
the call holds, padding included (peft's ``LilyLayer`` does exactly this, and we match its numbers).
So a layer's output for one example depends on what else is in its batch, how much padding there is,
and, in generation, on the call (the prompt's forward averages over the prompt, each decoding step over
that step's new tokens only). That is why packing is refused and why merging is impossible: there is
no fixed ΔW, it changes with the tokens.

Sharing happens within a group, as in peft: the adapted layers with the same target name (the listed
name the module's name ends with; for a regex target, the regex itself) and the same weight shape, in
model order. Within a group, layers i, i+1, … i+stride_A−1 (counted from the group's first) use the A of
the block's first layer, and every layer uses the group's first layer's B; routers are never shared.

Init (peft's, in peft's draw order for the same seed): every layer draws its A, B and router as
``nn.Linear`` does, then A and the router are redrawn Kaiming-uniform (a = √5) and B is zero (step 0 is
the base; ``init_weights: false`` draws B Kaiming-uniform too); the shared A and B are then the
leaders'. Saved as peft saves them: ``lily_A.weight`` (r, in), ``lily_B.weight`` (num_B·r, out) and
``lily_router.weight`` (num_B, r) under *every* adapted module, a shared tensor repeated under each
module that uses it (loading checks that the copies agree).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftcli.inject import is_regex_target, match_targets
from peftcli.methods.kit import AdapterLayer, LayerMethod
from peftcli.methods.registry import Method, register
from peftcli.recipe import MethodConfig, RecipeError, doc

MAX_AMBIGUOUS = 6  # listed names that one module's name ends with at once: orders tried (6! = 720)


@dataclass
class LilyConfig(MethodConfig):
    """peft's ``LilyConfig`` fields (``exclude_modules``, ``layers_to_transform`` and ``layers_pattern``
    left out: narrow ``target_modules`` instead)."""

    r: int = field(
        default=32,
        metadata=doc(
            "rank of each A and of each B expert (peft advises 2-4x the LoRA rank you would use)", min=1
        ),
    )
    stride_A: int = field(
        default=1,
        metadata=doc("neighbouring layers of a group that share one A (1: every layer its own)", min=1),
    )
    num_B: int = field(
        default=2,
        metadata=doc("B experts shared by every layer of a group, mixed by each layer's router", min=2),
    )
    scaling: float = field(
        default=1.0, metadata=doc("s: the update is s · h (Σ p_e B_e), a plain multiplier (no alpha / r)")
    )
    init_weights: bool = field(
        default=True,
        metadata=doc("B at zero (step 0 is the base); false: B Kaiming-uniform too"),
    )
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata=doc(
            "module names (list), a regex on full names, or all-linear (every nn.Linear but the head); "
            "layers share A and B within one name and shape"
        ),
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=doc("modules trained in full and saved whole; seq_cls heads are added"),
    )


def kaiming(weight: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class LilyLinear(AdapterLayer):
    """``base_layer(x) + s · h (Σ_e p_e B_e)`` with h = A x and p the router's softmax averaged over the
    call's tokens, around a frozen ``nn.Linear``. ``lily_A`` and ``lily_B`` may be other layers' modules
    (shared, as peft shares them); ``lily_router`` is always this layer's own."""

    def __init__(self, base_layer: nn.Linear, cfg: LilyConfig):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.num_B, self.scaling = cfg.r, cfg.num_B, cfg.scaling
        device = base_layer.weight.device
        # nn.Linear draws each weight as it is built: the same stream peft's layer consumes
        self.lily_A = nn.Linear(self.in_features, cfg.r, bias=False, device=device)
        self.lily_B = nn.Linear(self.out_features, cfg.num_B * cfg.r, bias=False, device=device)
        self.lily_router = nn.Linear(cfg.r, cfg.num_B, bias=False, device=device)
        kaiming(self.lily_A.weight)
        kaiming(self.lily_router.weight)
        if cfg.init_weights:
            nn.init.zeros_(self.lily_B.weight)  # step 0 = base
        else:
            kaiming(self.lily_B.weight)

    def experts(self) -> torch.Tensor:
        """The B experts (num_B, r, out), a view of ``lily_B.weight`` (num_B·r, out)."""
        return self.lily_B.weight.view(self.num_B, self.r, self.out_features)

    def mixture(self, h: torch.Tensor) -> torch.Tensor:
        """(num_B,): the router's softmax averaged over every token of the call, padding included."""
        probabilities = torch.softmax(self.lily_router(h), dim=-1)
        return probabilities.reshape(-1, self.num_B).mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        h = self.lily_A(x.to(self.lily_A.weight.dtype))
        mixed = torch.einsum("e,ero->ro", self.mixture(h), self.experts())
        return result + (h @ mixed * self.scaling).to(result.dtype)

    def merge(self) -> None:
        raise RecipeError(
            "method",
            "lily has no fixed update to fold into W: its router mixes the B experts by the tokens of each forward",
            "load the adapter with peftcli.load instead",
        )


@register
class Lily(LayerMethod):
    name = "lily"
    description = (
        "Lily: A shared by neighbouring layers, B experts shared by all, mixed by a router per layer "
        "(arXiv 2407.09946)"
    )
    config_cls = LilyConfig
    peft_type = "LILY"
    mergeable = False  # the expert mix depends on the tokens of each forward: no fixed ΔW
    merge = Method.merge
    supports_quantized_base = False  # peft's Lily wraps nn.Linear and groups layers by W's shape
    supports_packing = False
    packing_refusal = (
        "averages each layer's router over every token of a forward, padding included, so a packed "
        "batch gives other numbers than the same examples padded"
    )
    supports_fsdp = False  # A and B are shared across decoder layers, which FSDP shards apart
    trainable_formula = (
        "per group of L same-name, same-shape layers: ceil(L / stride_A)·r·in + num_B·r·out, "
        "plus num_B·r per layer (its router), plus modules_to_save"
    )
    parameter_prefix = "lily_"  # base_model.model.<module>.lily_A / lily_B / lily_router .weight
    layer_types = (LilyLinear,)
    target_kind = "nn.Linear layers"
    target_hint = "peft's Lily wraps nn.Linear only: target the model's linear layers"

    cfg: LilyConfig

    @staticmethod
    def accepts_target(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def __init__(self, cfg: LilyConfig, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.groups: dict[tuple[str, tuple[int, ...]], list[str]] = {}

    # -- building ------------------------------------------------------------------------
    def resolve_targets(self, model: nn.Module) -> list[str]:
        """``all-linear`` is saved for peft as the adapted layers' names (see :meth:`adapter_config`), so
        it must adapt exactly the modules those names reach."""
        targets = super().resolve_targets(model)
        if not self.all_linear():
            return targets
        names = sorted({t.rsplit(".", 1)[-1] for t in targets})
        extra = [n for n in match_targets(model, names) if n not in targets]
        if extra:
            raise RecipeError(
                "method.target_modules",
                f"all-linear is saved for peft as the names {names}, which also reach {extra[0]}",
                "list the modules by name, or as a regex on full names",
            )
        return targets

    def all_linear(self) -> bool:
        return self.cfg.target_modules in ("all-linear", ["all-linear"])

    def create_layer(self, name: str, base: nn.Module) -> LilyLinear:
        return LilyLinear(base, self.cfg)

    def wrap(self, model: nn.Module) -> None:
        """Every layer built with its own A, B and router (peft's draws), then A and B shared."""
        super().wrap(model)
        self.groups = self.group_layers(model)
        for names in self.groups.values():
            layers = [model.get_submodule(n) for n in names]
            for index, layer in enumerate(layers):
                layer.lily_A = layers[index - index % self.cfg.stride_A].lily_A
                layer.lily_B = layers[0].lily_B

    def listed_names(self) -> list[str]:
        """The names a module's name is matched against for grouping (not for a regex target)."""
        targets = self.cfg.target_modules
        if self.all_linear():
            return sorted({t.rsplit(".", 1)[-1] for t in self.targets})
        return [targets] if isinstance(targets, str) else list(targets)

    def group_layers(self, model: nn.Module) -> dict[tuple[str, tuple[int, ...]], list[str]]:
        """{(target name, weight shape): adapted module names in model order}. peft keys a module by
        the last of its listed names (in its set's iteration order) that the module's name ends with;
        where several end it, every order is tried and must give the same groups (else one line)."""
        shapes = {n: tuple(m.base_layer.weight.shape) for n, m in self.layers(model)}
        if is_regex_target(self.cfg.target_modules):
            return self._grouped(shapes, dict.fromkeys(shapes, self.cfg.target_modules))
        listed = self.listed_names()
        matches = {n: [t for t in listed if n.endswith(t)] for n in shapes}
        ambiguous = sorted({t for found in matches.values() if len(found) > 1 for t in found})
        if len(ambiguous) > MAX_AMBIGUOUS:
            self._refuse_ambiguous(matches)
        partitions = {}
        for order in itertools.permutations(ambiguous):  # one empty order when nothing is ambiguous
            last = {
                n: max(found, key=lambda t: order.index(t) if t in order else -1)
                for n, found in matches.items()
            }
            groups = self._grouped(shapes, last)
            partitions.setdefault(frozenset(tuple(g) for g in groups.values()), groups)
        if len(partitions) > 1:
            self._refuse_ambiguous(matches)
        return next(iter(partitions.values()))

    @staticmethod
    def _grouped(
        shapes: dict[str, tuple[int, ...]], names: dict[str, str]
    ) -> dict[tuple[str, tuple[int, ...]], list[str]]:
        """{(target name, shape): module names in model order} from each module's target name."""
        groups: dict[tuple[str, tuple[int, ...]], list[str]] = {}
        for name, shape in shapes.items():
            groups.setdefault((names[name], shape), []).append(name)
        return groups

    @staticmethod
    def _refuse_ambiguous(matches: dict[str, list[str]]) -> None:
        name, found = next((n, f) for n, f in matches.items() if len(f) > 1)
        raise RecipeError(
            "method.target_modules",
            f"{name} ends with {' and '.join(map(repr, found))}, and peft's Lily would group it by "
            "whichever its set of names lists last (Python's hash order), which changes the sharing",
            "list names none of which ends another (e.g. q_proj, not both q_proj and self_attn.q_proj)",
        )

    def summary_lines(self) -> list[str]:
        a_count = sum(math.ceil(len(n) / self.cfg.stride_A) for n in self.groups.values())
        return [
            f"lily: {len(self.groups)} groups of layers, {a_count} A adapters, "
            f"{self.cfg.num_B} B experts per group, one router per layer"
        ]

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        cfg, count = self.cfg, 0
        for names in self.groups.values():
            first = model.get_submodule(names[0])
            count += math.ceil(len(names) / cfg.stride_A) * cfg.r * first.in_features
            count += cfg.num_B * cfg.r * first.out_features + len(names) * cfg.num_B * cfg.r
        return count + self.saved_modules_count(model)

    # -- saving and loading --------------------------------------------------------------
    def live_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Each layer's A, B and router under its own name, shared ones repeated (peft's file)."""
        state = super().live_state_dict(model)
        every = model.named_parameters(remove_duplicate=False)
        state.update({self.stored_key(n): p for n, p in every if self.owns(n)})
        return state

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """As saved: a shared tensor cloned under each further name (safetensors stores no aliases)."""
        state, seen = super().adapter_state_dict(model), set()
        for key, value in state.items():
            if value.data_ptr() in seen:
                state[key] = value.clone()
            seen.add(value.data_ptr())
        return state

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """The file's copies of one shared tensor must agree (peft would keep whichever it loads last)."""
        first: dict[int, str] = {}
        for key, live in self.live_state_dict(model).items():
            if key not in state:
                continue
            earlier = first.setdefault(id(live), key)
            if earlier != key and earlier in state and not torch.equal(state[earlier], state[key]):
                raise RecipeError(
                    "adapter",
                    f"{key} differs from {earlier}, and lily shares one tensor between them",
                    "load it with the stride_A, num_B and target_modules it was trained with",
                )
        super().load_adapter_state_dict(model, state)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        """Targets as peft must read them to group the same layers: the regex itself, or the listed
        names (all-linear: the adapted modules' names), never full module names (each would be a
        group of one)."""
        targets = self.cfg.target_modules
        saved = targets if is_regex_target(targets) else sorted(set(self.listed_names()))
        return {
            **super().adapter_config(model),
            "target_modules": saved,
            "exclude_modules": None,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    @classmethod
    def config_from_adapter(cls, adapter_config: dict[str, Any]) -> LilyConfig:
        for key in ("exclude_modules", "layers_to_transform", "layers_pattern"):
            if adapter_config.get(key) not in (None, [], ""):
                raise RecipeError(
                    f"adapter_config.{key}",
                    f"is {adapter_config[key]!r}; peftcli's lily reads adapters that name their targets only",
                    "save the adapter with target_modules narrowed to the layers instead",
                )
        return super().config_from_adapter(adapter_config)


__all__ = ["Lily", "LilyConfig", "LilyLinear"]
