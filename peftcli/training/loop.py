"""The training loop: one story read top to bottom (:func:`train`); its stages live in the modules
named below.

Run it from the shell or from Python::

    peftcli train recipes/tiny/lora.yaml --output-dir runs/demo        # add --resume to continue
    python -c "import peftcli; print(peftcli.train('recipes/tiny/lora.yaml').to_json())"

It writes, under ``output_dir``::

    .peftcli.lock           pid, host, start time of the running run  (rundir.claim_run_dir)
    recipe.yaml             the resolved recipe                       (checkpoints.prepare_run_dir)
    metrics.jsonl           one JSON object per train/eval event      (events.reset_metrics, log_event)
    loggers.json            train.loggers' runs (TensorBoard, W&B,    (events.reset_metrics, log_event)
                            MLflow get metrics.jsonl's events too)
    checkpoints/step-N/     everything an exact resume needs          (checkpoints.save)
    adapter/                the adapter in peft's format              (finish)
    results.json summary.md the result as JSON and as a table         (finish)

The story: claim the run directory (:func:`~peftcli.training.rundir.claim_run_dir`: the lock, a finished
run, --overwrite), find the checkpoint to resume from and check everything that can fail before the
weights load (:func:`~peftcli.training.checkpoints.prepare_run_dir`), build the run
(:func:`~peftcli.training.setup.set_up`: data, model + method, sampler, optimizer), restore it
(:func:`~peftcli.training.checkpoints.restore`, or a fresh :class:`TrainState`), then
:func:`train_steps`: per optimizer step :func:`next_window` (index batches) → :func:`collate_window` →
:func:`~peftcli.training.step.loss_normaliser` → :func:`optimizer_step` (the run's
:class:`~peftcli.training.step.Stepper`; :func:`skip_or_stop` when the loss or gradient is not finite),
with the train event, eval and a checkpoint on their cadence (peftcli.training.events, .checkpoints), and
:func:`finish` (final eval, export, results). :func:`answer_faults` turns CUDA OOM and a full disk into
advice. The only callbacks are the method hooks. What goes wrong and what users see:
docs/troubleshooting.md.

Under torchrun (``--nproc-per-node N``) every rank runs this same story with a
:class:`peftcli.training.distributed.Dist`: it takes its slice of each global window, the loss normaliser is
summed over ranks, DDP/FSDP reduce the gradients, and only rank 0 writes files (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import torch

import peftcli.checkpoint as ckpt
import peftcli.training.distributed as distributed
from peftcli.checkpoint import atomic_write_text
from peftcli.data.batching import collate_packed, take_rows
from peftcli.recipe import Recipe
from peftcli.training import faults, metrics, rundir
from peftcli.training.checkpoints import check_space, prepare_run_dir, restore, save
from peftcli.training.console import Reporter, peak_memory_bytes
from peftcli.training.distributed import Dist
from peftcli.training.events import log_event, log_train, reset_metrics, run_eval, run_eval_tasks
from peftcli.training.loss import count_targets, token_loss_sum
from peftcli.training.results import TrainResult
from peftcli.training.setup import head_labels, report_start, set_up
from peftcli.training.state import Run, TrainState
from peftcli.training.step import loss_normaliser

__all__ = [
    "TrainResult",
    "TrainState",
    "TrainingInterrupted",
    "count_targets",  # re-exported: tests and benches score losses as the loop does
    "token_loss_sum",
    "train",
]


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written before stopping."""

    def __init__(self, step: int, checkpoint: Path, signum: int):
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint}")


def train(
    recipe: Recipe,
    resume: bool = False,
    reporter: Reporter | None = None,
    overwrite: bool = False,
    allow_code: bool = False,
) -> TrainResult:
    """Train ``recipe``'s adapter; with ``resume``, continue from its newest intact checkpoint;
    with ``overwrite``, discard the run already in its output directory first; ``allow_code`` lets the
    recipe's Python rewards (grpo) run, as ``peftcli train --allow-code`` does.
    Under torchrun every rank calls this; rank 0 alone holds the run directory, writes and reports."""
    from peftcli.training.objectives.rewards import check_code

    check_code(recipe, allow_code)  # before anything starts: refused code runs nothing
    dist, device = distributed.init(recipe.train.distributed, recipe.train.device)
    ok = False
    try:
        result = _train(recipe, resume, reporter if dist.is_main else None, overwrite, dist, device)
        ok = True
        return result
    finally:
        dist.shutdown(ok)


