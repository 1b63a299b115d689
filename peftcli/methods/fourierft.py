"""FourierFT: Parameter-Efficient Fine-Tuning with Discrete Fourier Transform (Gao et al., 2024,
arXiv 2405.03003).

Each adapted layer trains n spectral coefficients c (``n_frequency``) at n fixed random positions of an
(out × in) frequency grid; the weight update is the real part of the grid's inverse 2-D DFT::

    ΔW = α · Re(IDFT2(S)),   S[p_k] = c_k, zero elsewhere;   y = W0 x + b0 + ΔW x

The positions p_k are the first n entries of a permutation of the out·in grid cells drawn from a CPU
generator seeded with ``random_loc_seed`` (row = p // in, column = p % in), as peft draws them: they are
never saved, the seed alone rebuilds them. α is ``scaling``. As in peft, c starts as a standard-normal
draw (``init_weights: false``, the default: step 0 is *not* the base), or at zero
(``init_weights: true``). Merging adds ΔW to W (transposed for GPT-2's Conv1D); unmerging subtracts it.
Saved as peft names it: ``fourierft_spectrum`` (n) under each module, ``peft_type`` ``FOURIERFT``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.inject import is_linear
from peftcli.methods.kit import DeltaLayer, LayerMethod
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc


@dataclass
class FourierFtConfig(MethodConfig):
    """peft's ``FourierFTConfig`` fields."""

    n_frequency: int = field(
        default=1000,
        metadata=doc(
            "spectral coefficients trained per layer (at most in × out of the smallest layer)", min=1
        ),
    )
    scaling: float = field(
        default=150.0,
        metadata=doc("α, the scale of the inverse DFT (peft: 150 for LLMs, ~300 for classification)"),
    )
    random_loc_seed: int = field(
        default=777, metadata=doc("seed of the generator that picks the frequency positions", min=0)
    )
    init_weights: bool = field(
        default=False,
        metadata=doc("true: the spectrum starts at zero (step 0 = base); false (peft's default): N(0, 1)"),
    )
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata=doc(
            "module names (list), a regex on full names, or all-linear (every linear layer but the head)"
        ),
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=doc("modules trained in full and saved whole; seq_cls heads are added"),
    )


def frequency_positions(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """(2, n): row and column of each trained coefficient, the first n cells of a seeded permutation of
    the out·in grid (peft's draw, so the seed alone locates a saved spectrum)."""
    cells = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([cells // in_features, cells % in_features])


class FourierFtLinear(DeltaLayer):
    """``base_layer(x) + x ΔWᵀ`` with ΔW = α Re(IDFT2(S)) around a frozen linear-like layer."""

    def __init__(self, base_layer: nn.Module, n_frequency: int, scaling: float, seed: int, zero_init: bool):
        super().__init__()
        self.base_layer = base_layer
        self.scaling = scaling
        device = base_layer.weight.device
        self.register_buffer(
            "positions",
            frequency_positions(self.out_features, self.in_features, n_frequency, seed),
            persistent=False,
        )
        spectrum = torch.zeros(n_frequency) if zero_init else torch.randn(n_frequency)
        self.fourierft_spectrum = nn.Parameter(spectrum.to(device))
        self.positions = self.positions.to(device)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in) in the spectrum's dtype: the coefficients placed on the grid, inverse 2-D DFT."""
        spectrum = self.fourierft_spectrum
        grid = torch.zeros(self.out_features, self.in_features, device=spectrum.device)
        grid = grid.index_put((self.positions[0], self.positions[1]), spectrum.float())
        return (torch.fft.ifft2(grid).real * self.scaling).to(spectrum.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        delta = self.delta_weight()
        return (result + F.linear(x.to(delta.dtype), delta)).to(result.dtype)

    def stored_delta(self) -> torch.Tensor:
        """ΔW as W stores it: (out, in), or (in, out) for GPT-2's Conv1D, in fp32."""
        delta = self.delta_weight().detach().float()
        return delta.T if self.fan_in_fan_out else delta


@register
class FourierFt(LayerMethod):
    name = "fourierft"
    description = "FourierFT: each layer's update is the inverse DFT of n trained spectral coefficients (arXiv 2405.03003)"
    config_cls = FourierFtConfig
    mergeable = True
    identity_at_init = False  # peft's default init_weights: false draws the spectrum from N(0, 1)
    peft_type = "FOURIERFT"
    supports_quantized_base = False  # peft's FourierFT wraps nn.Linear / Conv1D only, never a 4-bit layer
    supports_packing = True  # a per-token linear update: packed examples never meet
    supports_fsdp = True  # the spectrum is a plain parameter of its layer; positions are rebuilt per rank
    trainable_formula = "n_frequency per adapted layer (the spectral coefficients), plus modules_to_save"
    parameter_prefix = "fourierft_spectrum"  # saved as base_model.model.<module>.fourierft_spectrum
    layer_types = (FourierFtLinear,)
    target_kind = "linear layers (nn.Linear, GPT-2's Conv1D)"
    target_hint = "target the model's linear layers"
    accepts_target = staticmethod(is_linear)

    cfg: FourierFtConfig

    def create_layer(self, name: str, base: nn.Module) -> FourierFtLinear:
        cfg = self.cfg
        layer = FourierFtLinear(base, cfg.n_frequency, cfg.scaling, cfg.random_loc_seed, cfg.init_weights)
        cells = layer.in_features * layer.out_features
        if cfg.n_frequency > cells:
            raise RecipeError(
                "method.n_frequency",
                f"{cfg.n_frequency} is more than the {cells} cells of {name}'s grid",
                f"use at most {cells}",
            )
        return layer

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(self.cfg.n_frequency for _ in self.layers(model))
        return count + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {
            **super().adapter_config(model),
            "fan_in_fan_out": self.fan_in_fan_out(model),
            "bias": "none",
            "n_frequency_pattern": {},
        }


__all__ = ["FourierFt", "FourierFtConfig", "FourierFtLinear", "frequency_positions"]
