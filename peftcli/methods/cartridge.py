"""Cartridge (Eyuboglu et al., 2025, "Cartridges: Lightweight and general-purpose long context
representations via self-study", arXiv 2506.06266): a trained KV cache.

A cartridge *is* the key/value cache of ``n`` virtual tokens in every attention layer, trained directly
(no MLP reparameterisation, unlike prefix tuning), which every real token attends to::

    head_l(x) = softmax(q [Z_k^l; K]^T / √d) [Z_v^l; V]        Z^l = [Z_frozen^l; Z_train^l] ∈ R^{n×kv dim}

What sets it apart from P-tuning v2 (the same deep prompt) is what the paper found makes a KV cache
train stably (Sec. 4 and App.):

- **a frozen attention sink.** The first ``num_frozen_tokens`` virtual tokens (default 1) never train:
  models park attention on the first position, and moving it hurts (peft's ``num_frozen_tokens``);
- **initialisation from a real cache.** ``init: text`` prefills the frozen base on a document
  (``init_text`` or the file ``init_text_file``; through the tokenizer's chat template as a system
  message when ``init_chat_template``, as peft's ``initialize_kv_prefix_from_text`` does) and takes the
  keys/values of its first ``n`` tokens: the paper's best init ("first tokens of the corpus"), clearly
  ahead of random vectors. ``init: random`` draws N(0, 1) (peft's ``get_peft_model`` default).

Saved as peft's CARTRIDGE: ``prompt_embeddings`` [n, L·2·kv_heads·head_dim] (frozen rows first), and
``num_frozen_tokens`` in ``adapter_config.json``; GQA models store ``kv_heads`` heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from peftcli.methods.prefix_tuning import DeepPrompts, kv_cache_rows
from peftcli.methods.registry import register
from peftcli.methods.soft_prompt import (
    PrefixGeometry,
    PromptedModel,
    SoftPromptConfig,
    SoftPromptMethod,
    load_base_tokenizer,
    prefix_geometry,
    rows_to_key_values,
)
from peftcli.recipe import RecipeError, doc


@dataclass
class CartridgeConfig(SoftPromptConfig):
    num_frozen_tokens: int = field(
        default=1,
        metadata=doc("the first virtual tokens kept frozen (the attention sink; the paper freezes 1)", min=0),
    )
    init: Literal["random", "text"] = field(
        default="random",
        metadata=doc(
            "cache init: random (N(0,1)) or text (the base's KV cache of a document's first tokens)"
        ),
    )
    init_text: str = field(
        default="", metadata=doc("init: text — the document whose KV cache starts the cartridge")
    )
    init_text_file: str | None = field(
        default=None, metadata=doc("init: text — read the document from this file instead of init_text")
    )
    init_chat_template: bool = field(
        default=True,
        metadata=doc(
            "init: text — wrap the document as a system message in the tokenizer's chat template "
            "(peft's default; plain tokens when the tokenizer has no template)"
        ),
    )


class CartridgeCache(nn.Module):
    """The cartridge: ``frozen`` rows (a buffer: never trained) then ``trainable`` rows, each
    (tokens, L·2·token_dim). ``forward()`` gives all ``n`` rows as peft stores them; ``key_values(B)``
    the per-layer ``(key, value)`` pairs :class:`PromptedModel` turns into the KV cache."""

    def __init__(self, rows: torch.Tensor, num_frozen: int, geometry: PrefixGeometry):
        super().__init__()
        self.num_virtual_tokens = rows.shape[0]
        self.geometry = geometry
        self.register_buffer("frozen", rows[:num_frozen].detach().clone())
        self.trainable = nn.Parameter(rows[num_frozen:].detach().clone())
        self.gate = None

    def forward(self) -> torch.Tensor:
        return torch.cat([self.frozen, self.trainable], dim=0)  # (n, L·2·token_dim)

    def key_values(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return rows_to_key_values(self(), self.geometry, batch_size)

    def start_from(self, rows: torch.Tensor) -> None:
        """Replace every row (SPoT transfer): the frozen ones too, as peft's ``load_prompt_embeddings``."""
        with torch.no_grad():
            self.frozen.copy_(rows[: self.frozen.shape[0]])
            self.trainable.copy_(rows[self.frozen.shape[0] :])


def document_text(cfg: CartridgeConfig) -> str:
    if not cfg.init_text_file:
        return cfg.init_text
    path = Path(cfg.init_text_file).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(
            "method.init_text_file",
            f"cannot read {path} ({type(err).__name__})",
            "point at a UTF-8 text file",
        ) from None


