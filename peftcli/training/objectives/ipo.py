"""IPO (Azar et al., 2023): mean ((avg_c − avgref_c) − (avg_r − avgref_r) − 1/(2β))², on per-token
average log-probs (as TRL computes it)."""

from __future__ import annotations

import torch

from peftcli.training.objectives.base import Objective, PairScores


class Ipo(Objective):
    name = "ipo"
    needs_reference = True

    def losses(self, s: PairScores) -> torch.Tensor:
        ref_c, ref_r = s.ref_chosen / s.chosen_count, s.ref_rejected / s.rejected_count
        logits = (s.avg_chosen - ref_c) - (s.avg_rejected - ref_r)
        return (logits - 1 / (2 * self.beta)) ** 2

    def rewards(self, s: PairScores) -> tuple[torch.Tensor, torch.Tensor]:
        ref_c, ref_r = s.ref_chosen / s.chosen_count, s.ref_rejected / s.rejected_count
        return self.beta * (s.avg_chosen - ref_c), self.beta * (s.avg_rejected - ref_r)
