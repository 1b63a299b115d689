"""Ladder side-tuning, LST (Sung, Cho and Bansal, 2022, arXiv 2206.06522).

The frozen backbone runs once under ``torch.no_grad()``: no autograd graph is built through it, no
activation of it is kept for backward, and no gradient ever reaches it. A small *side network* of
width ``d_s = d / reduction_factor`` climbs beside it like a ladder, reading the backbone's hidden
states through learned down-projections and gates::

    s_0 = D_0 h_0                                          h_i: backbone hidden state after layer i
    z_i = μ_i · D_i h_i + (1 − μ_i) · s_{i−1},  μ_i = sigmoid(α_i / T)          (i = 1 … L)
    s_i = z_i + W2_i σ(W1_i LN_i(z_i))                     side block i, width d_s
    h'_L = h_L + U LN_f(s_L)                               what the head reads

``D_i ∈ R^{d_s×d}`` (with bias), ``α_i`` scalars at 0 (μ = 0.5) and temperature ``T`` as in the paper.
The up-projection ``U ∈ R^{d×d_s}`` (and its bias) starts at zero, so step 0 equals the base; the head
(the LM head, or the pooler + new classifier of a seq_cls model) reads ``h'_L``, i.e. the side
network's output upsampled to the head's width and added to the backbone's last hidden state. Only the
head's small input activation is kept for backward besides the side network's own.

Deviation from the paper, on purpose: the side blocks are position-wise feed-forward blocks (no
self-attention), and are initialised at random rather than by pruning the backbone. Token mixing comes
from the backbone's hidden states, which already attend over the sequence; being position-wise, the side
network needs no KV cache, so greedy generation with the backbone's cache stays exact.

Placement: the method replaces the model's body (``model.model`` for llama/qwen2, ``model.transformer``
for gpt2, ``model.bert`` for bert, i.e. ``getattr(model, model.base_model_prefix)``) by a
:class:`LadderSideBody` holding the frozen ``backbone`` and the ``side`` network; a body with a pooler
(BERT) has its pooler re-run on ``h'_L``. Saved tensors: ``base_model.model.<body>.side.*`` (and a
seq_cls head). ``adapter_config.json`` carries no ``peft_type``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from peftcli.inject import classifier_heads, make_trainable_copies, set_module
from peftcli.methods.bottleneck import NONLINEARITIES, hidden_size_of
from peftcli.methods.registry import Method, register
from peftcli.recipe import MethodConfig, RecipeError, doc


@dataclass
class LadderConfig(MethodConfig):
    reduction_factor: int = field(
        default=8, metadata=doc("side width d_s = hidden_size / reduction_factor (paper: 8)", min=1)
    )
    gate_temperature: float = field(
        default=0.1, metadata=doc("T in the gates μ_i = sigmoid(α_i / T) (paper: 0.1)", min_exclusive=0.0)
    )
    ffn_multiplier: int = field(default=4, metadata=doc("side block FFN width = ffn_multiplier · d_s", min=1))
    nonlinearity: Literal["relu", "gelu", "swish", "tanh"] = field(
        default="gelu", metadata=doc("σ in the side blocks")
    )


class SideBlock(nn.Module):
    """``z + W2 σ(W1 LN(z))`` at the side width."""

    def __init__(self, width: int, ffn_width: int, nonlinearity: str):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, ffn_width)
        self.act = NONLINEARITIES[nonlinearity]()
        self.fc2 = nn.Linear(ffn_width, width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: (B, T, d_s) -> (B, T, d_s)
        return z + self.fc2(self.act(self.fc1(self.norm(z))))


class SideNetwork(nn.Module):
    def __init__(self, hidden_size: int, num_layers: int, cfg: LadderConfig):
        super().__init__()
        width = max(1, hidden_size // cfg.reduction_factor)
        self.hidden_size, self.width, self.num_layers = hidden_size, width, num_layers
        self.temperature = cfg.gate_temperature
        self.downsamplers = nn.ModuleList(nn.Linear(hidden_size, width) for _ in range(num_layers + 1))
        self.gates = nn.Parameter(torch.zeros(num_layers))  # α_i = 0: μ_i = 0.5, half backbone, half ladder
        self.blocks = nn.ModuleList(
            SideBlock(width, cfg.ffn_multiplier * width, cfg.nonlinearity) for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(width)
        self.upsample = nn.Linear(width, hidden_size)
        nn.init.zeros_(self.upsample.weight)  # U = 0: h'_L = h_L at step 0, the base's output
        nn.init.zeros_(self.upsample.bias)

    def forward(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # hidden_states: L+1 tensors (B, T, d), detached -> (B, T, d), the delta on h_L
        dtype = self.upsample.weight.dtype
        s = self.downsamplers[0](hidden_states[0].to(dtype))  # (B, T, d_s)
        mu = torch.sigmoid(self.gates / self.temperature)  # (L,)
        for i in range(self.num_layers):
            z = mu[i] * self.downsamplers[i + 1](hidden_states[i + 1].to(dtype)) + (1 - mu[i]) * s
            s = self.blocks[i](z)
        return self.upsample(self.final_norm(s))

    def parameter_count(self) -> int:
        d, w, n = self.hidden_size, self.width, self.num_layers
        f = self.blocks[0].fc1.out_features if n else 0
        per_block = 2 * w + (w * f + f) + (f * w + w)
        return (n + 1) * (d * w + w) + n + n * per_block + 2 * w + (w * d + d)


class LadderSideBody(nn.Module):
    """The frozen body run under ``no_grad``, and the side network that corrects its last hidden state."""

    def __init__(self, backbone: nn.Module, side: SideNetwork):
        super().__init__()
        self.backbone = backbone
        self.side = side

    def forward(self, *args, **kwargs):
        wants_hidden = kwargs.pop("output_hidden_states", None)
        with torch.no_grad():  # no graph through the backbone: its activations are freed as it goes
            out = self.backbone(*args, output_hidden_states=True, **kwargs)
        hidden = out.hidden_states
        if len(hidden) != self.side.num_layers + 1:
            raise RuntimeError(f"expected {self.side.num_layers + 1} hidden states, got {len(hidden)}")
        last = out.last_hidden_state
        out.last_hidden_state = last + self.side(hidden).to(last.dtype)
        pooler = getattr(self.backbone, "pooler", None)
        if pooler is not None and getattr(out, "pooler_output", None) is not None:
            out.pooler_output = pooler(out.last_hidden_state)  # BERT pools the corrected sequence
        if not wants_hidden:
            out.hidden_states = None
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # embed_tokens, config, get_input_embeddings, ...: the backbone's
            return getattr(super().__getattr__("backbone"), name)


@register
class LadderSideTuning(Method):
    name = "ladder_side_tuning"
    description = (
        "Ladder side-tuning: a small gated side network, no backprop through the backbone (arXiv 2206.06522)"
    )
    config_cls = LadderConfig
    trainable_formula = (
        "(L+1)·(d·d_s + d_s) downsamplers + L gates + L side blocks (2·d_s + 2·f·d_s + f + d_s) "
        "+ 2·d_s + d_s·d + d upsample (d_s = d / reduction_factor, f = ffn_multiplier·d_s), plus a seq_cls head"
    )

    parameter_prefix = "side"  # the side network: saved as base_model.model.<body>.side.*

    cfg: LadderConfig

    def __init__(self, cfg: LadderConfig, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.body_name = ""

    def apply(self, model: nn.Module) -> nn.Module:
        self.body_name = getattr(model, "base_model_prefix", "")
        body = getattr(model, self.body_name, None) if self.body_name else None
        if body is None or body is model:
            raise RecipeError(
                "model.task",
                f"ladder_side_tuning needs a model with a head over a body; {type(model).__name__} has none",
                "use a causal_lm or seq_cls model",
            )
        num_layers = getattr(model.config, "num_hidden_layers", None) or getattr(
            model.config, "n_layer", None
        )
        if not num_layers:
            raise RecipeError(
                "model.name", "cannot tell the number of layers", "the config needs num_hidden_layers"
            )
        device = next(model.parameters()).device
        side = SideNetwork(hidden_size_of(model), int(num_layers), self.cfg).to(device)
        set_module(model, self.body_name, LadderSideBody(body, side))
        self.saved_modules = make_trainable_copies(model, classifier_heads(model, self.task))
        return model

    def side_network(self, model: nn.Module) -> SideNetwork:
        return model.get_submodule(self.body_name).side

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        return self.side_network(model).parameter_count() + self.saved_modules_count(model)

    def owns(self, parameter_name: str) -> bool:
        return parameter_name.startswith(f"{self.body_name}.side.")


__all__ = ["LadderConfig", "LadderSideBody", "LadderSideTuning", "SideNetwork"]
