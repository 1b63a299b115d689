"""Which examples each step trains on: a pure function of ``(seed, epoch)`` over the lengths array.

The loop checkpoints ``(epoch, batch_index)`` and resumes with ``window(epoch, batch_index, n)``;
nothing else about the data order needs saving. The sampler holds one epoch's order as an int64
array (8 bytes per example, like the lengths array) and cuts micro-batches from it on demand, so no
Python list the size of the dataset is ever built.

A mixture (``data.train`` as a list of weighted sources) draws each source's share of the epoch from
its own rows (a fresh permutation each time a source is exhausted), then shuffles the draws together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Mixture:
    """Where each source's rows sit in the concatenated dataset, and its sampling weight."""

    offsets: list[int]  # first row of each source
    sizes: list[int]  # rows of each source
    weights: list[float]  # normalised to sum 1

    def counts(self, total: int) -> list[int]:
        """Examples drawn from each source per epoch: largest-remainder rounding of weight × total."""
        exact = [w * total for w in self.weights]
        counts = [math.floor(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
        for i in by_remainder[: total - sum(counts)]:
            counts[i] += 1
        return counts


class BatchSampler:
    """Shuffled micro-batches of example indices, a pure function of ``(seed, epoch)``.

    ``lengths`` is the lengths array (or just the number of examples); packing and length-grouped
    samplers read it to plan batches. An epoch has ``len(lengths)`` examples, mixture or not.
    """

    def __init__(
        self,
        lengths: np.ndarray | int,
        batch_size: int,
        seed: int,
        drop_last: bool = False,
        mixture: Mixture | None = None,
    ):
        self.lengths = np.arange(0) if isinstance(lengths, int) else lengths
        self.n_examples = lengths if isinstance(lengths, int) else len(lengths)
        assert self.n_examples > 0 and batch_size > 0, (self.n_examples, batch_size)
        self.batch_size, self.seed, self.drop_last, self.mixture = batch_size, seed, drop_last, mixture
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Micro-batches per epoch."""
        if self.drop_last:
            return self.n_examples // self.batch_size
        return math.ceil(self.n_examples / self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Every example index of ``epoch`` in training order, from a generator seeded ``seed + epoch``."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.mixture is None:
            order = torch.randperm(self.n_examples, generator=generator).numpy()
        else:
            draws = []
            for offset, size, count in zip(
                self.mixture.offsets, self.mixture.sizes, self.mixture.counts(self.n_examples), strict=True
            ):
                rounds = [torch.randperm(size, generator=generator) for _ in range(math.ceil(count / size))]
                drawn = torch.cat(rounds)[:count] if rounds else torch.zeros(0, dtype=torch.long)
                draws.append(drawn + offset)
            combined = torch.cat(draws)
            order = combined[torch.randperm(len(combined), generator=generator)].numpy()
        self._order = (epoch, order)
        return order

    def batch(self, epoch: int, index: int) -> list[int]:
        """Micro-batch ``index`` of ``epoch``."""
        order = self.epoch_order(epoch)
        return order[index * self.batch_size : (index + 1) * self.batch_size].tolist()

    def window(self, epoch: int, batch_index: int, n_batches: int) -> list[list[int]]:
        """The global window of one optimizer step: up to ``n_batches`` micro-batches from ``batch_index``
        (fewer at the end of an epoch). Distributed ranks each take their slice of every micro-batch."""
        last = min(batch_index + n_batches, len(self))
        return [self.batch(epoch, i) for i in range(batch_index, last)]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All micro-batches of ``epoch`` (small data and tests; the loop asks for windows)."""
        return self.window(epoch, 0, len(self))
