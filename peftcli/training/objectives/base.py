"""What every objective shares: the per-sequence log-probabilities of a batch of preference pairs
(:func:`score_pairs`, one forward over chosen and rejected rows together, and one more with the
reference when the objective needs it) and the :class:`Objective` interface the Stepper calls.

Definitions (docs/objectives.md): logp(y) sums the log-probabilities of y's tokens and EOS after the
prompt; avg(y) = logp(y) / (tokens of y + 1), the number of scored positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftcli.recipe import ObjectiveConfig
from peftcli.training.distributed import Dist
from peftcli.training.loss import IGNORE_INDEX, shift_labels

__all__ = ["Objective", "PairScores", "pair_counts", "score_pairs", "sequence_logps", "stand_in"]


@dataclass
class PairScores:
    """Per pair (B,): the policy's summed log-probs of the chosen and rejected answers, their scored
    positions (tokens + EOS), and the reference's log-probs (None when the objective needs none)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_count: torch.Tensor
    rejected_count: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    @property
    def avg_chosen(self) -> torch.Tensor:
        return self.chosen / self.chosen_count

    @property
    def avg_rejected(self) -> torch.Tensor:
        return self.rejected / self.rejected_count

    def detached(self) -> PairScores:
        return PairScores(*(None if t is None else t.detach() for t in self.__dict__.values()))

    @staticmethod
    def cat(parts: list[PairScores]) -> PairScores:
        names = list(parts[0].__dict__)
        joined = {
            n: None if getattr(parts[0], n) is None else torch.cat([getattr(p, n) for p in parts])
            for n in names
        }
        return PairScores(**joined)


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's labelled tokens, their number), both (rows,): position t of the
    logits predicts label t+1; prompt and padding carry -100 and count for nothing."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = shift_labels(batch["labels"]).to(logits.device)  # (R, T)
    scored = labels != IGNORE_INDEX
    logits = logits.float()
    token_logps = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(
        logits, dim=-1
    )
    return (token_logps * scored).sum(-1), scored.sum(-1)


def score_pairs(
    policy: nn.Module,
    batch: dict[str, torch.Tensor],
    reference: Callable[[], contextlib.AbstractContextManager] | None = None,
    reference_model: nn.Module | None = None,
) -> PairScores:
    """The pairs of a collated preference batch (chosen rows first, then rejected: collate_pairs).
    With ``reference``, a second forward without gradients inside that context (the adapter off, or
    the start adapter swapped in) on ``reference_model`` (the unwrapped model) scores the reference."""
    logps, counts = sequence_logps(policy, batch)
    half = logps.size(0) // 2
    scores = PairScores(logps[:half], logps[half:], counts[:half], counts[half:])
    if reference is not None:
        with torch.no_grad(), reference():
            ref, _ = sequence_logps(reference_model if reference_model is not None else policy, batch)
        scores.ref_chosen, scores.ref_rejected = ref[:half], ref[half:]
    return scores


def stand_in(batch: dict[str, torch.Tensor]) -> bool:
    """A torchrun rank's stand-in micro-batch (Dist.mask_padding: every label ignored): it runs forward
    and backward to keep the ranks' collectives in step, and counts for nothing."""
    return not bool((batch["labels"] != IGNORE_INDEX).any())


def pair_counts(micro: list[dict[str, torch.Tensor]]) -> dict[str, int]:
    """A window's normalisers: its pairs, and the chosen answers' scored positions (ORPO's SFT term)."""
    pairs, chosen_tokens = 0, 0
    for batch in micro:
        if stand_in(batch):
            continue
        half = batch["labels"].size(0) // 2
        pairs += half
        chosen_tokens += int((shift_labels(batch["labels"][:half]) != IGNORE_INDEX).sum())
    return {"pairs": pairs, "chosen_tokens": chosen_tokens}


