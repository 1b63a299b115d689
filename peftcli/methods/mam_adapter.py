"""Mix-and-match (MAM) adapter (He et al., 2022, "Towards a Unified View of Parameter-Efficient
Transfer Learning", arXiv 2110.04366, Sec. 4.6).

Prefix tuning on every attention layer plus a scaled parallel adapter beside every FFN, trained
together::

    head_l(x) = softmax(q [P_k^l; K]^T / √d) [P_v^l; V]                  (prefix tuning, n virtual tokens)
    h_ffn     = FFN(x) + s · (W_up ReLU(W_down x + b_down) + b_up)        (parallel adapter, s = 4)

Composition, not copies: the prefix is :class:`peftcli.methods.prefix_tuning.PrefixTuning` (which wraps
the model in a ``PromptedModel``) and the FFN adapter is
:class:`peftcli.methods.parallel_adapter.ParallelAdapter` applied to the wrapped base model. The paper's
setting is 30 prefix tokens and an FFN bottleneck of 512 with ``s = 4``. Not the identity at step 0:
the prefixes act from the start (the adapter's ``W_up`` starts at zero).

Saved tensors: ``prompt_embeddings`` (the prefixes after the projection, as prefix tuning stores them)
and ``base_model.model.<ffn>.adapter.{down,up}.*`` (and a seq_cls head). No ``peft_type``: peft cannot
load the mix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from peftcli.inject import PREFIX
from peftcli.methods.parallel_adapter import ParallelAdapter, ParallelAdapterConfig
from peftcli.methods.prefix_tuning import PrefixTuning, PrefixTuningConfig
from peftcli.methods.registry import Method, register
from peftcli.recipe import MethodConfig, Recipe, RecipeError, doc


@dataclass
class MamConfig(MethodConfig):
    num_virtual_tokens: int = field(
        default=30, metadata=doc("prefix length n in every attention layer (paper: 30)", min=1)
    )
    prefix_projection: bool = field(
        default=True, metadata=doc("train the prefixes through a tanh MLP (dropped at export)")
    )
    encoder_hidden_size: int | None = field(
        default=None, metadata=doc("prefix MLP width (default: hidden size)", min=1)
    )
    reduction_factor: float | None = field(
        default=None,
        metadata=doc("FFN adapter width m = hidden_size / reduction_factor (default 16)", min=1.0),
    )
    bottleneck_size: int | None = field(
        default=None, metadata=doc("FFN adapter width m directly (paper: 512)", min=1)
    )
    scaling: float = field(
        default=4.0, metadata=doc("s, the FFN adapter's output scale (paper: 4)", min_exclusive=0.0)
    )
    nonlinearity: Literal["relu", "gelu", "swish", "tanh"] = field(
        default="relu", metadata=doc("σ in the FFN adapter")
    )


def prefix_config(cfg: MamConfig) -> PrefixTuningConfig:
    return PrefixTuningConfig(
        name="prefix_tuning",
        num_virtual_tokens=cfg.num_virtual_tokens,
        prefix_projection=cfg.prefix_projection,
        encoder_hidden_size=cfg.encoder_hidden_size,
    )


def adapter_config(cfg: MamConfig) -> ParallelAdapterConfig:
    return ParallelAdapterConfig(
        name="parallel_adapter",
        positions=["ffn"],
        reduction_factor=cfg.reduction_factor,
        bottleneck_size=cfg.bottleneck_size,
        scaling=cfg.scaling,
        nonlinearity=cfg.nonlinearity,
    )


@register
class MamAdapter(Method):
    name = "mam_adapter"
    supports_packing = False  # its prefixes are one KV cache per row, shared by packed examples
    description = (
        "MAM adapter: prefix tuning on attention + scaled parallel adapter on the FFN (arXiv 2110.04366)"
    )
    config_cls = MamConfig
    identity_at_init = False  # the prefixes change the outputs from step 0
    trainable_formula = "prefix_tuning's count + parallel_adapter's count on the FFNs (+ one seq_cls head)"

    cfg: MamConfig

    def __init__(self, cfg: MamConfig, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.prefix = PrefixTuning(prefix_config(cfg), task)
        self.adapter = ParallelAdapter(adapter_config(cfg), task)

    @classmethod
    def validate_config(cls, cfg: MamConfig, recipe: Recipe) -> None:
        if cfg.reduction_factor is not None and cfg.bottleneck_size is not None:
            raise RecipeError(
                "method.bottleneck_size",
                "set either reduction_factor or bottleneck_size, not both",
                "remove one of them",
            )
        PrefixTuning.validate_config(prefix_config(cfg), recipe)

    def apply(self, model: nn.Module) -> nn.Module:
        wrapped = self.prefix.apply(model)  # PromptedModel: the prefix encoder lives beside base_model
        self.adapter.apply(wrapped.base_model)  # only adds: the FFN adapters and (again) the head copy
        self.saved_modules = self.adapter.saved_modules  # named inside the base model, as the adapter's
        return wrapped

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        return self.prefix.prompt_parameter_count(model) + self.adapter.expected_trainable_parameters(
            model.base_model
        )

    # -- saving: prefix rows + adapter tensors (+ the head once, in the adapter's naming) -------------
    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeddings": self.prefix.stored_rows(model),
            **self.adapter.adapter_state_dict(model.base_model),
        }

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        rows = state.pop("prompt_embeddings", None)
        if rows is None:
            raise RecipeError(
                "adapter",
                "a mam_adapter adapter holds prompt_embeddings; it is missing",
                "load it with the method that wrote it",
            )
        head_state = {
            key.replace(PREFIX, "base_model.", 1): value
            for key, value in state.items()
            if any(key.startswith(f"{PREFIX}{m}.") for m in self.prefix.saved_modules)
        }
        self.prefix.load_adapter_state_dict(model, {"prompt_embeddings": rows, **head_state})
        self.adapter.load_adapter_state_dict(model.base_model, state)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        """The config's fields, the prefix geometry peft's prefix tuning writes, and the FFN adapter's."""
        prefix = self.prefix.adapter_config(model)
        return {
            **{k: prefix[k] for k in ("token_dim", "num_layers", "num_attention_heads")},
            **super().adapter_config(model),
            **self.adapter.adapter_config(model.base_model),
        }


__all__ = ["MamAdapter", "MamConfig"]
