"""Faults during training and what we tell the user: a non-finite loss or gradient (``train.on_nan``)
and running out of GPU memory.

A non-finite step either stops the run (``stop``: the last good checkpoint stays, the message names
the step and the micro-batch's examples) or is skipped (``skip``: no update, the optimizer's state
untouched, an event in metrics.jsonl), until more than ``train.max_skipped_steps`` were skipped.
Out of memory on CUDA raises :class:`OutOfMemory`, which the CLI prints with advice built from this
run's numbers and exit code 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftcli.recipe import Recipe, RecipeError

EXIT_OUT_OF_MEMORY = 3


@dataclass
class NonFinite:
    """A step whose loss or gradient norm is NaN or infinite, and the examples it was computed on."""

    step: int  # 1-based: the step that would have been taken
    what: str  # "loss nan", "gradient norm inf"
    micro_batch: int | None  # which micro-batch of the window; None: the gradient of the whole window
    examples: list[int] = field(default_factory=list)  # positions in the loaded training set

    def name_examples(self, window: list[list[int]]) -> None:
        """Fill :attr:`examples` from the step's index batches."""
        if self.micro_batch is None:
            self.examples = [i for batch in window for i in batch]
        else:
            self.examples = list(window[self.micro_batch])

    def describe(self) -> str:
        shown = ", ".join(str(i) for i in self.examples[:16]) + (" ..." if len(self.examples) > 16 else "")
        return f"step {self.step}: {self.what} on training examples [{shown}]"

    def event(self, skipped_total: int) -> dict:
        return {
            "event": "skipped_step",
            "step": self.step,
            "reason": self.what,
            "examples": self.examples,
            "skipped_total": skipped_total,
        }


def gradient_norm(parameters) -> torch.Tensor:
    """The total L2 norm of the gradients (what clipping would compute), without changing them."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, 2.0)


def find_non_finite(step: int, micro_losses: list[float], grad_norm: float | None) -> NonFinite | None:
    """The first micro-batch whose loss is not finite, else the whole window when the gradient norm is not."""
    for index, loss in enumerate(micro_losses):
        if not math.isfinite(loss):
            return NonFinite(step, f"loss {loss}", index)
    if grad_norm is not None and not math.isfinite(grad_norm):
        return NonFinite(step, f"gradient norm {grad_norm}", None)
    return None


def stop_error(fault: NonFinite, last_checkpoint: Path | None, skipped: int, limit: int) -> RecipeError:
    kept = (
        f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
    )
    if skipped > limit:
        return RecipeError(
            "train.max_skipped_steps",
            f"{skipped} steps had a non-finite loss or gradient, more than {limit} (the last: "
            f"{fault.describe()}); {kept}",
            "lower train.lr, set train.max_grad_norm, or check those examples",
        )
    return RecipeError(
        "train.on_nan",
        f"{fault.describe()}; {kept}",
        "lower train.lr, set train.max_grad_norm, check those examples, or set train.on_nan: skip",
    )


class OutOfMemory(MemoryError):
    """CUDA ran out of memory; the message carries advice for this run. The CLI exits with code 3."""

    exit_code = EXIT_OUT_OF_MEMORY


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError)


def out_of_memory(
    recipe: Recipe, step: int, where: str, last_checkpoint: Path | None, supports_quantized_base: bool
) -> OutOfMemory:
    """Advice with this run's numbers: what to change, in the order that costs the least."""
    data, train, model = recipe.data, recipe.train, recipe.model
    lines = [
        f"CUDA ran out of memory during {where} at step {step} "
        f"(micro-batch {train.batch_size} × max_length {data.max_length}, grad_accum {train.grad_accum})."
    ]
    if train.batch_size > 1:
        half = max(1, train.batch_size // 2)
        lines.append(
            f"- train.batch_size={half} train.grad_accum={train.grad_accum * train.batch_size // half}: "
            f"half the activations, the same {train.batch_size * train.grad_accum} examples per step"
        )
    if not model.gradient_checkpointing:
        lines.append("- model.gradient_checkpointing=true: recompute activations in backward (~30% slower)")
    if data.max_length > 128:
        lines.append(
            f"- data.max_length={data.max_length // 2}: shorter examples (longer ones are truncated)"
        )
    if model.quantization is None and supports_quantized_base:
        lines.append(
            "- model.quantization.bits=4: QLoRA, the frozen base in 4 bits (about 1/4 of its memory)"
        )
    if getattr(data, "packing", None) is False:
        lines.append("- data.packing=true: no memory spent on padding")
    if where.startswith("eval"):
        lines.append(f"- eval.batch_size={max(1, recipe.eval.batch_size // 2)}: smaller eval batches")
    kept = (
        f"The last checkpoint, {last_checkpoint}, is intact; these settings change the run, so start it "
        "again with --overwrite or a new --output-dir (or --resume with only gradient checkpointing on)."
        if last_checkpoint
        else "No checkpoint had been written yet."
    )
    lines.append(kept)
    return OutOfMemory("\n".join(lines))
