"""DPO (Rafailov et al., 2023): mean −logσ(β·((logp_c − logref_c) − (logp_r − logref_r))); with
``label_smoothing`` ε (cDPO), each pair also counts with weight ε as if its labels were swapped."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftcli.training.objectives.base import Objective, PairScores


class Dpo(Objective):
    name = "dpo"
    needs_reference = True

    def losses(self, s: PairScores) -> torch.Tensor:
        logits = (s.chosen - s.ref_chosen) - (s.rejected - s.ref_rejected)
        smoothing = self.cfg.label_smoothing
        return (
            -F.logsigmoid(self.beta * logits) * (1 - smoothing)
            - F.logsigmoid(-self.beta * logits) * smoothing
        )

    def rewards(self, s: PairScores) -> tuple[torch.Tensor, torch.Tensor]:
        return self.beta * (s.chosen - s.ref_chosen), self.beta * (s.rejected - s.ref_rejected)
