"""UniPELT (Mao et al., 2022, arXiv 2110.07577): LoRA, prefix tuning and a bottleneck adapter, each
behind a learned gate, trained together.

With ``σ`` the logistic function::

    LoRA on W_q, W_v:     h = W0 x + G_L(x) · (α/r) B A x,        G_L(x) = σ(w_L · x + b_L)   (per token)
    prefix tuning:        P_k^l, P_v^l ← G_P^l · P_k^l, G_P^l · P_v^l,   G_P^l = σ(g_l)      (per layer)
    adapter after FFN:    h ← h + G_A(h) · W_up σ(W_down h + b_down) + ...,  G_A(h) = σ(w_A · h + b_A)

The gates start at ``σ(0) = 0.5``; ``B`` and ``W_up`` start at zero, so LoRA and the adapter add nothing
at step 0 while the prefixes act from the start (not the identity at init).

Deviation from the paper: its prefix gate is computed from each layer's input, per token. A prefix is
handed to the model as a KV cache before the layers run, so here ``G_P`` is a learned scalar per layer
(the key/value rows are scaled, which is what the paper's gate multiplies too).

Composition, not copies: LoRA is :class:`peftcli.methods.lora.LoRA` (its ``LoRALinear`` modules are then
wrapped by :class:`GatedLoRA`), the prefixes are :class:`peftcli.methods.prefix_tuning.PrefixTuning`
(whose ``PrefixEncoder`` takes a ``gate``), and the adapter is
:class:`peftcli.methods.bottleneck.Bottleneck` placed after each FFN as ``houlsby_adapter`` places it.

Saved tensors: ``prompt_embeddings`` (prefix rows after the projection, ungated), ``prefix_gate.logits``
(the ``g_l``) and every other trainable tensor under ``base_model.model.<its name in the base model>``.
No ``peft_type``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from peftcli.inject import (
    PREFIX,
    QUERY_VALUE_NAMES,
    WrappedLayer,
    attention_projections,
    load_prefixed,
    set_module,
)
from peftcli.methods.bottleneck import Bottleneck, attach, block_of, bottleneck_width, find_sublayers
from peftcli.methods.lora import LoRA, LoraConfig, LoRALinear
from peftcli.methods.prefix_tuning import PrefixTuning, PrefixTuningConfig
from peftcli.methods.registry import Method, register
from peftcli.recipe import MethodConfig, Recipe, RecipeError, doc


@dataclass
class UniPeltConfig(MethodConfig):
    lora_r: int = field(default=8, metadata=doc("LoRA rank (paper: 8)", min=1))
    lora_alpha: float = field(
        default=16.0, metadata=doc("LoRA scale numerator (update × alpha/r)", min_exclusive=0.0)
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata=doc(
            "LoRA targets; default the attention's query and value projections (or its fused qkv layer), read from the model"
        ),
    )
    num_virtual_tokens: int = field(
        default=10, metadata=doc("prefix length in every attention layer (paper: 10)", min=1)
    )
    prefix_projection: bool = field(
        default=True, metadata=doc("train the prefixes through a tanh MLP (dropped at export)")
    )
    encoder_hidden_size: int | None = field(
        default=None, metadata=doc("prefix MLP width (default: hidden size)", min=1)
    )
    reduction_factor: float | None = field(
        default=None, metadata=doc("adapter width m = hidden_size / reduction_factor (default 16)", min=1.0)
    )
    bottleneck_size: int | None = field(default=None, metadata=doc("adapter width m directly", min=1))
    nonlinearity: Literal["relu", "gelu", "swish", "tanh"] = field(
        default="relu", metadata=doc("σ in the adapter")
    )


class GatedLoRA(WrappedLayer):
    """``W0 x + σ(w·x + b) · (α/r) B A x`` around a :class:`LoRALinear` (whose weights and init it uses)."""

    def __init__(self, lora: LoRALinear):
        super().__init__()
        self.lora = lora
        self.gate = nn.Linear(lora.in_features, 1)
        nn.init.zeros_(self.gate.weight)  # σ(0) = 0.5 for every token at step 0
        nn.init.zeros_(self.gate.bias)
        self.gate.to(lora.lora_A.weight)

    def get_base_layer(self) -> nn.Module:
        return self.lora.base_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.lora.base_layer(x)
        xf = x.to(self.lora.lora_A.weight.dtype)
        delta = (
            self.lora.lora_B(self.lora.lora_A(self.lora.lora_dropout(xf))) * self.lora.scaling
        )  # (B, T, out)
        return (result + torch.sigmoid(self.gate(xf)) * delta).to(result.dtype)


class GatedAdapter(nn.Module):
    """``h + σ(w·h + b) · bottleneck(h)`` on a sublayer output."""

    needs_input = False

    def __init__(self, hidden_size: int, bottleneck_size: int, nonlinearity: str):
        super().__init__()
        self.bottleneck = Bottleneck(hidden_size, bottleneck_size, nonlinearity)
        self.gate = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        # h: (B, T, d) -> (B, T, d)
        hf = h.to(self.gate.weight.dtype)
        return (hf + torch.sigmoid(self.gate(hf)) * self.bottleneck(hf)).to(h.dtype)


class PrefixGate(nn.Module):
    """One learned scalar per layer: the prefix keys/values of layer l are scaled by σ(g_l)."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_layers))  # σ(0) = 0.5

    def forward(self, layer: int) -> torch.Tensor:
        return torch.sigmoid(self.logits[layer])


def _gate_of(gate: PrefixGate, layer: int) -> torch.Tensor:
    return gate(layer)


