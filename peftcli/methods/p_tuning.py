"""P-tuning (Liu et al., 2021, "GPT Understands, Too", arXiv 2103.10385).

Like prompt tuning, ``n`` virtual token embeddings are prepended to the input, but they are produced
by a small trainable *prompt encoder* from free embeddings ``e_1 … e_n`` (the paper's fix for discrete,
poorly associated prompt vectors)::

    h_1 … h_n = head(e_1 … e_n)       y = f([h_1 … h_n; E(x)])
    head = lstm: MLP(BiLSTM(e))       (Linear 2e→2e, ReLU, Linear 2e→h; the paper's choice)
    head = mlp:  Linear h→e, ReLU, Linear e→e, ReLU, Linear e→h

The encoder only serves training: the adapter stores its output ``h`` (peft's P_TUNING
``prompt_embeddings`` [n · num_transformer_submodules, h]), so inference needs no encoder. A reloaded
adapter therefore replays fixed embeddings; resume training from the run's checkpoint instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from peftcli.methods.prompt_tuning import PromptEmbedding
from peftcli.methods.registry import register
from peftcli.methods.soft_prompt import PromptedModel, SoftPromptConfig, SoftPromptMethod
from peftcli.recipe import RecipeError, doc


@dataclass
class PTuningConfig(SoftPromptConfig):
    encoder: Literal["mlp", "lstm"] = field(
        default="mlp",
        metadata=doc("prompt encoder: mlp (3 layers) or lstm (bidirectional LSTM + 2-layer MLP)"),
    )
    encoder_hidden_size: int | None = field(
        default=None, metadata=doc("width of the prompt encoder (default: the model's hidden size)", min=1)
    )
    encoder_num_layers: int = field(default=2, metadata=doc("LSTM layers (lstm encoder only)", min=1))
    encoder_dropout: float = field(
        default=0.0, metadata=doc("dropout between LSTM layers", min=0.0, max=0.99)
    )


class PromptEncoder(nn.Module):
    """``embedding`` (n, h) through ``lstm_head`` + ``mlp_head`` or ``mlp_head`` alone -> (n, h)."""

    def __init__(
        self, n: int, hidden: int, encoder: str, encoder_hidden: int, num_layers: int, dropout: float
    ):
        super().__init__()
        self.num_virtual_tokens = n
        self.encoder = encoder
        self.embedding = nn.Embedding(n, hidden)  # N(0, 1), as in the paper's code and peft
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(
                hidden,
                encoder_hidden,
                num_layers=num_layers,
                dropout=dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * encoder_hidden, 2 * encoder_hidden),
                nn.ReLU(),
                nn.Linear(2 * encoder_hidden, hidden),
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(hidden, encoder_hidden),
                nn.ReLU(),
                nn.Linear(encoder_hidden, encoder_hidden),
                nn.ReLU(),
                nn.Linear(encoder_hidden, hidden),
            )

    def forward(self) -> torch.Tensor:
        e = self.embedding.weight.unsqueeze(0)  # (1, n, h)
        if self.encoder == "lstm":
            e = self.lstm_head(e)[0]  # (1, n, 2e)
        return self.mlp_head(e)[0]  # (n, h)


def lstm_parameters(input_size: int, hidden: int, layers: int) -> int:
    """Bidirectional nn.LSTM: per direction and layer 4 gates of (W_ih, W_hh, b_ih, b_hh)."""
    total = 0
    for layer in range(layers):
        width = input_size if layer == 0 else 2 * hidden
        total += 2 * 4 * hidden * (width + hidden + 2)
    return total


@register
class PTuning(SoftPromptMethod):
    name = "p_tuning"
    description = "P-tuning: virtual tokens from a trainable LSTM/MLP prompt encoder (arXiv 2103.10385)"
    config_cls = PTuningConfig
    peft_type = "P_TUNING"
    trainable_formula = (
        "n·h + encoder: mlp h·e+e + e·e+e + e·h+h; lstm BiLSTM(h→e) + 2e·2e+2e + 2e·h+h "
        "(h hidden size, e encoder_hidden_size); export keeps only the n·h output"
    )
    prompt_kind = "input"

    cfg: PTuningConfig

    @classmethod
    def validate_config(cls, cfg: PTuningConfig, recipe) -> None:
        if cfg.init_from:
            raise RecipeError(
                "method.init_from",
                "p_tuning starts its encoder from scratch, so a transferred "
                "prompt could not be reproduced at step 0",
                "use prompt_tuning for prompt transfer (a P-tuning adapter's stored prompt works as source)",
            )

    def _encoder_hidden(self, model: nn.Module) -> int:
        return self.cfg.encoder_hidden_size or model.get_input_embeddings().weight.shape[1]

    def build_prompt(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        hidden = model.get_input_embeddings().weight.shape[1]
        encoder = PromptEncoder(
            cfg.num_virtual_tokens,
            hidden,
            cfg.encoder,
            self._encoder_hidden(model),
            cfg.encoder_num_layers,
            cfg.encoder_dropout,
        )
        return encoder.to(model.get_input_embeddings().weight.device)

    def fixed_prompt(self, rows: torch.Tensor, model: PromptedModel) -> nn.Module:
        return PromptEmbedding(rows)

    def prompt_parameter_count(self, model: PromptedModel) -> int:
        h, e, n = (
            model.get_input_embeddings().weight.shape[1],
            self._encoder_hidden(model),
            self.cfg.num_virtual_tokens,
        )
        if self.cfg.encoder == "lstm":
            return (
                n * h
                + lstm_parameters(h, e, self.cfg.encoder_num_layers)
                + (2 * e * 2 * e + 2 * e)
                + (2 * e * h + h)
            )
        return n * h + (h * e + e) + (e * e + e) + (e * h + h)

    def method_adapter_config(self, model: PromptedModel) -> dict[str, Any]:
        return {
            "encoder_reparameterization_type": self.cfg.encoder.upper(),
            "encoder_hidden_size": self._encoder_hidden(model.base_model),
            "encoder_num_layers": self.cfg.encoder_num_layers,
            "encoder_dropout": self.cfg.encoder_dropout,
        }

    @classmethod
    def config_from_adapter(cls, adapter_config: dict[str, Any]) -> PTuningConfig:
        return PTuningConfig(
            name=cls.name,
            num_virtual_tokens=int(adapter_config["num_virtual_tokens"]),
            encoder=str(adapter_config.get("encoder_reparameterization_type") or "MLP").lower(),
            encoder_hidden_size=adapter_config.get("encoder_hidden_size"),
            encoder_num_layers=int(adapter_config.get("encoder_num_layers") or 2),
            encoder_dropout=float(adapter_config.get("encoder_dropout") or 0.0),
        )
