"""MiSS: Matrix Shard Sharing (Kang and Yin, 2024, "MiSS: Balancing LoRA Performance and Efficiency with
Simple Shard Sharing", arXiv 2409.15371; first published as Bone, "Block-Affine Adaptation").

Each adapted linear layer keeps W (out × in) frozen and trains one shard D (r × out) that every r-wide
column block of W shares: column c of the update is row (c mod r) of D::

    ΔW[o, c] = D[c mod r, o],      y = W x + b + D ᵀ (Σ_k x_k)

where x_k are the r-wide slices of x (zero-padded when r does not divide ``in``), so the forward sums
the slices first and costs one r × out product per token. D starts at zero: step 0 is the base.
``init_weights`` picks peft's variants:

- ``true`` (peft's "balance", the default): D is (r, out) as above; ``false``: the same, D Kaiming-uniform;
- ``mini``: D is (r, mini_r), repeated out/mini_r times along ``out`` (fewer numbers; ``mini_r`` must
  divide every adapted layer's ``out``);
- ``bat`` (Block Affine Transformation): W is cut into r × r blocks W_ij and each row of blocks i has its
  own B_i (out/r of them, stored (out/r, r, r)), applied to the weights themselves:
  W'_ij = W_ij (I + B_i) + B_i, so the update depends on W (nonlinear across shards); the forward builds
  W' (r must divide ``in`` and ``out``).

``miss_dropout`` drops entries of x before the slices are summed (not with ``bat``, as in peft). Merging
adds ΔW (or writes W'); unmerging subtracts it (bat: W = (W' − B_i)(I + B_i)^(-1)). Saved as peft names it:
``miss_block`` under each module, ``peft_type`` ``MISS``.
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
from peftcli.recipe import MethodConfig, RecipeError, doc


@dataclass
class MissConfig(MethodConfig):
    """peft's ``MissConfig`` fields."""

    r: int = field(
        default=64,
        metadata=doc("shard rows: the width of the column blocks of W that share the shard (≤ in)", min=1),
    )
    miss_dropout: float = field(
        default=0.0,
        metadata=doc("dropout on the layer's input before its slices are summed", min=0.0, max=1.0),
    )
    mini_r: int = field(
        default=1,
        metadata=doc("with init_weights: mini, the shard's columns (must divide every adapted out)", min=1),
    )
    init_weights: bool | Literal["bat", "mini"] = field(
        default=True,
        metadata=doc(
            "true: MiSS (zero shard, r × out); false: the same, Kaiming-uniform; bat: per-block affine "
            "maps of W (out/r × r × r); mini: an r × mini_r shard repeated along out"
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


def layer_problem(in_features: int, out_features: int, cfg: MissConfig) -> str | None:
    """Why a layer's shape does not fit the config (peft's checks), or None."""
    r = cfg.r
    if r > in_features:
        return f"r ({r}) is more than in_features ({in_features})"
    if cfg.init_weights == "bat" and (in_features % r or out_features % r):
        return f"with init_weights: bat, r ({r}) must divide in_features ({in_features}) and out_features ({out_features})"
    if cfg.init_weights == "mini" and out_features % cfg.mini_r:
        return f"mini_r ({cfg.mini_r}) does not divide out_features ({out_features})"
    return None


def shard_shape(in_features: int, out_features: int, cfg: MissConfig) -> tuple[int, ...]:
    if cfg.init_weights == "bat":
        return (out_features // cfg.r, cfg.r, cfg.r)
    if cfg.init_weights == "mini":
        return (cfg.r, cfg.mini_r)
    return (cfg.r, out_features)


def block_affine(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Bat's W' (out, in): each r × r block W_ij of W becomes W_ij (I + B_i) + B_i."""
    n_out, r, _ = blocks.shape
    w = weight.reshape(n_out, r, -1, r)  # (i, a, j, c): block (i, j), row a, column c
    turned = w + torch.einsum("iajk,ikc->iajc", w, blocks) + blocks[:, :, None, :]
    return turned.reshape(weight.shape)


def block_affine_inverse(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """W from bat's W': each block (W'_ij − B_i)(I + B_i)^(-1)."""
    n_out, r, _ = blocks.shape
    eye = torch.eye(r, dtype=blocks.dtype, device=blocks.device)
    inverse = torch.linalg.inv(eye + blocks)
    w = weight.reshape(n_out, r, -1, r) - blocks[:, :, None, :]
    return torch.einsum("iajk,ikc->iajc", w, inverse).reshape(weight.shape)


class MissLinear(AdapterLayer):
    """``base_layer(x) + Dᵀ Σ_k x_k`` around a frozen ``nn.Linear`` (bat: ``x W'ᵀ + b``)."""

    def __init__(self, base_layer: nn.Module, cfg: MissConfig):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.mode = cfg.r, cfg.init_weights
        self.mini_r = cfg.mini_r
        shape = shard_shape(self.in_features, self.out_features, cfg)
        block = torch.zeros(shape)
        if cfg.init_weights is False:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.miss_block = nn.Parameter(block.to(base_layer.weight.device))
        self.dropout = nn.Dropout(cfg.miss_dropout) if cfg.miss_dropout > 0 else nn.Identity()

    def shard(self) -> torch.Tensor:
        """D as (r, out): the stored shard, or mini's repeated along out."""
        if self.mode == "mini":
            return self.miss_block.repeat(1, self.out_features // self.mini_r)
        return self.miss_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        if self.merged:
            return self.base_layer(x)
        if self.mode == "bat":
            return self.bat_forward(x)
        result = self.base_layer(x)
        shard = self.shard()
        padded = F.pad(x, (0, -self.in_features % self.r)).to(shard.dtype)
        slices = self.dropout(padded).reshape(*x.shape[:-1], -1, self.r)
        return (result + slices.sum(dim=-2) @ shard).to(result.dtype)

    def bat_forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.miss_block
        weight = block_affine(self.base_layer.weight.to(blocks.dtype), blocks)
        bias = self.base_layer.bias
        bias = None if bias is None else bias.to(blocks.dtype)
        return F.linear(x.to(blocks.dtype), weight, bias).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in) in fp32 (not bat): column c is row c mod r of D."""
        columns = torch.arange(self.in_features, device=self.miss_block.device) % self.r
        return self.shard().detach().float().T[:, columns]

    def merge(self) -> None:
        weight = self.base_layer.weight
        blocks = self.miss_block.detach().float()
        merged = (
            block_affine(weight.float(), blocks)
            if self.mode == "bat"
            else weight.float() + self.delta_weight()
        )
        write_weight(weight, merged)

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        blocks = self.miss_block.detach().float()
        if self.mode == "bat":
            write_weight(weight, block_affine_inverse(weight.float(), blocks))
        else:
            write_weight(weight, weight.float() - self.delta_weight())


@register
class Miss(LayerMethod):
    name = "miss"
    description = (
        "MiSS: one trained shard shared by every column block of each layer's weight (arXiv 2409.15371)"
    )
    config_cls = MissConfig
    mergeable = True
    peft_type = "MISS"
    supports_quantized_base = True  # the shard adds to a 4-bit layer's output; bat (which reads W) is refused
    supports_packing = True  # a per-token update: packed examples never meet
    supports_fsdp = (
        True  # the shard is a plain parameter of its layer; bat reads W inside the layer's forward
    )
    trainable_formula = (
        "r × out per adapted layer (bat: out/r blocks of r × r, the same count; mini: r × mini_r), "
        "plus modules_to_save"
    )
    parameter_prefix = "miss_"  # saved as base_model.model.<module>.miss_block, peft's key
    layer_types = (MissLinear,)
    target_kind = "nn.Linear layers"
    target_hint = "target the model's nn.Linear layers, or use lora (peft's MiSS adapts nn.Linear only too)"
    accepts_target = staticmethod(lambda module: isinstance(module, nn.Linear))

    cfg: MissConfig

    @classmethod
    def validate_config(cls, cfg: MissConfig, recipe) -> None:
        if cfg.miss_dropout >= 1:
            raise RecipeError("method.miss_dropout", f"must be < 1, got {cfg.miss_dropout}", "e.g. 0.1")
        if cfg.init_weights == "bat" and recipe.model.quantization is not None:
            raise RecipeError(
                "method.init_weights",
                "bat builds W' from W on every forward; a 4-bit base does not hold W (peft refuses it too)",
                "use init_weights: true or mini on a quantized base, or drop model.quantization",
            )

    def create_layer(self, name: str, base: nn.Module) -> MissLinear:
        problem = layer_problem(base.in_features, base.out_features, self.cfg)
        if problem:
            key = "method.mini_r" if problem.startswith("mini_r") else "method.r"
            raise RecipeError(key, f"{name}: {problem}", "pick values that fit every adapted layer")
        return MissLinear(base, self.cfg)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        cfg = self.cfg
        if cfg.init_weights == "mini":
            per_layer = [cfg.r * cfg.mini_r for _ in self.layers(model)]
        else:  # balance: r × out; bat: (out / r) · r · r, the same
            per_layer = [cfg.r * m.out_features for _, m in self.layers(model)]
        return sum(per_layer) + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {**super().adapter_config(model), "bias": "none"}


__all__ = ["Miss", "MissConfig", "MissLinear", "block_affine", "block_affine_inverse", "layer_problem"]
