"""The training loop: one story read top to bottom (:func:`train`), its stages named functions.

Run it from the shell or from Python::

    peftcli train recipes/tiny/lora.yaml --output-dir runs/demo        # add --resume to continue
    python -c "import peftcli; print(peftcli.train('recipes/tiny/lora.yaml').to_json())"

It writes, under ``output_dir``::

    .peftcli.lock           pid, host, start time of the running run  (claim_run_dir)
    recipe.yaml             the resolved recipe                       (prepare_run_dir)
    metrics.jsonl           one JSON object per train/eval event      (reset_metrics, log_event)
    loggers.json            train.loggers' runs (TensorBoard, W&B,    (reset_metrics, log_event)
                            MLflow get metrics.jsonl's events too)
    checkpoints/step-N/     everything an exact resume needs          (save)
    adapter/                the adapter in peft's format              (finish)
    results.json summary.md the result as JSON and as a table         (finish)

The stages: :func:`claim_run_dir` (the lock, a finished run, --overwrite), :func:`prepare_run_dir`
(the checkpoint to resume from, checks before loading weights, recipe.yaml), :func:`set_up` (model,
method, data, optimizer, scheduler) and :func:`check_space`, :func:`restore` (or a fresh
:class:`TrainState`), then per optimizer step :func:`next_window` (index batches) →
:func:`collate_window` → :func:`~peftcli.training.step.loss_normaliser` → :func:`optimizer_step` (the
:class:`~peftcli.training.step.Stepper`) (→ :func:`skip_or_stop` when
the loss or gradient is not finite), with :func:`log_event`, :func:`run_eval` and :func:`save` on their
cadence, and :func:`finish` (final eval, export, results); :func:`answer_faults` turns CUDA OOM and a
full disk into advice. The only callbacks are the method hooks. What goes wrong and what users see:
docs/troubleshooting.md.

Under torchrun (``--nproc-per-node N``) every rank runs this same story with a
:class:`peftcli.training.distributed.Dist`: it takes its slice of each global window, the loss normaliser is
summed over ranks, DDP/FSDP reduce the gradients, and only rank 0 writes files (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import peftcli.checkpoint as ckpt
import peftcli.training.distributed as distributed
from peftcli.checkpoint import atomic_write_text
from peftcli.data.batching import (
    PlannedBatches,
    collate_packed,
    packed_steps,
    padding_fraction,
    plan_length_grouped,
    plan_packed,
    take_rows,
)
from peftcli.methods.catalog import get_method_class, method_for
from peftcli.methods.registry import Method, count_parameters
from peftcli.models import build_model
from peftcli.recipe import Recipe, RecipeError, dump_recipe
from peftcli.training import faults, metrics, rundir
from peftcli.training.attention import use_packed_attention
from peftcli.training.console import Reporter, peak_memory_bytes
from peftcli.training.distributed import Dist
from peftcli.training.loggers import Loggers, check_installed
from peftcli.training.loss import choose_loss_path, count_targets, token_loss_sum
from peftcli.training.optim import build_optimizer, build_scheduler, total_steps
from peftcli.training.results import TrainResult
from peftcli.training.step import Stepper, loss_normaliser

__all__ = [
    "TrainResult",
    "TrainState",
    "TrainingInterrupted",
    "count_targets",
    "token_loss_sum",
    "train",
]


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written before stopping."""

    def __init__(self, step: int, checkpoint: Path, signum: int):
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint}")


@dataclass
class Run:
    """What :func:`set_up` builds once; fixed for the whole run."""

    recipe: Recipe
    reporter: Reporter
    dist: Dist  # this process's rank and world (world size 1 in a single-process run)
    wrapped: torch.nn.Module  # what forward runs through: the model, or its DDP wrapper
    run_dir: Path
    device: torch.device
    base_path: str
    tokenizer: Any
    data: Any  # peftcli.data.DataBundle
    model: torch.nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: Any  # peftcli.data.BatchSampler: index windows over the lengths array, pure in (seed, epoch)
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    trainable_params: dict[str, torch.nn.Parameter]  # what the optimizer, clipping and checkpoints see
    steps: int  # optimizer steps in the whole run
    steps_per_epoch: int
    trainable: int
    total: int
    loss_path: str = "plain"  # peftcli.training.loss: plain, chunked (torch) or liger fused
    speed_lines: list[str] = field(default_factory=list)  # loss path, packing, compile: for the summary
    loggers: Loggers | None = None  # train.loggers, opened with metrics.jsonl by reset_metrics
    stepper: Stepper = field(init=False)  # the optimizer step over these fields (peftcli.training.step)

    def __post_init__(self) -> None:
        self.stepper = Stepper(
            model=self.model,
            method=self.method,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            task=self.recipe.model.task,
            device=self.device,
            wrapped=self.wrapped,
            dist=self.dist,
            scaler=self.scaler,
            amp_dtype=self.amp_dtype,
            loss_path=self.loss_path,
            max_grad_norm=self.recipe.train.max_grad_norm,
            trainable_params=self.trainable_params,
        )

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
    tokens_seen: int = 0  # attention-mask tokens in this process's life (for tokens/s)
    skipped_steps: int = 0  # steps dropped for a non-finite loss or gradient (train.on_nan: skip)
    elapsed_before: float = 0.0  # seconds spent before the checkpoint we resumed from
    started: float = field(default_factory=time.perf_counter)  # reset when the loop starts


