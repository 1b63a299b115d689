"""Checkpoints of a run: which one to resume from (:func:`prepare_run_dir`), the disk space they need
(:func:`check_space`), writing one (:func:`save`) and restoring from one (:func:`restore`).

``checkpoints/step-N/`` holds everything an exact resume needs: the trainable weights, the optimizer's and
the method's state, every rank's RNG state and the trainer's position (step, epoch, batch_index, the
scheduler). peftcli.checkpoint writes and verifies the files; this module decides what goes in them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import peftcli.checkpoint as ckpt
import peftcli.training.distributed as distributed
from peftcli.checkpoint import atomic_write_text
from peftcli.recipe import Recipe, RecipeError, dump_recipe
from peftcli.training import metrics, rundir
from peftcli.training.console import Reporter
from peftcli.training.loggers import check_installed
from peftcli.training.state import Run, TrainState

__all__ = ["check_space", "prepare_run_dir", "restore", "save"]


def prepare_run_dir(recipe: Recipe, resume: bool, reporter: Reporter, is_main: bool = True) -> Path | None:
    """Check the run directory against ``resume`` and everything that can fail before the weights are
    loaded (rundir.preflight), write recipe.yaml (rank 0); the checkpoint to resume from."""
    from peftcli.models import resolve_model_name

    run_dir = Path(recipe.output_dir)
    check_installed(recipe.train.loggers)  # a missing tracker fails here, before any weights load
    latest = ckpt.resume_checkpoint(run_dir, warn=reporter.warn) if resume else None
    if resume and latest is None:
        reporter.note(f"--resume: no complete checkpoint in {run_dir}/checkpoints, starting from scratch")
    if not resume and ckpt.list_checkpoints(run_dir):
        raise RecipeError(
            "output_dir",
            f"{run_dir} already holds checkpoints from an earlier run",
            "pass --resume to continue it, choose another --output-dir, or pass --overwrite to discard it",
        )
    on_disk = len(ckpt.list_checkpoints(run_dir)) if resume else 0
    rundir.preflight(recipe, resolve_model_name(recipe.model.name), on_disk)
    if latest is not None:
        check_same_recipe(recipe, latest)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
    return latest


def check_same_recipe(recipe: Recipe, checkpoint: Path) -> None:
    """--resume continues the run its directory was started with: refuse a recipe that trains differently."""
    saved = checkpoint.parent.parent / "recipe.yaml"
    if saved.exists() and saved_identity(saved.read_text()) != training_identity(dump_recipe(recipe)):
        raise RecipeError(
            "--resume",
            f"the recipe differs from the one {Path(recipe.output_dir)} was started with",
            f"resume with the same recipe (see {saved}) or start a new output_dir",
        )


def saved_identity(recipe_yaml: str) -> str:
    """The identity of a run directory's recipe.yaml as this release reads it: a run started before a
    recipe key existed saved no value for it, and the key's default is what that run trained with (a new
    key's default keeps the old behaviour). A recipe this release cannot read keeps its text as written,
    which then differs from any recipe it can."""
    import yaml

    from peftcli.recipe_loader import build_recipe

    try:
        return training_identity(dump_recipe(build_recipe(yaml.safe_load(recipe_yaml))))
    except RecipeError:
        return training_identity(recipe_yaml)


def training_identity(recipe_yaml: str) -> str:
    """The parts of a recipe that must not change across --resume (logging cadence may; so may the loss
    path and compile, which compute the same numbers)."""
    import yaml

    raw = yaml.safe_load(recipe_yaml)
    for key in ("log_every", "eval_every", "save_every", "keep_checkpoints", "loggers", "loss", "compile"):
        raw.get("train", {}).pop(key, None)
    raw.pop("eval", None)
    # Recomputing activations changes memory, not the numbers: the advice after CUDA OOM relies on it.
    raw.get("model", {}).pop("gradient_checkpointing", None)
    return json.dumps(raw, sort_keys=True)


def check_space(run: Run, latest: Path | None) -> None:
    """The free-space check again with the exact trainable count (preflight could only estimate it)."""
    on_disk = len(ckpt.list_checkpoints(run.run_dir)) if latest is not None else 0
    rundir.check_free_space(run.run_dir, *rundir.space_needed(run.trainable, run.recipe.train, on_disk))


def save(run: Run, state: TrainState) -> Path:
    """Write checkpoints/step-N atomically: everything an exact resume needs. Every rank calls it (FSDP
    gathers full tensors, and every rank's RNG state is kept); rank 0 writes."""
    rng = ckpt.rng_state()
    if run.dist.enabled:  # dropout draws differ per rank: keep each rank's generator
        rng = {**rng, "per_rank": run.dist.gather_objects(rng)}
    payload = {
        "trainable": distributed.full_tree({n: p.detach() for n, p in run.trainable_params.items()}),
        "optimizer": distributed.full_tree(run.optimizer.state_dict()),
        "method_state": run.method.method_state(),
        "rng": rng,
        "trainer_state": {
            "world_size": run.dist.world_size,
            "step": state.step,
            "epoch": state.epoch,
            "batch_index": state.batch_index,
            "scheduler": run.scheduler.state_dict(),
            "total_steps": run.steps,
            "skipped_steps": state.skipped_steps,
        },
    }
    if not run.dist.is_main:
        return ckpt.checkpoints_dir(run.run_dir) / f"step-{state.step}"
    return ckpt.save_checkpoint(run.run_dir, state.step, payload, run.recipe.train.keep_checkpoints)


def restore(run: Run, checkpoint: Path) -> TrainState:
    """Trainable weights, optimizer, scheduler, method state and RNG (this rank's) from ``checkpoint``."""
    saved = ckpt.load_checkpoint(checkpoint, expected_trainable=run.trainable_params)
    trainer = saved["trainer_state"]
    saved_world = trainer.get("world_size", 1)
    if saved_world != run.dist.world_size:
        raise RecipeError(
            "--resume",
            f"{checkpoint} was written by a run on {saved_world} process(es); "
            f"this run has {run.dist.world_size}",
            f"resume with the same world size (--nproc-per-node × --nnodes = {saved_world}) "
            "or start a new output_dir",
        )
    with torch.no_grad():
        for name, value in saved["trainable"].items():
            param = run.trainable_params[name]
            param.copy_(distributed.like(param, value))
    run.optimizer.load_state_dict(saved["optimizer"])
    distributed.shard_optimizer_state(run.optimizer)
    run.method.load_method_state(saved["method_state"])
    run.scheduler.load_state_dict(trainer["scheduler"])
    ckpt.set_rng_state(saved["rng"].get("per_rank", [saved["rng"]])[run.dist.rank])
    run.reporter.note(f"resuming from {checkpoint} (step {trainer['step']} of {run.steps})")
    return TrainState(
        step=trainer["step"],
        epoch=trainer["epoch"],
        batch_index=trainer["batch_index"],
        elapsed_before=metrics.elapsed_at(run.metrics_path, trainer["step"]),
        skipped_steps=trainer.get("skipped_steps", 0),
    )
