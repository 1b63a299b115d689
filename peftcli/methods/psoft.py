"""PSOFT: efficient Orthogonal Fine-Tuning with Principal Subspace adaptation (ICLR 2026,
https://openreview.net/forum?id=FSHrinMArK, the paper peft cites).

OFT rotates a weight's columns by an orthogonal matrix, which keeps their pairwise angles (the
pre-trained geometry) but costs in × in numbers. PSOFT restricts the rotation to W's principal subspace
of rank r: with the top-r SVD ``W ≈ U_r S_r V_rᵀ`` it fixes A (r, in) and B (out, r) from it and trains
only an r × r matrix R between them::

    ΔW = s · B (R − I) A,       s = psoft_alpha / r,      y = W x + b + ΔW x

- ``psoft_init`` (default): A = V_rᵀ (orthonormal rows), B = U_r S_r / s, so s·B A is W's top-r part;
  ``pissa_init``: the scaled singular values split evenly, A = √(S_r/s) V_rᵀ, B = U_r √(S_r/s).
- R is the Cayley transform of a skew-symmetric Q (its r(r−1)/2 upper entries trained):
  R = (I + Q)(I − Q)⁻¹, orthogonal; ``use_cayley_neumann`` replaces the inverse by peft's truncated
  series I + 2Q + 2Q² + … + Q^(t−1) (t = ``num_cayley_neumann_terms``), with ‖Q‖_F capped at
  ``cayley_neumann_eps`` when set. ``psoft_orth: false`` trains R as a free r × r matrix instead.
- ``psoft_mag_b`` / ``psoft_mag_a``: R ← diag(b) R diag(a), two trained r-vectors on its output and input
  sides (they relax strict orthogonality for task fit).

At init Q = 0 (or R = I) and a = b = 1, so ΔW = 0: step 0 is the base. A and B are not saved: loading
rebuilds them from the base weight's SVD (``psoft_svd: full``; ``lowrank``: ``torch.svd_lowrank`` with
``psoft_svd_lowrank_niter`` power iterations, seeded by ``random_seed``, as peft draws it). Saved as peft
names it: ``psoft_R.weight``, ``psoft_R.vector_b``, ``psoft_R.vector_a`` under each module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from peftcli.methods.kit import AdapterLayer, LayerMethod, write_weight
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc


@dataclass
class PsoftConfig(MethodConfig):
    """peft's ``PsoftConfig`` fields."""

    r: int = field(default=32, metadata=doc("rank of the principal subspace (R is r × r)", min=1))
    psoft_alpha: float = field(default=32, metadata=doc("scale s = psoft_alpha / r, as LoRA's alpha"))
    psoft_dropout: float = field(
        default=0.0, metadata=doc("dropout on the PSOFT input path", min=0.0, max=0.99)
    )
    ab_svd_init: Literal["psoft_init", "pissa_init"] = field(
        default="psoft_init",
        metadata=doc("A, B from the SVD: psoft_init (A = V_r^T, orthonormal rows) or pissa_init (√S split)"),
    )
    psoft_svd: Literal["full", "lowrank"] = field(
        default="full", metadata=doc("SVD backend: full (torch.linalg.svd) or lowrank (torch.svd_lowrank)")
    )
    psoft_svd_lowrank_niter: int = field(
        default=10, metadata=doc("power iterations of the lowrank SVD", min=0)
    )
    random_seed: int = field(default=0, metadata=doc("seed of the lowrank SVD's random draw", min=0))
    psoft_orth: bool = field(
        default=True, metadata=doc("R orthogonal (Cayley transform of a skew-symmetric Q); false: R free")
    )
    psoft_mag_b: bool = field(default=True, metadata=doc("train a scaling vector on R's output side"))
    psoft_mag_a: bool = field(default=True, metadata=doc("train a scaling vector on R's input side"))
    use_cayley_neumann: bool = field(
        default=False, metadata=doc("approximate the Cayley inverse by a truncated Neumann series")
    )
    num_cayley_neumann_terms: int = field(
        default=5, metadata=doc("terms of the Neumann series (with use_cayley_neumann)", min=1)
    )
    cayley_neumann_eps: float | None = field(
        default=None,
        metadata=doc("cap on ‖Q‖_F in the Neumann series, in (0, 1); null: no cap"),
    )
    init_weights: bool = field(
        default=True,
        metadata=doc("start at R = I (step 0 is the base); false: Q ~ N(0, 0.1²), as peft draws it"),
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


def principal_factors(weight: torch.Tensor, cfg: PsoftConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in) and B (out, r) from W's top-r SVD in fp32, split by ``ab_svd_init``."""
    w, r, scale = weight.detach().float(), cfg.r, cfg.psoft_alpha / cfg.r
    if cfg.psoft_svd == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        devices = [] if w.device.type == "cpu" else [w.device]
        kwargs = {} if w.device.type == "cpu" else {"device_type": w.device.type}
        with torch.random.fork_rng(devices=devices, **kwargs):
            torch.manual_seed(cfg.random_seed)
            u, s, v = torch.svd_lowrank(w, q=r, niter=cfg.psoft_svd_lowrank_niter)
        u, s, vh = u[:, :r], s[:r], v[:, :r].T
    s = s / scale
    if cfg.ab_svd_init == "psoft_init":
        return vh.contiguous(), (u * s).contiguous()
    root = s.sqrt()
    return (root[:, None] * vh).contiguous(), (u * root).contiguous()


def neumann_cayley(q: torch.Tensor, terms: int) -> torch.Tensor:
    """peft's truncated series for (I + Q)(I − Q)⁻¹: I + 2Q + … + 2Q^m + Q^(m+1), m = max(2, t − 2)
    for t ≥ 3 (t = 3 and 4 give the same sum, as in peft); I + 2Q for t = 2; I for t = 1."""
    eye = torch.eye(q.shape[0], device=q.device, dtype=q.dtype)
    if terms <= 1:
        return eye
    if terms == 2:
        return eye + 2 * q
    result, power = eye.clone(), eye
    for _ in range(max(2, terms - 2)):
        power = power @ q
        result = result + 2 * power
    return result + power @ q


class Rotation(nn.Module):
    """R (r × r): Cayley of a skew-symmetric Q from its upper entries, or free; times the vectors."""

    def __init__(self, cfg: PsoftConfig):
        super().__init__()
        r, self.cfg = cfg.r, cfg
        if cfg.psoft_orth:
            q = torch.zeros(r * (r - 1) // 2) if cfg.init_weights else torch.randn(r * (r - 1) // 2) * 0.1
            self.weight = nn.Parameter(q)
            rows, cols = torch.triu_indices(r, r, 1)
            self.register_buffer("rows", rows, persistent=False)
            self.register_buffer("cols", cols, persistent=False)
        else:
            free = torch.eye(r) if cfg.init_weights else torch.eye(r) + torch.randn(r, r) * 0.1
            self.weight = nn.Parameter(free)
        self.vector_b = nn.Parameter(torch.ones(r)) if cfg.psoft_mag_b else None
        self.vector_a = nn.Parameter(torch.ones(r)) if cfg.psoft_mag_a else None

    def skew(self) -> torch.Tensor:
        r = self.cfg.r
        q = torch.zeros(r, r, device=self.weight.device, dtype=self.weight.dtype)
        q = q.index_put((self.rows, self.cols), self.weight)
        return q - q.T

    def matrix(self) -> torch.Tensor:
        cfg = self.cfg
        if not cfg.psoft_orth:
            rot = self.weight
        elif cfg.use_cayley_neumann:
            q = self.skew()
            norm = torch.linalg.norm(q)
            if cfg.cayley_neumann_eps is not None and torch.isfinite(norm) and norm > cfg.cayley_neumann_eps:
                q = q * (cfg.cayley_neumann_eps / (norm + 1e-12))
            rot = neumann_cayley(q, cfg.num_cayley_neumann_terms)
        else:
            q = self.skew()
            eye = torch.eye(cfg.r, device=q.device, dtype=q.dtype)
            rot = torch.linalg.solve(eye - q, eye + q, left=False)  # (I + Q)(I − Q)⁻¹
        if self.vector_b is not None:
            rot = self.vector_b[:, None] * rot
        if self.vector_a is not None:
            rot = rot * self.vector_a[None, :]
        return rot


class PsoftLinear(AdapterLayer):
    """``base_layer(x) + s · ((R − I) (A x')) B^T`` around a frozen ``nn.Linear`` (x' = dropout(x))."""

    def __init__(self, base_layer: nn.Linear, cfg: PsoftConfig):
        super().__init__()
        self.base_layer = base_layer
        self.scaling = cfg.psoft_alpha / cfg.r
        a, b = principal_factors(base_layer.weight, cfg)
        self.register_buffer("psoft_A", a, persistent=False)  # rebuilt from W on loading, never saved
        self.register_buffer("psoft_B", b, persistent=False)
        self.psoft_R = Rotation(cfg).to(base_layer.weight.device)
        self.psoft_dropout = nn.Dropout(cfg.psoft_dropout) if cfg.psoft_dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        xa = self.psoft_dropout(x.to(self.psoft_A.dtype)) @ self.psoft_A.T  # (B, T, r)
        rotated = xa @ self.psoft_R.matrix().T
        return (result + ((rotated - xa) @ self.psoft_B.T) * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s · B (R − I) A (out, in), fp32."""
        rot = self.psoft_R.matrix().detach().float()
        eye = torch.eye(rot.shape[0], device=rot.device)
        return self.psoft_B.float() @ (rot - eye) @ self.psoft_A.float() * self.scaling

    def merge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() + self.delta_weight())

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() - self.delta_weight())


@register
class Psoft(LayerMethod):
    name = "psoft"
    description = (
        "PSOFT: an r × r orthogonal rotation inside each layer's top-r singular subspace (ICLR 2026)"
    )
    config_cls = PsoftConfig
    mergeable = True
    peft_type = "PSOFT"
    supports_quantized_base = False  # A and B come from the SVD of a dense W (peft refuses quantized too)
    supports_packing = True  # a per-token linear map: packed examples never meet
    supports_fsdp = False  # not yet run under FSDP here (tests/test_distributed.py): refused at start
    trainable_formula = (
        "per adapted layer r(r−1)/2 (psoft_orth; r² without) + r per magnitude vector (psoft_mag_a, "
        "psoft_mag_b), plus modules_to_save"
    )
    parameter_prefix = "psoft_"  # saved as base_model.model.<module>.psoft_R.weight ..., peft's keys
    layer_types = (PsoftLinear,)
    target_kind = "nn.Linear layers"
    target_hint = "peft's PSOFT adapts nn.Linear only; use LoRA or OFT for GPT-2's Conv1D"
    accepts_target = staticmethod(lambda module: type(module) is nn.Linear)

    cfg: PsoftConfig

    @classmethod
    def validate_config(cls, cfg: PsoftConfig, recipe) -> None:
        super().validate_config(cfg, recipe)
        eps = cfg.cayley_neumann_eps
        if eps is not None and not 0.0 < eps < 1.0:
            raise RecipeError(
                "method.cayley_neumann_eps", f"must be in (0, 1), got {eps}", "e.g. 0.9, or null"
            )

    def create_layer(self, name: str, base: nn.Module) -> PsoftLinear:
        smaller = min(base.in_features, base.out_features)
        if self.cfg.r > smaller:
            raise RecipeError(
                "method.r",
                f"{self.cfg.r} is larger than min(in, out) = {smaller} of {name}",
                f"use r <= {smaller}, or leave that layer out of target_modules",
            )
        return PsoftLinear(base, self.cfg)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        r = self.cfg.r
        per_layer = (r * (r - 1) // 2 if self.cfg.psoft_orth else r * r) + r * (
            self.cfg.psoft_mag_a + self.cfg.psoft_mag_b
        )
        return per_layer * len(self.layers(model)) + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {**super().adapter_config(model), "fan_in_fan_out": False}


__all__ = ["Psoft", "PsoftConfig", "PsoftLinear", "neumann_cayley", "principal_factors"]
