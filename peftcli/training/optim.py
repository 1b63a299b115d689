"""Optimizers (torch and bitsandbytes) and learning-rate schedules."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from peftcli.quantize import import_bitsandbytes
from peftcli.recipe import TrainConfig

BNB_OPTIMIZERS = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "paged_adamw_32bit": "PagedAdamW32bit",
    "paged_lion_8bit": "PagedLion8bit",
}


def build_optimizer(param_groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            param_groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    bnb = import_bitsandbytes("train.optimizer", "or pick optimizer: adamw")
    if cfg.optimizer.startswith("paged_"):
        # On a CPU bitsandbytes keeps paged state in ordinary memory (paging is a CUDA unified-memory
        # feature) and warns at the first step; that is expected, documented, and not worth a warning.
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    cls = getattr(bnb.optim, BNB_OPTIMIZERS[cfg.optimizer])
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    if "lion" not in cfg.optimizer:
        kwargs["eps"] = cfg.adam_eps
    return cls(param_groups, **kwargs)


def total_steps(cfg: TrainConfig, num_examples: int) -> tuple[int, int]:
    """(optimizer steps in the run, micro-batches per epoch)."""
    batches_per_epoch = math.ceil(num_examples / cfg.batch_size)
    if cfg.max_steps:
        return cfg.max_steps, batches_per_epoch
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    return max(1, math.ceil(steps_per_epoch * cfg.epochs)), batches_per_epoch


def warmup_steps(cfg: TrainConfig, steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * steps)


def lr_factor(step: int, cfg: TrainConfig, steps: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then the decay."""
    warmup = warmup_steps(cfg, steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if cfg.scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, steps))
