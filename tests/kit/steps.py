"""Training steps in tests run the loop's own step (``peftcli.training.step.Stepper``): forward/backward,
``extra_loss``, ``auxiliary_loss``, ``after_backward``, clipping, ``optimizer.step``, ``after_step``, the scheduler and
``zero_grad``, in the loop's order, so what a test checks after a step is what training does."""

from __future__ import annotations

import dataclasses

import torch

from peftcli.recipe import Recipe, TrainConfig
from peftcli.training.optim import build_optimizer
from peftcli.training.step import Stepper, StepResult, loss_normaliser


def stepper(
    model: torch.nn.Module,
    method,
    *,
    recipe: Recipe | None = None,
    task: str | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
) -> Stepper:
    """The loop's ``Stepper`` with the optimizer the recipe's train section builds (``build_optimizer``;
    without a recipe AdamW, lr 1e-2, no weight decay, no clipping) and, given a recipe,
    ``method.on_train_start`` with its step count, as the loop calls it before the first step."""
    cfg = recipe.train if recipe is not None else TrainConfig(lr=1e-2, weight_decay=0.0, max_grad_norm=0.0)
    if lr is not None:
        cfg = dataclasses.replace(cfg, lr=lr)
    if weight_decay is not None:
        cfg = dataclasses.replace(cfg, weight_decay=weight_decay)
    task = task or (recipe.model.task if recipe is not None else "causal_lm")
    if recipe is not None and cfg.max_steps:
        method.on_train_start(model, cfg.max_steps)
    optimizer = build_optimizer(method.param_groups(model, cfg.lr, cfg.weight_decay), cfg)
    return Stepper(
        model=model, method=method, optimizer=optimizer, task=task, max_grad_norm=cfg.max_grad_norm
    )


def train_step(
    model: torch.nn.Module,
    method,
    batches: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]],
    *,
    recipe: Recipe | None = None,
    task: str | None = None,
    lr: float | None = None,
    steps: int = 1,
    start_step: int = 0,
) -> list[StepResult]:
    """``steps`` optimizer steps of a fresh :func:`stepper` on one window (a batch, or a list of
    micro-batches); the model trains in train mode and is left in eval mode."""
    micro = [batches] if isinstance(batches, dict) else list(batches)
    run = stepper(model, method, recipe=recipe, task=task, lr=lr)
    model.train()
    results = [run.step(micro, step) for step in range(start_step, start_step + steps)]
    model.eval()
    return results


def train_steps(model, method, batch, steps: int = 1, lr: float = 1e-2, start_step: int = 0) -> None:
    """The peft-oracle tests' form: ``steps`` plain AdamW steps (lr 1e-2) so weights are non-trivial."""
    train_step(model, method, batch, lr=lr, steps=steps, start_step=start_step)


def window_gradients(
    model, method, micro: list[dict[str, torch.Tensor]], task: str = "causal_lm", loss_path: str = "plain"
):
    """The loop's forward/backward over one accumulation window (``Stepper.backward_window``), without
    the update: (window loss, scored targets, the trainable gradients). Gradients start from zero."""
    model.zero_grad(set_to_none=True)
    n_targets = loss_normaliser(micro, task, method=method)
    stepper = Stepper(model=model, method=method, optimizer=None, task=task, loss_path=loss_path)  # no update
    loss, _, _ = stepper.backward_window(micro, n_targets)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, n_targets, grads


def thread_ranks(world: int, work) -> list:
    """``work(dist)`` for each of ``world`` ranks, run in threads whose ``Dist.sum_floats`` (the all-reduce
    every normaliser and estimate goes through) meet: a torchrun job's arithmetic without processes.
    The Dists' mode is "none" (no DDP wrapper: each rank's gradients stay its own, scaled by the world
    size as the loop scales them for DDP's average). Returns each rank's result; a rank's error is raised."""
    import threading

    from peftcli.training.distributed import Dist

    barrier, slots, results, errors = threading.Barrier(world, timeout=120), [None] * world, {}, []

    def rank(r: int) -> None:
        def sum_floats(values):
            slots[r] = list(values)
            barrier.wait()
            total = [sum(column) for column in zip(*slots, strict=True)]
            barrier.wait()
            return total

        dist = Dist("none", r, world)
        dist.sum_floats = sum_floats
        try:
            results[r] = work(dist)
        except BaseException as error:  # the others must not wait for this rank
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [results[r] for r in range(world)]


def rank_window(built, objective_cfg, micro: list[dict[str, torch.Tensor]], dist) -> tuple[float, dict]:
    """One rank's forward/backward over its micro-batches through the loop's Stepper with ``objective_cfg``,
    on its own copy of the built model: (its share of the window's loss, its gradients divided by the world
    size: DDP averages them, so the ranks' sum is the update)."""
    import copy

    from peftcli.training.objectives.registry import build_objective

    method, model = copy.deepcopy((built.method, built.model))
    model.train()
    objective = build_objective(objective_cfg, method, model, dist)
    stepper_ = Stepper(model=model, method=method, optimizer=None, objective=objective, dist=dist)
    loss, _, _ = stepper_.backward_window(micro, 1)
    grads = {n: p.grad / dist.world_size for n, p in model.named_parameters() if p.grad is not None}
    return loss, grads
