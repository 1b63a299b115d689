"""Set up a run: :func:`set_up` builds the :class:`~peftcli.training.state.Run` from a recipe in named stages,
in this order (the random draws of each depend on those before it):

    check_recipe     what can be refused before anything loads (method × distributed, eval tasks,
                     model.adapter)
    seed_everything  Python's and torch's generators
    load_inputs      the base model's path, its tokenizer and the tokenized data
    load_model       base model + method (peftcli.models.build_model); model.adapter's weights after
                     any data-driven init (peftcli.training.continuing)
    plan_batches     the sampler (shuffled, length-grouped or packed) and the number of steps
    build_stepper    optimizer, scheduler, mixed precision, loss path, packed attention, compile

:func:`report_start` prints the start summary once the run is set up.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Any

import torch

import peftcli.training.distributed as distributed
from peftcli.data.batching import (
    PlannedBatches,
    packed_steps,
    padding_fraction,
    plan_length_grouped,
    plan_packed,
)
from peftcli.methods.catalog import get_method_class, method_for
from peftcli.methods.registry import Method, count_parameters
from peftcli.models import build_model
from peftcli.recipe import Recipe, RecipeError
from peftcli.training.attention import use_packed_attention
from peftcli.training.console import Reporter
from peftcli.training.continuing import check_start_adapter, load_start_adapter
from peftcli.training.distributed import Dist
from peftcli.training.loss import choose_loss_path
from peftcli.training.objectives.precompute import attach_references
from peftcli.training.objectives.registry import build_objective
from peftcli.training.optim import build_optimizer, build_scheduler, total_steps
from peftcli.training.state import Run
from peftcli.training.step import Stepper

__all__ = ["autocast_dtype", "build_sampler", "report_start", "seed_everything", "set_up"]


def set_up(
    recipe: Recipe, reporter: Reporter, dist: Dist | None = None, device_spec: str | None = None
) -> Run:
    """Seed, then build tokenizer, data, model + method (wrapped for DDP/FSDP), sampler, optimizer and
    scheduler (in this order: the random draws of each depend on those before it)."""
    from peftcli.models import resolve_device

    dist = dist or Dist()
    check_recipe(recipe, dist)
    seed_everything(recipe.train.seed)
    device = resolve_device(device_spec or recipe.train.device)
    base_path, tokenizer, data = load_inputs(recipe, reporter, dist)
    check_reward_columns(recipe, data)
    method, model = load_model(recipe, base_path, tokenizer, data, device)
    initialise_from_data(method, model, data.train, tokenizer, recipe, reporter, device)
    if recipe.model.adapter:  # continue from a trained adapter: its weights replace the fresh init's
        load_start_adapter(recipe, method, model)
        reporter.note(f"starting from the adapter {recipe.model.adapter}")
    wrapped = distributed.wrap(dist, model)  # FSDP2 shards in place: parameters are DTensors after this
    trainable, total = count_parameters(model)
    sampler, steps, steps_per_epoch, plan_lines = plan_batches(recipe, data, dist.world_size)
    method.on_train_start(model, steps)
    stepper, speed_lines = build_stepper(recipe, method, model, wrapped, dist, device, steps)
    attach_references(
        recipe,
        stepper.objective,
        model,
        data,
        tokenizer,
        base_path,
        device,
        stepper.amp_dtype,
        dist,
        reporter.note,
    )
    return Run(
        recipe=recipe,
        reporter=reporter,
        dist=dist,
        run_dir=Path(recipe.output_dir),
        base_path=base_path,
        tokenizer=tokenizer,
        data=data,
        stepper=stepper,
        sampler=sampler,
        steps=steps,
        steps_per_epoch=steps_per_epoch,
        trainable=trainable,
        total=total,
        speed_lines=speed_lines[:1] + plan_lines + speed_lines[1:],  # loss, then packing, attention, compile
    )


def check_recipe(recipe: Recipe, dist: Dist) -> None:
    """What can be refused before anything loads: a method that cannot run this distributed mode or on a
    quantized base; eval.tasks that lm-eval does not have."""
    distributed.check_method(
        dist, get_method_class(recipe.method.name), recipe.model.quantization is not None
    )
    check_objective(recipe, dist)
    check_start_adapter(recipe)
    if recipe.eval.tasks:
        check_eval_tasks(recipe, dist)


# Why an objective cannot run under fsdp (the others: their reference swaps adapter weights it shards).
NOT_SHARDED = {"grpo": "its rollout samples with the whole model, which fsdp shards"}


def check_objective(recipe: Recipe, dist: Dist) -> None:
    """A preference objective (or grpo) runs in one process or under DDP (not FSDP: NOT_SHARDED), and
    ``reference: base`` needs a method that can switch its adapter off
    (peftcli.methods.registry.Method.adapter_disabled)."""
    from peftcli.methods.registry import overrides
    from peftcli.training.objectives.reference import check_base_reference
    from peftcli.training.objectives.registry import OBJECTIVES

    objective = OBJECTIVES[recipe.objective.name]
    if objective.data_format is None:
        return
    if dist.enabled and dist.mode != "ddp":
        why = NOT_SHARDED.get(objective.name, f"its reference swaps adapter weights that {dist.mode} shards")
        raise RecipeError(
            "objective.name",
            f"{objective.name} cannot run under {dist.mode} with {dist.world_size} processes: {why}",
            "set train.distributed: ddp",
        )
    method = get_method_class(recipe.method.name)
    base_reference = objective.wants_reference(recipe.objective) and recipe.objective.reference == "base"
    if base_reference and not overrides(method, "adapter_disabled"):
        raise RecipeError(
            "objective.reference",
            f"{method.name} cannot switch its adapter off, so the base model is no reference",
            "set objective.reference: start",
        )
    if base_reference:
        check_base_reference(recipe.method)


def check_reward_columns(recipe: Recipe, data: Any) -> None:
    """grpo: the columns its rewards compare with are in the prompt data (before the model loads)."""
    if recipe.objective.name == "grpo":
        from peftcli.training.objectives.rewards import check_reference_columns

        check_reference_columns(recipe.objective.rewards, data.train[0])


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def load_inputs(recipe: Recipe, reporter: Reporter, dist: Dist) -> tuple[str, Any, Any]:
    """The base model's local path, its tokenizer and the tokenized data. Rank 0 fills the caches (tiny
    model, tokenized data) before the others read them."""
    from peftcli.data.pipeline import load_data
    from peftcli.models import load_tokenizer, resolve_model_name

    with dist.main_first():
        base_path = resolve_model_name(recipe.model.name)
        tokenizer = load_tokenizer(base_path, recipe.model)
        data = load_data(
            recipe.data,
            tokenizer,
            data_task(recipe),
            log=reporter.note,
            console=None if reporter.quiet else reporter.console,
            model_name=recipe.model.name,
        )
    if not data.train:
        raise RecipeError(
            "data.train", "no training examples left after tokenization", "check the data and max_length"
        )
    return base_path, tokenizer, data


def data_task(recipe: Recipe) -> str:
    """The task the data stage tokenizes for: a reward model's pairs are tokenized as for a causal LM
    (prompt, answer, EOS; the labels go unused), whatever head scores them."""
    return "causal_lm" if recipe.objective.name == "reward" else recipe.model.task


def head_labels(recipe: Recipe, data: Any) -> list[str] | None:
    """The seq_cls head's class names: the data's, or the one output of a reward model."""
    return ["reward"] if recipe.objective.name == "reward" else data.label_names


def load_model(
    recipe: Recipe, base_path: str, tokenizer: Any, data: Any, device: torch.device
) -> tuple[Method, torch.nn.Module]:
    """The recipe's method, and the base model with it attached (trainable weights in fp32)."""
    method = method_for(recipe)
    model = build_model(
        base_path,
        recipe.model,
        method,
        device,
        seed=recipe.train.seed,
        label_names=head_labels(recipe, data),
        pad_token_id=tokenizer.pad_token_id,
    )
    return method, model


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