def _train(
    recipe: Recipe, resume: bool, reporter: Reporter | None, overwrite: bool, dist: Dist, device: str
) -> TrainResult:
    reporter = reporter or Reporter(quiet=True)
    claim = (
        rundir.claim_run_dir(recipe, resume, overwrite, reporter)
        if dist.is_main
        else contextlib.nullcontext()
    )
    with claim:
        with dist.main_first():  # rank 0 claims and cleans the run directory and fills the caches first
            latest = prepare_run_dir(recipe, resume, reporter, dist.is_main)
        run = set_up(recipe, reporter, dist, device)
        check_space(run, latest)
        state = restore(run, latest) if latest is not None else TrainState()
        reset_metrics(run, state.step)
        report_start(run)
        eval_before = run_eval(run, 0) if latest is None else metrics.first_eval(run.metrics_path)
        run.model.train()
        state.started = time.perf_counter()
        with answer_faults(run, state):
            train_steps(run, state)
            return finish(run, state, eval_before)


def train_steps(run: Run, state: TrainState) -> None:
    """Optimizer steps until ``run.steps``: each takes the next window, updates, and logs, evaluates and
    checkpoints on the recipe's cadence. A signal checkpoints at the step every rank reaches, then stops."""
    cfg = run.recipe.train
    with (
        stop_requests() as stop,
        run.reporter.progress(run.steps, state.step) as progress,
        trackers_ended_on_error(run),
    ):
        while state.step < run.steps:
            window, next_position = next_window(run, state)
            micro = collate_window(run, window, state.step)  # this rank's slice; grpo: sampled completions
            run.dist.mask_padding(micro, run.dist.padding_flags(window))
            n_targets = loss_normaliser(micro, run.task, run.dist, run.method)
            loss, tokens, lr, fault = optimizer_step(run, micro, n_targets, state.step)
            loss, tokens, stopping = run.dist.reduce_step(loss, tokens, bool(stop))
            measured = objective_metrics(run)  # every rank: grpo sums its KL over ranks here
            if fault is not None:
                skip_or_stop(run, state, fault, window)  # raises unless train.on_nan lets it skip
            state.step, (state.epoch, state.batch_index) = state.step + 1, next_position
            if fault is None:
                state.record_loss(loss, tokens, measured)

            progress.update(state.step, loss, lr, state.tokens_per_s(), state.note())
            if state.step % cfg.log_every == 0 or state.step == run.steps:
                log_train(run, state, lr)
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < run.steps:
                run_eval(run, state.step)
                run.model.train()
            if (cfg.save_every and state.step % cfg.save_every == 0) or state.step == run.steps:
                save(run, state)
            if stopping:  # any rank got a signal: all checkpoint at this same step and stop
                signum = stop[0] if stop else signal.SIGTERM
                raise TrainingInterrupted(state.step, save(run, state), signum)


@contextlib.contextmanager
def trackers_ended_on_error(run: Run):
    """If the loop stops early, end the trackers' runs too: KILLED when interrupted (resumable), else FAILED."""
    try:
        yield
    except BaseException as error:
        if run.loggers is not None:
            interrupted = isinstance(error, (TrainingInterrupted, KeyboardInterrupt))
            run.loggers.close("KILLED" if interrupted else "FAILED")
        raise


# -- one optimizer step ------------------------------------------------------------------------


def next_window(run: Run, state: TrainState) -> tuple[list[list[int]], tuple[int, int]]:
    """The global index batches of the next accumulation window, and (epoch, batch_index) after it.
    (The sampler keeps one epoch's order at a time; distributed ranks take their slice of each batch.)"""
    window = run.sampler.window(state.epoch, state.batch_index, run.recipe.train.grad_accum)
    next_batch = state.batch_index + len(window)
    if next_batch >= run.sampler.batches_in(state.epoch):
        return window, (state.epoch + 1, 0)
    return window, (state.epoch, next_batch)


def collate_window(run: Run, window: list[list[int]], step: int = 0) -> list[dict[str, torch.Tensor]]:
    """This rank's slice of the global ``window`` (Dist.rank_slice; one process: all of it), one padded
    micro-batch per index batch, read from the memory-mapped tokenized table; with packing, one packed
    micro-batch per list of rows. An objective that samples (grpo) rolls its prompts out instead: their
    completions, sampled at optimizer step ``step`` and rewarded, are the micro-batches. KTO's KL rows
    take the completions of the examples before the rank's own in the whole micro-batch."""
    from peftcli.data.collate import collate_rows, collate_unpaired, pad_token_id

    mine, train = run.dist.rank_slice(window), run.data.train
    objective = run.stepper.objective
    if objective is not None and objective.samples:
        from peftcli.training.objectives.rollout import roll_out

        rows = [train.take(indices) for indices in mine]
        layout = {"offsets": run.dist.slice_offsets(window), "stand_ins": run.dist.padding_flags(window)}
        return roll_out(
            objective,
            run.model,
            run.tokenizer,
            rows,
            step,
            run.recipe.train.seed,
            run.device,
            **layout,
            use_cache=run.method.decodes_with_cache,
        )
    if objective is not None and objective.data_format == "unpaired_preference":
        partners = run.dist.rank_slice([[batch[i - 1] for i in range(len(batch))] for batch in window])
        return [
            collate_unpaired(train.take(indices), run.tokenizer, train.take(before))
            for indices, before in zip(mine, partners, strict=True)
        ]
    if run.recipe.train.packing:
        return [collate_packed(take_rows(train, batch), pad_token_id(run.tokenizer)) for batch in mine]
    return [collate_rows(train, indices, run.tokenizer, run.task) for indices in mine]


