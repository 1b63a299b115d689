"""PVeRA: Probabilistic VeRA (arXiv 2512.07703).

VeRA's shared frozen random projections, made probabilistic: the shared A has 2r rows, and the scaled
code ``d ⊙ A x`` (2r) is read as the mean μ and log-variance log σ² of a Gaussian latent z (r), VAE
style; B maps z back up::

    (μ, log σ²) = split(Λ_d A dropout(x)),     z = μ + ε ⊙ exp(log σ² / 2),  ε ~ N(0, I)
    y = W0 x + b0 + Λ_b B z

z is sampled while training (the reparametrisation trick) and is the mean μ at inference, unless
``sample_at_inference`` asks for samples there too (then ``generator_seed`` makes the draws
reproducible: each layer owns a CPU generator seeded with it, as peft's layers do). At the mean the
update is linear, ΔW = Λ_b B Λ_{d[:r]} A[:r], which is what merging folds into W (a merged model
always runs the mean). A (2r, in_max) and B (out_max, r) are drawn exactly as VeRA draws its pair
(Kaiming-uniform from a CPU generator seeded with ``projection_prng_key``, A first), sized for the
largest target and sliced per layer. b (out) starts at zero (step 0 is the base), d (2r) at
``d_initial``. Saved as peft names them: ``pvera_lambda_b`` / ``pvera_lambda_d`` under each module,
``base_model.pvera_A`` / ``base_model.pvera_B`` once (unless ``save_projection: false``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.methods.kit import AdapterLayer, SharedState, write_weight
from peftcli.methods.registry import register
from peftcli.methods.vera import Vera, shared_projections
from peftcli.recipe import MethodConfig, doc


@dataclass
class PveraConfig(MethodConfig):
    """peft's ``PveraConfig`` fields."""

    r: int = field(
        default=256,
        metadata=doc(
            "latent size of the shared random projections (A has 2r rows: mean and log-variance)", min=1
        ),
    )
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata=doc(
            "module names (list), a regex on full names, or all-linear (every linear layer but the head)"
        ),
    )
    projection_prng_key: int = field(
        default=0, metadata=doc("seed of the generator that draws the shared A and B", min=0)
    )
    save_projection: bool = field(
        default=True,
        metadata=doc("store A and B in the adapter; false: only the vectors, A and B redrawn from the key"),
    )
    pvera_dropout: float = field(
        default=0.0, metadata=doc("dropout on the PVeRA input path", min=0.0, max=0.99)
    )
    d_initial: float = field(default=0.1, metadata=doc("initial value of every entry of d (2r of them)"))
    sample_at_inference: bool = field(
        default=False,
        metadata=doc("sample z at inference too (false: the mean μ, which is also what merging keeps)"),
    )
    generator_seed: int | None = field(
        default=None,
        metadata=doc("seed of each layer's CPU generator for the samples (null: torch's global one)"),
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=doc("modules trained in full and saved whole; seq_cls heads are added"),
    )


class PveraLinear(AdapterLayer):
    """``base_layer(x) + b ⊙ B[:out] z`` with z drawn from N(μ, σ²), (μ, log σ²) = d ⊙ A[:, :in] x."""

    def __init__(self, base_layer: nn.Module, shared: SharedState, cfg: PveraConfig):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "shared", shared)  # a reference, not a submodule: A and B have one name
        self.r = cfg.r
        self.sample_at_inference = cfg.sample_at_inference
        seed = cfg.generator_seed
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        device = base_layer.weight.device
        self.pvera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device))  # step 0 = base
        self.pvera_lambda_d = nn.Parameter(torch.full((2 * cfg.r,), float(cfg.d_initial), device=device))
        self.pvera_dropout = nn.Dropout(cfg.pvera_dropout) if cfg.pvera_dropout > 0 else nn.Identity()

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices of the shared A (2r, in) and B (out, r)."""
        return self.shared.pvera_A[:, : self.in_features], self.shared.pvera_B[: self.out_features, :]

    def latent(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = μ + ε σ while training (or when sampling at inference), else μ."""
        if not (self.training or self.sample_at_inference):
            return mu
        std = torch.exp(0.5 * logvar)
        if self.generator is None:
            return mu + torch.randn_like(std) * std
        noise = torch.randn(std.shape, dtype=std.dtype, generator=self.generator)  # CPU, as peft draws
        return mu + noise.to(std.device) * std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        projection_a, projection_b = self.projections()
        x = self.pvera_dropout(x.to(self.pvera_lambda_d.dtype))
        mu, logvar = (self.pvera_lambda_d * F.linear(x, projection_a)).chunk(2, dim=-1)
        update = self.pvera_lambda_b * F.linear(self.latent(mu, logvar), projection_b)
        return (result + update).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Λ_b B Λ_{d[:r]} A[:r] (the update at the mean) as W stores it, in fp32."""
        projection_a, projection_b = self.projections()
        d_mean, a_mean = self.pvera_lambda_d[: self.r], projection_a[: self.r]
        delta = (self.pvera_lambda_b[:, None] * projection_b) @ (d_mean[:, None] * a_mean)
        delta = delta.detach().float()
        return delta.T if self.fan_in_fan_out else delta

    def merge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() + self.delta_weight())

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() - self.delta_weight())


@register
class Pvera(Vera):
    """VeRA's method with PVeRA's layer, projection shapes (A: 2r rows) and names (``pvera_``)."""

    name = "pvera"
    description = (
        "PVeRA: VeRA with a probabilistic latent (mean and log-variance codes, sampled in training) "
        "(arXiv 2512.07703)"
    )
    config_cls = PveraConfig
    peft_type = "PVERA"
    trainable_formula = (
        "out + 2r per adapted layer (b and d; A and B are frozen and shared), plus modules_to_save"
    )
    parameter_prefix = "pvera_lambda_"  # saved as base_model.model.<module>.pvera_lambda_b / _d
    layer_types = (PveraLinear,)

    cfg: PveraConfig

    def projections(self, in_max: int, out_max: int) -> dict[str, torch.Tensor]:
        """pvera_A (2r, in_max) then pvera_B (out_max, r), from ``projection_prng_key``."""
        cfg = self.cfg
        return shared_projections(
            cfg.r, in_max, out_max, cfg.projection_prng_key, a_rows=2 * cfg.r, prefix="pvera"
        )

    def vector_sizes(self, layer: nn.Module) -> int:
        """b (out) and d (2r)."""
        return layer.out_features + 2 * self.cfg.r

    def create_layer(self, name: str, base: nn.Module) -> PveraLinear:
        return PveraLinear(base, self.shared_state, self.cfg)


__all__ = ["Pvera", "PveraConfig", "PveraLinear"]