def train(
    recipe: Recipe, resume: bool = False, reporter: Reporter | None = None, overwrite: bool = False
) -> TrainResult:
    """Train ``recipe``'s adapter; with ``resume``, continue from its newest intact checkpoint;
    with ``overwrite``, discard the run already in its output directory first.
    Under torchrun every rank calls this; rank 0 alone holds the run directory, writes and reports."""
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
    claim = claim_run_dir(recipe, resume, overwrite, reporter) if dist.is_main else contextlib.nullcontext()
    with claim:
        with dist.main_first():  # rank 0 claims and cleans the run directory and fills the caches first
            latest = prepare_run_dir(recipe, resume, reporter, dist.is_main)
        run = set_up(recipe, reporter, dist, device)
        check_space(run, latest)
        state = restore(run, latest) if latest is not None else TrainState()
        reset_metrics(run, state.step)
        report_start(run)
        eval_before = run_eval(run, 0) if latest is None else metrics.first_eval(run.metrics_path)

        cfg = recipe.train
        run.model.train()
        state.started = time.perf_counter()
        with answer_faults(run, state):
            with (
                stop_requests() as stop,
                reporter.progress(run.steps, state.step) as progress,
                trackers_ended_on_error(run),
            ):
                while state.step < run.steps:
                    window, next_position = next_window(run, state)
                    mine = run.dist.rank_slice(window)  # this rank's slice of the global window
                    micro = collate_window(run, mine)
                    run.dist.mask_padding(micro, run.dist.padding_flags(window))
                    n_targets = loss_normaliser(micro, run.task, run.dist)
                    loss, tokens, lr, fault = optimizer_step(run, micro, n_targets, state.step)
                    loss, tokens, stopping = run.dist.reduce_step(loss, tokens, bool(stop))
                    if fault is not None:
                        skip_or_stop(run, state, fault, window)  # raises unless train.on_nan lets it skip
                    state.step, (state.epoch, state.batch_index) = state.step + 1, next_position
                    if fault is None:
                        record_loss(state, loss, tokens)

                    progress.update(state.step, loss, lr, tokens_per_s(state))
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

            return finish(run, state, eval_before)


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


# -- set up ------------------------------------------------------------------------------------


@contextlib.contextmanager
def claim_run_dir(recipe: Recipe, resume: bool, overwrite: bool, reporter: Reporter):
    """Hold the run directory's lock for the whole run: no second train (a racing --resume included)
    writes into it. Inside: what a killed run left half-written is removed, a finished run is refused
    unless resumed, and --overwrite discards the earlier run."""
    run_dir = Path(recipe.output_dir)
    if resume and overwrite:
        raise RecipeError("--overwrite", "cannot be combined with --resume", "pass one of them")
    created = not run_dir.exists()
    lock = rundir.acquire_lock(run_dir, note=reporter.warn)
    try:
        rundir.remove_partial_files(run_dir)
        finished = rundir.finished_run(run_dir)
        if finished is not None and not resume and not overwrite:
            raise rundir.refuse_finished(run_dir, finished)
        if overwrite:
            removed = rundir.discard_run(run_dir)
            if removed:
                reporter.note(f"--overwrite: removed {', '.join(removed)} from {run_dir}")
        yield lock
    finally:
        lock.release()
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that failed its checks leaves no empty directory behind


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
        saved = latest.parent.parent / "recipe.yaml"
        if saved.exists() and _training_identity(saved.read_text()) != _training_identity(
            dump_recipe(recipe)
        ):
            raise RecipeError(
                "--resume",
                f"the recipe differs from the one {run_dir} was started with",
                f"resume with the same recipe (see {saved}) or start a new output_dir",
            )
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
    return latest


