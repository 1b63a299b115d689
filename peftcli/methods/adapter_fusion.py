"""AdapterFusion, stage two (Pfeiffer et al., 2021, arXiv 2005.00247).

Stage one trains N bottleneck adapters separately (``houlsby_adapter`` runs, typically with
``config: pfeiffer``). Stage two freezes them and learns, at every sublayer they sit on, an attention
over their outputs. With ``h`` the sublayer output and ``z_n = W_up,n σ(W_down,n h)`` the n-th
adapter's output (its delta, before the skip connection)::

    q = W_Q h + b_Q,   k_n = W_K z_n + b_K,   v_n = W_V z_n + b_V
    a = softmax_n(q · k_n / T)                              (over the N adapters, per token)
    h ← h + Σ_n a_n v_n

Init as AdapterHub's: ``W_Q``, ``W_K`` ~ N(0, 0.02²), ``W_V`` = I, biases 0, so training starts from
(roughly) the mean of the adapters' outputs. ``T`` is ``temperature``. Not the identity at step 0: the
frozen source adapters act from the start.

The recipe names the stage-one adapter directories (``adapters: [dir, dir, ...]``); they must be
``houlsby_adapter`` adapters trained on the same base and task, with the same positions, and without
trained layer norms (N adapters cannot share one set of norms). Their options are copied into
``source_configs`` when training starts and their tensors are saved again inside the fusion adapter,
so the fusion adapter reloads without the source directories. Source heads (seq_cls) are not used: the
fusion run trains its own head. Placement per model family: :mod:`peftcli.methods.bottleneck`.

Saved tensors: ``base_model.model.<sublayer output module>.adapter.sources.<n>.{down,up}.*`` (frozen),
``...adapter.{query,key,value}.*`` (trained) and a seq_cls head. No ``peft_type``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftcli.checkpoint import read_adapter_state
from peftcli.inject import PREFIX, classifier_heads, make_trainable_copies
from peftcli.methods.bottleneck import (
    ADAPTER_ATTR,
    POSITIONS,
    Bottleneck,
    Sublayer,
    attach,
    block_of,
    bottleneck_width,
    find_sublayers,
)
from peftcli.methods.houlsby_adapter import HoulsbyConfig, resolved
from peftcli.methods.registry import Method, register
from peftcli.recipe import MethodConfig, Recipe, RecipeError, doc, from_dict

SOURCE_METHOD = "houlsby_adapter"


@dataclass
class FusionConfig(MethodConfig):
    adapters: list[str] = field(
        default_factory=list,
        metadata=doc("trained houlsby_adapter directories to fuse (RUN/adapter), at least 2"),
    )
    temperature: float = field(
        default=1.0, metadata=doc("T in softmax(q·k / T) over the adapters", min_exclusive=0.0)
    )
    source_configs: list[dict[str, Any]] = field(
        default_factory=list,
        metadata=doc("filled in when training starts (the sources' options); leave empty"),
    )


class FusionBlock(nn.Module):
    """Frozen source bottlenecks and the trained query/key/value attention over their outputs."""

    needs_input = False

    def __init__(self, hidden_size: int, sources: list[Bottleneck], temperature: float):
        super().__init__()
        self.sources = nn.ModuleList(sources)
        self.temperature = temperature
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        nn.init.normal_(self.query.weight, std=0.02)
        nn.init.normal_(self.key.weight, std=0.02)
        with torch.no_grad():  # W_V = I: v_n = z_n, the fused output starts as a mix of the adapters' outputs
            self.value.weight.copy_(torch.eye(hidden_size))
        for linear in (self.query, self.key, self.value):
            nn.init.zeros_(linear.bias)
        for p in self.sources.parameters():
            p.requires_grad_(False)

    def forward(self, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        # h: (B, T, d) -> (B, T, d)
        hf = h.to(self.query.weight.dtype)
        z = torch.stack([source(hf) for source in self.sources], dim=2)  # (B, T, N, d)
        q = self.query(hf)  # (B, T, d)
        k, v = self.key(z), self.value(z)  # (B, T, N, d)
        attention = (torch.einsum("btd,btnd->btn", q, k) / self.temperature).softmax(dim=-1)  # (B, T, N)
        return (hf + torch.einsum("btn,btnd->btd", attention, v)).to(h.dtype)


def read_source(path: str, key: str) -> dict[str, Any]:
    """The sidecar of a stage-one adapter directory, checked to be a houlsby_adapter."""
    sidecar = Path(path) / "peftcli_adapter.json"
    if not sidecar.is_file():
        raise RecipeError(
            key,
            f"{path} is not an adapter directory written by peftcli",
            "point at RUN/adapter of a houlsby_adapter run",
        )
    info = json.loads(sidecar.read_text())
    if info.get("method") != SOURCE_METHOD:
        raise RecipeError(
            key,
            f"{path} holds a {info.get('method')} adapter, not a {SOURCE_METHOD}",
            "AdapterFusion fuses bottleneck adapters trained with method.name: houlsby_adapter",
        )
    return info


@register
class AdapterFusion(Method):
    name = "adapter_fusion"
    description = (
        "AdapterFusion: learn an attention over N frozen trained adapters per layer (arXiv 2005.00247)"
    )
    config_cls = FusionConfig
    identity_at_init = False  # the frozen source adapters act from step 0
    trainable_formula = (
        "per fused sublayer 3·(d² + d) for query/key/value, plus a seq_cls head (sources frozen)"
    )

    # the fusion blocks (frozen sources included, so a reload needs no source directory) are children
    # named "adapter": saved as base_model.model.<module>.adapter.{sources.<n>,query,key,value}.*
    parameter_prefix = ADAPTER_ATTR

    cfg: FusionConfig

    def __init__(self, cfg: FusionConfig, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.sublayers: list[Sublayer] = []

    @classmethod
    def validate_config(cls, cfg: FusionConfig, recipe: Recipe) -> None:
        if len(cfg.adapters) < 2:
            raise RecipeError(
                "method.adapters",
                f"needs at least 2 adapter directories, got {len(cfg.adapters)}",
                "list the RUN/adapter directories of your houlsby_adapter runs",
            )
        positions = None
        for i, path in enumerate(cfg.adapters):
            key = f"method.adapters[{i}]"
            if not Path(path).is_dir():
                raise RecipeError(
                    key, f"directory not found: {path}", "paths are relative to where peftcli runs"
                )
            info = read_source(path, key)
            if info.get("model_name") != recipe.model.name:
                raise RecipeError(
                    key,
                    f"{path} was trained on {info.get('model_name')!r}, this recipe uses "
                    f"{recipe.model.name!r}",
                    "fuse adapters trained on the same base model",
                )
            if info.get("task") != recipe.model.task:
                raise RecipeError(
                    key,
                    f"{path} was trained for {info.get('task')}, this recipe is {recipe.model.task}",
                    "fuse adapters trained for the same model.task",
                )
            options = resolved(from_dict(HoulsbyConfig, info["method_config"], key))
            if options.train_layer_norms:
                raise RecipeError(
                    key,
                    f"{path} trained its own layer norms; N adapters cannot share them",
                    "train the sources with train_layer_norms: false (e.g. config: pfeiffer)",
                )
            if positions is not None and sorted(options.positions) != positions:
                raise RecipeError(
                    key,
                    f"{path} sits on {options.positions}, the first adapter on {positions}",
                    "fuse adapters with the same positions",
                )
            positions = sorted(options.positions)

    def source_options(self) -> list[HoulsbyConfig]:
        if not self.cfg.source_configs:  # first build: copy the sources' options into the config we save
            self.cfg.source_configs = [
                read_source(p, f"method.adapters[{i}]")["method_config"]
                for i, p in enumerate(self.cfg.adapters)
            ]
        return [
            resolved(from_dict(HoulsbyConfig, c, "method.source_configs")) for c in self.cfg.source_configs
        ]

    def apply(self, model: nn.Module) -> nn.Module:
        options = self.source_options()
        positions = tuple(p for p in POSITIONS if p in options[0].positions)
        self.sublayers = find_sublayers(model, positions)
        device = next(model.parameters()).device
        for sub in self.sublayers:
            sources = [
                Bottleneck(
                    sub.hidden_size,
                    bottleneck_width(sub.hidden_size, o.reduction_factor, o.bottleneck_size),
                    o.nonlinearity,
                )
                for o in options
            ]
            attach(model, sub, FusionBlock(sub.hidden_size, sources, self.cfg.temperature).to(device))
        # Source tensors: from their directories when present (training); a reload overwrites them anyway
        # with the copies saved in the fusion adapter.
        for n, path in enumerate(self.cfg.adapters):
            if not (Path(path) / "adapter_model.safetensors").is_file():
                continue
            state = read_adapter_state(path)
            with torch.no_grad():
                for sub in self.sublayers:
                    source = block_of(model, sub).sources[n]
                    for pname, param in source.named_parameters():
                        key = f"{PREFIX}{sub.output_module}.adapter.{pname}"
                        if key not in state:
                            raise RecipeError(
                                f"method.adapters[{n}]",
                                f"{path} has no tensor {key}",
                                "it was trained on another model or with other positions",
                            )
                        param.copy_(state[key].to(param.dtype))
        self.saved_modules = make_trainable_copies(model, classifier_heads(model, self.task))
        return model

    def blocks(self, model: nn.Module) -> list[tuple[str, FusionBlock]]:
        return [(sub.output_module, block_of(model, sub)) for sub in self.sublayers]

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(3 * (b.query.in_features**2 + b.query.in_features) for _, b in self.blocks(model))
        return count + self.saved_modules_count(model)


__all__ = ["AdapterFusion", "FusionBlock", "FusionConfig"]
