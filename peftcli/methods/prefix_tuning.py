"""Prefix tuning (Li & Liang, 2021, arXiv 2101.00190) and P-tuning v2 (Liu et al., 2022, arXiv 2110.07602).

Every attention layer ``l`` gets ``n`` trainable key and value vectors in front of the real ones::

    head_l(x) = softmax(q [P_k^l; K]^T / √d) [P_v^l; V]

**Prefix tuning** reparameterises the prefixes through an MLP for stable training (Sec. 4.3), on by
default (``prefix_projection``)::

    [P_k^1, P_v^1, …, P_k^L, P_v^L] = W_2 tanh(W_1 E + b_1) + b_2        E ∈ R^{n×token_dim}

**P-tuning v2** is the same deep prompt without the reparameterisation: the prefixes are the
parameters. Both are saved as peft's PREFIX_TUNING: ``prompt_embeddings`` [n, L·2·token_dim], the
prefixes *after* the projection (so the MLP is dropped at export and a reload replays fixed rows).

Init: ``random`` (N(0, 1) embeddings and default Linear init, as peft), or ``real_words`` (the paper's
finding that initialising from real words helps, Sec. 7.2): the keys and values the frozen model
computes for ``init_text`` at positions 0…n-1, exactly where the prefix sits. With the projection on,
the rows are a fixed offset and the MLP's last layer starts at zero, so step 0 reproduces them too.

For reuse (MAM adapter, UniPELT): :class:`PrefixEncoder` produces the per-layer ``(key, value)``
pairs, optionally scaled by ``gate(layer)``; :class:`~peftcli.methods.soft_prompt.PromptedModel`
turns them into the KV cache the base model reads (``prefix_cache``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from peftcli.methods.registry import register
from peftcli.methods.soft_prompt import (
    PrefixGeometry,
    PromptedModel,
    SoftPromptConfig,
    SoftPromptMethod,
    load_base_tokenizer,
    prefix_geometry,
    repeat_to,
    rows_to_key_values,
)
from peftcli.recipe import RecipeError, doc


@dataclass
class PTuningV2Config(SoftPromptConfig):
    init: Literal["random", "real_words"] = field(
        default="random", metadata=doc("prefix init: random, or real_words (the model's keys/values of init_text)")
    )
    init_text: str = field(default="", metadata=doc("init: real_words — the words whose activations start the prefix"))


@dataclass
class PrefixTuningConfig(PTuningV2Config):
    prefix_projection: bool = field(
        default=True, metadata=doc("reparameterise the prefixes through a 2-layer tanh MLP while training")
    )
    encoder_hidden_size: int | None = field(
        default=None, metadata=doc("width of the projection MLP (default: the model's hidden size)", min=1)
    )


class PrefixEncoder(nn.Module):
    """Trainable key/value prefixes for every attention layer.

    ``forward()`` returns the flattened rows (n, L·2·token_dim) that peft stores: row block ``2l`` is
    layer ``l``'s key, ``2l + 1`` its value (each ``kv_heads × head_dim``; see ``PrefixGeometry``).
    ``key_values(batch_size)`` returns per layer ``(key, value)``, each (B, kv_heads, n, head_dim),
    multiplied by ``gate(layer)`` when a gate is set (a scalar or anything broadcastable to that shape).
    """

    def __init__(self, num_virtual_tokens: int, geometry: PrefixGeometry, projection: bool = False,
                 encoder_hidden_size: int | None = None):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.geometry = geometry
        self.projection = projection
        if projection:
            width = encoder_hidden_size or geometry.token_dim
            self.embedding = nn.Embedding(num_virtual_tokens, geometry.token_dim)
            self.transform = nn.Sequential(nn.Linear(geometry.token_dim, width), nn.Tanh(),
                                           nn.Linear(width, geometry.row_size))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, geometry.row_size)
        self.register_buffer("offset", None)  # fixed rows added to the projection (real-word / SPoT init)
        self.gate: Callable[[int], torch.Tensor] | None = None

    def forward(self) -> torch.Tensor:
        rows = self.transform(self.embedding.weight) if self.projection else self.embedding.weight  # (n, L·2·token_dim)
        if self.offset is not None:
            rows = rows + self.offset
        return rows

    def key_values(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = rows_to_key_values(self(), self.geometry, batch_size)
        if self.gate is None:
            return pairs
        return [(k * self.gate(layer), v * self.gate(layer)) for layer, (k, v) in enumerate(pairs)]

    def start_from(self, rows: torch.Tensor) -> None:
        """Make ``forward()`` return exactly ``rows`` now, keeping every parameter trainable."""
        with torch.no_grad():
            if self.projection:
                last = self.transform[-1]
                nn.init.zeros_(last.weight)  # the MLP adds 0 at step 0 and learns from there
                nn.init.zeros_(last.bias)
                self.offset = rows.detach().clone().to(last.weight)
            else:
                self.embedding.weight.copy_(rows)

    def trainable_count(self) -> int:
        g, n = self.geometry, self.num_virtual_tokens
        if not self.projection:
            return n * g.row_size
        width = self.transform[0].out_features
        return n * g.token_dim + (g.token_dim * width + width) + (width * g.row_size + g.row_size)


def real_word_rows(model: nn.Module, n: int, text: str, geometry: PrefixGeometry) -> torch.Tensor:
    """The frozen causal LM's keys and values of ``text`` (repeated or cut to n tokens) as prefix rows."""
    tokenizer = load_base_tokenizer(model, "method.init_text")
    ids = repeat_to(tokenizer(text, add_special_tokens=False)["input_ids"], n)
    if not ids:
        raise RecipeError("method.init_text", "init: real_words needs a non-empty init_text",
                          "set method.init_text to words that describe the task")
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([ids], device=device), use_cache=True).past_key_values
    blocks = []
    for layer in range(geometry.num_layers):
        cached = cache.layers[layer]
        blocks += [cached.keys[0], cached.values[0]]  # each (H, n, d)
    rows = torch.stack(blocks).permute(2, 0, 1, 3)  # (n, 2L, H, d)
    return rows.reshape(n, geometry.row_size).float()


