"""Collation: right-pad tokenized examples into long tensors.

The training loop collates each micro-batch from the memory-mapped dataset by index
(``collate_rows``), so only the rows of the current step are ever Python lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peftcli.data.formats import IGNORE_INDEX


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the pad token, else EOS, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0  # any id works: padded positions are masked out and carry no loss


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([list(row) + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def collate(examples: Sequence[dict], tokenizer, task: str) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into long tensors.

    Returns ``input_ids`` and ``attention_mask`` (B, T) and ``labels``: (B, T') padded with -100 for
    causal_lm (T' = T) and seq2seq (T' = longest target), or (B,) class indices for seq_cls.
    """
    if examples and "rejected_ids" in examples[0]:
        return with_reference(collate_pairs(examples, tokenizer), examples)
    if examples and "desirable" in examples[0]:
        return collate_unpaired(examples, tokenizer)
    input_rows = [example["input_ids"] for example in examples]
    batch = {
        "input_ids": _pad(input_rows, pad_token_id(tokenizer)),  # (B, T)
        "attention_mask": _pad([[1] * len(row) for row in input_rows], 0),  # (B, T)
    }
    if task == "seq_cls":
        batch["labels"] = torch.tensor([example["label"] for example in examples], dtype=torch.long)  # (B,)
    else:
        batch["labels"] = _pad([example["labels"] for example in examples], IGNORE_INDEX)  # (B, T')
    if examples and "task_id" in examples[0]:  # data.task_id_column
        batch["task_ids"] = torch.tensor([example["task_id"] for example in examples], dtype=torch.long)
    return batch


# Batch entries the model's forward takes besides ids and mask (multitask prompt tuning's task_ids)
MODEL_EXTRAS = ("task_ids",)


def model_extras(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's :data:`MODEL_EXTRAS`, for the forward calls that name their arguments."""
    return {key: batch[key] for key in MODEL_EXTRAS if key in batch}


def collate_pairs(examples: Sequence[dict], tokenizer) -> dict[str, torch.Tensor]:
    """Preference pairs as one batch of 2B rows, chosen first (rows 0..B-1) and rejected after (rows
    B..2B-1), all padded to one width: one forward pass scores both answers of every pair."""
    input_rows = [e["input_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    label_rows = [e["labels"] for e in examples] + [e["rejected_labels"] for e in examples]
    return {
        "input_ids": _pad(input_rows, pad_token_id(tokenizer)),  # (2B, T)
        "attention_mask": _pad([[1] * len(row) for row in input_rows], 0),  # (2B, T)
        "labels": _pad(label_rows, IGNORE_INDEX),  # (2B, T)
    }


def collate_unpaired(
    examples: Sequence[dict], tokenizer, partners: Sequence[dict] | None = None
) -> dict[str, torch.Tensor]:
    """KTO examples as one batch of 2B rows: the B examples (rows 0..B-1), then their B mismatched KL
    rows (B..2B-1), row i pairing example i's prompt with example i-1's completion (cyclically, as
    TRL's KTOTrainer rotates completions within a batch), its labels on that completion; and the
    labels ``desirable`` (B,). KL rows are not truncated again: each is at most two examples long.
    ``partners`` (a torchrun rank's slice): the examples whose completions the KL rows take, row i
    partners[i]'s, the example before it in the whole micro-batch."""
    prompts = [e["input_ids"][: e["prompt_length"]] for e in examples]
    donors = list(partners) if partners is not None else [examples[i - 1] for i in range(len(examples))]
    answers = [e["input_ids"][e["prompt_length"] :] for e in donors]
    answer_labels = [e["labels"][e["prompt_length"] :] for e in donors]
    kl_rows = [list(prompts[i]) + list(answers[i]) for i in range(len(examples))]
    kl_labels = [[IGNORE_INDEX] * len(prompts[i]) + list(answer_labels[i]) for i in range(len(examples))]
    input_rows = [e["input_ids"] for e in examples] + kl_rows
    return {
        "input_ids": _pad(input_rows, pad_token_id(tokenizer)),  # (2B, T)
        "attention_mask": _pad([[1] * len(row) for row in input_rows], 0),  # (2B, T)
        "labels": _pad([e["labels"] for e in examples] + kl_labels, IGNORE_INDEX),  # (2B, T)
        "desirable": torch.tensor([bool(e["desirable"]) for e in examples]),  # (B,)
    }


def with_reference(batch: dict[str, torch.Tensor], examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """The examples' precomputed reference log-probs as ``batch["reference"]`` (2B,), in the batch's row
    order (chosen rows, then rejected), when the rows carry them (objective.precompute_reference)."""
    if "reference" in examples[0]:
        columns = torch.tensor([e["reference"] for e in examples], dtype=torch.float32)  # (B, 2)
        batch["reference"] = columns.t().reshape(-1)
    return batch


def collate_rows(rows, indices: list[int], tokenizer, task: str) -> dict[str, torch.Tensor]:
    """Read ``indices`` from a memory-mapped ``TokenizedRows`` and collate them (one micro-batch)."""
    return collate(rows.take(indices), tokenizer, task)
