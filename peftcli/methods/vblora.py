"""VB-LoRA: Vector Bank LoRA (Li et al., 2024, arXiv 2405.15179).

Every adapted layer builds its LoRA factors from one trained vector bank V (num_vectors × L, L =
``vector_length``) shared by the whole model. A is cut into r × (in / L) sub-vectors and B into
(out / L) × r; each sub-vector is a top-k mixture of bank vectors, chosen and weighted by its own
trained logits z (num_vectors of them)::

    v = Σ_{i ∈ topk(z)} softmax(z_topk)_i V_i,      ΔW = B A,      y = W0 x + b0 + B A dropout(x)

A (r, in) is the sub-vectors of ``vblora_logits_A`` (r, in/L, num_vectors) laid end to end per row; B
(out, r) stacks the (out/L) blocks of ``vblora_logits_B`` (out/L, r, num_vectors), each block's r
sub-vectors as its L × r columns. V starts U(−b, b) (``init_vector_bank_bound``) and the logits
N(0, ``init_logits_std``), as in peft: step 0 is *not* the base. Merging adds ΔW to W (transposed for
GPT-2's Conv1D); unmerging subtracts it. Saved as peft names it: ``vblora_logits_A`` / ``_B`` under each
module and ``base_model.vblora_vector_bank`` once (the kit's shared state, here a trained tensor). With
``save_only_topk_weights`` the logits are stored as what the forward uses, the top-k indices
(``<logits>_topk_indices``, the smallest integer type that holds num_vectors) and the first k − 1
softmax weights (``<logits>_topk_weights``); loading rebuilds logits that select and weigh the same
vectors (log-weights, −inf elsewhere), which serve inference and merging but not further training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.inject import is_linear, linear_dims, load_prefixed
from peftcli.methods.kit import DeltaLayer, LayerMethod, SharedState
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc

BANK = "vblora_vector_bank"
INDICES, WEIGHTS = "_topk_indices", "_topk_weights"


@dataclass
class VbloraConfig(MethodConfig):
    """peft's ``VBLoRAConfig`` fields."""

    r: int = field(default=4, metadata=doc("rank of each layer's A and B", min=1))
    num_vectors: int = field(
        default=256, metadata=doc("vectors in the shared bank (more for bigger models)", min=1)
    )
    vector_length: int = field(
        default=256,
        metadata=doc("length of a bank vector; must divide every adapted layer's in and out", min=1),
    )
    topk: int = field(
        default=2, metadata=doc("bank vectors mixed into each sub-vector (the paper: 2 is best)", min=1)
    )
    save_only_topk_weights: bool = field(
        default=False,
        metadata=doc(
            "store only the top-k indices and weights (far smaller); such an adapter serves inference "
            "and merging, not further training"
        ),
    )
    vblora_dropout: float = field(
        default=0.0, metadata=doc("dropout on the VB-LoRA input path", min=0.0, max=0.99)
    )
    init_vector_bank_bound: float = field(
        default=0.02,
        metadata=doc("the bank starts U(-bound, bound); not zero, or no gradient flows", min_exclusive=0.0),
    )
    init_logits_std: float = field(default=0.1, metadata=doc("the logits start N(0, std)", min=0.0))
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


def mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """(..., L): each sub-vector as the softmax-weighted sum of the bank vectors its top-k logits pick."""
    top, indices = logits.topk(topk, dim=-1)
    return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[indices]).sum(-2)


def index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer type peft stores top-k indices in for a bank of ``num_vectors``."""
    if num_vectors < 2**8:
        return torch.uint8
    if num_vectors < 2**15:
        return torch.int16
    return torch.int32 if num_vectors < 2**31 else torch.int64


def topk_entries(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights): what the forward reads of ``logits``; the last weight is 1 − the others."""
    top, indices = logits.topk(topk, dim=-1)
    weights = F.softmax(top, dim=-1)[..., :-1].contiguous()
    return indices.to(index_dtype(logits.shape[-1])), weights