def document_ids(tokenizer, text: str, chat_template: bool) -> list[int]:
    """The document's tokens as peft's ``initialize_kv_prefix_from_text`` forms them: the chat template
    with the text as the system message, or (no template) the tokenizer's plain encoding."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        try:
            ids = tokenizer.apply_chat_template(
                [{"role": "system", "content": text}],
                tokenize=True,
                add_generation_prompt=False,
                return_dict=False,
            )
            return [int(i) for i in ids]
        except (TypeError, ValueError):
            pass  # a template that refuses a system message: plain tokens, as peft falls back
    return list(tokenizer(text)["input_ids"])


def text_rows(model: nn.Module, cfg: CartridgeConfig, geometry: PrefixGeometry) -> torch.Tensor:
    """The frozen base's keys/values of the document's first ``n`` tokens (causal: the rest cannot change
    them, so only those ``n`` are run)."""
    tokenizer = load_base_tokenizer(model, "method.init")
    ids = document_ids(tokenizer, document_text(cfg), cfg.init_chat_template)
    n = cfg.num_virtual_tokens
    if len(ids) < n:
        raise RecipeError(
            "method.init_text_file" if cfg.init_text_file else "method.init_text",
            f"init: text needs at least num_virtual_tokens = {n} tokens; the document has {len(ids)}",
            "use a longer document, fewer virtual tokens, or init: random",
        )
    return kv_cache_rows(model, ids[:n], geometry)


@register
class Cartridge(SoftPromptMethod):
    name = "cartridge"
    description = (
        "Cartridge: a trained KV cache with a frozen attention sink, init from a document (arXiv 2506.06266)"
    )
    config_cls = CartridgeConfig
    peft_type = "CARTRIDGE"
    prompt_kind = "prefix"
    trainable_formula = (
        "(num_virtual_tokens − num_frozen_tokens) · num_layers · 2 · kv_heads · head_dim; "
        "the adapter stores all num_virtual_tokens rows"
    )

    cfg: CartridgeConfig

    @classmethod
    def validate_config(cls, cfg: CartridgeConfig, recipe) -> None:
        if recipe.model.gradient_checkpointing:
            raise RecipeError(
                "model.gradient_checkpointing",
                "cartridge passes its cache as a KV cache, which transformers drops inside checkpointed layers",
                "set model.gradient_checkpointing: false",
            )
        if cfg.num_frozen_tokens >= cfg.num_virtual_tokens:
            raise RecipeError(
                "method.num_frozen_tokens",
                f"{cfg.num_frozen_tokens} frozen of {cfg.num_virtual_tokens} virtual tokens leaves nothing to train",
                "keep num_frozen_tokens below num_virtual_tokens (the paper: 1)",
            )
        if cfg.init == "text":
            cls.validate_text_init(cfg, recipe.model.task)

    @staticmethod
    def validate_text_init(cfg: CartridgeConfig, task: str) -> None:
        if task != "causal_lm":
            raise RecipeError(
                "method.init",
                "init: text reads the model's KV cache of a document, which only causal LMs return",
                "use init: random for seq_cls and seq2seq",
            )
        if not cfg.init_text and not cfg.init_text_file:
            raise RecipeError(
                "method.init_text",
                "init: text needs a document",
                "set method.init_text or method.init_text_file",
            )
        if cfg.init_text_file and not Path(cfg.init_text_file).expanduser().is_file():
            raise RecipeError(
                "method.init_text_file", f"{cfg.init_text_file} is not a file", "point at a UTF-8 text file"
            )

    def build_prompt(self, model: nn.Module) -> nn.Module:
        DeepPrompts.check_model(self, model)  # the same refusal: a model whose attention reads no cache
        cfg = self.cfg
        geometry = prefix_geometry(model.config, self.task)
        if cfg.init == "text":
            rows = text_rows(model, cfg, geometry)
        else:
            rows = torch.randn(cfg.num_virtual_tokens, geometry.row_size)
        device = model.get_input_embeddings().weight.device
        return CartridgeCache(rows, cfg.num_frozen_tokens, geometry).to(device)

    def fixed_prompt(self, rows: torch.Tensor, model: PromptedModel) -> nn.Module:
        return CartridgeCache(rows, self.cfg.num_frozen_tokens, prefix_geometry(model.config, self.task))

    def load_transferred_rows(self, model: PromptedModel, rows: torch.Tensor) -> None:
        model.prefix.start_from(rows)

    def prompt_parameter_count(self, model: PromptedModel) -> int:
        geometry = prefix_geometry(model.config, self.task)
        return (self.cfg.num_virtual_tokens - self.cfg.num_frozen_tokens) * geometry.row_size

    def on_save(self, model: nn.Module) -> None:
        # The saved cache replaces the init: a reload must need neither the document nor its file.
        super().on_save(model)
        if self.cfg.init != "random":
            self.cfg = replace(self.cfg, init="random", init_text="", init_text_file=None)

    def method_adapter_config(self, model: PromptedModel) -> dict[str, Any]:
        return {"num_frozen_tokens": self.cfg.num_frozen_tokens}

    @classmethod
    def config_from_adapter(cls, adapter_config: dict[str, Any]) -> CartridgeConfig:
        # The stored cache replaces the init, so a peft adapter reloads with the cheapest one.
        return CartridgeConfig(
            name=cls.name,
            num_virtual_tokens=int(adapter_config["num_virtual_tokens"]),
            num_frozen_tokens=int(adapter_config.get("num_frozen_tokens") or 0),
        )


__all__ = ["Cartridge", "CartridgeCache", "CartridgeConfig"]
