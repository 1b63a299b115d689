"""One optimizer step, as the loop runs it: :class:`Stepper` holds what the step needs, and
:meth:`Stepper.step` runs forward/backward over an accumulation window, the method hooks, clipping, the
optimizer and the scheduler.

The loop calls this and nothing else for its updates, so a test that builds a :class:`Stepper` runs the
loop's own step (hook order, loss normalisation, the non-finite check) rather than a copy of it::

    stepper = Stepper(model, method, optimizer)
    result = stepper.step([batch], step=0)   # StepResult(loss, tokens, lr, fault)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftcli.methods.registry import Method
from peftcli.training import faults
from peftcli.training.distributed import Dist
from peftcli.training.loss import count_targets, micro_batch_loss_sum

__all__ = ["StepResult", "Stepper", "loss_normaliser"]

CPU = torch.device("cpu")  # immutable: safe as a dataclass default


@dataclass
class StepResult:
    """What one optimizer step reports."""

    loss: float  # the window's token-weighted loss (this rank's share under torchrun)
    tokens: int  # attention-mask tokens in the window's micro-batches
    lr: float  # the learning rate this step used
    fault: faults.NonFinite | None  # a non-finite loss or gradient norm: the update was dropped


def loss_normaliser(
    micro: list[dict[str, torch.Tensor]], task: str, dist: Dist | None = None, method: Method | None = None
) -> int:
    """The number of scored targets in the whole global accumulation window (summed over ranks): every
    micro-batch's summed loss is divided by it, so the step's loss is token-weighted over the window.
    A method with its own loss (``Method.loss_sum``) counts its own targets (``Method.loss_targets``)."""
    local = sum(batch_targets(batch, task, method) for batch in micro)
    return max(1, dist.sum_int(local) if dist is not None else local)


def batch_targets(batch: dict[str, torch.Tensor], task: str, method: Method | None) -> int:
    counted = method.loss_targets(batch) if method is not None else None
    return count_targets(batch, task) if counted is None else counted


@dataclass
class Stepper:
    """Everything one optimizer step needs; the loop builds one per run (``Run.stepper``)."""

    model: nn.Module  # the tuned model (method attached)
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: Any | None = None  # stepped once per optimizer step when given
    task: str = "causal_lm"
    device: torch.device = CPU
    wrapped: nn.Module | None = None  # what forward runs through (DDP/FSDP wrapper); None means model
    dist: Dist = field(default_factory=Dist)
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling
    amp_dtype: torch.dtype | None = None  # torch.autocast's dtype; None runs without autocast
    loss_path: str = "plain"  # peftcli.training.loss: plain, chunked or liger
    max_grad_norm: float = 0.0  # clip the trainable gradients' norm to this; 0 does not clip
    trainable_params: dict[str, nn.Parameter] | None = None  # None: the model's requires_grad params
    objective: Any = None  # a preference Objective (peftcli.training.objectives); None: sft, the loss path

    def __post_init__(self) -> None:
        if self.wrapped is None:
            self.wrapped = self.model
        if self.trainable_params is None:
            self.trainable_params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def step(
        self, micro: list[dict[str, torch.Tensor]], step: int, n_targets: int | None = None
    ) -> StepResult:
        """Forward/backward every micro-batch of the window, then the method hooks, clipping and the
        optimizer and scheduler step. ``step``: optimizer steps done before this one. ``n_targets``: the
        window's loss normaliser (:func:`loss_normaliser` of ``micro`` when None). A non-finite loss or
        gradient norm drops the update and leaves the optimizer's state untouched (``StepResult.fault``)."""
        if n_targets is None:
            n_targets = loss_normaliser(micro, self.task, self.dist, self.method)
        loss, tokens, micro_losses = self.backward_window(micro, n_targets)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        # Checked before the method hooks read the gradients. With fp16 loss scaling, inf gradients are the
        # scaler's business (it skips the step and lowers the scale); only the loss is ours to check then.
        grad_norm = None if self.scaler else float(faults.gradient_norm(self.trainable_params.values()))
        fault = faults.find_non_finite(step + 1, micro_losses, grad_norm)
        if fault is not None:
            return StepResult(loss, tokens, self.drop_update(), fault)
        return StepResult(loss, tokens, self.update(step), None)

    def backward_window(
        self, micro: list[dict[str, torch.Tensor]], n_targets: int
    ) -> tuple[float, int, list[float]]:
        """Accumulate the window's gradients: (window loss, tokens, each micro-batch's loss share)."""
        world = (
            self.dist.grad_scale
        )  # DDP/FSDP average gradients over ranks: scaled by world, that is the sum
        loss_total, tokens, micro_losses = 0.0, 0, []
        counts = self.window_counts(micro) if self.objective is not None else None
        for i, batch in enumerate(micro):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            sync = i == len(micro) - 1  # gradients are reduced across ranks once per window
            with (
                self.dist.grad_sync(self.wrapped, sync),
                torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None),
            ):
                if self.objective is None:
                    loss_sum = self.method.loss_sum(self.wrapped, batch)  # None: the loss path's
                    if loss_sum is None:
                        loss_sum = micro_batch_loss_sum(self.wrapped, batch, self.task, self.loss_path)
                    auxiliary = self.method.auxiliary_loss(self.model, batch)  # summed, as loss_sum
                    total = loss_sum if auxiliary is None else loss_sum + auxiliary
                    loss = total / n_targets  # token-weighted over the whole (global) accumulation window
                    share = None
                else:  # a preference objective: this micro-batch's share of the window's loss
                    loss = self.objective.micro_loss(self.wrapped, batch, {**counts, "micro": i})
                    share = loss.item()
                extra = self.method.extra_loss(self.model)
                if extra is not None:
                    loss = loss + extra / (len(micro) * world)
                loss = loss * world
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            micro_losses.append(loss_sum.item() / n_targets if share is None else share)
            loss_total += micro_losses[-1]
            tokens += int(batch["attention_mask"].sum())
        return loss_total, tokens, micro_losses

    def window_counts(self, micro: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """An objective's normalisers over the global window (pairs, chosen tokens; grpo: its tokens, and
        each micro-batch's rows and tokens as lists), each summed over ranks and at least 1, in one
        all-reduce."""
        local = self.objective.window_counts(micro)
        flat = [float(x) for v in local.values() for x in (v if isinstance(v, list) else [v])]
        summed = iter(max(1, round(x)) for x in self.dist.sum_floats(flat))
        return {
            k: [next(summed) for _ in v] if isinstance(v, list) else next(summed) for k, v in local.items()
        }

    def update(self, step: int) -> float:
        """after_backward → clip → optimizer (through the scaler) → after_step → scheduler → zero_grad;
        the lr the update used."""
        self.method.after_backward(self.model, step)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable_params.values(), self.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.method.after_step(self.model, step)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def drop_update(self) -> float:
        """A faulty step: gradients dropped, the schedule still advances; the lr the step would have used."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            with warnings.catch_warnings():  # the schedule keeps time although this step took no update
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        return lr
