"""Less padding: length-grouped batches and padding-free packing, planned over the lengths array.

Both plans are pure functions of ``(lengths, seed, epoch, budget)``, like the plain shuffled sampler,
so the loop checkpoints only ``(epoch, batch_index)`` and an exact resume replays the same batches.

Both start from the epoch's order of the plain shuffled sampler (so data mixtures keep their weights).

* :func:`plan_length_grouped` (``train.group_by_length``): the epoch's permutation is cut into
  mega-batches of ``MEGA_BATCHES × batch_size`` examples, each sorted by length and cut into
  micro-batches, and the micro-batches are shuffled: similar lengths share a batch (little padding)
  and the order stays random across the epoch.
* :func:`plan_packed` (``train.packing``): the epoch's permutation is cut into pools; each pool is
  packed first-fit-decreasing into rows of at most ``row_tokens`` tokens, whole examples only; the
  rows are shuffled and grouped ``rows_per_batch`` at a time. A packed micro-batch is a list of rows,
  a row a list of example indices; :func:`collate_packed` lays each row out flat with
  ``position_ids`` restarting at 0 per example, from which transformers builds attention that never
  crosses an example (``masking_utils.find_packed_sequence_indices``; flash-attention varlen on
  CUDA). The tail of a shorter row is padding in a segment of its own, carrying no loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100
MEGA_BATCHES = 50  # micro-batches per length-sorted mega-batch (transformers' LengthGroupedSampler uses 50)
POOL_ROWS = 64  # rows per first-fit-decreasing pool: larger packs tighter, smaller keeps more randomness


def _shuffled(items: list, seed: int, epoch: int) -> list:
    """``items`` in an order drawn from a second stream of ``(seed, epoch)`` (not the permutation's)."""
    generator = torch.Generator().manual_seed(seed + epoch + 7_919_000_003)
    return [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]


def plan_length_grouped(
    lengths: np.ndarray, order: np.ndarray, seed: int, epoch: int, batch_size: int
) -> list[list[int]]:
    """Micro-batches of example indices with similar lengths, in a seeded random order. ``order`` is the
    epoch's seeded order of example indices (the plain sampler's, so mixtures keep their weights)."""
    mega = batch_size * MEGA_BATCHES
    batches = []
    for start in range(0, len(order), mega):
        group = order[start : start + mega]
        group = group[np.argsort(-lengths[group], kind="stable")]
        batches += [group[i : i + batch_size].tolist() for i in range(0, len(group), batch_size)]
    return _shuffled(batches, seed, epoch)


def plan_packed(
    lengths: np.ndarray, order: np.ndarray, seed: int, epoch: int, row_tokens: int, rows_per_batch: int
) -> list[list[list[int]]]:
    """Micro-batches of rows of example indices; each row's lengths sum to at most ``row_tokens``.
    ``order`` is the epoch's seeded order of example indices, as for :func:`plan_length_grouped`."""
    assert int(lengths.max(initial=0)) <= row_tokens, (int(lengths.max()), row_tokens)
    pool_tokens = POOL_ROWS * row_tokens
    rows: list[list[int]] = []
    start = 0
    while start < len(order):
        end, tokens = start, 0
        while end < len(order) and tokens < pool_tokens:
            tokens += int(lengths[order[end]])
            end += 1
        rows += _first_fit_decreasing(order[start:end], lengths, row_tokens)
        start = end
    rows = _shuffled(rows, seed, epoch)
    return [rows[i : i + rows_per_batch] for i in range(0, len(rows), rows_per_batch)]


def _first_fit_decreasing(indices: np.ndarray, lengths: np.ndarray, capacity: int) -> list[list[int]]:
    rows: list[list[int]] = []
    room: list[int] = []
    for i in indices[np.argsort(-lengths[indices], kind="stable")].tolist():
        n = int(lengths[i])
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([i])
            room.append(capacity - n)
        else:
            rows[slot].append(i)
            room[slot] -= n
    return rows


def padding_fraction(lengths: np.ndarray, batches: Sequence[Sequence], packed: bool) -> float:
    """Share of the collated tensor that is padding: rows padded to the longest in their micro-batch."""
    real = padded = 0
    for batch in batches:
        rows = (
            [sum(int(lengths[i]) for i in row) for row in batch]
            if packed
            else [int(lengths[i]) for i in batch]
        )
        real += sum(rows)
        padded += max(rows) * len(rows)
    return 1.0 - real / max(padded, 1)


class PlannedBatches:
    """A sampler over a plan function, with the loop's interface (``window``, ``batches_in``,
    ``epoch_batches``); a packed epoch's number of micro-batches depends on the epoch."""

    def __init__(self, plan, n_examples: int):
        self.plan, self.n_examples = plan, n_examples  # plan: epoch -> list of micro-batches
        self._cached: tuple[int, list] | None = None

    def batches_in(self, epoch: int) -> int:
        return len(self.epoch_batches(epoch))

    def epoch_batches(self, epoch: int) -> list:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self.plan(epoch))
        return self._cached[1]

    def window(self, epoch: int, batch_index: int, n_batches: int) -> list:
        return self.epoch_batches(epoch)[batch_index : batch_index + n_batches]

    def __len__(self) -> int:
        """Micro-batches in epoch 0 (packed epochs differ by a row or so)."""
        return len(self.epoch_batches(0))


def packed_steps(sampler: PlannedBatches, epochs: float, grad_accum: int) -> int:
    """Optimizer steps in ``epochs`` passes when each epoch has its own number of micro-batches."""
    steps, remaining, epoch = 0, epochs, 0
    while remaining > 0:
        per_epoch = math.ceil(len(sampler.epoch_batches(epoch)) / grad_accum)
        steps += math.ceil(per_epoch * min(1.0, remaining))
        remaining, epoch = remaining - 1, epoch + 1
    return max(1, steps)


def take_rows(rows, batch: Sequence[Sequence[int]]) -> list[list[dict]]:
    """Read a packed micro-batch's examples from the tokenized table in one ``take``, split into rows."""
    examples = rows.take([i for row in batch for i in row])
    out, start = [], 0
    for row in batch:
        out.append(examples[start : start + len(row)])
        start += len(row)
    return out


def collate_packed(rows: Sequence[Sequence[dict]], pad_id: int) -> dict[str, torch.Tensor]:
    """One packed micro-batch: each row's examples laid end to end, right-padded to the longest row.

    Returns (R, T) ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 per example and for the
    padding tail) and ``attention_mask`` (1 on real tokens; the model is not given it: attention follows
    the position ids). Each example's first label is dropped: in a row it would be scored as the
    prediction from the previous example's last token; unpacked it falls off the causal shift.
    """
    width = max(sum(len(example["input_ids"]) for example in row) for row in rows)
    input_ids, labels, positions, mask = [], [], [], []
    for row in rows:
        ids, lab, pos = [], [], []
        for example in row:
            n = len(example["input_ids"])
            ids += list(example["input_ids"])
            lab += [IGNORE_INDEX, *list(example["labels"])[1:n]]
            pos += range(n)
        pad = width - len(ids)
        input_ids.append(ids + [pad_id] * pad)
        labels.append(lab + [IGNORE_INDEX] * pad)
        positions.append(pos + list(range(pad)))
        mask.append([1] * len(ids) + [0] * pad)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),  # (R, T)
        "attention_mask": torch.tensor(mask, dtype=torch.long),  # (R, T)
        "position_ids": torch.tensor(positions, dtype=torch.long),  # (R, T)
        "labels": torch.tensor(labels, dtype=torch.long),  # (R, T)
    }
