"""OSF: Orthogonal Subspace Fine-tuning (Nayak et al., 2025, "Sculpting Subspaces: Constrained Full
Fine-Tuning in LLMs for Continual Learning", arXiv 2504.07097).

Each adapted linear layer's weight is split by its SVD, ``W = U S Vᵀ``, into the top-k singular
directions (the "high" subspace: what earlier training made important, frozen) and the rest (the "low"
subspace, trained)::

    W = U_h S_h V_hᵀ + U_l S_l V_lᵀ,      k = effective_rank (default ⌊min(out, in) / 2⌋)

U_l, S_l and V_l start at their SVD values and train; their gradients are projected out of the high
subspace before every step, ``∇U_l ← (I − U_h U_hᵀ) ∇U_l`` and ``∇V_l ← ∇V_l (I − V_h V_hᵀ)`` (in peft's
row layout, V stored as (r, in)), so what the layer learned before is left intact. The layer runs
``W x + b + (U_l S_l V_l − U_l⁰ S_l⁰ V_l⁰) x``: the base plus the change of the low part (zero at step 0).
``effective_rank`` (and ``rank_pattern`` values) may be an int or a fraction in (0, 1] of min(out, in).

The adapter holds only U_l, S_l, V_l (peft's ``osf_svd_params.U_low`` / ``S_low`` / ``V_low``); loading
recomputes the SVD of the base weight (deterministic on the same weights) for the high part and the
starting low part. Merging adds the change into W; unmerging subtracts it (peft has no unmerge).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.methods.kit import AdapterLayer, LayerMethod, write_weight
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc


@dataclass
class OsfConfig(MethodConfig):
    """peft's ``OSFConfig`` fields."""

    effective_rank: int | float | None = field(
        default=None,
        metadata=doc(
            "frozen top singular directions per layer: an int, or a fraction in (0, 1] of min(out, in); "
            "default: half of min(out, in). The trained rank is min(out, in) minus this"
        ),
    )
    rank_pattern: dict[str, int | float] = field(
        default_factory=dict,
        metadata=doc(
            "regex on full module names -> effective_rank for the layers it finds (the first that matches)"
        ),
    )
    init_weights: bool = field(
        default=True,
        metadata=doc("start the low part at its SVD values (step 0 is the base); false: random, as peft"),
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


def frozen_rank(value: int | float | None, min_dim: int) -> int:
    """k for a layer whose smaller side is ``min_dim``: a fraction in (0, 1] of it, an int, or half."""
    if value is None:
        return min_dim // 2
    k = int(min_dim * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
    return max(min(min_dim, k), 0)


class OsfLinear(AdapterLayer):
    """``base_layer(x) + (U_l S_l V_l − U_l⁰ S_l⁰ V_l⁰) x`` around a frozen ``nn.Linear``, with the low
    factors' gradients kept orthogonal to the frozen high subspace."""

    def __init__(self, base_layer: nn.Linear, k: int, init_weights: bool):
        super().__init__()
        self.base_layer = base_layer
        self.k = k
        weight = base_layer.weight.detach()
        u, s, vt = torch.linalg.svd(weight.float(), full_matrices=False)
        for name, value in (("U_high", u[:, :k]), ("V_high", vt[:k]), ("U_low0", u[:, k:])):
            self.register_buffer(name, value.contiguous().to(weight.dtype), persistent=False)
        self.register_buffer("S_low0", s[k:].contiguous().to(weight.dtype), persistent=False)
        self.register_buffer("V_low0", vt[k:].contiguous().to(weight.dtype), persistent=False)
        start = (self.U_low0, self.S_low0, self.V_low0)
        if not init_weights:
            start = tuple(torch.randn_like(t) for t in start)
        self.osf_svd_params = nn.ParameterDict(
            {
                name: nn.Parameter(t.clone())
                for name, t in zip(("U_low", "S_low", "V_low"), start, strict=True)
            }
        )
        self.osf_svd_params["U_low"].register_hook(self.project_u)
        self.osf_svd_params["V_low"].register_hook(self.project_v)

    def project_u(self, grad: torch.Tensor) -> torch.Tensor:
        """∇U_l with its component in span(U_h) removed."""
        return grad - self.U_high @ (self.U_high.T @ grad)

    def project_v(self, grad: torch.Tensor) -> torch.Tensor:
        """∇V_l (rows in input space) with its component in the rows of V_h removed."""
        return grad - (grad @ self.V_high.T) @ self.V_high

    @staticmethod
    def low_path(x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """U diag(s) V x for each row of x, without building the (out, in) matrix."""
        return F.linear(F.linear(x, v) * s, u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out). The low part now minus the low part at the start, each through
        # its r-wide bottleneck: at step 0 the two are the same numbers, so the change is exactly 0.
        result = self.base_layer(x)
        if self.merged:
            return result
        p = self.osf_svd_params
        xs = x.to(p["U_low"].dtype)
        now = self.low_path(xs, p["U_low"], p["S_low"], p["V_low"])
        start = self.low_path(xs, self.U_low0, self.S_low0, self.V_low0)
        return result + (now - start).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """U_l S_l V_l − U_l⁰ S_l⁰ V_l⁰ as W stores it (out, in), in fp32."""
        p = {n: t.detach().float() for n, t in self.osf_svd_params.items()}
        now = (p["U_low"] * p["S_low"]) @ p["V_low"]
        return now - (self.U_low0.float() * self.S_low0.float()) @ self.V_low0.float()

    def merge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() + self.delta_weight())

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() - self.delta_weight())


@register
class Osf(LayerMethod):
    name = "osf"
    description = (
        "OSF: each layer's low singular subspace trained, kept orthogonal to its frozen top one "
        "(arXiv 2504.07097)"
    )
    config_cls = OsfConfig
    mergeable = True
    peft_type = "OSF"
    supports_quantized_base = False  # the SVD needs W as a dense matrix (peft's OSF too)
    supports_packing = True  # a per-token linear map: packed examples never meet
    supports_fsdp = False  # the gradient projections need each layer's whole U_h / V_h next to its grad
    trainable_formula = (
        "(out + in + 1) × (min(out, in) − effective_rank) per adapted layer, plus modules_to_save"
    )
    parameter_prefix = "osf_"  # saved as base_model.model.<module>.osf_svd_params.U_low ..., peft's keys
    layer_types = (OsfLinear,)
    target_kind = "nn.Linear layers"
    target_hint = "peft's OSF adapts nn.Linear only; use LoRA for GPT-2's Conv1D"
    accepts_target = staticmethod(lambda module: type(module) is nn.Linear)

    cfg: OsfConfig

    @classmethod
    def validate_config(cls, cfg: OsfConfig, recipe) -> None:
        super().validate_config(cfg, recipe)
        ranks = {"method.effective_rank": cfg.effective_rank}
        ranks.update({f"method.rank_pattern.{k}": v for k, v in cfg.rank_pattern.items()})
        for key, value in ranks.items():
            if value is not None and value <= 0:
                raise RecipeError(key, f"must be > 0, got {value}", "an int >= 1 or a fraction in (0, 1]")
        for pattern in cfg.rank_pattern:
            try:
                re.compile(pattern)
            except re.error as err:
                raise RecipeError(
                    f"method.rank_pattern.{pattern}",
                    f"not a valid regular expression ({err})",
                    "fix the regex",
                ) from None

    def rank_for(self, name: str, layer: nn.Linear) -> int:
        """k for one layer: the first ``rank_pattern`` key found in its name (peft's ``re.search``),
        else ``effective_rank``; refused when it leaves nothing frozen to protect."""
        value = self.cfg.effective_rank
        for pattern, rank in self.cfg.rank_pattern.items():
            if re.search(pattern, name):
                value = rank
                break
        k = frozen_rank(value, min(layer.out_features, layer.in_features))
        if k <= 0:
            raise RecipeError(
                "method.effective_rank",
                f"gives {name} a frozen rank of 0 (min(out, in) = {min(layer.out_features, layer.in_features)})",
                "raise effective_rank (a fraction such as 0.5 scales with each layer)",
            )
        return k

    def create_layer(self, name: str, base: nn.Module) -> OsfLinear:
        return OsfLinear(base, self.rank_for(name, base), self.cfg.init_weights)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(
            (m.out_features + m.in_features + 1) * (min(m.out_features, m.in_features) - m.k)
            for _, m in self.layers(model)
        )
        return count + self.saved_modules_count(model)


__all__ = ["Osf", "OsfConfig", "OsfLinear", "frozen_rank"]
