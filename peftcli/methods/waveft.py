"""WaveFT: Wavelet Fine-Tuning (Bilican et al., 2025, arXiv 2505.12532).

Each adapted layer trains n wavelet coefficients (``n_frequency``) at n fixed random positions of an
(out × in) coefficient grid; the weight update is the grid's one-level inverse 2-D discrete wavelet
transform::

    ΔW = α · IDWT2(S),   S[p_k] = c_k, zero elsewhere;   y = W0 x + b0 + ΔW x

The positions p_k are FourierFT's (the first n cells of a permutation of the out·in grid drawn from a CPU
generator seeded with ``random_loc_seed``; never saved). A filter of length L shrinks the reconstruction
by L − 2 in each direction, so the grid is padded by L − 2 (then to even sizes), the coefficients placed
centred in it, the padded grid read as its four quarter-size sub-bands (approximation, horizontal,
vertical, diagonal: top-left, top-right, bottom-left, bottom-right), synthesised, and the result
cropped centrally to (out, in), as peft does. ``use_idwt: false`` skips the transform (ΔW = α S, a sparse
update). The spectrum starts at zero (``init_weights: true``: step 0 is the base) or N(0, 0.01²).
The Daubechies filters are computed here from their definition (Daubechies 1988: the minimum-phase
spectral factor of the maxflat half-band polynomial), not read from a table. Saved as peft names it:
``waveft_spectrum`` (n) under each module, ``peft_type`` ``WAVEFT``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from peftcli.inject import is_linear, linear_dims
from peftcli.methods.fourierft import frequency_positions
from peftcli.methods.kit import DeltaLayer, LayerMethod, pattern_key
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc

DAUBECHIES = tuple(f"db{n}" for n in range(1, 11))  # the families peft 0.21 has filters for, less sym/coif


@dataclass
class WaveFtConfig(MethodConfig):
    """peft's ``WaveFTConfig`` fields."""

    n_frequency: int = field(
        default=2592,
        metadata=doc(
            "wavelet coefficients trained per layer (at most in × out of the smallest layer)", min=1
        ),
    )
    scaling: float = field(default=25.0, metadata=doc("α, the scale of the reconstructed ΔW (peft: 25)"))
    wavelet_family: str = field(
        default="db1",
        metadata=doc("Daubechies wavelet of the transform: db1 (Haar) to db10; longer filters are slower"),
    )
    use_idwt: bool = field(
        default=True,
        metadata=doc("true: ΔW is the inverse DWT of the coefficients; false: ΔW is the sparse grid itself"),
    )
    random_loc_seed: int = field(
        default=777, metadata=doc("seed of the generator that picks the coefficient positions", min=0)
    )
    init_weights: bool = field(
        default=True,
        metadata=doc(
            "true (peft's default): the spectrum starts at zero (step 0 = base); false: N(0, 0.01²)"
        ),
    )
    n_frequency_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata=doc("per-module n_frequency: {module-name suffix or regex: n}, as peft matches it"),
    )
    proportional_parameters: bool = field(
        default=False,
        metadata=doc("share n_frequency × layers among the layers in proportion to in × out (at least 1)"),
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


@functools.cache
def daubechies_lowpass(vanishing_moments: int) -> tuple[float, ...]:
    """The dbN reconstruction low-pass filter (length 2N, sum √2), PyWavelets' orientation.

    |H(ω)|² = 2 cos^{2N}(ω/2) P(sin²(ω/2)) with P(y) = Σ_{k<N} C(N−1+k, k) y^k; each root y of P gives
    the pair z + 1/z = 2 − 4y, of which the root inside the unit circle is kept (minimum phase)."""
    n = vanishing_moments
    polynomial = np.poly1d([1.0])
    for y in np.roots([math.comb(n - 1 + k, k) for k in reversed(range(n))]) if n > 1 else []:
        centre, half_gap = 1 - 2 * y, 2 * np.sqrt(y * (y - 1) + 0j)
        z = centre + half_gap if abs(centre + half_gap) <= 1 else centre - half_gap
        polynomial = polynomial * np.poly1d([1.0, -z])
    taps = np.real((polynomial * np.poly1d([1.0, 1.0]) ** n).c)
    return tuple(taps / taps.sum() * math.sqrt(2))


def reconstruction_filters(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rec_lo, rec_hi) in float64: rec_hi[k] = (−1)^k rec_lo[L−1−k] (the quadrature mirror)."""
    low = torch.tensor(daubechies_lowpass(int(family.removeprefix("db"))), dtype=torch.float64)
    signs = torch.tensor([(-1.0) ** k for k in range(len(low))], dtype=torch.float64)
    return low, signs * low.flip(0)


def inverse_dwt2(bands: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """One level of the 2-D inverse DWT. ``bands`` (4, h, w): approximation, horizontal (high-pass down
    the rows), vertical (high-pass along the rows), diagonal → (2h − L + 2, 2w − L + 2).

    Synthesis upsamples each band by 2 and filters it with its separable pair (a transposed
    convolution with stride 2), then drops the L − 2 border samples on each side."""
    pairs = [(low, low), (high, low), (low, high), (high, high)]  # (down the rows, along the rows)
    kernels = torch.stack([torch.outer(rows, cols) for rows, cols in pairs]).unsqueeze(1)
    full = F.conv_transpose2d(bands.unsqueeze(0), kernels.to(bands.dtype), stride=2)[0, 0]
    border = len(low) - 2
    return full[border : full.shape[0] - border, border : full.shape[1] - border]


class WaveFtLinear(DeltaLayer):
    """``base_layer(x) + x ΔWᵀ`` with ΔW = α IDWT2(S) around a frozen linear-like layer."""

    def __init__(self, base_layer: nn.Module, n_frequency: int, cfg: WaveFtConfig):
        super().__init__()
        self.base_layer = base_layer
        self.scaling = cfg.scaling
        self.use_idwt = cfg.use_idwt
        device = base_layer.weight.device
        positions = frequency_positions(self.out_features, self.in_features, n_frequency, cfg.random_loc_seed)
        self.register_buffer("positions", positions.to(device), persistent=False)
        low, high = reconstruction_filters(cfg.wavelet_family)
        self.register_buffer("filters", torch.stack([low, high]).float().to(device), persistent=False)
        spectrum = torch.zeros(n_frequency) if cfg.init_weights else torch.randn(n_frequency) * 0.01
        self.waveft_spectrum = nn.Parameter(spectrum.to(device))

    def coefficient_grid(self) -> torch.Tensor:
        """The coefficients on the padded grid (out + L − 2, in + L − 2, each rounded up to even), centred."""
        spectrum = self.waveft_spectrum
        growth = self.filters.shape[1] - 2
        rows, cols = self.out_features + growth, self.in_features + growth
        rows, cols = rows + rows % 2, cols + cols % 2
        top, left = (rows - self.out_features) // 2, (cols - self.in_features) // 2
        grid = torch.zeros(rows, cols, device=spectrum.device, dtype=spectrum.dtype)
        return grid.index_put((self.positions[0] + top, self.positions[1] + left), spectrum)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in) in the spectrum's dtype."""
        if not self.use_idwt:
            grid = torch.zeros(self.out_features, self.in_features, device=self.waveft_spectrum.device)
            grid = grid.to(self.waveft_spectrum.dtype).index_put(tuple(self.positions), self.waveft_spectrum)
            return grid * self.scaling
        grid = self.coefficient_grid()
        h, w = grid.shape[0] // 2, grid.shape[1] // 2
        bands = torch.stack([grid[:h, :w], grid[:h, w:], grid[h:, :w], grid[h:, w:]])
        delta = inverse_dwt2(bands, self.filters[0], self.filters[1]) * self.scaling
        top = (delta.shape[0] - self.out_features) // 2
        left = (delta.shape[1] - self.in_features) // 2
        return delta[top : top + self.out_features, left : left + self.in_features]

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
class WaveFt(LayerMethod):
    name = "waveft"
    description = "WaveFT: each layer's update is the inverse wavelet transform of n trained coefficients (arXiv 2505.12532)"
    config_cls = WaveFtConfig
    mergeable = True
    peft_type = "WAVEFT"
    supports_quantized_base = False  # peft's WaveFT wraps nn.Linear / Conv1D only, never a 4-bit layer
    supports_packing = True  # a per-token linear update: packed examples never meet
    supports_fsdp = True  # the spectrum is a plain parameter of its layer; positions are rebuilt per rank
    trainable_formula = (
        "n_frequency per adapted layer (n_frequency_pattern's n where it matches; with "
        "proportional_parameters max(1, round(n·layers·in·out / Σ in·out))), plus modules_to_save"
    )
    parameter_prefix = "waveft_spectrum"  # saved as base_model.model.<module>.waveft_spectrum
    layer_types = (WaveFtLinear,)
    target_kind = "linear layers (nn.Linear, GPT-2's Conv1D)"
    target_hint = "target the model's linear layers"
    accepts_target = staticmethod(is_linear)

    cfg: WaveFtConfig

    @classmethod
    def validate_config(cls, cfg: WaveFtConfig, recipe) -> None:
        super().validate_config(cfg, recipe)
        if cfg.wavelet_family not in DAUBECHIES:
            raise RecipeError(
                "method.wavelet_family",
                f"{cfg.wavelet_family!r} is not a wavelet peftcli computes",
                "use one of db1 (Haar) … db10; symlets and coiflets are not provided (docs/methods.md)",
            )

    def apply(self, model: nn.Module) -> nn.Module:
        self.counts = self.frequency_counts(model)
        return super().apply(model)

    def frequency_counts(self, model: nn.Module) -> dict[str, int]:
        """Each target's n: proportional shares of the budget, else its pattern's n, else n_frequency."""
        cfg = self.cfg
        targets = self.resolve_targets(model)
        if cfg.proportional_parameters:
            sizes = {name: math.prod(linear_dims(model.get_submodule(name))) for name in targets}
            budget, total = cfg.n_frequency * len(targets), sum(sizes.values())
            return {name: max(1, round(size / total * budget)) for name, size in sizes.items()}
        counts = {}
        for name in targets:
            key = pattern_key(cfg.n_frequency_pattern, name)
            counts[name] = cfg.n_frequency_pattern[key] if key is not None else cfg.n_frequency
        return counts

    def create_layer(self, name: str, base: nn.Module) -> WaveFtLinear:
        n = self.counts[name]
        cells = math.prod(linear_dims(base))
        if n > cells:
            raise RecipeError(
                "method.n_frequency",
                f"{n} is more than the {cells} cells of {name}'s grid",
                f"use at most {cells}",
            )
        return WaveFtLinear(base, n, self.cfg)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(layer.waveft_spectrum.numel() for _, layer in self.layers(model))
        return count + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {
            **super().adapter_config(model),
            "fan_in_fan_out": self.fan_in_fan_out(model),
            "bias": "none",
        }


__all__ = [
    "WaveFt",
    "WaveFtConfig",
    "WaveFtLinear",
    "daubechies_lowpass",
    "inverse_dwt2",
    "reconstruction_filters",
]
