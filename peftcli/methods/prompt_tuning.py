"""Prompt tuning (Lester, Al-Rfou & Constant, 2021, arXiv 2104.08691).

``n`` trainable vectors ``P ∈ R^{n×h}`` are prepended to the (frozen) input embeddings and the model
runs unchanged on the longer sequence::

    y = f([P; E(x)])          only P trains; the virtual positions carry no loss

Init (the paper's Sec. 3): ``random`` (N(0, 1), nn.Embedding's and peft's default), ``sample_vocab``
(the embeddings of tokens drawn from the ``sample_vocab_top_k`` first ids, a proxy for the paper's
"5,000 most common tokens": BPE vocabularies are ordered by merge rank), or ``text`` (the embeddings
of ``init_text``, or of the label names for classification, repeated or cut to ``n``). The paper finds
random init clearly worst for small models, hence ``sample_vocab`` by default.

Saved as peft's PROMPT_TUNING: ``prompt_embeddings`` [n · num_transformer_submodules, h].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from peftcli.methods.registry import register
from peftcli.methods.soft_prompt import (
    PromptedModel,
    SoftPromptConfig,
    SoftPromptMethod,
    load_base_tokenizer,
    repeat_to,
    sample_init_ids,
    special_ids,
)
from peftcli.recipe import RecipeError, doc

PEFT_INIT = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}


@dataclass
class PromptTuningConfig(SoftPromptConfig):
    init: Literal["random", "sample_vocab", "text"] = field(
        default="sample_vocab",
        metadata=doc("prompt init: random (N(0,1)), sample_vocab (embeddings of common tokens) or text"),
    )
    init_text: str = field(
        default="",
        metadata=doc(
            "init: text — the text whose embeddings start the prompt (default for seq_cls: the label names)"
        ),
    )
    sample_vocab_top_k: int = field(
        default=5000,
        metadata=doc("init: sample_vocab — draw from the first K token ids (the paper: 5000)", min=1),
    )


class PromptEmbedding(nn.Module):
    """The prompt itself: ``embedding.weight`` (n, h), consumed as is."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.embedding = nn.Embedding(rows.shape[0], rows.shape[1], _weight=rows.clone())
        self.num_virtual_tokens = rows.shape[0]

    def forward(self) -> torch.Tensor:
        return self.embedding.weight  # (n, h)


def init_rows(
    model: nn.Module, n: int, init: str, text: str, top_k: int, task: str, key: str
) -> torch.Tensor:
    """(n, h) starting rows from the frozen input embeddings (or N(0, 1))."""
    embeddings = model.get_input_embeddings()
    hidden = embeddings.weight.shape[1]
    if init == "random":
        return torch.randn(n, hidden)
    tokenizer = load_base_tokenizer(model, key)
    if init == "sample_vocab":
        ids = sample_init_ids(n, embeddings.weight.shape[0], top_k, special_ids(tokenizer))
    else:
        if not text and task == "seq_cls":  # the paper's "class label" init
            text = " ".join(model.config.id2label[i] for i in range(model.config.num_labels))
        token_ids = [t for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
        if not token_ids:
            raise RecipeError(
                "method.init_text",
                "init: text needs a non-empty init_text",
                "set method.init_text, or use init: sample_vocab",
            )
        ids = torch.tensor(repeat_to(token_ids, n))
    with torch.no_grad():
        return embeddings(ids.to(embeddings.weight.device)).detach().float().cpu()


@register
class PromptTuning(SoftPromptMethod):
    name = "prompt_tuning"
    description = "Prompt tuning: n trainable embeddings prepended to the input (arXiv 2104.08691)"
    config_cls = PromptTuningConfig
    peft_type = "PROMPT_TUNING"
    trainable_formula = "num_virtual_tokens · hidden_size"
    prompt_kind = "input"

    cfg: PromptTuningConfig

    @classmethod
    def validate_config(cls, cfg: PromptTuningConfig, recipe) -> None:
        if cfg.init == "text" and not cfg.init_text and recipe.model.task != "seq_cls":
            raise RecipeError(
                "method.init_text",
                "init: text needs init_text for this task",
                "set method.init_text (e.g. a task description), or use init: sample_vocab",
            )

    def build_prompt(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        rows = init_rows(
            model,
            cfg.num_virtual_tokens,
            cfg.init,
            cfg.init_text,
            cfg.sample_vocab_top_k,
            self.task,
            "method.init",
        )
        return PromptEmbedding(rows).to(model.get_input_embeddings().weight.device)

    def fixed_prompt(self, rows: torch.Tensor, model: PromptedModel) -> nn.Module:
        return PromptEmbedding(rows)

    def load_transferred_rows(self, model: PromptedModel, rows: torch.Tensor) -> None:
        with torch.no_grad():
            model.input_prompt.embedding.weight.copy_(rows)

    def prompt_parameter_count(self, model: PromptedModel) -> int:
        return self.cfg.num_virtual_tokens * model.get_input_embeddings().weight.shape[1]

    def method_adapter_config(self, model: PromptedModel) -> dict[str, Any]:
        return {
            "prompt_tuning_init": PEFT_INIT[self.cfg.init],
            "prompt_tuning_init_text": self.cfg.init_text or None,
            "tokenizer_name_or_path": model.name_or_path or None,
        }

    @classmethod
    def config_from_adapter(cls, adapter_config: dict[str, Any]) -> PromptTuningConfig:
        # The stored prompt replaces the init, so a peft adapter reloads with the cheapest one.
        return PromptTuningConfig(
            name=cls.name, num_virtual_tokens=int(adapter_config["num_virtual_tokens"]), init="random"
        )
