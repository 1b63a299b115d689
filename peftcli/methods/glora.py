"""GLoRA: Generalized LoRA (Chavan et al., 2023, arXiv 2306.07967).

One formula that holds LoRA, (IA)3-style scaling, prompt-like bias shifts and their mixes: each adapted
linear layer keeps W0 and b0 frozen and trains five "support tensors" A..E that rewrite both::

    W' = W0 + W0 ⊙ A + B          b' = b0 + b0 ⊙ D + E + W0 C          y = W' x + b'

Each tensor has a form chosen per role (the paper's search space; peft's ``config_A_B``, ``config_C``,
``config_D_E``):

- ``lora``: Xd Xu, a rank-r product ((out, r)·(r, in) for A and B, (in, r)·(r, 1) for C);
- ``vector``: one value per output channel ((out, 1) for A and B, broadcast over the row; (in, 1) for
  C; (out,) for D and E);
- ``constant``: one scalar;
- ``none``: zeros (a fixed buffer, saved as peft saves it).

C, D and E act on the bias, so a layer without one (llama's) has them as zeros whatever the config says.
At init every ``lora`` Xd, vector and scalar is zero (Xu Kaiming-uniform), so step 0 is the base;
``init_weights: false`` draws them as peft does (Kaiming-uniform, scalars N(0, 0.02²)). Merging writes
W', b' into the layer; unmerging inverts it, ``W0 = (W' − B) / (1 + A)``, exact while no entry of A is −1.
Saved as peft names it: ``glora_A.Xd`` / ``.Xu`` / ``.X`` / ``.zeros`` (and B..E) under each module,
``peft_type`` ``GLORA``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.methods.kit import AdapterLayer, LayerMethod, write_weight
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, doc


@dataclass
class GloraConfig(MethodConfig):
    """peft's ``GloraConfig`` fields."""

    r: int = field(default=8, metadata=doc("rank of every support tensor in the lora form", min=1))
    config_A_B: Literal["lora", "vector", "constant", "none"] = field(
        default="lora",
        metadata=doc(
            "form of A (W0 ⊙ A) and B (added to W): lora (r·(out+in) each), vector (out), constant (1) or none"
        ),
    )
    config_C: Literal["lora", "vector", "none"] = field(
        default="lora",
        metadata=doc("form of C (b += W0 C): lora (r·(in+1)), vector (in) or none; zeros without a bias"),
    )
    config_D_E: Literal["vector", "constant", "none"] = field(
        default="constant",
        metadata=doc(
            "form of D (b0 ⊙ D) and E (added to b): vector (out), constant (1) or none; zeros without a bias"
        ),
    )
    init_weights: bool = field(
        default=True,
        metadata=doc("start every update at zero (step 0 is the base); false: random, as peft draws it"),
    )
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata=doc(
            "module names (list), a regex on full names, or all-linear (every nn.Linear but the head)"
        ),
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=doc("modules trained in full and saved whole; seq_cls heads are added"),
    )


def kaiming(shape: tuple[int, ...]) -> torch.Tensor:
    """Kaiming-uniform (a = √5) as peft initialises its support tensors (fan-in: the last dimension)."""
    value = torch.empty(shape)
    nn.init.kaiming_uniform_(value, a=math.sqrt(5))
    return value


class LowRank(nn.Module):
    """``Xd @ Xu`` (rows, cols) of rank r; Xd starts at zero (or random with ``init_weights: false``)."""

    def __init__(self, rows: int, cols: int, r: int, init_weights: bool):
        super().__init__()
        self.Xu = nn.Parameter(kaiming((r, cols)))
        self.Xd = nn.Parameter(torch.zeros(rows, r) if init_weights else kaiming((rows, r)))

    def forward(self) -> torch.Tensor:
        return self.Xd @ self.Xu


class Vector(nn.Module):
    """One trained value per row: ``(n, 1)`` broadcast over a matrix's columns, or ``(n,)`` for a bias."""

    def __init__(self, n: int, column: bool, init_weights: bool):
        super().__init__()
        shape = (n, 1) if column else (1, n)
        value = torch.zeros(shape) if init_weights else kaiming(shape)
        self.X = nn.Parameter(value if column else value[0])

    def forward(self) -> torch.Tensor:
        return self.X


class Scalar(nn.Module):
    """One trained number shared by every entry."""

    def __init__(self, init_weights: bool):
        super().__init__()
        self.X = nn.Parameter(torch.zeros(1) if init_weights else torch.randn(1) * 0.02)

    def forward(self) -> torch.Tensor:
        return self.X[0]


