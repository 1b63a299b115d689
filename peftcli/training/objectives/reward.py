"""Reward model (Bradley–Terry): a one-output sequence-classification head on the base scores each
prompt + answer, r = the head's output at the last real token (transformers' sequence classification
finds it through ``pad_token_id``), and the loss is mean −logσ(r_c − r_r). No reference; the head trains
whole and is saved as ``modules_to_save`` (peft's format, as TRL's RewardTrainer with a LoRA config)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.training.objectives.base import Objective, PairScores


def pair_rewards(model: nn.Module, batch: dict[str, torch.Tensor]) -> PairScores:
    """The rewards of a collated pair batch (chosen rows first): the head's one output per row, as
    ``chosen``/``rejected``; each pair counts once (its counts are 1)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rewards = logits.float().squeeze(-1)  # (2B,)
    half = rewards.size(0) // 2
    ones = torch.ones(half, device=rewards.device)
    return PairScores(rewards[:half], rewards[half:], ones, ones)


class Reward(Objective):
    name = "reward"
    task: ClassVar[str] = "seq_cls"

    def score(self, policy: nn.Module, batch: dict[str, torch.Tensor]) -> PairScores:
        return pair_rewards(policy, batch)

    def losses(self, s: PairScores) -> torch.Tensor:
        return -F.logsigmoid(s.chosen - s.rejected)

    def rewards(self, s: PairScores) -> tuple[torch.Tensor, torch.Tensor]:
        return s.chosen, s.rejected