def objective_metrics(run: Run) -> dict[str, float]:
    """What the objective measured this step (grpo: reward mean and std, each reward, KL), else nothing."""
    take = getattr(run.stepper.objective, "step_metrics", None)
    return take() if take is not None else {}


def optimizer_step(
    run: Run, micro: list[dict[str, torch.Tensor]], n_targets: int, step: int
) -> tuple[float, int, float, faults.NonFinite | None]:
    """The run's :class:`Stepper` step: (window loss, tokens seen, the lr this step used, the fault if the
    loss or gradient norm was not finite). The loop looks this name up at every step, so a test or a bench
    can wrap it (tests/helpers/raise_on_rank.py, bench/throughput.py)."""
    result = run.stepper.step(micro, step, n_targets)
    return result.loss, result.tokens, result.lr, result.fault


def skip_or_stop(run: Run, state: TrainState, fault: faults.NonFinite, window: list[list[int]]) -> None:
    """train.on_nan: stop here (the last good checkpoint stays), or count the skipped step, log it to
    metrics.jsonl and go on, until more than train.max_skipped_steps were skipped. ``window``: the
    step's index batches, so the message names the examples."""
    if run.recipe.train.packing:  # a packed micro-batch is a list of rows of example indices
        window = [[i for row in batch for i in row] for batch in window]
    fault.name_examples(window)
    cfg = run.recipe.train
    last_good = ckpt.latest_checkpoint(run.run_dir)
    if cfg.on_nan == "stop":
        raise faults.stop_error(fault, last_good, 0, cfg.max_skipped_steps)
    state.skipped_steps += 1
    if state.skipped_steps > cfg.max_skipped_steps:
        raise faults.stop_error(fault, last_good, state.skipped_steps, cfg.max_skipped_steps)
    log_event(run, fault.event(state.skipped_steps))
    run.reporter.warn(
        f"skipped {fault.describe()} ({state.skipped_steps} of at most {cfg.max_skipped_steps})"
    )


@contextlib.contextmanager
def answer_faults(run: Run, state: TrainState):
    """CUDA out of memory becomes advice with this run's numbers (exit code 3); a full disk while
    writing metrics or the adapter becomes one line saying how much space is needed."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise faults.out_of_memory(
            run.recipe,
            state.step + 1,
            "training" if state.step < run.steps else "the final eval",
            ckpt.latest_checkpoint(run.run_dir),
            type(run.method).supports_quantized_base,
        ) from None
    except OSError as err:
        if err.errno not in ckpt.DISK_ERRORS:
            raise
        what = Path(err.filename).name if err.filename else "a file"
        needed = rundir.adapter_bytes(run.trainable)
        raise ckpt.disk_error(err, what, run.run_dir, needed, ckpt.latest_checkpoint(run.run_dir)) from None


@contextlib.contextmanager
def stop_requests():
    """Collect SIGINT/SIGTERM instead of dying mid-step; the loop checkpoints and stops."""
    received: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, frame: received.append(signum))
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# -- finish ------------------------------------------------------------------------------------


def finish(run: Run, state: TrainState, eval_before: dict[str, float] | None) -> TrainResult:
    """Final eval, the adapter in peft's format, results.json and summary.md."""
    from peftcli.export import save_adapter

    elapsed = state.elapsed()
    eval_after = run_eval(run, state.step)
    tasks = run_eval_tasks(run) if run.recipe.eval.tasks else None
    adapter_dir = run.run_dir / "adapter"
    with distributed.unsharded(run.model) if run.dist.mode == "fsdp" else contextlib.nullcontext():
        if run.dist.is_main:
            save_adapter(
                adapter_dir,
                run.model,
                run.method,
                run.tokenizer,
                run.base_path,
                run.recipe.model,
                head_labels(run.recipe, run.data),
                seed=run.recipe.train.seed,
            )
    result = TrainResult(
        run.run_dir,
        adapter_dir,
        state.step,
        eval_before,
        eval_after,
        state.first_loss,
        state.last_loss,
        elapsed,
        state.tokens_per_s(),
        run.trainable,
        run.total,
        run.data.stats,
        peak_memory_bytes(run.device),
        tasks,
    )
    if run.dist.is_main:
        run.loggers.close()
        atomic_write_text(run.run_dir / "results.json", json.dumps(result.to_json(), indent=2) + "\n")
        atomic_write_text(
            run.run_dir / "summary.md", run.reporter.summary_markdown(result, run.method.summary_lines())
        )
    return result