def default_lora_targets(model: nn.Module) -> list[str]:
    """The attention's query and value projections (the paper's LoRA placement), read from the model's
    structure; a fused query-key-value layer where there is one."""
    found = attention_projections(model, QUERY_VALUE_NAMES)
    if found:
        return found
    raise RecipeError(
        "method.lora_target_modules",
        f"cannot find query/value projections in {type(model).__name__}",
        "name them, e.g. lora_target_modules: [q_proj, v_proj]",
    )


@register
class UniPelt(Method):
    name = "unipelt"
    supports_packing = False  # its prefixes are one KV cache per row, shared by packed examples
    description = (
        "UniPELT: gated LoRA + gated prefix tuning + gated adapter, trained together (arXiv 2110.07577)"
    )
    config_cls = UniPeltConfig
    identity_at_init = False  # the prefixes act from step 0
    trainable_formula = (
        "LoRA r·(in+out) + gate (in+1) per target; prefix_tuning's count + L gate scalars; "
        "per FFN 2·d·m + d + m + gate (d+1); plus a seq_cls head"
    )

    cfg: UniPeltConfig

    def __init__(self, cfg: UniPeltConfig, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.prefix = PrefixTuning(
            PrefixTuningConfig(
                name="prefix_tuning",
                num_virtual_tokens=cfg.num_virtual_tokens,
                prefix_projection=cfg.prefix_projection,
                encoder_hidden_size=cfg.encoder_hidden_size,
            ),
            task,
        )
        self.lora: LoRA | None = None
        self.sublayers = []

    @classmethod
    def validate_config(cls, cfg: UniPeltConfig, recipe: Recipe) -> None:
        if cfg.reduction_factor is not None and cfg.bottleneck_size is not None:
            raise RecipeError(
                "method.bottleneck_size",
                "set either reduction_factor or bottleneck_size, not both",
                "remove one of them",
            )
        PrefixTuning.validate_config(cls(cfg, recipe.model.task).prefix.cfg, recipe)

    def apply(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        targets = cfg.lora_target_modules or default_lora_targets(model)
        self.lora = LoRA(
            LoraConfig(name="lora", r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=targets), self.task
        )
        model = self.lora.apply(model)  # adds LoRALinear (B = 0) and a seq_cls head copy
        for name in self.lora.targets:
            set_module(model, name, GatedLoRA(model.get_submodule(name)))
        device = next(model.parameters()).device
        self.sublayers = find_sublayers(model, ("ffn",))
        for sub in self.sublayers:
            m = bottleneck_width(sub.hidden_size, cfg.reduction_factor, cfg.bottleneck_size)
            attach(model, sub, GatedAdapter(sub.hidden_size, m, cfg.nonlinearity).to(device))
        wrapped = self.prefix.apply(model)  # wraps the model; the head is copied (trainable) once more
        self.saved_modules = self.prefix.saved_modules  # the seq_cls head, named inside the base model
        wrapped.prefix_gate = PrefixGate(wrapped.config.num_hidden_layers).to(device)
        self._gate_prefix(wrapped)
        return wrapped

    def _gate_prefix(self, model: nn.Module) -> None:
        model.prefix.gate = partial(_gate_of, model.prefix_gate)  # partial: deepcopy rebinds it

    def gated_loras(self, model: nn.Module) -> list[GatedLoRA]:
        return [m for m in model.modules() if isinstance(m, GatedLoRA)]

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        lora = sum(
            g.lora.r * (g.lora.in_features + g.lora.out_features) + g.lora.in_features + 1
            for g in self.gated_loras(model)
        )
        adapters = 0
        for sub in self.sublayers:
            b = block_of(model.base_model, sub).bottleneck
            adapters += Bottleneck.parameter_count(b.hidden_size, b.bottleneck_size) + b.hidden_size + 1
        prefix = self.prefix.prompt_parameter_count(model) + model.config.num_hidden_layers
        return lora + adapters + prefix + self.saved_modules_count(model.base_model)

    def _base_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}{n}": p.detach() for n, p in model.base_model.named_parameters() if p.requires_grad}

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeddings": self.prefix.stored_rows(model),
            "prefix_gate.logits": model.prefix_gate.logits.detach(),
            **self._base_state(model),
        }

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        rows, gate = state.pop("prompt_embeddings", None), state.pop("prefix_gate.logits", None)
        if rows is None or gate is None:
            raise RecipeError(
                "adapter",
                "a unipelt adapter holds prompt_embeddings and prefix_gate.logits",
                "load it with the method that wrote it",
            )
        heads = {
            k.replace(PREFIX, "base_model.", 1): v
            for k, v in state.items()
            if any(k.startswith(f"{PREFIX}{m}.") for m in self.prefix.saved_modules)
        }
        self.prefix.load_adapter_state_dict(
            model, {"prompt_embeddings": rows, **heads}
        )  # replaces the prefix module
        self._gate_prefix(model)
        with torch.no_grad():
            model.prefix_gate.logits.copy_(gate)
        load_prefixed(model, state, self._base_state(model))

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        """The config's fields, the prefix geometry and the LoRA targets as matched."""
        prefix = self.prefix.adapter_config(model)
        return {
            **{k: prefix[k] for k in ("token_dim", "num_layers", "num_attention_heads")},
            **super().adapter_config(model),
            "lora_target_modules": list(self.lora.targets) if self.lora else None,
        }


__all__ = ["GatedAdapter", "GatedLoRA", "PrefixGate", "UniPelt", "UniPeltConfig"]
