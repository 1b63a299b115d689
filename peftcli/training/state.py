"""What the loop carries: :class:`Run` (built once by :func:`peftcli.training.setup.set_up`, fixed for the
whole run) and :class:`TrainState` (where the run stands: saved in every checkpoint, rebuilt on resume)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftcli.methods.registry import Method
from peftcli.recipe import Recipe
from peftcli.training import metrics
from peftcli.training.console import Reporter
from peftcli.training.distributed import Dist
from peftcli.training.loggers import Loggers
from peftcli.training.step import Stepper

__all__ = ["Run", "TrainState"]


@dataclass
class Run:
    """What :func:`~peftcli.training.setup.set_up` builds once; fixed for the whole run. The model, method,
    optimizer and the rest of one update live in :attr:`stepper` (the loop's optimizer step)."""

    recipe: Recipe
    reporter: Reporter
    dist: Dist  # this process's rank and world (world size 1 in a single-process run)
    run_dir: Path
    base_path: str
    tokenizer: Any
    data: Any  # peftcli.data.DataBundle
    stepper: Stepper  # model, method, optimizer, scheduler, device, DDP/FSDP wrapper, AMP, loss path
    sampler: Any  # peftcli.data.BatchSampler: index windows over the lengths array, pure in (seed, epoch)
    steps: int  # optimizer steps in the whole run
    steps_per_epoch: int
    trainable: int
    total: int
    speed_lines: list[str] = field(default_factory=list)  # loss path, packing, compile: for the summary
    loggers: Loggers | None = None  # train.loggers, opened with metrics.jsonl by reset_metrics

    @property
    def model(self) -> torch.nn.Module:
        return self.stepper.model

    @property
    def method(self) -> Method:
        return self.stepper.method

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.stepper.optimizer

    @property
    def scheduler(self) -> Any:
        return self.stepper.scheduler

    @property
    def device(self) -> torch.device:
        return self.stepper.device

    @property
    def trainable_params(self) -> dict[str, torch.nn.Parameter]:
        """What the optimizer, clipping and checkpoints see."""
        return self.stepper.trainable_params

    @property
    def metrics_path(self) -> Path:
        return metrics.metrics_path(self.run_dir)

    @property
    def task(self) -> str:
        return self.recipe.model.task


@dataclass
class TrainState:
    """Where the run stands: saved in every checkpoint (step, epoch, batch_index) or rebuilt on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next window comes from
    batch_index: int = 0  # the first micro-batch of the next window within that epoch
    first_loss: float | None = None
    last_loss: float | None = None
    window_losses: list[float] = field(default_factory=list)  # since the last train event
    window_metrics: list[dict[str, float]] = field(default_factory=list)  # the objective's, since then
    tokens_seen: int = 0  # attention-mask tokens in this process's life (for tokens/s)
    skipped_steps: int = 0  # steps dropped for a non-finite loss or gradient (train.on_nan: skip)
    elapsed_before: float = 0.0  # seconds spent before the checkpoint we resumed from
    started: float = field(default_factory=time.perf_counter)  # reset when the loop starts

    def record_loss(
        self, loss: float, tokens: int, objective_metrics: dict[str, float] | None = None
    ) -> None:
        """A good step's loss and tokens, and what its objective measured (a skipped step records none)."""
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss
        self.window_losses.append(loss)
        self.tokens_seen += tokens
        if objective_metrics:
            self.window_metrics.append(objective_metrics)

    def mean_metrics(self) -> dict[str, float]:
        """The objective's metrics averaged over the steps since the last train event."""
        values: dict[str, list[float]] = {}
        for step_metrics in self.window_metrics:
            for key, value in step_metrics.items():
                values.setdefault(key, []).append(value)
        return {key: sum(v) / len(v) for key, v in values.items()}

    def note(self) -> str:
        """The progress bar's extra: the last step's reward mean ± std (grpo), else nothing."""
        last = self.window_metrics[-1] if self.window_metrics else {}
        if "reward" not in last:
            return ""
        return f"reward {last['reward']:.3f} ± {last['reward_std']:.3f}"

    def tokens_per_s(self) -> float:
        return self.tokens_seen / max(time.perf_counter() - self.started, 1e-9)

    def elapsed(self) -> float:
        """Seconds of training, the time before the resumed checkpoint included."""
        return self.elapsed_before + (time.perf_counter() - self.started)
