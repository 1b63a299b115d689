"""SFT, the default: next-token cross-entropy, token-weighted over the accumulation window. Its loss is
peftcli.training.loss's (plain, chunked or fused); the Stepper runs that path itself when the run's
objective is sft, so SFT runs are exactly what they were before objectives existed."""

from __future__ import annotations

from typing import ClassVar

from peftcli.training.objectives.base import Objective


class Sft(Objective):
    name = "sft"
    data_format: ClassVar[str | None] = None  # text, completion, instruction, chat, sharegpt, classification