def logits_from_topk(indices: torch.Tensor, weights: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """Logits whose top-k softmax is (weights, 1 − Σ weights) at ``indices``: log-weights, −inf elsewhere."""
    weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
    logits = torch.full((*weights.shape[:-1], num_vectors), float("-inf"), dtype=weights.dtype)
    return logits.scatter(-1, indices.long(), weights.log())


class VbloraLinear(DeltaLayer):
    """``base_layer(x) + B (A dropout(x))`` with A and B mixed from the shared bank, around a frozen
    linear-like layer."""

    def __init__(self, base_layer: nn.Module, shared: SharedState, cfg: VbloraConfig):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "shared", shared)  # a reference, not a submodule: V has one name
        self.topk = cfg.topk
        in_features, out_features = linear_dims(base_layer)
        length, device = cfg.vector_length, base_layer.weight.device
        logits_a = torch.empty(cfg.r, in_features // length, cfg.num_vectors)
        logits_b = torch.empty(out_features // length, cfg.r, cfg.num_vectors)
        self.vblora_logits_A = nn.Parameter(nn.init.normal_(logits_a, 0.0, cfg.init_logits_std).to(device))
        self.vblora_logits_B = nn.Parameter(nn.init.normal_(logits_b, 0.0, cfg.init_logits_std).to(device))
        self.vblora_dropout = nn.Dropout(cfg.vblora_dropout) if cfg.vblora_dropout > 0 else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r, in) and B (out, r), mixed from the bank."""
        bank = getattr(self.shared, BANK)
        logits_a, logits_b = self.vblora_logits_A, self.vblora_logits_B
        lora_a = mix(logits_a, bank, self.topk).reshape(logits_a.shape[0], -1)
        # (out/L, r, L) -> (out/L, L, r) -> (out, r): block j's sub-vectors are rows j·L … j·L + L − 1
        lora_b = mix(logits_b, bank, self.topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
        return lora_a, lora_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        lora_a, lora_b = self.factors()
        x = self.vblora_dropout(x.to(lora_a.dtype))
        return (result + F.linear(F.linear(x, lora_a), lora_b)).to(result.dtype)

    def stored_delta(self) -> torch.Tensor:
        """B A as W stores it: (out, in), or (in, out) for GPT-2's Conv1D, in fp32."""
        lora_a, lora_b = self.factors()
        delta = (lora_b.float() @ lora_a.float()).detach()
        return delta.T if self.fan_in_fan_out else delta


@register
class Vblora(LayerMethod):
    name = "vblora"
    description = "VB-LoRA: each layer's A and B are top-k mixtures of one shared trained vector bank (arXiv 2405.15179)"
    config_cls = VbloraConfig
    mergeable = True
    identity_at_init = False  # as in peft: the bank and the logits both start random, so B A != 0
    peft_type = "VBLORA"
    supports_quantized_base = False  # peft's VB-LoRA has no quantized layers ("TODO: add quantization")
    supports_packing = True  # a per-token linear update: packed examples never meet
    supports_fsdp = False  # the bank is one trained tensor every layer reads, outside every block
    trainable_formula = (
        "num_vectors × vector_length (the shared bank) + num_vectors × r × (in + out) / vector_length "
        "per adapted layer (the logits), plus modules_to_save"
    )
    parameter_prefix = (
        "vblora_logits_"  # saved as base_model.model.<module>.vblora_logits_A / _B, peft's keys
    )
    layer_types = (VbloraLinear,)
    target_kind = "linear layers (nn.Linear, GPT-2's Conv1D)"
    target_hint = "target the model's linear layers"
    accepts_target = staticmethod(is_linear)

    cfg: VbloraConfig

    @classmethod
    def validate_config(cls, cfg: VbloraConfig, recipe) -> None:
        super().validate_config(cfg, recipe)
        if cfg.topk > cfg.num_vectors:
            raise RecipeError(
                "method.topk",
                f"{cfg.topk} is more than the bank's {cfg.num_vectors} vectors",
                "use topk <= num_vectors (the paper uses 2)",
            )

    def build_shared(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The bank V (num_vectors, vector_length), a trained parameter, U(−bound, bound)."""
        bound = self.cfg.init_vector_bank_bound
        bank = torch.empty(self.cfg.num_vectors, self.cfg.vector_length).uniform_(-bound, bound)
        return {BANK: nn.Parameter(bank)}

    def create_layer(self, name: str, base: nn.Module) -> VbloraLinear:
        length = self.cfg.vector_length
        for dim in linear_dims(base):
            if dim % length:
                raise RecipeError(
                    "method.vector_length",
                    f"{length} does not divide {name}'s {dim} features",
                    "use a vector_length that divides every adapted layer's in and out",
                )
        return VbloraLinear(base, self.shared_state, self.cfg)

    # -- saving: the logits whole, or only their top-k ------------------------------------
    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().adapter_state_dict(model)
        if not self.cfg.save_only_topk_weights:
            return state
        for key in [k for k in state if ".vblora_logits_" in k]:
            indices, weights = topk_entries(state.pop(key), self.cfg.topk)
            state[key + INDICES], state[key + WEIGHTS] = indices, weights
        return state

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Logits rebuilt from top-k entries where the file holds those, then loaded by name."""
        state = dict(state)
        for key in [k for k in state if k.endswith(INDICES)]:
            logits_key = key.removesuffix(INDICES)
            weights = state.pop(logits_key + WEIGHTS)
            state[logits_key] = logits_from_topk(state.pop(key), weights, self.cfg.num_vectors)
        expected = {k: v.detach() for k, v in self.live_state_dict(model).items()}
        load_prefixed(model, state, expected)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        cfg = self.cfg
        count = cfg.num_vectors * cfg.vector_length
        for _, layer in self.layers(model):
            in_features, out_features = linear_dims(layer.base_layer)
            count += cfg.num_vectors * cfg.r * (in_features + out_features) // cfg.vector_length
        return count + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {
            **super().adapter_config(model),
            "fan_in_fan_out": self.fan_in_fan_out(model),
            "bias": "none",
        }


__all__ = [
    "Vblora",
    "VbloraConfig",
    "VbloraLinear",
    "index_dtype",
    "logits_from_topk",
    "mix",
    "topk_entries",
]
