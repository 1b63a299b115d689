"""GRPO (Shao et al., 2024, DeepSeekMath), with TRL 1.16 GRPOTrainer's defaults: G completions sampled
per prompt (:mod:`~peftcli.training.objectives.rollout`), rewarded (``objective.rewards``), and

* the group-normalised advantage Â_i = (r_i − mean(r_group)) / (std(r_group) + 1e-4), the std unbiased
  (``scale_rewards: group``; ``batch`` takes the window's std, ``none`` does not divide);
* the clipped objective per completion token t: −min(ρ_t·Â, clip(ρ_t, 1 − ε, 1 + ε_high)·Â) with
  ρ_t = π(y_t)/π_old(y_t). One update per rollout (TRL's num_iterations 1): π_old is the policy that
  sampled, so ρ_t = 1 in value while its gradient is ∇log π(y_t);
* with ``kl_coef`` β > 0, + β·ρ_t·(e^{ref − logp} − (ref − logp) − 1) per token (the k3 estimator,
  times the ratio as TRL's default use_bias_correction_kl has it: 1 in value, it makes the gradient the
  unbiased reverse-KL one), the reference being the adapter switched off (``reference: base``) or as the
  run started (``start``);
* averaged by ``loss_type``: dapo (TRL's default) over the window's completion tokens; grpo per
  sequence, then over sequences; bnpo over each micro-batch's tokens; dr_grpo over rows × max_new_tokens
  (the last three over the window's micro-batches too, as TRL scales for gradient accumulation).

Under torchrun every normaliser is the whole (global) micro-batch's or window's, summed over ranks, and
the rollout's advantages and statistics are computed over every rank's completions (rollout.py), so N
ranks compute what one process does. (TRL's DDP averages per-device means instead.)

log π scores logits / temperature, the distribution that sampled (as TRL does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from peftcli.recipe import ObjectiveConfig
from peftcli.training.loss import IGNORE_INDEX, shift_labels
from peftcli.training.objectives.base import Objective, stand_in
from peftcli.training.objectives.rewards import build_rewards

__all__ = ["Grpo", "group_advantages", "summed_rewards", "token_logps", "unbiased_std"]

STD_EPS = 1e-4  # TRL's: Â = (r − mean) / (std + 1e-4)


def unbiased_std(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The NaN-ignoring standard deviation with Bessel's correction (TRL's nanstd); NaN for one value."""
    dims = dim if dim is not None else tuple(range(values.dim()))
    mean = torch.nanmean(values, dim=dims, keepdim=True)
    count = (~values.isnan()).sum(dim=dims, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dims, keepdim=True) * count / (count - 1)
    variance = torch.where(count > 1, variance, torch.full_like(variance, math.nan))
    return variance.sqrt().squeeze(dims) if dim is not None else variance.sqrt().reshape(())


def summed_rewards(per_reward: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, K) rewards → (N,) weighted sums, a NaN (unscored) reward counting 0; NaN where none scored."""
    total = (per_reward * weights).nansum(dim=1)
    return torch.where(per_reward.isnan().all(dim=1), torch.full_like(total, math.nan), total)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """(N,) rewards, consecutive groups of ``group_size`` → (N,) advantages; an unscored completion's is 0."""
    groups = rewards.view(-1, group_size)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(group_size)
    if scale == "group":
        std = unbiased_std(groups, dim=1).repeat_interleave(group_size)
    else:
        std = unbiased_std(rewards).expand_as(rewards)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def token_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(y_t) of every labelled token at logits / temperature, its mask), both (R, T): position t
    predicts label t+1; the prompt and padding carry -100."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = shift_labels(batch["labels"]).to(logits.device)  # (R, T)
    logits = logits.float() / temperature
    picked = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    mask = (labels != IGNORE_INDEX).float()
    return (picked - torch.logsumexp(logits, dim=-1)) * mask, mask


