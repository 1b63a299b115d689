"""OFT: Orthogonal Finetuning (Qiu et al., 2023, "Controlling Text-to-Image Diffusion by Orthogonal
Finetuning", arXiv 2306.07280; peft's form, Qiu et al., 2025, arXiv 2506.19847).

A frozen linear layer sees its input rotated by a learned block-diagonal orthogonal matrix::

    y = W0 (R x) + b0,     R = diag(R_1, ..., R_n),   R_i = (I + Q_i)(I - Q_i)^(-1)   (Cayley)

which multiplies W0 by an orthogonal matrix from the right, so the angles between W0's neurons (its
"hyperspherical energy") are kept. Each block is ``oft_block_size`` wide (or there are ``r`` blocks:
set one of the two, as in peft; a size that does not divide ``in`` moves to the nearest divisor, as
peft moves it). Q_i is skew-symmetric, stored as its strict upper triangle: b(b-1)/2 numbers per
block, one block shared by all with ``block_share``. Q = 0 at init, so R = I and step 0 is the base.
By default the inverse is the Neumann series I + 2Q + 2Q² + ... (peft's ``use_cayley_neumann``, its
exact truncation); ``use_cayley_neumann: false`` solves exactly. COFT (``coft``) keeps each Q within
a Frobenius ball of radius eps/√(stored blocks) around zero, by projecting the stored Q before each use
(in place, as peft does). Merging folds R into W (W ← W Rᵀ); unmerging multiplies by the inverse.
Saved as peft names it: ``oft_R.weight`` (blocks, b(b-1)/2) under each adapted module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftcli.methods.kit import AdapterLayer, LayerMethod, write_weight
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc


@dataclass
class OFTConfig(MethodConfig):
    """peft's ``OFTConfig`` fields (set exactly one of r and oft_block_size, as there)."""

    r: int = field(default=0, metadata=doc("number of blocks per layer (0: from oft_block_size)", min=0))
    oft_block_size: int = field(
        default=32, metadata=doc("width of each rotation block (0: from r); must divide in_features", min=0)
    )
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata=doc(
            "module names (list), a regex on full names, or all-linear (every nn.Linear but the head)"
        ),
    )
    coft: bool = field(
        default=False, metadata=doc("constrained OFT: keep each rotation within eps of identity")
    )
    eps: float = field(
        default=6e-5,
        metadata=doc("COFT's radius (scaled by 1/sqrt(blocks)); only with coft", min_exclusive=0.0),
    )
    block_share: bool = field(
        default=False, metadata=doc("one rotation block shared by all blocks of a layer")
    )
    use_cayley_neumann: bool = field(
        default=True,
        metadata=doc("approximate the Cayley inverse by a Neumann series (faster); false: exact"),
    )
    num_cayley_neumann_terms: int = field(
        default=5, metadata=doc("terms of the Neumann series (with use_cayley_neumann)", min=1)
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=doc("modules trained in full and saved whole; seq_cls heads are added"),
    )


def nearest_divisor(dimension: int, wanted: int) -> int:
    """The divisor of ``dimension`` nearest ``wanted`` (ties to the smaller; ``dimension`` itself when
    ``wanted`` exceeds it): how peft moves a block size or block count that does not divide ``in``."""
    if dimension % wanted == 0:
        return wanted
    if wanted >= dimension:
        return dimension
    lower = max(d for d in range(1, wanted + 1) if dimension % d == 0)
    higher = min(d for d in range(wanted, dimension + 1) if dimension % d == 0)
    return lower if wanted - lower <= higher - wanted else higher


def block_geometry(in_features: int, r: int, block_size: int) -> tuple[int, int]:
    """(blocks, block width) of a layer from the config's r or oft_block_size (the other one is 0)."""
    if r == 0:
        block_size = nearest_divisor(in_features, block_size)
        return in_features // block_size, block_size
    r = nearest_divisor(in_features, r)
    return r, in_features // r


def neumann_coefficients(terms: int) -> list[float]:
    """Coefficients of I, Q, Q², ... in peft's truncated Neumann form of (I + Q)(I - Q)^(-1): 1, 2, 2, ...,
    and 1 on the last power (which is Q³ at least, so 3 and 4 terms give the same series)."""
    if terms <= 2:
        return [1.0, 2.0][: max(terms, 1)]
    return [1.0, 2.0, 2.0] + [2.0] * max(0, terms - 4) + [1.0]