class Objective:
    """One training objective. Subclasses set the class attributes and write :meth:`losses` (per pair)
    and :meth:`rewards`; ORPO adds a token-weighted term through :meth:`window_loss`.

    ``data_format``: the data format it trains on (None: any SFT format). ``needs_reference``: whether
    it compares the policy with a frozen reference (a second forward, no gradients). ``dist``: the
    run's ranks (build_objective sets it), for what a micro-batch's loss needs from the other ranks
    (KTO's KL estimate, GRPO's rollout statistics) beyond the Stepper's summed normalisers."""

    name: ClassVar[str]
    data_format: ClassVar[str | None] = "preference"
    needs_reference: ClassVar[bool] = False
    task: ClassVar[str] = "causal_lm"  # the model head it trains (reward: seq_cls)
    samples: ClassVar[bool] = False  # grpo: the loop samples completions of the window's prompts first
    dist: Dist = Dist()  # one process unless build_objective is given the run's

    def __init__(
        self, cfg: ObjectiveConfig, reference: Callable[[], Any] | None = None, reference_model=None
    ):
        self.cfg, self.beta = cfg, cfg.beta
        self.reference, self.reference_model = reference, reference_model

    def losses(self, s: PairScores) -> torch.Tensor:
        """The loss of each pair (B,)."""
        raise NotImplementedError

    def rewards(self, s: PairScores) -> tuple[torch.Tensor, torch.Tensor]:
        """The implicit rewards of the chosen and rejected answers (B,) each, as TRL logs them."""
        raise NotImplementedError

    @classmethod
    def wants_reference(cls, cfg: ObjectiveConfig) -> bool:
        """Whether this run compares with a reference (grpo: only with a KL term)."""
        return cls.needs_reference

    def window_counts(self, micro: list[dict[str, torch.Tensor]]) -> dict[str, int]:
        """The window's normalisers, before summing over ranks (pairs, chosen tokens): ints, or lists of
        ints (one per micro-batch). micro_loss gets them summed, with ``micro``: the micro-batch's index."""
        return pair_counts(micro)

    def window_loss(self, s: PairScores, counts: dict[str, int]) -> torch.Tensor:
        """This micro-batch's share of the window's loss: its pairs' losses over the window's pairs."""
        return self.losses(s).sum() / counts["pairs"]

    def score(self, policy: nn.Module, batch: dict[str, torch.Tensor]) -> PairScores:
        """The pairs' scores that :meth:`losses` and :meth:`rewards` read (log-probs; reward: the head's).
        A batch carrying ``reference`` (objective.precompute_reference) skips the reference forward."""
        if self.needs_reference and "reference" in batch:
            scores = score_pairs(policy, batch)
            ref = batch["reference"].to(scores.chosen.device)
            half = ref.size(0) // 2
            scores.ref_chosen, scores.ref_rejected = ref[:half], ref[half:]
            return scores
        reference = self.reference if self.needs_reference else None
        return score_pairs(policy, batch, reference, self.reference_model)

    def micro_loss(
        self, policy: nn.Module, batch: dict[str, torch.Tensor], counts: dict[str, int]
    ) -> torch.Tensor:
        scores = self.score(policy, batch)
        if stand_in(batch):  # zero gradients through the graph (its averages are 0/0: not the loss)
            return scores.chosen.sum() * 0.0
        return self.window_loss(scores, counts)

    def metrics(self, s: PairScores) -> dict[str, float]:
        """The eval metrics over ``s`` (all pairs of the eval split): the loss as training computes it over
        one window of them, the mean rewards, their margin, and the share of pairs with a positive margin."""
        chosen, rejected = self.rewards(s)
        margins = chosen - rejected
        counts = {"pairs": s.chosen.numel(), "chosen_tokens": int(s.chosen_count.sum())}
        return {
            "eval_loss": float(self.window_loss(s, counts)),
            "rewards/chosen": float(chosen.mean()),
            "rewards/rejected": float(rejected.mean()),
            "rewards/margins": float(margins.mean()),
            "rewards/accuracy": float((margins > 0).float().mean()),
            "eval_examples": s.chosen.numel(),
        }
