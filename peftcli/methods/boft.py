"""BOFT: Butterfly Orthogonal Finetuning (Liu et al., 2024, "Parameter-Efficient Orthogonal Finetuning
via Butterfly Factorization", arXiv 2311.06243).

OFT rotates a frozen layer's input by one block-diagonal orthogonal matrix; BOFT rotates it by a product
of m of them (m = ``boft_n_butterfly_factor``), each conjugated by a butterfly permutation, so that the
product is dense with few parameters, and rescales each output::

    y = s ⊙ (W0 (R x)) + b0,    Rᵀ = M_{m-1} ⋯ M_1 M_0,    M_i = P_i B_i P_iᵀ
    B_i = diag(B_i1, ..., B_iD),   B_ij = (I - S_ij)(I + S_ij)^(-1),   S_ij = (A_ij - A_ijᵀ) / 2

Each B_ij is the Cayley transform of a stored b × b matrix's skew-symmetric part (b = ``boft_block_size``,
D = in/b blocks; or D = ``boft_block_num``). P_0 = I; P_i (i ≥ 1) shuffles, inside each run of b·2^i
features, the chunks of b/2 features so that the even-numbered chunks come first: block j of factor i then
mixes features that factor i-1 kept apart (the butterfly of the FFT). m = 1 is OFT with the exact Cayley
transform. A = 0 and s = 1 at init, so step 0 is the base. ``boft_dropout`` (training only) replaces
int(p·D) random blocks of one random factor by the identity, drawn as peft draws them.

Merging writes s ⊙ (W Rᵀ) into W; unmerging writes (W / s) R back (R is orthogonal: exact up to rounding).
Saved as peft names it: ``boft_R`` (m, D, b, b) and ``boft_s`` (out, 1) under each module, ``peft_type``
``BOFT``. peft builds the block diagonal with a CUDA extension where one compiles and otherwise falls
back to m = 1; here R is built in plain PyTorch from the factors (a gather, a batched b × b product and
a gather per factor, no in × in permutation matrices), then x R as peft computes it: one (in × in) product
per token, which keeps our logits on peft's to the rounding (applying the factors to x directly is
cheaper per token but rounds differently: 1.2e-5 on tiny:t5's logits).
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
class BoftConfig(MethodConfig):
    """peft's ``BOFTConfig`` fields (set exactly one of boft_block_size and boft_block_num, as there)."""

    boft_block_size: int = field(
        default=4,
        metadata=doc(
            "width b of each rotation block (0: from boft_block_num); must divide in_features", min=0
        ),
    )
    boft_block_num: int = field(
        default=0, metadata=doc("rotation blocks per layer (0: from boft_block_size)", min=0)
    )
    boft_n_butterfly_factor: int = field(
        default=1,
        metadata=doc("butterfly factors m: 1 is OFT; each more doubles the reach of a block", min=1),
    )
    boft_dropout: float = field(
        default=0.0,
        metadata=doc(
            "training only: share of one factor's blocks set to the identity per forward", min=0.0, max=1.0
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


def butterfly_geometry(in_features: int, cfg: BoftConfig) -> tuple[int, int] | str:
    """(blocks D, block width b) of a layer, or why its ``in`` does not fit the config (peft's checks)."""
    extra = cfg.boft_n_butterfly_factor - 1  # the factors beyond OFT's one
    spread = 2**extra
    if cfg.boft_block_size == 0:
        blocks = cfg.boft_block_num
        if in_features % blocks:
            return f"boft_block_num {blocks} does not divide in_features {in_features}"
        if extra and blocks % spread:
            return f"boft_block_num {blocks} is not a multiple of 2^(boft_n_butterfly_factor - 1) = {spread}"
        width = in_features // blocks
    else:
        width = cfg.boft_block_size
        if in_features % (width * spread):
            return f"boft_block_size × 2^(boft_n_butterfly_factor - 1) = {width * spread} does not divide in_features {in_features}"
        blocks = in_features // width
    if extra and (blocks % 2 or width % 2):
        return f"with butterfly factors the blocks ({blocks}) and their width ({width}) must both be even"
    return blocks, width


def butterfly_permutation(n: int, group: int, chunk: int) -> torch.Tensor:
    """Indices of n features: inside each run of ``group``, the chunks of ``chunk`` features at even
    positions first, then the odd ones (peft's ``block_butterfly_perm``; the identity when group = 2·chunk)."""
    chunks = torch.arange(group).reshape(-1, chunk)
    order = torch.cat([chunks[0::2], chunks[1::2]]).reshape(-1)
    return torch.cat([start + order for start in range(0, n, group)])


def cayley(a: torch.Tensor) -> torch.Tensor:
    """(..., b, b) -> the Cayley transform (I - S)(I + S)^(-1) of each matrix's skew part S = (A - Aᵀ)/2."""
    skew = 0.5 * (a - a.transpose(-2, -1))
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype).expand_as(a)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def drop_blocks(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """BOFT's multiplicative dropout: int(p·D) of one random factor's D blocks become the identity. The
    draws (the factor, then a permutation of the blocks) come from the global generator in peft's order."""
    factors, count, width, _ = blocks.shape
    factor = torch.randint(0, factors, (1,)).item()
    dropped = int(p * count)
    mask = torch.cat([torch.ones(dropped), torch.zeros(count - dropped)])[torch.randperm(count)]
    full = torch.zeros(factors, count, 1, 1)
    full[factor] = mask.view(count, 1, 1)
    full = full.to(blocks.device, blocks.dtype)
    eye = torch.eye(width, device=blocks.device, dtype=blocks.dtype)
    return (1 - full) * blocks + full * eye


class BoftLinear(AdapterLayer):
    """``s ⊙ (base_layer(x R) - b0) + b0`` around a frozen ``nn.Linear``, R (in × in) built per forward."""

    def __init__(self, base_layer: nn.Module, blocks: int, width: int, cfg: BoftConfig):
        super().__init__()
        self.base_layer = base_layer
        self.n_blocks, self.block_size = blocks, width
        self.dropout = cfg.boft_dropout
        factors = cfg.boft_n_butterfly_factor
        device = base_layer.weight.device
        self.boft_R = nn.Parameter(torch.zeros(factors, blocks, width, width, device=device))
        self.boft_s = nn.Parameter(torch.ones(self.out_features, 1, device=device))
        for i, perm in enumerate(self.permutations(factors)):
            self.register_buffer(f"perm_{i}", perm.to(device), persistent=False)
            self.register_buffer(f"inverse_{i}", torch.argsort(perm).to(device), persistent=False)

    def permutations(self, factors: int) -> list[torch.Tensor]:
        """P_i of each factor as feature indices (P_0 = I)."""
        if factors == 1:
            return [torch.arange(self.in_features)]
        half = self.block_size // 2
        return [butterfly_permutation(self.in_features, self.block_size * 2**i, half) for i in range(factors)]

    def rotation_blocks(self) -> torch.Tensor:
        """(m, D, b, b): each factor's orthogonal blocks, some set to I by dropout while training."""
        blocks = cayley(self.boft_R)
        if self.training and self.dropout > 0:
            blocks = drop_blocks(blocks, self.dropout)
        return blocks

    def rotate(self, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """x R for rows x (..., in): x M_{m-1} first, M_0 last; x M_i = ((x P_i) B_i) P_iᵀ. With x = I
        this is R itself."""
        for i in reversed(range(blocks.shape[0])):
            shuffled = x[..., getattr(self, f"inverse_{i}")]
            shuffled = shuffled.reshape(*x.shape[:-1], self.n_blocks, self.block_size)
            turned = torch.einsum("...nk,nkc->...nc", shuffled, blocks[i]).reshape(x.shape)
            x = turned[..., getattr(self, f"perm_{i}")]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        if self.merged:
            return self.base_layer(x)
        blocks = self.rotation_blocks()
        eye = torch.eye(self.in_features, device=blocks.device, dtype=blocks.dtype)
        rotated = (x.to(blocks.dtype) @ self.rotate(eye, blocks)).to(x.dtype)
        result = self.base_layer(rotated)
        bias = self.base_layer.bias
        scale = self.boft_s.squeeze(-1).to(result.dtype)
        if bias is None:
            return result * scale
        return (result - bias) * scale + bias

    def full_rotation(self) -> torch.Tensor:
        """R (in, in) in fp32: x_rotated = x R for a row vector x."""
        eye = torch.eye(self.in_features, device=self.boft_R.device)
        return self.rotate(eye, cayley(self.boft_R.detach().float()))

    def merge(self) -> None:
        weight = self.base_layer.weight
        scale = self.boft_s.detach().float()
        write_weight(weight, (weight.float() @ self.full_rotation().T) * scale)

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        scale = self.boft_s.detach().float()
        write_weight(weight, (weight.float() / scale) @ self.full_rotation())


@register
class Boft(LayerMethod):
    name = "boft"
    description = (
        "BOFT: each layer's input rotated by a butterfly product of block-diagonal orthogonal matrices "
        "(arXiv 2311.06243)"
    )
    config_cls = BoftConfig
    mergeable = True
    peft_type = "BOFT"
    supports_quantized_base = (
        True  # the rotation acts on the input, the scale on the output: a 4-bit base works
    )
    supports_packing = True  # a per-token rotation and scale: packed examples never meet
    supports_fsdp = True  # plain parameters in each layer, which FSDP2 shards like the base
    trainable_formula = (
        "m·D·b² per adapted layer (m = boft_n_butterfly_factor, D blocks of width b, D·b = in) "
        "plus out (the scale s); plus modules_to_save"
    )
    parameter_prefix = "boft_"  # saved as base_model.model.<module>.boft_R / .boft_s, peft's keys
    layer_types = (BoftLinear,)
    target_kind = "nn.Linear layers"
    target_hint = (
        "target the model's nn.Linear layers, or use lora (peft has no BOFT layer for others either)"
    )
    accepts_target = staticmethod(lambda module: isinstance(module, nn.Linear))

    cfg: BoftConfig

    @classmethod
    def validate_config(cls, cfg: BoftConfig, recipe) -> None:
        if (cfg.boft_block_size == 0) == (cfg.boft_block_num == 0):
            raise RecipeError(
                "method.boft_block_size",
                f"set exactly one of boft_block_size ({cfg.boft_block_size}) and boft_block_num "
                f"({cfg.boft_block_num}): block size × block number = in",
                "e.g. boft_block_size: 4 with boft_block_num: 0, or boft_block_num: 8 with boft_block_size: 0",
            )
        if cfg.boft_dropout >= 1:
            raise RecipeError("method.boft_dropout", f"must be < 1, got {cfg.boft_dropout}", "e.g. 0.1")

    def create_layer(self, name: str, base: nn.Module) -> BoftLinear:
        geometry = butterfly_geometry(base.in_features, self.cfg)
        if isinstance(geometry, str):
            key = "method.boft_block_size" if self.cfg.boft_block_size else "method.boft_block_num"
            raise RecipeError(
                key, f"{name}: {geometry}", "pick a size that divides every adapted layer's in_features"
            )
        return BoftLinear(base, *geometry, self.cfg)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        factors = self.cfg.boft_n_butterfly_factor
        count = sum(factors * m.n_blocks * m.block_size**2 + m.out_features for _, m in self.layers(model))
        return count + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {
            **super().adapter_config(model),
            "fan_in_fan_out": False,
            "bias": "none",
            "init_weights": True,
        }


__all__ = ["Boft", "BoftConfig", "BoftLinear", "butterfly_geometry", "butterfly_permutation", "cayley"]
