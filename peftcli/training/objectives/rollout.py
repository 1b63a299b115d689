"""GRPO's rollout: for every prompt of a window, G completions sampled with the policy through
:func:`peftcli.decoding.decode` (the KV cache, unless the method decodes without one; the method's own
forward), rewarded, and collated into the micro-batches the loss reads.

Sampling is a pure function of the run's seed, the optimizer step and the completion's row in the
window (one ``torch.Generator`` per row, :func:`peftcli.decoding.row_generator`), and of the weights:
a run resumed from a checkpoint samples at every later step what the uninterrupted run sampled. The
model samples in eval mode (no dropout) and the loop's train mode is restored after.

A completion is its tokens up to and including the first EOS, or ``max_new_tokens`` tokens when no EOS
came (truncated); its row is prompt + completion, right-padded, the completion's tokens labelled.

Under torchrun each rank samples its slice of every micro-batch's prompts (a prompt's whole group on one
rank), seeded by the completions' rows in the whole window, so the samples do not depend on the number of
ranks; the ranks then exchange their rewards, and the advantages (``scale_rewards: batch`` takes the
window's std) and the logged statistics are computed over the whole window in one process's order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from peftcli.data.collate import pad_token_id
from peftcli.data.formats import IGNORE_INDEX
from peftcli.decoding import Sampling, decode, eos_token_ids
from peftcli.training.distributed import Dist
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
    offsets: Sequence[int] | None = None,
    stand_ins: Sequence[bool] | None = None,
    use_cache: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """The window's micro-batches of prompt rows → its micro-batches of scored completions (G per prompt,
    a prompt's group on consecutive rows), with ``advantages``; the reward statistics go to the objective.
    Under torchrun ``window`` is this rank's slice: ``offsets`` (Dist.slice_offsets) place each
    micro-batch's first prompt in the whole window, and ``stand_ins`` (Dist.padding_flags) mark the
    slices that count for nothing (Dist.rank_slice). ``use_cache``: the method's ``decodes_with_cache``."""
    if offsets is None:
        offsets = [sum(len(rows) for rows in window[:i]) for i in range(len(window))]
    stand_ins = list(stand_ins) if stand_ins is not None else [False] * len(window)
    sampling = sampling_for(objective, seed, step)
    sampled = sample(objective, model, tokenizer, window, sampling, offsets, device, use_cache)
    eos, group = eos_token_ids(model, tokenizer), objective.cfg.group_size
    mine = [reward_matrix(objective, tokenizer, rows, outputs, eos, group) for rows, _, outputs in sampled]
    lengths = [[len(ids) for ids in outputs] for _, _, outputs in sampled]
    per_reward, all_lengths, places = whole_window(objective.dist, mine, lengths, stand_ins)
    rewards = summed_rewards(per_reward, reward_weights(objective))
    advantages = group_advantages(rewards, group, objective.cfg.scale_rewards)
    objective.record_rollout(
        window_stats(objective, per_reward) | {"completion_length": sum(all_lengths) / len(all_lengths)}
    )
    pad = pad_token_id(tokenizer)
    return [
        completion_batch(
            prompts, outputs, advantages[place] if place is not None else torch.zeros(len(outputs)), pad
        )
        for (_, prompts, outputs), place in zip(sampled, places, strict=True)
    ]


def sample(
    objective: Grpo,
    model: nn.Module,
    tokenizer,
    window: Sequence[list[dict]],
    sampling: Sampling,
    offsets: Sequence[int],
    device: torch.device,
    use_cache: bool = True,
) -> list[tuple[list[dict], list[list[int]], list[list[int]]]]:
    """(prompt rows, G prompts per row, their completions) per micro-batch; completion k of the prompt at
    place p of the window is sampled from row p·G + k's generator, in eval mode."""
    group = objective.cfg.group_size
    eos, pad = eos_token_ids(model, tokenizer), pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    sampled = []
    try:
        for rows, offset in zip(window, offsets, strict=True):
            prompts = [row["input_ids"] for row in rows for _ in range(group)]
            row_ids = list(range(offset * group, offset * group + len(prompts)))
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
                use_cache=use_cache,
            )
            sampled.append((rows, prompts, outputs))
    finally:
        model.train(was_training)
    return sampled


def whole_window(
    dist: Dist, mine: list[torch.Tensor], lengths: list[list[int]], stand_ins: list[bool]
) -> tuple[torch.Tensor, list[int], list[slice | None]]:
    """Every rank's rewards (N, K) and completion lengths in one process's order (micro-batch after
    micro-batch, each rank's slice in rank order, stand-ins left out), and where this rank's micro-batches
    sit in it (None: a stand-in). One process: its own, in order."""
    shared = [None if pad else (r, n) for r, n, pad in zip(mine, lengths, stand_ins, strict=True)]
    ranks = dist.gather_objects(shared)
    parts, all_lengths, places, start = [], [], [], 0
    for micro in range(len(shared)):
        for rank, pieces in enumerate(ranks):
            if pieces[micro] is None:
                if rank == dist.rank:
                    places.append(None)
                continue
            rewards, counts = pieces[micro]
            if rank == dist.rank:
                places.append(slice(start, start + len(counts)))
            parts.append(rewards)
            all_lengths += counts
            start += len(counts)
    return torch.cat(parts), all_lengths, places


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
                model,
                prompts,
                objective.cfg.max_new_tokens,
                eos,
                pad,
                device,
                GREEDY,
                keep_eos=True,
                use_cache=run.method.decodes_with_cache,
            )
            parts.append(reward_matrix(objective, tokenizer, batch, outputs, eos, 1))
    finally:
        model.train(was_training)
    per_reward = torch.cat(parts)
    result = {"eval_reward": float(torch.nanmean(summed_rewards(per_reward, reward_weights(objective))))}
    for i, reward in enumerate(objective.rewards):
        result[f"eval_rewards/{reward.name}"] = float(torch.nanmean(per_reward[:, i]))
    return result | {"eval_examples": len(rows)}
