"""What a finished training run returns (and writes to RUN/results.json)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    steps: int
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    first_loss: float | None
    last_loss: float | None
    elapsed_s: float
    tokens_per_s: float
    trainable: int
    total: int
    data_stats: dict[str, Any] = field(default_factory=dict)
    peak_memory_bytes: int | None = None  # peak RSS (CPU) or CUDA max allocated of the training process
    tasks: dict[str, dict[str, Any]] | None = None  # eval.tasks: lm-eval's metrics per task, after training

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "adapter_dir": str(self.adapter_dir),
            "steps": self.steps,
            "eval_before": self.eval_before,
            "eval_after": self.eval_after,
            "train_loss_first": self.first_loss,
            "train_loss_last": self.last_loss,
            "elapsed_s": round(self.elapsed_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "trainable_parameters": self.trainable,
            "total_parameters": self.total,
            "peak_memory_bytes": self.peak_memory_bytes,
            "data": self.data_stats,
            **({"tasks": self.tasks} if self.tasks is not None else {}),
        }
