"""RandLoRA: full-rank parameter-efficient fine-tuning by random bases (Albert et al., 2025,
arXiv 2502.00987).

Where LoRA learns one rank-r product, RandLoRA sums n = ⌈min(in, out) / r⌉ products of *frozen* random
rank-r bases, each scaled by two small trained diagonals, so the update can reach full rank::

    ΔW = (α / r) Σ_j B_j Λ_j A Γ_j        (for in ≤ out; transposed for in > out)

A (r × m) is one frozen random matrix on the smaller side m = min(in, out), shared by every term; B_j
(M × r, M = max(in, out)) are n frozen random matrices; Λ_j (r) and Γ_j (m) are trained:
``randlora_lambda`` (r, n) and ``randlora_gamma`` (n, m) under each layer. One A (r, 1, m_max) and one
stack of B (M_max, n_max, r) serve the whole model, sized for the elementwise largest (out, in) among
the targets; a layer uses A[:, :, :m] and B[:M, :n, :], and pairs them as peft does: the j-th block of
Λ·A·Γ flattened (r, n) row-major against B flattened (n, r) row-major. Λ starts at 0 (step 0 is the
base) and Γ at 1 / max(n, m), as in peft. α is ``randlora_alpha`` (peft's default 640 = 20·r).

The bases come from a CPU generator seeded with ``projection_prng_key``, A first, as peft draws them:
dense (the default), A and each B_j are Kaiming-uniform (a = √5) draws in bfloat16, divided by their
standard deviation; ``sparse`` makes them ternary (−1, 0, 1 with probabilities 1/6, 2/3, 1/6) and
``very_sparse`` sparser still (±1 with probability 1/(2√m_max) each), then divided by their standard
deviation. With ``save_projection: false`` the adapter holds only Λ and Γ and loading redraws A and B.
Merging adds ΔW to W (transposed for GPT-2's Conv1D); unmerging subtracts it. Saved as peft names them:
``randlora_lambda`` / ``randlora_gamma`` under each module, ``base_model.randlora_A`` /
``base_model.randlora_B`` once (peft also repeats A and B under every module; we read such files and
write the bases once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.inject import is_linear, linear_dims
from peftcli.methods.kit import SHARED_PREFIX, DeltaLayer, LayerMethod, SharedState
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, doc


@dataclass
class RandLoraConfig(MethodConfig):
    """peft's ``RandLoraConfig`` fields."""

    r: int = field(
        default=32,
        metadata=doc(
            "rank of each random basis; a layer sums ceil(min(in, out) / r) of them, so a smaller r "
            "trains more numbers",
            min=1,
        ),
    )
    projection_prng_key: int = field(
        default=0, metadata=doc("seed of the generator that draws the shared bases A and B", min=0)
    )
    save_projection: bool = field(
        default=True,
        metadata=doc("store A and B in the adapter; false: only Λ and Γ, A and B redrawn from the key"),
    )
    sparse: bool = field(
        default=False,
        metadata=doc("ternary bases (-1, 0, 1 with probabilities 1/6, 2/3, 1/6) instead of dense ones"),
    )
    very_sparse: bool = field(
        default=False,
        metadata=doc("ternary bases with ±1 at probability 1/(2 sqrt(min dim)) each (over sparse)"),
    )
    randlora_alpha: float = field(
        default=640.0,
        metadata=doc("α: the update is scaled by α / r (peft's default 640, about 20 r)"),
    )
    randlora_dropout: float = field(
        default=0.0, metadata=doc("dropout on the RandLoRA input path", min=0.0, max=0.99)
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


def num_bases(smaller_dim: int, r: int) -> int:
    """⌈smaller_dim / r⌉: enough rank-r terms to reach full rank."""
    return -(-smaller_dim // r)


def dense_bases(r: int, max_dim: int, min_dim: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, 1, min_dim) then B (max_dim, n, r) as n draws of (max_dim, 1, r): Kaiming-uniform (a = √5)
    in bfloat16 from one generator, each then divided by its standard deviation (in bfloat16)."""
    generator = torch.Generator(device="cpu").manual_seed(key)

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=torch.bfloat16)
        return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)

    basis_a = draw((r, 1, min_dim))
    basis_b = torch.cat([draw((max_dim, 1, r)) for _ in range(num_bases(min_dim, r))], dim=1)
    return (basis_a / basis_a.std()).float(), (basis_b / basis_b.std()).float()


def sparse_bases(
    r: int, max_dim: int, min_dim: int, key: int, sparsity: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary A (r, 1, min_dim) and B (max_dim, n, r): a uniform draw below 1/(2s) gives −1, above
    1 − 1/(2s) gives 1, else 0; each then divided by its standard deviation."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    uniform_a = torch.rand((r, 1, min_dim), generator=generator)
    uniform_b = torch.rand((max_dim, num_bases(min_dim, r), r), generator=generator)

    def ternary(uniform: torch.Tensor) -> torch.Tensor:
        values = torch.zeros(uniform.shape)
        values[uniform < 1 / (2 * sparsity)] = -1
        values[uniform > 1 - 1 / (2 * sparsity)] = 1
        return values / values.std()

    return ternary(uniform_a), ternary(uniform_b)


class RandLoraLinear(DeltaLayer):
    """``base_layer(x) + (α/r) x ΔWᵀ`` with ΔW built from the shared bases and this layer's Λ, Γ, around
    a frozen linear-like layer."""

    def __init__(self, base_layer: nn.Module, shared: SharedState, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "shared", shared)  # a reference, not a submodule: A and B have one name
        self.r, self.scaling = r, alpha / r
        in_features, out_features = linear_dims(base_layer)
        self.min_dim, self.max_dim = min(in_features, out_features), max(in_features, out_features)
        self.a_on_input = self.min_dim == in_features  # A acts on the smaller side: the input, or the output
        self.n = num_bases(self.min_dim, r)
        device = base_layer.weight.device
        self.randlora_lambda = nn.Parameter(torch.zeros(r, self.n, device=device))  # step 0 = base
        gamma = torch.full((self.n, self.min_dim), 1.0 / max(self.n, self.min_dim), device=device)
        self.randlora_gamma = nn.Parameter(gamma)
        self.randlora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, second) with ΔW x = (α/r) second (first x): the trained side Λ·A·Γ, (r·n, m), and B,
        (M, n·r), put in the order the layer's shape needs (A always acts on the smaller side)."""
        basis_a = self.shared.randlora_A[:, : self.n, : self.min_dim]
        basis_b = self.shared.randlora_B[: self.max_dim, : self.n, :]
        trained = self.randlora_lambda[:, :, None] * basis_a * self.randlora_gamma[None]  # (r, n, m)
        scaled_a, flat_b = trained.flatten(end_dim=1), basis_b.flatten(start_dim=1)
        if self.a_on_input:
            return scaled_a, flat_b
        return flat_b.T, scaled_a.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        first, second = self.factors()
        x = self.randlora_dropout(x.to(second.dtype))
        return (result + F.linear(F.linear(x, first), second) * self.scaling).to(result.dtype)

    def stored_delta(self) -> torch.Tensor:
        """(α/r) · second · first as W stores it: (out, in), or (in, out) for GPT-2's Conv1D, fp32."""
        first, second = self.factors()
        delta = (second.float() @ first.float()).detach() * self.scaling
        return delta.T if self.fan_in_fan_out else delta


@register
class RandLora(LayerMethod):
    name = "randlora"
    description = "RandLoRA: a full-rank update from frozen shared random bases, each scaled by two trained diagonals (arXiv 2502.00987)"
    config_cls = RandLoraConfig
    mergeable = True
    peft_type = "RANDLORA"
    supports_quantized_base = True  # the update acts beside the 4-bit layer, as peft's bitsandbytes RandLoRA
    supports_packing = True  # a per-token linear update: packed examples never meet
    supports_fsdp = True  # Λ, Γ shard with their layers; A, B are buffers every rank holds whole
    trainable_formula = (
        "n × (r + min(in, out)) per adapted layer, n = ceil(min(in, out) / r) (Λ and Γ; the bases are "
        "frozen and shared), plus modules_to_save"
    )
    parameter_prefix = "randlora_"  # randlora_lambda / randlora_gamma under each module, peft's keys
    layer_types = (RandLoraLinear,)
    target_kind = "linear layers (nn.Linear, GPT-2's Conv1D)"
    target_hint = "target the model's linear layers"
    accepts_target = staticmethod(is_linear)

    cfg: RandLoraConfig

    def build_shared(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A and B, sized for the elementwise largest (out, in) among the targets."""
        self.targets = self.resolve_targets(model)
        dims = [linear_dims(model.get_submodule(name)) for name in self.targets]
        largest_out, largest_in = max(d[1] for d in dims), max(d[0] for d in dims)
        max_dim, min_dim = max(largest_out, largest_in), min(largest_out, largest_in)
        cfg = self.cfg
        if cfg.very_sparse:
            bases = sparse_bases(cfg.r, max_dim, min_dim, cfg.projection_prng_key, math.sqrt(min_dim))
        elif cfg.sparse:
            bases = sparse_bases(cfg.r, max_dim, min_dim, cfg.projection_prng_key, 3)
        else:
            bases = dense_bases(cfg.r, max_dim, min_dim, cfg.projection_prng_key)
        return dict(zip(("randlora_A", "randlora_B"), bases, strict=True))

    def create_layer(self, name: str, base: nn.Module) -> RandLoraLinear:
        cfg = self.cfg
        return RandLoraLinear(base, self.shared_state, cfg.r, cfg.randlora_alpha, cfg.randlora_dropout)

    def shared_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A and B once as ``base_model.randlora_A`` / ``_B``, or nothing when they are redrawn from
        ``projection_prng_key`` on loading (``save_projection: false``)."""
        return super().shared_state_dict(model) if self.cfg.save_projection else {}

    def adapter_file_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft's file less its per-module copies of A and B (the same tensors as the shared ones)."""
        shared = (f"{SHARED_PREFIX}randlora_A", f"{SHARED_PREFIX}randlora_B")
        return {
            k: v for k, v in state.items() if k in shared or not k.endswith((".randlora_A", ".randlora_B"))
        }

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(m.n * (self.cfg.r + m.min_dim) for _, m in self.layers(model))
        return count + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {
            **super().adapter_config(model),
            "fan_in_fan_out": self.fan_in_fan_out(model),
            "bias": "none",
            "init_weights": True,
        }


__all__ = ["RandLora", "RandLoraConfig", "RandLoraLinear", "dense_bases", "num_bases", "sparse_bases"]