def set_up(
    recipe: Recipe, reporter: Reporter, dist: Dist | None = None, device_spec: str | None = None
) -> Run:
    """Seed, then build tokenizer, data, model + method (wrapped for DDP/FSDP), optimizer, scheduler and
    sampler (in this order: the random draws of each depend on those before it)."""
    from peftcli.data.pipeline import load_data
    from peftcli.data.sampler import BatchSampler
    from peftcli.models import load_tokenizer, resolve_device, resolve_model_name

    cfg = recipe.train
    dist = dist or Dist()
    distributed.check_method(
        dist, get_method_class(recipe.method.name), recipe.model.quantization is not None
    )
    if recipe.eval.tasks:
        check_eval_tasks(recipe, dist)
    seed_everything(cfg.seed)
    device = resolve_device(device_spec or cfg.device)
    with dist.main_first():  # rank 0 fills the caches (tiny model, tokenized data) before the others read
        base_path = resolve_model_name(recipe.model.name)
        tokenizer = load_tokenizer(base_path, recipe.model)
        data = load_data(
            recipe.data,
            tokenizer,
            recipe.model.task,
            log=reporter.note,
            console=None if reporter.quiet else reporter.console,
            model_name=recipe.model.name,
        )
    if not data.train:
        raise RecipeError(
            "data.train", "no training examples left after tokenization", "check the data and max_length"
        )
    method = method_for(recipe)
    model = build_model(
        base_path,
        recipe.model,
        method,
        device,
        seed=cfg.seed,
        label_names=data.label_names,
        pad_token_id=tokenizer.pad_token_id,
    )
    initialise_from_data(method, model, data.train, tokenizer, recipe, reporter, device)
    wrapped = distributed.wrap(dist, model)  # FSDP2 shards in place: parameters are DTensors after this
    trainable, total = count_parameters(model)
    global_cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size * dist.world_size)
    # global micro-batches (batch_size × world): each rank takes its slice (Dist.rank_slice)
    sampler, speed_lines = build_sampler(
        recipe,
        BatchSampler(data.train.lengths, global_cfg.batch_size, cfg.seed, mixture=data.mixture),
        dist.world_size,
    )
    steps, batches_per_epoch = total_steps(global_cfg, len(data.train))
    if cfg.packing:
        batches_per_epoch = len(sampler)
        steps = cfg.max_steps or packed_steps(sampler, cfg.epochs, cfg.grad_accum)
    method.on_train_start(model, steps)
    optimizer = build_optimizer(method.param_groups(model, cfg.lr, cfg.weight_decay), cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    amp_dtype = autocast_dtype(recipe, device)
    loss_path, why = choose_loss_path(model, recipe.model.task, cfg.loss, device)
    if dist.enabled and loss_path != "plain":  # DDP/FSDP hook the wrapped forward: run through it
        loss_path, why = "plain", f"distributed ({dist.mode}) runs the wrapped model's forward"
    speed_lines.insert(0, f"loss: {loss_path} ({why})")
    packed_on_cpu = cfg.packing and device.type == "cpu"
    if packed_on_cpu:
        switched, why = use_packed_attention(model)
        speed_lines.append(f"attention: {why}" if switched else f"attention: block-diagonal mask ({why})")
    if cfg.compile:
        compile_model(model, loss_path)
        warning = "; warning: with packing every step recompiles on the CPU (measured 33× slower)"
        speed_lines.append(
            "compile: torch.compile (the first steps compile)" + (warning if packed_on_cpu else "")
        )
    return Run(
        recipe=recipe,
        reporter=reporter,
        dist=dist,
        wrapped=wrapped,
        run_dir=Path(recipe.output_dir),
        device=device,
        base_path=base_path,
        tokenizer=tokenizer,
        data=data,
        model=model,
        method=method,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=sampler,
        amp_dtype=amp_dtype,
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
        trainable_params={n: p for n, p in model.named_parameters() if p.requires_grad},
        steps=steps,
        steps_per_epoch=max(1, math.ceil(batches_per_epoch / cfg.grad_accum)),
        trainable=trainable,
        total=total,
        loss_path=loss_path,
        speed_lines=speed_lines,
    )


def initialise_from_data(method, model, rows, tokenizer, recipe: Recipe, reporter: Reporter, device) -> None:
    """A data-driven init (LoRA's corda, eva, lora_ga) reads the first ``method.data_init_examples()``
    training examples, in file order and training's batch size, before the optimizer exists. Every rank
    reads the same examples, so every rank computes the same init."""
    from rich.progress import track

    from peftcli.data.collate import collate_rows

    count = min(method.data_init_examples(), len(rows))
    if not count:
        return
    size = recipe.train.batch_size
    chunks = [list(range(start, min(start + size, count))) for start in range(0, count, size)]
    batches = (
        {k: v.to(device) for k, v in collate_rows(rows, chunk, tokenizer, recipe.model.task).items()}
        for chunk in chunks
    )
    if not reporter.quiet:
        label = f"init {getattr(recipe.method, 'init', recipe.method.name)} from {count} examples"
        batches = track(
            batches, total=len(chunks), description=label, console=reporter.console, transient=True
        )
    method.init_from_data(model, batches)


def build_sampler(recipe: Recipe, plain, world_size: int = 1) -> tuple[Any, list[str]]:
    """The micro-batch plan of every epoch: ``plain`` (the data stage's shuffled sampler), or length-grouped
    or packed batches planned over its epoch order and lengths array; and the summary lines saying how much
    padding that saves against shuffled batches padded to their longest."""
    cfg = recipe.train
    lengths, order = plain.lengths, plain.epoch_order
    if not (cfg.packing or cfg.group_by_length):
        return plain, []
    before = padding_fraction(lengths, plain.epoch_batches(0), packed=False)
    if cfg.group_by_length:
        sampler = PlannedBatches(
            lambda epoch: plan_length_grouped(
                lengths, order(epoch), cfg.seed, epoch, cfg.batch_size * world_size
            ),
            len(lengths),
        )
        after = padding_fraction(lengths, sampler.epoch_batches(0), packed=False)
        return sampler, [f"group_by_length: padding {100 * before:.0f}% → {100 * after:.0f}% of tokens"]
    row_tokens = max(recipe.data.max_length, int(lengths.max()))
    budget = cfg.batch_tokens or cfg.batch_size * recipe.data.max_length
    rows = max(1, budget // row_tokens) * world_size  # global micro-batches: each rank takes its rows
    sampler = PlannedBatches(
        lambda epoch: plan_packed(lengths, order(epoch), cfg.seed, epoch, row_tokens, rows), len(lengths)
    )
    after = padding_fraction(lengths, sampler.epoch_batches(0), packed=True)
    line = (
        f"packing: {rows} rows × ≤{row_tokens} tokens per micro-batch, {len(sampler)} micro-batches per epoch; "
        f"padding {100 * before:.0f}% → {100 * after:.1f}% of tokens"
    )
    return sampler, [line]


def compile_model(model: torch.nn.Module, loss_path: str) -> None:
    """torch.compile in place (parameter names unchanged, so checkpoints and exports are too). The chunked
    loss calls the body and the head itself, so those are what gets compiled there."""
    from peftcli.training.loss import PLAIN, body_and_head

    if loss_path == PLAIN:
        model.compile()
        return
    body, _ = body_and_head(model)
    body.compile()


def check_space(run: Run, latest: Path | None) -> None:
    """The free-space check again with the exact trainable count (preflight could only estimate it)."""
    on_disk = len(ckpt.list_checkpoints(run.run_dir)) if latest is not None else 0
    rundir.check_free_space(run.run_dir, *rundir.space_needed(run.trainable, run.recipe.train, on_disk))


def report_start(run: Run) -> None:
    base_lines = None
    if run.recipe.model.quantization is not None:
        from peftcli.quantize import summary_lines

        base_lines = summary_lines(run.model, run.recipe.model.quantization)
    run.reporter.start_summary(
        run.recipe,
        run.method,
        run.trainable,
        run.total,
        run.data.stats,
        run.steps,
        run.device,
        base_lines,
        run.speed_lines,
    )
    if run.dist.enabled:
        cfg = run.recipe.train
        run.reporter.note(
            f"distributed: {run.dist.mode} on {run.dist.world_size} processes ({run.dist.backend}); "
            f"global batch {cfg.batch_size} × accum {cfg.grad_accum} × {run.dist.world_size} processes "
            f"= {cfg.batch_size * cfg.grad_accum * run.dist.world_size} examples"
        )


# -- restore -----------------------------------------------------------------------------------


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


# -- one optimizer step ------------------------------------------------------------------------


def next_window(run: Run, state: TrainState) -> tuple[list[list[int]], tuple[int, int]]:
    """The global index batches of the next accumulation window, and (epoch, batch_index) after it.
    (The sampler keeps one epoch's order at a time; distributed ranks take their slice of each batch.)"""
    window = run.sampler.window(state.epoch, state.batch_index, run.recipe.train.grad_accum)
    next_batch = state.batch_index + len(window)
    if next_batch >= run.sampler.batches_in(state.epoch):
        return window, (state.epoch + 1, 0)
    return window, (state.epoch, next_batch)


def collate_window(run: Run, window: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    """One padded micro-batch per index batch, read from the memory-mapped tokenized table; with packing,
    one packed micro-batch per list of rows."""
    from peftcli.data.collate import collate_rows, pad_token_id

    if run.recipe.train.packing:
        return [
            collate_packed(take_rows(run.data.train, batch), pad_token_id(run.tokenizer)) for batch in window
        ]
    return [collate_rows(run.data.train, indices, run.tokenizer, run.task) for indices in window]


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


def record_loss(state: TrainState, loss: float, tokens: int) -> None:
    state.first_loss = loss if state.first_loss is None else state.first_loss
    state.last_loss = loss
    state.window_losses.append(loss)
    state.tokens_seen += tokens


def tokens_per_s(state: TrainState) -> float:
    return state.tokens_seen / max(time.perf_counter() - state.started, 1e-9)


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


# -- log, eval, save: every file the loop writes goes through these and finish -----------------


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
    log_event(
        run,
        {
            "event": "train",
            "step": state.step,
            "epoch": round(state.step / run.steps_per_epoch, 4),
            "loss": sum(state.window_losses) / len(state.window_losses) if state.window_losses else None,
            "lr": lr,
            "tokens_per_s": round(tokens_per_s(state), 1),
            "elapsed_s": round(state.elapsed_before + time.perf_counter() - state.started, 3),
        },
    )
    state.window_losses.clear()


def run_eval(run: Run, step: int) -> dict[str, float] | None:
    from peftcli.evaluate import evaluate

    if not run.data.eval:
        return None
    with run.reporter.status("evaluating"):
        result = evaluate(run.model, run.tokenizer, run.data, run.task, run.recipe.eval, run.device)
    log_event(run, {"event": "eval", "step": step, **result})
    return result


def check_eval_tasks(recipe: Recipe, dist: Dist) -> None:
    """eval.tasks: lm-eval installed, the include path safe, the task names known, before training."""
    from peftcli.harness import check_tasks, recipe_task_options

    if dist.enabled:
        raise RecipeError(
            "eval.tasks",
            f"lm-eval tasks run in one process; this run has {dist.world_size}",
            "drop eval.tasks and run `peftcli eval RUN/adapter --tasks ...` after training",
        )
    check_tasks(recipe_task_options(recipe.eval), names=True)


def run_eval_tasks(run: Run) -> dict[str, dict[str, Any]]:
    """lm-eval's per-task metrics for the trained model, unmerged (results.json's ``tasks``)."""
    from peftcli.harness import recipe_task_options, run_tasks

    with run.reporter.status(f"lm-eval: {', '.join(run.recipe.eval.tasks)}"):
        result = run_tasks(
            run.model, run.tokenizer, run.task, run.device, recipe_task_options(run.recipe.eval)
        )
    return result["tasks"]


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


# -- finish ------------------------------------------------------------------------------------


def finish(run: Run, state: TrainState, eval_before: dict[str, float] | None) -> TrainResult:
    """Final eval, the adapter in peft's format, results.json and summary.md."""
    from peftcli.export import save_adapter

    elapsed = state.elapsed_before + (time.perf_counter() - state.started)
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
                run.data.label_names,
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
        tokens_per_s(state),
        run.trainable,
        run.total,
        run.data.stats,
        peak_memory_bytes(run.device),
        tasks,
    )
    if run.dist.is_main:
        run.loggers.close()
        atomic_write_text(run.run_dir / "results.json", json.dumps(result.to_json(), indent=2) + "\n")
        atomic_write_text(run.run_dir / "summary.md", run.reporter.summary_markdown(result))
    return result


# -- building blocks (also used by tests and benchmarks) ----------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def autocast_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    mode = recipe.train.mixed_precision
    if device.type != "cuda" or mode == "no":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _training_identity(recipe_yaml: str) -> str:
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
