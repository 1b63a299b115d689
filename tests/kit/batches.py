"""One seeded batch for any task: random token ids, right padding, the task's labels."""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE = -100


def batch(
    task: str = "causal_lm",
    vocab_size: int = 200,
    lengths: Sequence[int] = (9, 6),
    seed: int = 0,
    label_length: int = 5,
    prompt: int = 0,
    labels: bool = True,
) -> dict[str, torch.Tensor]:
    """Rows of ``max(lengths)`` ids drawn from [5, vocab) (below 5: special tokens), row i real for its
    first ``lengths[i]`` positions. Labels: causal_lm the ids (-100 on padding and the first ``prompt``
    positions), seq_cls classes 0, 1, 0, ..., seq2seq ``label_length`` random target ids per row."""
    gen = torch.Generator().manual_seed(seed)
    rows, width = len(lengths), max(lengths)
    input_ids = torch.randint(5, vocab_size, (rows, width), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate(lengths):
        attention_mask[row, length:] = 0
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if not labels:
        return out
    if task == "seq_cls":
        out["labels"] = torch.arange(rows) % 2
    elif task == "seq2seq":
        out["labels"] = torch.randint(5, vocab_size, (rows, label_length), generator=gen)
    else:
        target = input_ids.masked_fill(attention_mask == 0, IGNORE)
        target[:, :prompt] = IGNORE
        out["labels"] = target
    return out


def batch_of(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The peft-oracle tests' causal batch: 2 rows of 12, the second padded after 9."""
    return batch("causal_lm", vocab_size, lengths=(12, 9), seed=seed)


def inputs(batch: dict[str, torch.Tensor], task: str = "causal_lm") -> dict[str, torch.Tensor]:
    """The model's forward arguments: ids and mask, plus the decoder's targets for seq2seq and the task
    ids where the batch has them."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if task == "seq2seq":
        kwargs["labels"] = batch["labels"]
    if "task_ids" in batch:  # data.task_id_column's (multitask prompt tuning)
        kwargs["task_ids"] = batch["task_ids"]
    return kwargs


def parts(batch: dict[str, torch.Tensor], task: str = "causal_lm"):
    """(input_ids, attention_mask, the forward's other arguments, labels): for tests that call the model
    with the ids and the mask separately."""
    forward = inputs(batch, task)
    return forward.pop("input_ids"), forward.pop("attention_mask"), forward, batch["labels"]


def inputs_and_labels(batch: dict[str, torch.Tensor], task: str = "causal_lm"):
    """(the forward's arguments, the labels the loss reads)."""
    return inputs(batch, task), batch["labels"]