def plan_batches(recipe: Recipe, data: Any, world_size: int) -> tuple[Any, int, int, list[str]]:
    """The sampler, the optimizer steps of the whole run and of one epoch, and the summary lines about
    padding. Micro-batches are global (batch_size × world): each rank takes its slice (Dist.rank_slice)."""
    from peftcli.data.sampler import BatchSampler

    cfg = recipe.train
    global_cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size * world_size)
    plain = BatchSampler(data.train.lengths, global_cfg.batch_size, cfg.seed, mixture=data.mixture)
    sampler, lines = build_sampler(recipe, plain, world_size)
    steps, batches_per_epoch = total_steps(global_cfg, len(data.train))
    if cfg.packing:
        batches_per_epoch = len(sampler)
        steps = cfg.max_steps or packed_steps(sampler, cfg.epochs, cfg.grad_accum)
    return sampler, steps, max(1, math.ceil(batches_per_epoch / cfg.grad_accum)), lines


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


def build_stepper(
    recipe: Recipe,
    method: Method,
    model: torch.nn.Module,
    wrapped: torch.nn.Module,
    dist: Dist,
    device: torch.device,
    steps: int,
) -> tuple[Stepper, list[str]]:
    """The optimizer step: optimizer and schedule over the method's parameter groups, mixed precision, the
    loss path and the speed settings; and the summary lines saying which paths were taken."""
    cfg = recipe.train
    optimizer = build_optimizer(method.param_groups(model, cfg.lr, cfg.weight_decay), cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    amp_dtype = autocast_dtype(recipe, device)
    loss_path, speed_lines = choose_speed_paths(recipe, model, dist, device)
    objective = build_objective(recipe.objective, method, model, dist)
    if objective is not None:
        loss_path = "plain"
        scored = {
            "reward": "the head's rewards",
            "grpo": f"{recipe.objective.group_size} sampled completions per prompt, rewarded",
        }.get(objective.name, "log-probabilities of whole answers")
        speed_lines[0] = f"loss: {objective.name} (plain: {scored})"
    stepper = Stepper(
        model=model,
        method=method,
        optimizer=optimizer,
        scheduler=scheduler,
        task=recipe.model.task,
        device=device,
        wrapped=wrapped,
        dist=dist,
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
        amp_dtype=amp_dtype,
        loss_path=loss_path,
        max_grad_norm=cfg.max_grad_norm,
        objective=objective,
    )
    return stepper, speed_lines


def autocast_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    mode = recipe.train.mixed_precision
    if device.type != "cuda" or mode == "no":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def choose_speed_paths(
    recipe: Recipe, model: torch.nn.Module, dist: Dist, device: torch.device
) -> tuple[str, list[str]]:
    """The loss path (plain, chunked or liger), packed attention on the CPU and torch.compile, applied to
    ``model``; the loss path and the summary lines that say what was chosen and why."""
    cfg = recipe.train
    loss_path, why = choose_loss_path(model, recipe.model.task, cfg.loss, device)
    if dist.enabled and loss_path != "plain":  # DDP/FSDP hook the wrapped forward: run through it
        loss_path, why = "plain", f"distributed ({dist.mode}) runs the wrapped model's forward"
    lines = [f"loss: {loss_path} ({why})"]
    packed_on_cpu = cfg.packing and device.type == "cpu"
    if packed_on_cpu:
        switched, why = use_packed_attention(model)
        lines.append(f"attention: {why}" if switched else f"attention: block-diagonal mask ({why})")
    if cfg.compile:
        compile_model(model, loss_path)
        warning = "; warning: with packing every step recompiles on the CPU (measured 33× slower)"
        lines.append("compile: torch.compile (the first steps compile)" + (warning if packed_on_cpu else ""))
    return loss_path, lines


def compile_model(model: torch.nn.Module, loss_path: str) -> None:
    """torch.compile in place (parameter names unchanged, so checkpoints and exports are too). The chunked
    loss calls the body and the head itself, so those are what gets compiled there."""
    from peftcli.training.loss import PLAIN, body_and_head

    if loss_path == PLAIN:
        model.compile()
        return
    body, _ = body_and_head(model)
    body.compile()


def report_start(run: Run) -> None:
    """The start summary (model, method, data, steps, speed paths); under torchrun, the global batch."""
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