class Zeros(nn.Module):
    """A switched-off support tensor: fixed zeros, kept (and saved) in the shape peft keeps them."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("zeros", torch.zeros(shape))

    def forward(self) -> torch.Tensor:
        return self.zeros


def weight_part(form: str, out_features: int, in_features: int, r: int, init: bool) -> nn.Module:
    """A or B in ``form``: shaped against W (out, in)."""
    if form == "lora":
        return LowRank(out_features, in_features, r, init)
    if form == "vector":
        return Vector(out_features, column=True, init_weights=init)
    if form == "constant":
        return Scalar(init)
    return Zeros((out_features, in_features))


def coupling_part(form: str, in_features: int, r: int, init: bool) -> nn.Module:
    """C in ``form``: an (in, 1) column, so that W0 C is one bias-sized vector."""
    if form == "lora":
        return LowRank(in_features, 1, r, init)
    if form == "vector":
        return Vector(in_features, column=True, init_weights=init)
    return Zeros((in_features, 1))


def bias_part(form: str, out_features: int, init: bool) -> nn.Module:
    """D or E in ``form``: shaped against b (out,)."""
    if form == "vector":
        return Vector(out_features, column=False, init_weights=init)
    if form == "constant":
        return Scalar(init)
    return Zeros((out_features,))


class GloraLinear(AdapterLayer):
    """``base_layer(x) + F.linear(x, W0 ⊙ A + B, b0 ⊙ D + E + W0 C)`` around a frozen ``nn.Linear``."""

    def __init__(self, base_layer: nn.Linear, cfg: GloraConfig):
        super().__init__()
        self.base_layer = base_layer
        out_f, in_f, r, init = self.out_features, self.in_features, cfg.r, cfg.init_weights
        has_bias = base_layer.bias is not None
        self.glora_A = weight_part(cfg.config_A_B, out_f, in_f, r, init)
        self.glora_B = weight_part(cfg.config_A_B, out_f, in_f, r, init)
        self.glora_C = coupling_part(cfg.config_C if has_bias else "none", in_f, r, init)
        self.glora_D = bias_part(cfg.config_D_E if has_bias else "none", out_f, init)
        self.glora_E = bias_part(cfg.config_D_E if has_bias else "none", out_f, init)
        self.to(base_layer.weight.device)

    def adapted(self, w0: torch.Tensor, b0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b') from a base (W0, b0): the paper's two equations, summed left to right as peft sums
        them (so both tools round alike)."""
        weight = w0 + w0 * self.glora_A() + self.glora_B()
        if b0 is None:
            return weight, None
        return weight, b0 + b0 * self.glora_D() + self.glora_E() + (w0 @ self.glora_C()).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out). y = W' x + b', summed as (W0 x + b0) + (W' x + b') − (W0 x + b0):
        # peft's order again (at init W' = W0 exactly, so step 0 is the base to the bit).
        result = self.base_layer(x)
        if self.merged:
            return result
        weight, bias = self.adapted(self.base_layer.weight, self.base_layer.bias)
        adapted = F.linear(x.to(weight.dtype), weight, bias)
        return (result + adapted - result).to(result.dtype)

    def merge(self) -> None:
        base = self.base_layer
        w0 = base.weight.detach().float()
        b0 = None if base.bias is None else base.bias.detach().float()
        with torch.no_grad():
            weight, bias = self.adapted(w0, b0)
        write_weight(base.weight, weight)
        if bias is not None:
            write_weight(base.bias, bias)

    def unmerge(self) -> None:
        """W0 = (W' − B) / (1 + A), then b0 = (b' − E − W0 C) / (1 + D)."""
        base = self.base_layer
        with torch.no_grad():
            w0 = (base.weight.float() - self.glora_B()) / (1.0 + self.glora_A())
            if base.bias is not None:
                shift = self.glora_E() + (w0 @ self.glora_C()).squeeze(-1)
                write_weight(base.bias, (base.bias.float() - shift) / (1.0 + self.glora_D()))
        write_weight(base.weight, w0)


@register
class Glora(LayerMethod):
    name = "glora"
    description = (
        "GLoRA: each layer's W and b rescaled and shifted by five small support tensors (arXiv 2306.07967)"
    )
    config_cls = GloraConfig
    mergeable = True
    peft_type = "GLORA"
    supports_quantized_base = False  # W0 ⊙ A and W0 C read W as a dense matrix (peft's GLoRA too)
    supports_packing = True  # a per-token linear map: packed examples never meet
    supports_fsdp = False  # not yet run under FSDP here (tests/test_distributed.py): refused at start
    trainable_formula = (
        "per adapted layer: A and B each r·(out+in) (lora), out (vector), 1 (constant) or 0 (none); "
        "with a bias, C r·(in+1) / in / 0 and D, E each out / 1 / 0; plus modules_to_save"
    )
    parameter_prefix = "glora_"  # saved as base_model.model.<module>.glora_A.Xd ..., peft's keys
    layer_types = (GloraLinear,)
    target_kind = "nn.Linear layers"
    target_hint = "use LoRA or VeRA for GPT-2's Conv1D (peft's GLoRA adapts nn.Linear only too)"
    accepts_target = staticmethod(lambda module: type(module) is nn.Linear)

    cfg: GloraConfig

    def create_layer(self, name: str, base: nn.Module) -> GloraLinear:
        return GloraLinear(base, self.cfg)

    def live_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained support tensors and, as peft saves them, the switched-off ones' zero buffers."""
        state = super().live_state_dict(model)
        state.update({self.stored_key(n): b for n, b in model.named_buffers() if self.owns(n)})
        return state

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(self.layer_parameters(m) for _, m in self.layers(model))
        return count + self.saved_modules_count(model)

    def layer_parameters(self, layer: GloraLinear) -> int:
        """The formula for one layer, from the config and whether the layer has a bias."""
        cfg, out_f, in_f = self.cfg, layer.out_features, layer.in_features
        a_b = {"lora": cfg.r * (out_f + in_f), "vector": out_f, "constant": 1, "none": 0}[cfg.config_A_B]
        if layer.base_layer.bias is None:
            return 2 * a_b
        c = {"lora": cfg.r * (in_f + 1), "vector": in_f, "none": 0}[cfg.config_C]
        d_e = {"vector": out_f, "constant": 1, "none": 0}[cfg.config_D_E]
        return 2 * a_b + c + 2 * d_e

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {**super().adapter_config(model), "bias": "none"}


__all__ = ["Glora", "GloraConfig", "GloraLinear"]