class OFTRotation(nn.Module):
    """The stored skew-symmetric generators (``weight``: (blocks, b(b-1)/2), peft's ``oft_R``) and the
    rotation blocks they make."""

    def __init__(self, stored_blocks: int, block_size: int, cfg: OFTConfig, device: torch.device):
        super().__init__()
        self.block_size = block_size
        self.coft, self.eps = cfg.coft, cfg.eps
        self.neumann = cfg.num_cayley_neumann_terms if cfg.use_cayley_neumann else None
        n_elements = block_size * (block_size - 1) // 2
        self.weight = nn.Parameter(torch.zeros(stored_blocks, n_elements, device=device))  # R = I
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows.to(device), persistent=False)
        self.register_buffer("cols", cols.to(device), persistent=False)

    def skew(self, vectors: torch.Tensor) -> torch.Tensor:
        """(blocks, n) upper triangles -> (blocks, b, b) skew-symmetric matrices Q."""
        q = vectors.new_zeros(vectors.shape[0], self.block_size, self.block_size)
        q[:, self.rows, self.cols] = vectors
        return q - q.transpose(-2, -1)

    def constrain(self) -> None:
        """COFT: scale each stored Q into the Frobenius ball of radius eps/√(stored blocks), in place."""
        with torch.no_grad():
            q = self.skew(self.weight)
            radius = self.eps / torch.sqrt(torch.tensor(float(q.shape[0])))
            norms = torch.linalg.matrix_norm(q, keepdim=True)
            q = torch.where(norms <= radius, q, q * (radius / norms))
            self.weight.copy_(q[:, self.rows, self.cols])

    def blocks(self) -> torch.Tensor:
        """The rotation blocks R_i, (stored blocks, b, b)."""
        if self.coft:
            self.constrain()
        q = self.skew(self.weight)
        eye = torch.eye(self.block_size, device=q.device, dtype=q.dtype).expand_as(q)
        if self.neumann is None:
            return torch.linalg.solve(eye + q, eye - q, left=False)  # (I - Q)(I + Q)^(-1)
        rotation, power = eye.clone(), eye
        for coefficient in neumann_coefficients(self.neumann)[1:]:
            power = power @ q
            rotation = rotation + coefficient * power
        return rotation


class OFTLinear(AdapterLayer):
    """``base_layer(x_rotated)``, each block of b input features multiplied by its R_i."""

    def __init__(self, base_layer: nn.Module, cfg: OFTConfig):
        super().__init__()
        self.base_layer = base_layer
        self.n_blocks, self.block_size = block_geometry(self.in_features, cfg.r, cfg.oft_block_size)
        stored = 1 if cfg.block_share else self.n_blocks
        self.oft_R = OFTRotation(stored, self.block_size, cfg, base_layer.weight.device)

    def rotation_blocks(self) -> torch.Tensor:
        """(n_blocks, b, b), the one shared block repeated with ``block_share``."""
        blocks = self.oft_R.blocks()
        return blocks.expand(self.n_blocks, -1, -1) if blocks.shape[0] == 1 else blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        if self.merged:
            return self.base_layer(x)
        rotation = self.rotation_blocks()
        blocks = x.to(rotation.dtype).reshape(*x.shape[:-1], self.n_blocks, self.block_size)
        rotated = torch.einsum("...nk,nkc->...nc", blocks, rotation).reshape(x.shape)
        return self.base_layer(rotated.to(x.dtype))

    def full_rotation(self) -> torch.Tensor:
        """The (in, in) block-diagonal matrix R, fp32: x_rotated = x R for a row vector x."""
        return torch.block_diag(*self.rotation_blocks().detach().float())

    def merge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() @ self.full_rotation().T)

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        write_weight(weight, weight.float() @ torch.linalg.inv(self.full_rotation().T))

    def parameter_count(self) -> int:
        return self.oft_R.weight.shape[0] * self.block_size * (self.block_size - 1) // 2


@register
class OFT(LayerMethod):
    name = "oft"
    description = "OFT: a learned block-diagonal orthogonal rotation of each layer's input (arXiv 2306.07280)"
    config_cls = OFTConfig
    mergeable = True
    peft_type = "OFT"
    supports_quantized_base = True  # the rotation acts on the input: a 4-bit base works as in peft
    supports_packing = True  # a per-token rotation: packed examples never meet
    supports_fsdp = True  # plain parameters in each layer, which FSDP2 shards like the base
    trainable_formula = (
        "b(b-1)/2 per block, in/b blocks per adapted layer (one with block_share), b = oft_block_size or in/r; "
        "plus modules_to_save"
    )
    parameter_prefix = "oft_"  # saved as base_model.model.<module>.oft_R.weight, peft's key
    layer_types = (OFTLinear,)
    target_kind = "nn.Linear layers"
    target_hint = "target the model's nn.Linear layers, or use lora (peft has no OFT layer for others either)"
    accepts_target = staticmethod(lambda module: isinstance(module, nn.Linear))

    cfg: OFTConfig

    @classmethod
    def validate_config(cls, cfg: OFTConfig, recipe) -> None:
        if (cfg.r == 0) == (cfg.oft_block_size == 0):
            raise RecipeError(
                "method.r",
                f"set exactly one of r ({cfg.r}) and oft_block_size ({cfg.oft_block_size}): r × block size = in",
                "e.g. oft_block_size: 32 with r: 0, or r: 8 with oft_block_size: 0",
            )

    def create_layer(self, name: str, base: nn.Module) -> OFTLinear:
        return OFTLinear(base, self.cfg)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        return sum(m.parameter_count() for _, m in self.layers(model)) + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {
            **super().adapter_config(model),
            "module_dropout": 0.0,
            "fan_in_fan_out": False,
            "bias": "none",
            "init_weights": True,
        }


__all__ = ["OFT", "OFTConfig", "OFTLinear", "block_geometry", "nearest_divisor", "neumann_coefficients"]
