"""The training loop: one function, read top to bottom. The only callbacks are the method hooks."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli import checkpoint as ckpt
from peftcli.checkpoint import atomic_write_text
from peftcli.methods import get_method_class
from peftcli.methods.registry import Method, count_parameters
from peftcli.optim import build_optimizer, build_scheduler, total_steps
from peftcli.recipe import Recipe, RecipeError, dump_recipe
from peftcli.reporting import Reporter


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written before stopping."""

    def __init__(self, step: int, checkpoint: Path, signum: int):
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint}")


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
            "data": self.data_stats,
        }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy and the number of scored targets (tokens, or examples for seq_cls)."""
    if task == "seq_cls":
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()
    if task == "causal_lm":
        # Position t predicts token t+1. Shifting the labels (not the logits) keeps the logits a view:
        # slicing them would copy a (B, T, vocab) tensor every step.
        labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    labels = labels.to(logits.device)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, int((labels != -100).sum())


def count_targets(batch: dict[str, torch.Tensor], task: str) -> int:
    labels = batch["labels"]
    if task == "seq_cls":
        return labels.numel()
    if task == "causal_lm":
        labels = labels[:, 1:]
    return int((labels != -100).sum())


def autocast_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    mode = recipe.train.mixed_precision
    if device.type != "cuda" or mode == "no":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def build_model(
    recipe: Recipe, device: torch.device, label_names: list[str] | None, tokenizer, base_path: str
):
    """Base model + method, with the trainable parameters in fp32 (adapters train in full precision)."""
    from peftcli.models import load_model

    model = load_model(
        base_path, recipe.model, device, label_names=label_names, pad_token_id=tokenizer.pad_token_id
    )
    method_cls = get_method_class(recipe.method.name)
    if recipe.model.quantization is not None and not method_cls.supports_quantized_base:
        raise RecipeError(
            "model.quantization",
            f"method {method_cls.name} cannot train on a quantized base",
            "remove model.quantization or pick lora",
        )
    method: Method = method_cls(recipe.method, recipe.model.task)
    torch.manual_seed(recipe.train.seed)  # adapter init depends on the seed only
    model = method.apply(model)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    model.to(device)
    return model, method


def train(recipe: Recipe, resume: bool = False, reporter: Reporter | None = None) -> TrainResult:
    from peftcli.data import BatchSampler, collate_rows, load_data
    from peftcli.evaluate import evaluate
    from peftcli.export import save_adapter
    from peftcli.models import load_tokenizer, resolve_device, resolve_model_name

    reporter = reporter or Reporter(quiet=True)
    run_dir = Path(recipe.output_dir)
    cfg = recipe.train
    task = recipe.model.task

    # -- 1. where we start from ------------------------------------------------------------
    latest = ckpt.latest_checkpoint(run_dir) if resume else None
    if resume and latest is None:
        reporter.note(f"--resume: no complete checkpoint in {run_dir}/checkpoints, starting from scratch")
    if not resume and ckpt.list_checkpoints(run_dir):
        raise RecipeError(
            "output_dir",
            f"{run_dir} already holds checkpoints from an earlier run",
            "pass --resume to continue it, or choose another --output-dir",
        )
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
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))

    # -- 2. model, method, data ------------------------------------------------------------
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    base_path = resolve_model_name(recipe.model.name)
    tokenizer = load_tokenizer(base_path, recipe.model)
    data = load_data(
        recipe.data,
        tokenizer,
        task,
        log=reporter.note,
        console=None if reporter.quiet else reporter.console,
        model_name=recipe.model.name,
    )
    if not data.train:
        raise RecipeError(
            "data.train", "no training examples left after tokenization", "check the data and max_length"
        )
    model, method = build_model(recipe, device, data.label_names, tokenizer, base_path)
    trainable, total = count_parameters(model)
    steps, batches_per_epoch = total_steps(cfg, len(data.train))
    method.on_train_start(model, steps)
    optimizer = build_optimizer(method.param_groups(model, cfg.lr, cfg.weight_decay), cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    # The sampler plans over the lengths array; each step's window of indices is read from the
    # memory-mapped table by collate_rows.
    sampler = BatchSampler(data.train.lengths, cfg.batch_size, cfg.seed, mixture=data.mixture)
    amp_dtype = autocast_dtype(recipe, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    named_trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    step, epoch, batch_index = 0, 0, 0
    metrics_path = run_dir / "metrics.jsonl"
    if latest is not None:
        state = ckpt.load_checkpoint(latest)
        with torch.no_grad():
            for name, value in state["trainable"].items():
                named_trainable[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        method.load_method_state(state["method_state"])
        trainer_state = state["trainer_state"]
        step, epoch, batch_index = trainer_state["step"], trainer_state["epoch"], trainer_state["batch_index"]
        scheduler.load_state_dict(trainer_state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        _truncate_metrics(metrics_path, step)
        reporter.note(f"resuming from {latest} (step {step} of {steps})")
    elif metrics_path.exists():
        metrics_path.unlink()

    base_lines = None
    if recipe.model.quantization is not None:
        from peftcli.quantize import summary_lines

        base_lines = summary_lines(model, recipe.model.quantization)
    reporter.start_summary(recipe, method, trainable, total, data.stats, steps, device, base_lines)

    def log(event: dict[str, Any]) -> None:
        with open(metrics_path, "a") as handle:
            handle.write(json.dumps(event) + "\n")

    def run_eval(at_step: int) -> dict[str, float] | None:
        if not data.eval:
            return None
        with reporter.status("evaluating"):
            result = evaluate(model, tokenizer, data, task, recipe.eval, device)
        log({"event": "eval", "step": at_step, **result})
        return result

    def save(at_step: int, next_epoch: int, next_batch: int) -> Path:
        payload = {
            "trainable": {n: p.detach() for n, p in named_trainable.items()},
            "optimizer": optimizer.state_dict(),
            "method_state": method.method_state(),
            "rng": ckpt.rng_state(),
            "trainer_state": {
                "step": at_step,
                "epoch": next_epoch,
                "batch_index": next_batch,
                "scheduler": scheduler.state_dict(),
                "total_steps": steps,
            },
        }
        path = ckpt.save_checkpoint(run_dir, at_step, payload, cfg.keep_checkpoints)
        if os.environ.get("PEFTCLI_TEST_KILL_AFTER_CHECKPOINT") == str(at_step):
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die the hardest way right after a checkpoint
        return path

    eval_before = run_eval(0) if latest is None else _first_eval(metrics_path)

    # -- 3. the loop -------------------------------------------------------------------------
    stop_signal: list[int] = []
    previous_handlers = {
        s: signal.signal(s, lambda signum, frame: stop_signal.append(signum))
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    model.train()
    first_loss = last_loss = None
    window_losses: list[float] = []
    tokens_seen, start = 0, time.perf_counter()
    elapsed_before = _elapsed_at(metrics_path, step)
    try:
        with reporter.progress(steps, step) as progress:
            while step < steps:
                window = sampler.window(epoch, batch_index, cfg.grad_accum)  # global micro-batches
                next_epoch, next_batch = epoch, batch_index + len(window)
                if next_batch >= len(sampler):
                    next_epoch, next_batch = epoch + 1, 0
                micro = [collate_rows(data.train, indices, tokenizer, task) for indices in window]
                n_targets = max(1, sum(count_targets(b, task) for b in micro))

                loss_total = 0.0
                for batch in micro:
                    batch = {k: v.to(device) for k, v in batch.items()}
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        out = model(
                            input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"],
                            **({"labels": batch["labels"]} if task == "seq2seq" else {}),
                        )
                        loss_sum, _ = token_loss_sum(out.logits, batch["labels"], task)
                        loss = loss_sum / n_targets  # token-weighted over the whole accumulation window
                        extra = method.extra_loss(model)
                        if extra is not None:
                            loss = loss + extra / len(micro)
                    (scaler.scale(loss) if scaler else loss).backward()
                    loss_total += loss_sum.item() / n_targets
                    tokens_seen += int(batch["attention_mask"].sum())

                if scaler:
                    scaler.unscale_(optimizer)
                method.after_backward(model, step)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(named_trainable.values(), cfg.max_grad_norm)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                method.after_step(model, step)
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step, epoch, batch_index = step + 1, next_epoch, next_batch

                if not math.isfinite(loss_total):
                    raise RecipeError(
                        "train.lr",
                        f"the loss became {loss_total} at step {step}",
                        "lower train.lr or set train.max_grad_norm",
                    )
                first_loss = loss_total if first_loss is None else first_loss
                last_loss = loss_total
                window_losses.append(loss_total)
                elapsed = time.perf_counter() - start
                tokens_per_s = tokens_seen / max(elapsed, 1e-9)
                progress.update(step, loss_total, lr, tokens_per_s)
                if step % cfg.log_every == 0 or step == steps:
                    log(
                        {
                            "event": "train",
                            "step": step,
                            "epoch": round(step / max(1, math.ceil(batches_per_epoch / cfg.grad_accum)), 4),
                            "loss": sum(window_losses) / len(window_losses),
                            "lr": lr,
                            "tokens_per_s": round(tokens_per_s, 1),
                            "elapsed_s": round(elapsed_before + elapsed, 3),
                        }
                    )
                    window_losses.clear()
                if cfg.eval_every and step % cfg.eval_every == 0 and step < steps:
                    run_eval(step)
                    model.train()
                if (cfg.save_every and step % cfg.save_every == 0) or step == steps:
                    save(step, epoch, batch_index)
                if stop_signal:
                    path = save(step, epoch, batch_index)
                    raise TrainingInterrupted(step, path, stop_signal[0])
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)

    # -- 4. final eval, export, results --------------------------------------------------------
    elapsed = elapsed_before + (time.perf_counter() - start)
    eval_after = run_eval(step)
    adapter_dir = run_dir / "adapter"
    save_adapter(adapter_dir, model, method, tokenizer, base_path, recipe.model, data.label_names)
    result = TrainResult(
        run_dir,
        adapter_dir,
        step,
        eval_before,
        eval_after,
        first_loss,
        last_loss,
        elapsed,
        tokens_seen / max(time.perf_counter() - start, 1e-9),
        trainable,
        total,
        data.stats,
    )
    atomic_write_text(run_dir / "results.json", json.dumps(result.to_json(), indent=2) + "\n")
    atomic_write_text(run_dir / "summary.md", reporter.summary_markdown(result))
    return result


def _training_identity(recipe_yaml: str) -> str:
    """The parts of a recipe that must not change across --resume (logging cadence may)."""
    import yaml

    raw = yaml.safe_load(recipe_yaml)
    for key in ("log_every", "eval_every", "save_every", "keep_checkpoints"):
        raw.get("train", {}).pop(key, None)
    raw.pop("eval", None)
    return json.dumps(raw, sort_keys=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop events logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _first_eval(path: Path) -> dict[str, float] | None:
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "eval" and event.get("step") == 0:
            return {k: v for k, v in event.items() if k not in ("event", "step")}
    return None


def _elapsed_at(path: Path, step: int) -> float:
    if not path.exists() or step == 0:
        return 0.0
    elapsed = 0.0
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "train" and event.get("step", 0) <= step:
            elapsed = event.get("elapsed_s", elapsed)
    return elapsed


def trainable_named(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
