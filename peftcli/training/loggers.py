"""Optional experiment trackers (TensorBoard, Weights & Biases, MLflow) fed the events of metrics.jsonl.

``metrics.jsonl`` is always written by the loop; the trackers named in ``train.loggers`` receive the
same events (as ``train/<key>`` and ``eval/<key>`` scalars at the event's step) plus the resolved
recipe as hyperparameters. Each tracker is an optional extra (``pip install 'peftcli[wandb]'``),
imported only when a recipe names it; a missing one is a one-line error before any weights load.

Resume: an external store cannot take events back, so ``RUN/loggers.json`` remembers, per tracker,
the run it writes to and the last event it received. A resumed run reopens the same tracker run and
skips the events it already has: resume is exact, so those would be the same numbers again (only
timings differ). Each tracker therefore holds every event once, as metrics.jsonl does.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

from peftcli.checkpoint import atomic_write_text
from peftcli.recipe import Recipe, RecipeError, to_dict

# logger name -> (module that must be importable, extra that installs it)
EXTRAS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
STATE_FILE = "loggers.json"
TENSORBOARD_DIR = "tensorboard"


def check_installed(names: list[str]) -> None:
    """Fail before loading weights when a chosen tracker's package is missing (no import happens here)."""
    for i, name in enumerate(names):
        module, extra = EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise RecipeError(
                f"train.loggers[{i}]",
                f"{name} is not installed",
                f"pip install 'peftcli[{extra}]', or remove {name} from train.loggers",
            )


def event_order(event: dict[str, Any]) -> tuple[int, int]:
    """Position of an event in a run: by step, and within a step the train event before the eval."""
    return int(event.get("step", 0)), 0 if event.get("event") == "train" else 1


def scalars(event: dict[str, Any]) -> dict[str, float]:
    """``{"train/loss": ..., "train/lr": ...}`` or ``{"eval/eval_loss": ...}``: the numbers of one event."""
    kind = event.get("event", "event")
    return {
        f"{kind}/{key}": float(value)
        for key, value in event.items()
        if key not in ("event", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def flat_hyperparameters(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as ``{"train.lr": 0.002, "method.r": 16, ...}`` (lists as strings)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        elif isinstance(node, (list, tuple)):
            flat[prefix] = json.dumps(node)
        else:
            flat[prefix] = "None" if node is None else node

    walk("", to_dict(recipe))
    return flat


class _TensorBoard:
    def __init__(self, run_dir: Path, recipe: Recipe, state: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
        if not state:
            import yaml
            from torch.utils.tensorboard.summary import hparams

            self.writer.add_text(
                "recipe", "```yaml\n" + yaml.safe_dump(to_dict(recipe), sort_keys=False) + "```"
            )
            hyper = {
                k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in flat_hyperparameters(recipe).items()
            }
            for summary in hparams(hyper, {}):
                self.writer.file_writer.add_summary(summary)

    def log(self, event: dict[str, Any]) -> None:
        for tag, value in scalars(event).items():
            self.writer.add_scalar(tag, value, global_step=int(event["step"]))
        self.writer.flush()

    def close(self, status: str = "FINISHED") -> dict[str, Any]:
        self.writer.close()
        return {}


class _WandB:
    def __init__(self, run_dir: Path, recipe: Recipe, state: dict[str, Any]):
        import wandb

        self.run = wandb.init(
            project="peftcli",
            name=run_dir.name,
            dir=str(run_dir),
            id=state.get("run_id"),
            resume="allow" if state.get("run_id") else None,
            config=flat_hyperparameters(recipe),
            reinit="create_new",
        )

    def log(self, event: dict[str, Any]) -> None:
        self.run.log(scalars(event), step=int(event["step"]))

    def close(self, status: str = "FINISHED") -> dict[str, Any]:
        run_id = self.run.id
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
        return {"run_id": run_id}

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run.id}


class _MLflow:
    """The tracking URI is MLFLOW_TRACKING_URI as usual; unset, a SQLite store in RUN/mlflow.db (MLflow 3
    puts its ``file:`` store in maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE=true)."""

    def __init__(self, run_dir: Path, recipe: Recipe, state: dict[str, Any]):
        import logging
        import os

        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO lines about creating tables
        logging.getLogger("alembic").setLevel(logging.WARNING)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        if state.get("run_id"):
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name("peftcli")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("peftcli")
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:500]) for k, v in flat_hyperparameters(recipe).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, event: dict[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(event["step"])
        metrics = [Metric(k, v, now, step) for k, v in scalars(event).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str = "FINISHED") -> dict[str, Any]:
        self.client.set_terminated(self.run_id, status=status)
        return {"run_id": self.run_id}

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id}


_CLASSES = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class Loggers:
    """The trackers of one run. ``log`` takes exactly the dicts the loop writes to metrics.jsonl."""

    def __init__(self, run_dir: Path, recipe: Recipe, resumed: bool):
        self.run_dir = run_dir
        self.state_path = run_dir / STATE_FILE
        names = list(dict.fromkeys(recipe.train.loggers))
        check_installed(names)
        saved: dict[str, Any] = {}
        if resumed and self.state_path.exists():
            saved = json.loads(self.state_path.read_text())
        elif not resumed:
            self.state_path.unlink(missing_ok=True)
            shutil.rmtree(run_dir / TENSORBOARD_DIR, ignore_errors=True)  # a fresh run starts a fresh curve
        self.state: dict[str, dict[str, Any]] = {name: dict(saved.get(name, {})) for name in names}
        self.trackers = {name: _CLASSES[name](run_dir, recipe, self.state[name]) for name in names}
        for name, tracker in self.trackers.items():
            self.state[name].update(getattr(tracker, "state", dict)())
        self._save_state()

    def log(self, event: dict[str, Any]) -> None:
        if not self.trackers:
            return
        position = list(event_order(event))
        for name, tracker in self.trackers.items():
            last = self.state[name].get("last_event")
            if last is not None and position <= last:
                continue  # delivered before the run was resumed: same numbers, keep the first copy
            tracker.log(event)
            self.state[name]["last_event"] = position
        self._save_state()

    def close(self, status: str = "FINISHED") -> None:
        """End every tracker's run: FINISHED, KILLED (interrupted; resumable) or FAILED (MLflow's names)."""
        for name, tracker in self.trackers.items():
            self.state[name].update(tracker.close(status))
        self.trackers = {}
        self._save_state()

    def _save_state(self) -> None:
        if self.state:
            atomic_write_text(self.state_path, json.dumps(self.state, indent=2) + "\n")
