"""What the loop reports while it runs: metrics.jsonl's events (train, eval, skipped steps), fed to
train.loggers' trackers too, and the evaluations that produce them. Only rank 0 writes."""

from __future__ import annotations

from typing import Any

from peftcli.training import metrics
from peftcli.training.loggers import Loggers
from peftcli.training.state import Run, TrainState

__all__ = ["log_event", "log_train", "reset_metrics", "run_eval", "run_eval_tasks"]


def reset_metrics(run: Run, step: int) -> None:
    """A fresh run starts metrics.jsonl anew; a resumed one drops the events logged after its checkpoint
    (they will be logged again)."""
    if not run.dist.is_main:
        return
    metrics.start(run.metrics_path, step)
    run.loggers = Loggers(run.run_dir, run.recipe, resumed=step > 0)


def log_event(run: Run, event: dict[str, Any]) -> None:
    if not run.dist.is_main:
        return
    metrics.append(run.metrics_path, event)
    run.loggers.log(event)  # the same event to TensorBoard / W&B / MLflow, where train.loggers names them


def log_train(run: Run, state: TrainState, lr: float) -> None:
    """The train event: the mean loss since the last one, the lr, throughput and time so far."""
    log_event(
        run,
        {
            "event": "train",
            "step": state.step,
            "epoch": round(state.step / run.steps_per_epoch, 4),
            "loss": sum(state.window_losses) / len(state.window_losses) if state.window_losses else None,
            "lr": lr,
            "tokens_per_s": round(state.tokens_per_s(), 1),
            "elapsed_s": round(state.elapsed(), 3),
            **state.mean_metrics(),  # the objective's (grpo: reward, reward_std, rewards/NAME, kl)
        },
    )
    state.window_losses.clear()
    state.window_metrics.clear()


def run_eval(run: Run, step: int) -> dict[str, float] | None:
    """The eval split's metrics at ``step``, logged as an eval event; None without an eval split."""
    from peftcli.evaluate import evaluate

    if not run.data.eval:
        return None
    with run.reporter.status("evaluating"):
        objective = run.stepper.objective
        if objective is not None and objective.samples:
            from peftcli.training.objectives.rollout import evaluate_greedy

            result = evaluate_greedy(objective, run)
        elif objective is not None:
            result = evaluate_pairs(run)
        else:
            use_cache = run.method.decodes_with_cache
            result = evaluate(
                run.model, run.tokenizer, run.data, run.task, run.recipe.eval, run.device, use_cache=use_cache
            )
    log_event(run, {"event": "eval", "step": step, **result})
    return result


def evaluate_pairs(run: Run) -> dict[str, float]:
    """A preference objective's eval: its loss over the eval pairs, the mean rewards of the chosen and
    rejected answers, their margin, and the share of pairs ranked right (a positive margin)."""
    import torch

    from peftcli.data.collate import collate_rows

    objective, rows, size = run.stepper.objective, run.data.eval, run.recipe.eval.batch_size
    was_training = run.model.training
    run.model.eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(rows), size):
            batch = collate_rows(rows, range(start, min(start + size, len(rows))), run.tokenizer, run.task)
            batch = {k: v.to(run.device) for k, v in batch.items()}
            parts.append(objective.score(run.model, batch).detached())
    run.model.train(was_training)
    return objective.metrics(type(parts[0]).cat(parts))  # PairScores, or KtoScores


def run_eval_tasks(run: Run) -> dict[str, dict[str, Any]]:
    """lm-eval's per-task metrics for the trained model, unmerged (results.json's ``tasks``)."""
    from peftcli.harness import recipe_task_options, run_tasks

    with run.reporter.status(f"lm-eval: {', '.join(run.recipe.eval.tasks)}"):
        options = recipe_task_options(run.recipe.eval)
        use_cache = run.method.decodes_with_cache
        result = run_tasks(run.model, run.tokenizer, run.task, run.device, options, use_cache)
    return result["tasks"]
