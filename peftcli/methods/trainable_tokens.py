"""Trainable tokens: train a few rows of the embedding and nothing else (peft's ``TRAINABLE_TOKENS``).

A new chat-template token, or a token whose meaning must change, needs its embedding row trained; the
rest of the vocabulary should stay as it is. Training the whole matrix costs ``vocab · hidden`` numbers
(and their optimizer state) for a handful of rows. Here the rows ``I = token_indices`` of each targeted
embedding (or linear LM head) are replaced by a trainable copy ``D`` and the forward reads::

    W' = W  with  W'[I] = D          (D starts as W[I]: step 0 is the base model)

Only ``D`` trains and is saved (peft's ``trainable_tokens_delta``: the rows' new values, not a
difference). An LM head tied to the input embedding reads the same ``D``, so the tie holds; peft
writes the tied head's key too, and so do we. Merging writes ``D`` into ``W`` (exact); unmerging writes
the original rows back (kept as a buffer).

The layer is LoRA's ``trainable_token_indices`` one (:class:`peftcli.methods.lora_options.TrainableTokens`);
this method uses it alone, with peft's standalone key names (no ``token_adapter`` level).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftcli.inject import PREFIX, match_targets, set_module
from peftcli.methods.kit import LayerMethod
from peftcli.methods.lora_options import (
    TrainableTokens,
    check_rows,
    input_embedding_name,
    tied_module_names,
)
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc

ADAPTER_LEVEL = ".token_adapter."  # our layer keeps its rows one module down; peft's are on the layer
DELTA = "trainable_tokens_delta"


@dataclass
class TrainableTokensConfig(MethodConfig):
    """peft's ``TrainableTokensConfig`` fields."""

    token_indices: list[int] = field(
        default_factory=list,
        metadata=doc("ids of the tokens whose embedding rows train (e.g. new chat-template tokens)"),
    )
    target_modules: str | list[str] | None = field(
        default=None,
        metadata=doc(
            "the embedding(s) to train rows of: names (list) or a regex on full names; default: the "
            "model's input embedding (a tied LM head follows it)"
        ),
    )
    init_weights: bool = field(
        default=True,
        metadata=doc("start the rows at their current values (step 0 is the base); false: N(0, 1) rows"),
    )


def is_token_table(module: nn.Module) -> bool:
    """What a row can be trained in: an embedding, or a linear LM head (rows = output tokens)."""
    return isinstance(module, nn.Embedding | nn.Linear)


@register
class TrainableTokensMethod(LayerMethod):
    name = "trainable_tokens"
    description = (
        "Trainable tokens: train only the embedding rows of chosen token ids (peft TRAINABLE_TOKENS)"
    )
    config_cls = TrainableTokensConfig
    mergeable = True
    peft_type = "TRAINABLE_TOKENS"
    supports_quantized_base = True  # embeddings stay in full precision in a 4-bit base
    supports_packing = True  # a row lookup acts on each token alone
    trainable_formula = "len(token_indices) · embedding width, per targeted (untied) module"
    parameter_prefix = "trainable_tokens_"
    layer_types = (TrainableTokens,)

    cfg: TrainableTokensConfig

    def __init__(self, cfg: TrainableTokensConfig, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.tied_modules: list[str] = []  # modules reading the input embedding's rows

    @classmethod
    def validate_config(cls, cfg: TrainableTokensConfig, recipe) -> None:
        if not cfg.token_indices:
            raise RecipeError(
                "method.token_indices",
                "is empty, so nothing would train",
                "list the token ids to train, e.g. [32000, 32001] (tokenizer.convert_tokens_to_ids)",
            )

    # -- building ------------------------------------------------------------------------
    def resolve_targets(self, model: nn.Module) -> list[str]:
        targets = self.cfg.target_modules
        if targets is None:
            name = input_embedding_name(model)
            if name is None:
                raise RecipeError(
                    "method.target_modules",
                    f"{type(model).__name__} has no input embedding to train rows of",
                    "name the embedding module, e.g. [embed_tokens]",
                )
            return [name]
        return match_targets(model, targets, accept=is_token_table, what="embedding or linear head")

    def create_layer(self, name: str, base: nn.Module) -> TrainableTokens:
        indices = list(self.cfg.token_indices)
        check_rows(name, "method.token_indices", base, indices)
        layer = TrainableTokens(base, indices)
        if not self.cfg.init_weights:
            start_random(layer)
        return layer

    def wrap(self, model: nn.Module) -> None:
        """Each target gets its rows; a module tied to a targeted input embedding reads that embedding's
        rows instead (peft ties them whether or not the head was targeted too)."""
        embedding = input_embedding_name(model)
        tied = tied_module_names(model) if embedding in self.targets else []
        for name in [n for n in self.targets if n not in tied]:
            set_module(model, name, self.create_layer(name, model.get_submodule(name)))
        source = model.get_submodule(embedding).token_adapter if tied else None
        for name in tied:
            set_module(model, name, TrainableTokens(model.get_submodule(name), [], tied=source))
        self.tied_modules = tied

    def tied_layers(self, model: nn.Module) -> list[str]:
        return [n for n, m in self.layers(model) if m._tied]

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        owners = [m for _, m in self.layers(model) if not m._tied]
        rows = sum(len(m.adapter.indices) * m.weight.shape[1] for m in owners)
        return rows + self.saved_modules_count(model)

    # -- saving --------------------------------------------------------------------------
    def stored_key(self, parameter_name: str) -> str:
        """peft's key: ``base_model.model.<module>.trainable_tokens_delta``."""
        return PREFIX + parameter_name.replace(ADAPTER_LEVEL, ".")

    def live_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The rows under each owning module, and again under each tied module (peft writes both; a
        copy, as safetensors refuses one tensor under two keys: loading fills the owner, which they share)."""
        state = super().live_state_dict(model)
        for name in self.tied_layers(model):
            rows = model.get_submodule(name).adapter.trainable_tokens_delta
            state[f"{PREFIX}{name}.{DELTA}"] = rows.detach().clone()
        return state

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        """peft's keys; no ``modules_to_save`` (peft's TrainableTokensConfig has none and warns: a seq_cls
        head is saved all the same, and peft's sequence-classification model loads it)."""
        config = super().adapter_config(model)
        del config["modules_to_save"]
        return config


def start_random(layer: TrainableTokens) -> None:
    """peft's ``init_weights: false``: the rows start at N(0, 1), in the embedding's dtype."""
    rows = layer.token_adapter.trainable_tokens_delta
    with torch.no_grad():
        rows.copy_(torch.randn(rows.shape, dtype=rows.dtype, device=rows.device))


__all__ = ["TrainableTokensConfig", "TrainableTokensMethod", "is_token_table"]
