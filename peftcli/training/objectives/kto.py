"""KTO (Ethayarajh et al., 2024), on unpaired examples (prompt, completion, desirable or not), as TRL's
KTOTrainer computes it (loss_type kto). With r = logp − logref of an example's completion and z the
batch's KL estimate,

    desirable:    w_d · (1 − σ(β·(r − z)))        undesirable:  w_u · (1 − σ(β·(z − r)))

and the loss is the mean over the examples. z is estimated from mismatched pairs of the same batch:
example i's prompt with example i−1's completion (collate_unpaired builds those rows), z =
max(0, mean(logp − logref) over them), with no gradient through it (the paper and TRL detach it).

Under torchrun each rank holds a slice of the micro-batch, and N ranks compute what one process does:
the loop gives each rank's KL rows the completions of the examples before its own in the whole
micro-batch (the previous rank's last one included), and z is the mean over every rank's KL rows (their
sums and counts all-reduced). TRL instead rotates completions within each device's batch and averages
the devices' means, which equals one process only when every device holds as many examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftcli.training.objectives.base import Objective, sequence_logps, stand_in

__all__ = ["Kto", "KtoScores"]

MODEL_KEYS = ("input_ids", "attention_mask", "labels")


@dataclass
class KtoScores:
    """Per example (B,): the policy's and the reference's summed log-probs of its completion, its
    scored positions, its label, and the batch's KL estimate z (the same value for every row of a batch,
    so the scores of several eval batches concatenate)."""

    logps: torch.Tensor
    counts: torch.Tensor
    desirable: torch.Tensor
    ref: torch.Tensor
    kl: torch.Tensor

    def detached(self) -> KtoScores:
        return KtoScores(*(t.detach() for t in self.__dict__.values()))

    @staticmethod
    def cat(parts: list[KtoScores]) -> KtoScores:
        return KtoScores(*(torch.cat([getattr(p, n) for p in parts]) for n in parts[0].__dict__))


def rows(batch: dict[str, torch.Tensor], part: slice) -> dict[str, torch.Tensor]:
    return {k: batch[k][part] for k in MODEL_KEYS}


class Kto(Objective):
    name = "kto"
    data_format = "unpaired_preference"
    needs_reference = True

    def score(self, policy, batch: dict[str, torch.Tensor], across_ranks: bool = False) -> KtoScores:
        """The examples' log-probs with gradients, the KL rows' without (z is detached), and the
        reference's over all 2B rows in one forward. ``across_ranks`` (training under torchrun): z over
        the KL rows of every rank's slice of the micro-batch (eval: each rank scores all of it)."""
        half = batch["input_ids"].size(0) // 2
        logps, counts = sequence_logps(policy, rows(batch, slice(0, half)))
        with torch.no_grad():
            kl_logps, _ = sequence_logps(policy, rows(batch, slice(half, None)))
            with self.reference():
                ref, _ = sequence_logps(
                    policy if self.reference_model is None else self.reference_model, rows(batch, slice(None))
                )
        terms = kl_logps - ref[half:]
        kl = self.ranks_mean(terms, stand_in(batch)) if across_ranks else terms.mean()
        desirable = batch["desirable"].to(logps.device).bool()
        return KtoScores(logps, counts, desirable, ref[:half], kl.clamp(min=0).expand(half))

    def ranks_mean(self, terms: torch.Tensor, stand_in_batch: bool) -> torch.Tensor:
        """The mean of the KL terms of every rank's slice (a stand-in slice counts none); one process:
        their mean."""
        if not self.dist.enabled:
            return terms.mean()
        total, count = self.dist.sum_floats(
            [0.0, 0.0] if stand_in_batch else [float(terms.sum()), terms.numel()]
        )
        return torch.tensor(total / count, dtype=terms.dtype, device=terms.device)

    def micro_loss(self, policy, batch: dict[str, torch.Tensor], counts: dict) -> torch.Tensor:
        scores = self.score(policy, batch, across_ranks=True)
        if stand_in(batch):  # zero gradients through the graph: it counts for nothing
            return scores.logps.sum() * 0.0
        return self.window_loss(scores, counts)

    def losses(self, s: KtoScores) -> torch.Tensor:
        ratio = s.logps - s.ref
        desirable = self.cfg.desirable_weight * (1 - torch.sigmoid(self.beta * (ratio - s.kl)))
        undesirable = self.cfg.undesirable_weight * (1 - torch.sigmoid(self.beta * (s.kl - ratio)))
        return torch.where(s.desirable, desirable, undesirable)

    def rewards(self, s: KtoScores) -> tuple[torch.Tensor, torch.Tensor]:
        """β·(logp − logref) of the desirable examples and of the undesirable ones (sizes differ)."""
        reward = self.beta * (s.logps - s.ref)
        return reward[s.desirable], reward[~s.desirable]

    def metrics(self, s: KtoScores) -> dict[str, float]:
        """KTO has no pairs: rewards/chosen and rewards/rejected are the mean rewards of the desirable and
        the undesirable examples, margins their difference, and accuracy the share of examples whose
        reward has their label's sign (positive when desirable); kl the mean of the batches' z."""
        chosen, rejected = self.rewards(s)
        reward = self.beta * (s.logps - s.ref)
        mean = lambda t: float(t.mean()) if t.numel() else 0.0  # noqa: E731
        right = torch.where(s.desirable, reward > 0, reward < 0)
        return {
            "eval_loss": float(self.losses(s).mean()),
            "rewards/chosen": mean(chosen),
            "rewards/rejected": mean(rejected),
            "rewards/margins": mean(chosen) - mean(rejected),
            "rewards/accuracy": float(right.float().mean()),
            "kl": float(s.kl.mean()),
            "eval_examples": s.logps.numel(),
        }
