"""SimPO (Meng et al., 2024): mean −logσ(β·(avg_c − avg_r) − γ), no reference. γ is ``gamma``, or
``gamma_beta_ratio`` × β (TRL's CPOTrainer with loss_type simpo, simpo_gamma γ, cpo_alpha 0)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftcli.training.objectives.base import Objective, PairScores


class Simpo(Objective):
    name = "simpo"

    def losses(self, s: PairScores) -> torch.Tensor:
        return -F.logsigmoid(self.beta * (s.avg_chosen - s.avg_rejected) - self.cfg.simpo_gamma())

    def rewards(self, s: PairScores) -> tuple[torch.Tensor, torch.Tensor]:
        return self.beta * s.avg_chosen, self.beta * s.avg_rejected
