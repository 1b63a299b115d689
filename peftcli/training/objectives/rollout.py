"""GRPO's rollout: for every prompt of a window, G completions sampled with the policy through
:func:`peftcli.decoding.decode` (the KV cache, the method's own forward), rewarded, and collated into the
micro-batches the loss reads.

Sampling is a pure function of the run's seed, the optimizer step and the completion's row in the
window (one ``torch.Generator`` per row, :func:`peftcli.decoding.row_generator`), and of the weights:
a run resumed from a checkpoint samples at every later step what the uninterrupted run sampled. The
model samples in eval mode (no dropout) and the loop's train mode is restored after.

A completion is its tokens up to and including the first EOS, or ``max_new_tokens`` tokens when no EOS
came (truncated); its row is prompt + completion, right-padded, the completion's tokens labelled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from peftcli.data.collate import pad_token_id
from peftcli.data.formats import IGNORE_INDEX
from peftcli.decoding import Sampling, decode, eos_token_ids
from peftcli.training.objectives.grpo import Grpo, group_advantages, summed_rewards, unbiased_std
from peftcli.training.objectives.rewards import Completions

__all__ = ["completion_batch", "evaluate_greedy", "roll_out", "sampling_for"]

ROWS_PER_STEP = 1_000_003  # a window's completion rows stay below this: seeds never repeat across steps


def sampling_for(objective: Grpo, seed: int, step: int) -> Sampling:
    """The sampling of optimizer step ``step`` (0-based): its own seed, so every step draws afresh."""
    return Sampling(temperature=objective.cfg.temperature, seed=seed * ROWS_PER_STEP + step)


def roll_out(
    objective: Grpo,
    model: nn.Module,
    tokenizer,
    window: Sequence[list[dict]],
    step: int,
    seed: int,
    device: torch.device,
) -> list[dict[str, torch.Tensor]]:
    """The window's micro-batches of prompt rows → its micro-batches of scored completions (G per prompt,
    a prompt's group on consecutive rows), with ``advantages``; the reward statistics go to the objective."""
    group, sampling = objective.cfg.group_size, sampling_for(objective, seed, step)
    eos, pad = eos_token_ids(model, tokenizer), pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    sampled, first_row = [], 0
    try:
        for rows in window:
            prompts = [row["input_ids"] for row in rows for _ in range(group)]
            row_ids = list(range(first_row, first_row + len(prompts)))
            first_row += len(prompts)
            outputs = decode(
                model,
                prompts,
                objective.cfg.max_new_tokens,
                eos,
                pad,
                device,
                sampling,
                row_ids,
                keep_eos=True,
            )
            sampled.append((rows, prompts, outputs))
    finally:
        model.train(was_training)
    per_reward = torch.cat(
        [reward_matrix(objective, tokenizer, rows, outputs, eos, group) for rows, _, outputs in sampled]
    )  # (N, K): the window's completions, micro-batch after micro-batch
    rewards = summed_rewards(per_reward, reward_weights(objective))
    advantages = group_advantages(rewards, group, objective.cfg.scale_rewards).split(
        [len(outputs) for _, _, outputs in sampled]
    )
    lengths = [len(ids) for _, _, outputs in sampled for ids in outputs]
    objective.record_rollout(
        window_stats(objective, per_reward) | {"completion_length": sum(lengths) / len(lengths)}
    )
    return [
        completion_batch(prompts, outputs, micro_advantages, pad)
        for (_, prompts, outputs), micro_advantages in zip(sampled, advantages, strict=True)
    ]


def reward_weights(objective: Grpo) -> torch.Tensor:
    return torch.tensor([r.weight for r in objective.rewards], dtype=torch.float32)


def reward_matrix(
    objective: Grpo, tokenizer, rows: list[dict], outputs: list[list[int]], eos: set[int], group: int
) -> torch.Tensor:
    """Every reward of every completion (N, K); ``group`` consecutive completions per prompt row."""
    tokens = [[t for t in ids if t not in eos] for ids in outputs]
    completions = Completions(
        prompts=[
            tokenizer.decode(row["input_ids"], skip_special_tokens=True) for row in rows for _ in range(group)
        ],
        texts=[tokenizer.decode(ids, skip_special_tokens=True) for ids in tokens],
        token_ids=tokens,
        references=[row.get("references", {}) for row in rows for _ in range(group)],
    )
    return torch.tensor([r.score(completions) for r in objective.rewards], dtype=torch.float32).T


def window_stats(objective: Grpo, per_reward: torch.Tensor) -> dict[str, float]:
    """The window's reward mean and (unbiased) std, and each reward's mean. per_reward: (N, K)."""
    total = summed_rewards(per_reward, reward_weights(objective))
    stats = {"reward": float(torch.nanmean(total)), "reward_std": float(unbiased_std(total))}
    for i, reward in enumerate(objective.rewards):
        stats[f"rewards/{reward.name}"] = float(torch.nanmean(per_reward[:, i]))
    return stats


def completion_batch(
    prompts: list[list[int]], outputs: list[list[int]], advantages: torch.Tensor, pad: int
) -> dict[str, torch.Tensor]:
    """Prompt + completion rows, right-padded, only the completion labelled; and each row's advantage."""
    rows = [p + c for p, c in zip(prompts, outputs, strict=True)]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor(
        [
            [IGNORE_INDEX] * len(p) + c + [IGNORE_INDEX] * (width - len(p) - len(c))
            for p, c in zip(prompts, outputs, strict=False)
        ]
    )
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "advantages": advantages,
    }


def evaluate_greedy(objective: Grpo, run) -> dict[str, float]:
    """The eval prompts' greedy completions (one each), rewarded: ``eval_reward`` (the weighted sum's
    mean) and each reward's mean as ``eval_rewards/NAME``. ``run``: the loop's Run."""
    from peftcli.decoding import GREEDY

    model, tokenizer, rows = run.model, run.tokenizer, run.data.eval
    size, device = run.recipe.eval.batch_size, run.device
    eos, pad = eos_token_ids(model, tokenizer), pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    parts = []
    try:
        for start in range(0, len(rows), size):
            batch = rows[start : start + size]
            prompts = [row["input_ids"] for row in batch]
            outputs = decode(
                model, prompts, objective.cfg.max_new_tokens, eos, pad, device, GREEDY, keep_eos=True
            )
            parts.append(reward_matrix(objective, tokenizer, batch, outputs, eos, 1))
    finally:
        model.train(was_training)
    per_reward = torch.cat(parts)
    result = {"eval_reward": float(torch.nanmean(summed_rewards(per_reward, reward_weights(objective))))}
    for i, reward in enumerate(objective.rewards):
        result[f"eval_rewards/{reward.name}"] = float(torch.nanmean(per_reward[:, i]))
    return result | {"eval_examples": len(rows)}
