"""C3A: Circular Convolution Adaptation (Chen et al., 2024, "Parameter-Efficient Fine-Tuning via
Circular Convolution", arXiv 2407.19342).

Each adapted linear layer's update is block-circulant: ΔW (out × in) is cut into b × b blocks
(b = ``block_size``, which must divide ``in`` and ``out``), and block (m, n) is the circulant matrix of a
trained vector w_mn (b numbers), scaled by 1/in::

    ΔW_mn[j, k] = w_mn[(k − j) mod b] / in,      y = W x + b0 + ΔW x

so a layer trains out·in/b numbers for an update that can have full rank. ΔW is never built in the
forward: block m of ΔW x is Σ_n (w_mn ⋆ x_n), a circular cross-correlation, computed in the frequency
domain as irfft(Σ_n rfft(x_n) · conj(rfft(w_mn))), O(in·out/b · log b) per token. As in peft the kernel
is fp32 whatever the base's dtype (FFTs in half precision are not generally available), and
``init_weights`` draws it Xavier-uniform by default (step 0 is *not* the base); ``true`` starts at zero,
``gaussian`` N(0, 1), ``kaiming_uniform`` U(±1/√in). ``block_size_pattern`` sets b per module. Merging
adds ΔW (in W's dtype); unmerging subtracts it. Saved as peft names it: ``c3a_kernel`` (out/b, in/b, b)
under each module, ``peft_type`` ``C3A``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from peftcli.methods.kit import (
    AdapterLayer,
    LayerMethod,
    check_patterns_match,
    pattern_key,
    validate_patterns,
    write_weight,
)
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc

PATTERN_KEYS = ("block_size_pattern",)


@dataclass
class C3aConfig(MethodConfig):
    """peft's ``C3AConfig`` fields."""

    block_size: int = field(
        default=256,
        metadata=doc(
            "b: width of the circulant blocks; must divide every adapted layer's in and out (fewer numbers as it grows)",
            min=1,
        ),
    )
    block_size_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata=doc("per-module b: {regex or name suffix: b}, e.g. {down_proj: 64}", min=1),
    )
    init_weights: bool | Literal["gaussian", "kaiming_uniform", "xavier_uniform"] = field(
        default="xavier_uniform",
        metadata=doc(
            "the kernel's start: xavier_uniform (peft's default; false too), kaiming_uniform, gaussian, "
            "or true: zero (step 0 = base)"
        ),
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


def init_kernel(kernel: torch.Tensor, init: bool | str, in_features: int, out_features: int) -> None:
    """peft's draws, in place: zero, N(0, 1), or uniform within Xavier's or Kaiming's bound."""
    with torch.no_grad():
        if init is True:
            kernel.zero_()
        elif init == "gaussian":
            nn.init.normal_(kernel)
        elif init == "kaiming_uniform":
            bound = math.sqrt(1.0 / in_features)
            nn.init.uniform_(kernel, -bound, bound)
        else:  # "xavier_uniform" or False
            bound = math.sqrt(3.0) * math.sqrt(2.0 / (in_features + out_features))
            nn.init.uniform_(kernel, -bound, bound)


def block_circular_correlation(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(..., in) -> (..., out): block m is Σ_n (w_mn ⋆ x_n), z[j] = Σ_k x[k] w[(k − j) mod b], by rFFT."""
    _, n_in, b = kernel.shape
    spectrum = torch.fft.rfft(x.reshape(*x.shape[:-1], n_in, b))
    filters = torch.fft.rfft(kernel).conj()
    mixed = torch.einsum("...nf,mnf->...mf", spectrum, filters)
    return torch.fft.irfft(mixed, n=b).reshape(*x.shape[:-1], -1)


class C3aLinear(AdapterLayer):
    """``base_layer(x) + ΔW x`` with a block-circulant ΔW around a frozen ``nn.Linear``."""

    def __init__(self, base_layer: nn.Module, block_size: int, init: bool | str):
        super().__init__()
        self.base_layer = base_layer
        self.block_size = block_size
        shape = (self.out_features // block_size, self.in_features // block_size, block_size)
        kernel = torch.zeros(shape, dtype=torch.float32, device=base_layer.weight.device)
        init_kernel(kernel, init, self.in_features, self.out_features)
        self.c3a_kernel = nn.Parameter(kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        kernel = self.c3a_kernel.float()
        update = block_circular_correlation(x.float(), kernel) / self.in_features
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in) in fp32: the update of each unit input, as rows, transposed."""
        eye = torch.eye(self.in_features, device=self.c3a_kernel.device)
        return (block_circular_correlation(eye, self.c3a_kernel.detach().float()) / self.in_features).T

    def merge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() + self.delta_weight())

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() - self.delta_weight())


@register
class C3a(LayerMethod):
    name = "c3a"
    description = (
        "C3A: each layer's update is block-circulant, a circular convolution of its input (arXiv 2407.19342)"
    )
    config_cls = C3aConfig
    mergeable = True
    identity_at_init = False  # peft's default init_weights: xavier_uniform draws the kernel
    peft_type = "C3A"
    supports_quantized_base = True  # the convolution adds to a 4-bit layer's output and never reads W
    supports_packing = True  # a per-token linear update: packed examples never meet
    supports_fsdp = True  # the kernel is a plain (fp32) parameter of its layer, sharded with it
    trainable_formula = (
        "out × in / b per adapted layer (b = block_size, or its block_size_pattern), plus modules_to_save"
    )
    parameter_prefix = "c3a_"  # saved as base_model.model.<module>.c3a_kernel, peft's key
    layer_types = (C3aLinear,)
    target_kind = "nn.Linear layers"
    target_hint = "target the model's nn.Linear layers, or use lora (peft's C3A adapts nn.Linear only too)"
    accepts_target = staticmethod(lambda module: isinstance(module, nn.Linear))

    cfg: C3aConfig

    @classmethod
    def validate_config(cls, cfg: C3aConfig, recipe) -> None:
        validate_patterns(cfg, PATTERN_KEYS)

    def resolve_targets(self, model: nn.Module) -> list[str]:
        targets = super().resolve_targets(model)
        check_patterns_match(self.cfg, targets, PATTERN_KEYS)
        return targets

    def block_size_of(self, name: str) -> tuple[int, str]:
        """A module's b and the recipe key it comes from."""
        key = pattern_key(self.cfg.block_size_pattern, name)
        if key is None:
            return self.cfg.block_size, "method.block_size"
        return self.cfg.block_size_pattern[key], f"method.block_size_pattern.{key}"

    def create_layer(self, name: str, base: nn.Module) -> C3aLinear:
        block_size, key = self.block_size_of(name)
        if base.in_features % block_size or base.out_features % block_size:
            sizes = f"in {base.in_features}, out {base.out_features}"
            common = math.gcd(base.in_features, base.out_features)
            raise RecipeError(
                key,
                f"{block_size} does not divide both sides of {name} ({sizes})",
                f"use a divisor of {common} (their greatest common divisor), or set block_size_pattern for it",
            )
        return C3aLinear(base, block_size, self.cfg.init_weights)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(m.out_features * m.in_features // m.block_size for _, m in self.layers(model))
        return count + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {**super().adapter_config(model), "bias": "none"}


__all__ = ["C3a", "C3aConfig", "C3aLinear", "block_circular_correlation", "init_kernel"]
