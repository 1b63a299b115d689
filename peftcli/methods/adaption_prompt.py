"""Adaption prompt: LLaMA-Adapter's gated, zero-initialised prompts in the top layers' attention
(Zhang et al., 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
Attention", arXiv 2303.16199).

Each of the top ``adapter_layers`` attention modules gets ``adapter_len`` trainable prompt vectors
``P ∈ R^{n×h}`` (in the residual stream's space) and a scalar gate ``g``. The frozen projections turn
the prompt into keys and values; every query attends to them with a softmax of its own, scaled by the
gate, and the result goes through the frozen output projection beside the layer's own attention::

    y = Attn(x) + W_o · (g · softmax(q Kᵀ / √d) V),   K = W_k P,  V = W_v P,  q = RoPE(W_q x)

On GPT-2 q, K and V come from the fused ``c_attn`` (with its bias) and, as in peft, the branch is added
without an output projection. The prompt keys carry no rotary position (they sit at no position); the
gate starts at 0, so step 0 is
the base model and the prompts' influence grows only as training opens the gate (the paper's
"zero-init attention"). With grouped-query attention each key/value head serves its group of query
heads, as in the layer itself.

Saved as peft's ``ADAPTION_PROMPT``: ``<attention>.adaption_prompt`` (1, n, h) and
``<attention>.adaption_gate`` (1,) under ``base_model.model.``. peft (and so this method) supports the
llama, mistral and gpt2 families; others are refused at start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.methods.kit import LayerMethod
from peftcli.methods.registry import Method, register
from peftcli.recipe import MethodConfig, RecipeError, doc

# peft's TRANSFORMERS_MODEL_CONFIG: each family's attention module (its last name). llama and mistral
# project with q/k/v/o_proj and rotate the queries; GPT-2 projects with its fused c_attn and, as peft,
# adds the prompt branch unprojected (its c_proj has already run on the layer's own attention).
FAMILIES = {"llama": "self_attn", "mistral": "self_attn", "gpt2": "attn"}


@dataclass
class AdaptionPromptConfig(MethodConfig):
    """peft's ``AdaptionPromptConfig`` fields (``target_modules`` is fixed: the attention module)."""

    adapter_len: int = field(
        default=10, metadata=doc("prompt vectors per adapted layer (the paper: 10)", min=1)
    )
    adapter_layers: int | None = field(
        default=None,
        metadata=doc(
            "adapt the top N decoder layers (the paper: 30 of LLaMA-7B's 32); default: every layer",
            min=1,
        ),
    )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation of the two halves of the head dimension: (x1, x2) -> (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class AdaptedAttention(nn.Module):
    """A frozen attention plus LLaMA-Adapter's gated prompt branch; looks like the attention it wraps
    (model code reads ``layer_idx``, ``config``, ...). ``fused``: GPT-2's c_attn (see FAMILIES)."""

    def __init__(self, base_layer: nn.Module, adapter_len: int, hidden_size: int, fused: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.fused = fused
        weight = next(base_layer.parameters())
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32  # as peft
        self.adaption_prompt = nn.Parameter(
            torch.empty(1, adapter_len, hidden_size, device=weight.device, dtype=dtype).normal_()
        )
        self.adaption_gate = nn.Parameter(torch.zeros(1, device=weight.device, dtype=dtype))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def forward(self, *args: Any, **kwargs: Any):
        output, *rest = self.base_layer(*args, **kwargs)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if self.fused:
            update = self.fused_prompt_attention(hidden)
        else:
            position = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
            update = self.prompt_attention(hidden, position)
        return (output + update).to(output.dtype), *rest

    def prompt_attention(
        self, hidden: torch.Tensor, position: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """``W_o · (g · softmax(q Kᵀ/√d) V)`` for hidden states (B, T, h): (B, T, h)."""
        attention = self.base_layer
        batch, length, _ = hidden.shape
        head_dim = attention.head_dim
        query = attention.q_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)  # (B, H, T, d)
        cos, sin = (t.unsqueeze(1) for t in position)
        query = query * cos + rotate_half(query) * sin
        prompt = self.adaption_prompt.to(hidden.dtype)  # (1, n, h)
        n = prompt.shape[1]
        keys = attention.k_proj(prompt).view(1, n, -1, head_dim).transpose(1, 2)  # (1, Hkv, n, d)
        values = attention.v_proj(prompt).view(1, n, -1, head_dim).transpose(1, 2)
        return attention.o_proj(self.gated_mix(query, keys, values).to(hidden.dtype))

    def fused_prompt_attention(self, hidden: torch.Tensor) -> torch.Tensor:
        """GPT-2: ``g · softmax(q Kᵀ/√d) V`` with q, K, V from the fused c_attn (biases included), no
        output projection (peft's AdaptedAttentionGPT)."""
        attention, width = self.base_layer, hidden.shape[-1]
        batch, length, _ = hidden.shape
        head_dim = attention.head_dim
        query = attention.c_attn(hidden).split(width, dim=2)[0]
        query = query.view(batch, length, -1, head_dim).transpose(1, 2)  # (B, H, T, d)
        prompt = self.adaption_prompt.to(hidden.dtype)  # (1, n, h)
        _, keys, values = attention.c_attn(prompt).split(width, dim=2)
        keys = keys.view(1, prompt.shape[1], -1, head_dim).transpose(1, 2)  # (1, H, n, d)
        values = values.view(1, prompt.shape[1], -1, head_dim).transpose(1, 2)
        return self.gated_mix(query, keys, values).to(hidden.dtype)

    def gated_mix(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``g · softmax(q Kᵀ/√d) V``: queries (B, H, T, d) over the prompt's keys and values
        (1, Hkv, n, d), each key/value head serving its group of query heads; (B, T, H·d)."""
        batch, _, length, head_dim = query.shape
        group = query.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        scores = query @ keys.transpose(2, 3) / math.sqrt(head_dim)  # (B, H, T, n)
        weights = self.adaption_gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return (weights @ values.to(weights.dtype)).transpose(1, 2).reshape(batch, length, -1)


@register
class AdaptionPrompt(LayerMethod):
    name = "adaption_prompt"
    description = "Adaption prompt (LLaMA-Adapter): gated zero-init prompts in the top layers' attention (arXiv 2303.16199)"
    config_cls = AdaptionPromptConfig
    mergeable = False
    merge = Method.merge  # a second attention branch has no weight to fold into (peft cannot either)
    peft_type = "ADAPTION_PROMPT"
    supports_packing = True  # every token attends to the same prompts and nothing else new
    supports_quantized_base = True  # the frozen 4-bit projections run on the prompt; it stays fp32
    trainable_formula = "adapter_layers · (adapter_len · hidden_size + 1)"
    parameter_prefix = "adaption_"
    layer_types = (AdaptedAttention,)

    cfg: AdaptionPromptConfig

    @classmethod
    def validate_config(cls, cfg: AdaptionPromptConfig, recipe) -> None:
        if recipe.model.task != "causal_lm":
            raise RecipeError(
                "model.task",
                f"adaption_prompt adapts decoder-only causal LMs (llama, mistral), not {recipe.model.task}",
                "use lora or prompt_tuning for this task",
            )

    def resolve_targets(self, model: nn.Module) -> list[str]:
        """The attention modules of the top ``adapter_layers`` decoder layers, as peft picks them."""
        found = [n for n, _ in model.named_modules() if n.endswith(f".{self.attention_name(model)}")]
        wanted = self.cfg.adapter_layers or len(found)
        if wanted > len(found):
            raise RecipeError(
                "method.adapter_layers",
                f"is {wanted} but {type(model).__name__} has {len(found)} layers",
                f"use 1 … {len(found)}",
            )
        return found[-wanted:]

    @staticmethod
    def attention_name(model: nn.Module) -> str:
        """The family's attention module name (FAMILIES), or one line saying the family is not one."""
        family = getattr(model.config, "model_type", None)
        if family not in FAMILIES:
            raise RecipeError(
                "method.name",
                f"adaption_prompt supports the llama, mistral and gpt2 families (as peft), not {family}",
                "use prefix_tuning (prompts in every layer) or lora for this model",
            )
        return FAMILIES[family]

    def create_layer(self, name: str, base: nn.Module) -> AdaptedAttention:
        fused = hasattr(base, "c_attn")  # GPT-2
        return AdaptedAttention(base, self.cfg.adapter_len, base.config.hidden_size, fused)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        hidden = model.config.hidden_size
        return len(self.targets) * (self.cfg.adapter_len * hidden + 1) + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        """peft's three keys: the length, the resolved layer count, and the attention's name."""
        return {
            "adapter_len": self.cfg.adapter_len,
            "adapter_layers": len(self.targets),
            "target_modules": self.attention_name(model),
        }


__all__ = ["AdaptedAttention", "AdaptionPrompt", "AdaptionPromptConfig"]