class Grpo(Objective):
    name = "grpo"
    data_format: ClassVar[str | None] = "prompt"
    samples: ClassVar[bool] = True  # the loop rolls out completions of the window's prompts first

    def __init__(
        self, cfg: ObjectiveConfig, reference: Callable[[], Any] | None = None, reference_model=None
    ):
        super().__init__(cfg, reference, reference_model)
        self.rewards = build_rewards(cfg.rewards)
        self.epsilon_low = cfg.epsilon
        self.epsilon_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
        self.logged: dict[str, list[float]] = {}  # this rank's token-weighted sums, until the loop takes them
        self.rollout_stats: dict[str, float] = {}  # this step's reward statistics (over every rank's)

    @classmethod
    def wants_reference(cls, cfg: ObjectiveConfig) -> bool:
        return cfg.kl_coef > 0

    @property
    def kl_coef(self) -> float:
        return self.cfg.kl_coef

    def window_counts(self, micro: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """dapo's normaliser: the window's completion tokens; grpo's and dr_grpo's: each micro-batch's
        completions (rows), bnpo's: each micro-batch's tokens (a torchrun stand-in counts none)."""
        tokens = [int((shift_labels(b["labels"]) != IGNORE_INDEX).sum()) for b in micro]
        rows = [0 if stand_in(b) else b["labels"].size(0) for b in micro]
        return {"tokens": sum(tokens), "micro_tokens": tokens, "rows": rows}

    def per_token_losses(
        self, logps: torch.Tensor, advantages: torch.Tensor, ref_logps: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The clipped surrogate (+ β·k3 KL) of every token (R, T), and the KL alone (None at β = 0)."""
        advantages = advantages.unsqueeze(1)  # (R, 1)
        ratio = torch.exp(logps - logps.detach())  # π/π_old: 1, with the gradient of log π
        clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
        losses = -torch.min(ratio * advantages, clipped * advantages)
        if ref_logps is None:
            return losses, None
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        return losses + self.kl_coef * kl * ratio, kl  # × ρ: TRL's use_bias_correction_kl (default)

    def aggregate(self, losses: torch.Tensor, mask: torch.Tensor, counts: dict[str, Any]) -> torch.Tensor:
        """This micro-batch's share of the window's loss, as ``loss_type`` averages (TRL's four), over the
        whole micro-batch's rows or tokens (``counts``: summed over ranks; ``micro``: its index)."""
        kind, index, micro = self.cfg.loss_type, counts["micro"], len(counts["rows"])
        if kind == "dapo":
            return (losses * mask).sum() / counts["tokens"]
        if kind == "grpo":
            return (
                (losses * mask).sum(-1).div(mask.sum(-1).clamp(min=1.0)).sum() / counts["rows"][index] / micro
            )
        if kind == "bnpo":
            return (losses * mask).sum() / counts["micro_tokens"][index] / micro
        rows = counts["rows"][index]
        return (losses * mask).sum() / (rows * self.cfg.max_new_tokens) / micro  # dr_grpo

    def micro_loss(
        self, policy: nn.Module, batch: dict[str, torch.Tensor], counts: dict[str, int]
    ) -> torch.Tensor:
        logps, mask = token_logps(policy, batch, self.cfg.temperature)
        ref_logps = None
        if self.kl_coef > 0:
            with torch.no_grad(), self.reference():
                ref_logps, _ = token_logps(self.reference_model, batch, self.cfg.temperature)
        losses, kl = self.per_token_losses(logps, batch["advantages"].to(logps.device), ref_logps)
        if kl is not None:
            self.log("kl", float((kl.detach() * mask).sum()), float(mask.sum()))
        return self.aggregate(losses, mask, counts)

    def log(self, key: str, total: float, count: float) -> None:
        """Add to a token-weighted metric of this step (kl: over the window's completion tokens)."""
        sums = self.logged.setdefault(key, [0.0, 0.0])
        sums[0], sums[1] = sums[0] + total, sums[1] + count

    def record_rollout(self, stats: dict[str, float]) -> None:
        """The rollout's reward statistics for this step (rollout.py computes them over the window)."""
        self.rollout_stats = dict(stats)

    def step_metrics(self) -> dict[str, float]:
        """This step's metrics (reward mean/std, each reward's mean, completion length, KL: its sums over
        every rank's tokens, so every rank calls this once per step); then cleared."""
        keys = sorted(self.logged)
        sums = self.dist.sum_floats([x for key in keys for x in self.logged[key]])
        measured = {k: sums[2 * i] / sums[2 * i + 1] for i, k in enumerate(keys) if sums[2 * i + 1]}
        metrics = self.rollout_stats | measured
        self.logged, self.rollout_stats = {}, {}
        return metrics