@register
class PTuningV2(SoftPromptMethod):
    name = "p_tuning_v2"
    description = "P-tuning v2: trainable key/value prompts in every layer, no reparameterisation (arXiv 2110.07602)"
    config_cls = PTuningV2Config
    peft_type = "PREFIX_TUNING"
    trainable_formula = "num_virtual_tokens · num_layers · 2 · kv_heads · head_dim"
    prompt_kind = "prefix"

    cfg: PTuningV2Config

    @property
    def projection(self) -> bool:
        return bool(getattr(self.cfg, "prefix_projection", False))

    @classmethod
    def validate_config(cls, cfg: PTuningV2Config, recipe) -> None:
        if recipe.model.gradient_checkpointing:
            raise RecipeError("model.gradient_checkpointing", f"{cls.name} passes its prefixes as a KV cache, "
                              "which transformers drops inside checkpointed layers",
                              "set model.gradient_checkpointing: false, or use prompt_tuning / p_tuning")
        if cfg.init == "real_words":
            if recipe.model.task != "causal_lm":
                raise RecipeError("method.init", "init: real_words reads the model's KV cache, which only causal LMs "
                                  "return for their inputs", "use init: random for seq_cls and seq2seq")
            if not cfg.init_text:
                raise RecipeError("method.init_text", "init: real_words needs init_text",
                                  "set method.init_text to words that describe the task")

    def build_prompt(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        geometry = prefix_geometry(model.config, self.task)
        encoder = PrefixEncoder(cfg.num_virtual_tokens, geometry, self.projection,
                                getattr(cfg, "encoder_hidden_size", None) or model.get_input_embeddings().weight.shape[1])
        encoder.to(model.get_input_embeddings().weight.device)
        if cfg.init == "real_words":
            encoder.start_from(real_word_rows(model, cfg.num_virtual_tokens, cfg.init_text, geometry))
        return encoder

    def fixed_prompt(self, rows: torch.Tensor, model: PromptedModel) -> nn.Module:
        encoder = PrefixEncoder(rows.shape[0], prefix_geometry(model.config, self.task), projection=False)
        encoder.start_from(rows)
        return encoder

    def load_transferred_rows(self, model: PromptedModel, rows: torch.Tensor) -> None:
        model.prefix.start_from(rows)

    def prompt_parameter_count(self, model: PromptedModel) -> int:
        return model.prefix.trainable_count()

    def method_adapter_config(self, model: PromptedModel) -> dict[str, Any]:
        hidden = getattr(self.cfg, "encoder_hidden_size", None) or model.get_input_embeddings().weight.shape[1]
        return {"prefix_projection": self.projection, "encoder_hidden_size": hidden}

    @classmethod
    def config_from_adapter(cls, adapter_config: dict[str, Any]) -> PTuningV2Config:
        return cls.config_cls(name=cls.name, num_virtual_tokens=int(adapter_config["num_virtual_tokens"]))


@register
class PrefixTuning(PTuningV2):
    name = "prefix_tuning"
    description = "Prefix tuning: trainable key/value prefixes in every layer, MLP-reparameterised (arXiv 2101.00190)"
    config_cls = PrefixTuningConfig
    trainable_formula = ("with prefix_projection: n·t + t·e+e + e·(L·2·t)+L·2·t, else n·L·2·t "
                         "(t = kv_heads·head_dim, e = encoder_hidden_size, L layers); export keeps n·L·2·t")

    cfg: PrefixTuningConfig
