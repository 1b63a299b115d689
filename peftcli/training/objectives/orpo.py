"""ORPO (Hong et al., 2024), no reference: the token-weighted SFT loss on the chosen answers,
Σ(−logp_c) / Σ(tokens of c + 1), minus β·mean logσ(lo(avg_c) − lo(avg_r)) with the log-odds
lo(a) = a − log(1 − eᵃ)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftcli.training.objectives.base import Objective, PairScores


def log_odds(avg: torch.Tensor) -> torch.Tensor:
    return avg - torch.log1p(-torch.exp(avg))


class Orpo(Objective):
    name = "orpo"

    def odds_ratio(self, s: PairScores) -> torch.Tensor:
        """logσ of the log odds ratio of each pair (B,)."""
        return F.logsigmoid(log_odds(s.avg_chosen) - log_odds(s.avg_rejected))

    def losses(self, s: PairScores) -> torch.Tensor:
        """The odds-ratio term alone, per pair (the SFT term is token-weighted over the window)."""
        return -self.beta * self.odds_ratio(s)

    def window_loss(self, s: PairScores, counts: dict[str, int]) -> torch.Tensor:
        sft = -s.chosen.sum() / counts["chosen_tokens"]
        return sft + self.losses(s).sum() / counts["pairs"]

    def rewards(self, s: PairScores) -> tuple[torch.Tensor, torch.Tensor]:
        return self.beta * s.avg_chosen, self.beta * s.avg_rejected
