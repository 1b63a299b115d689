"""What users read while a run goes: the start-up summary, the progress bar and the final table."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

if TYPE_CHECKING:
    from peftcli.training.results import TrainResult


def human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


# eval metrics the result tables show, in this order (the rewards: a preference objective, docs/objectives.md)
METRIC_ORDER = (
    "eval_loss", "perplexity", "accuracy", "exact_match", "rewards/accuracy", "rewards/margins", "eval_reward"
)  # fmt: skip


def peak_memory_bytes(device) -> int:
    """Peak memory of this process so far: CUDA's max allocated on a GPU, else the peak RSS."""
    import sys

    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


class _Bar:
    def __init__(self, progress: Progress | None, task_id: Any):
        self.progress, self.task_id = progress, task_id

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, note: str = "") -> None:
        """``note``: the objective's own (grpo: the reward's mean ± std)."""
        if self.progress is not None:
            self.progress.update(self.task_id, completed=step, loss=loss, lr=lr, tps=tokens_per_s, note=note)


class Reporter:
    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.quiet = quiet
        self.console = console or Console(stderr=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(f"[dim]{text}[/dim]")

    def warn(self, text: str) -> None:
        """Something the user must see even with --quiet (a damaged checkpoint, a skipped step)."""
        self.console.print(f"[bold yellow]warning:[/bold yellow] {text}", highlight=False, soft_wrap=True)

    def start_summary(
        self,
        recipe,
        method,
        trainable: int,
        total: int,
        stats: dict,
        steps: int,
        device,
        base_lines: list[str] | None = None,
        speed_lines: list[str] | None = None,
    ) -> None:
        if self.quiet:
            return
        table = Table(title="peftcli train", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        table.add_row("model", f"{recipe.model.name} ({recipe.model.task}) on {device}")
        for i, line in enumerate(base_lines or []):
            table.add_row("quantized" if i == 0 else "", line)
        table.add_row("method", f"{method.name}: {method.description}")
        table.add_row(
            "trainable",
            f"{human(trainable)} of {human(total)} parameters ({100 * trainable / max(total, 1):.3f}%)",
        )
        for line in method.summary_lines():
            table.add_row("", line)
        data = (
            f"{stats.get('train_examples', '?')} train / {stats.get('eval_examples', 0)} eval examples, "
            f"{human(stats.get('train_tokens', 0))} train tokens"
        )
        truncated = stats.get("train_truncated", 0)
        if truncated:
            data += f", {truncated} truncated at {stats.get('max_length')} tokens"
        skipped = stats.get("skipped_rows")
        if skipped:
            data += ", skipped " + ", ".join(f"{n} {reason}" for reason, n in skipped.items())
        table.add_row("data", data)
        for source in stats.get("sources", []):  # a mixture: each source's rows and share of the tokens
            weight = "" if source["weight"] is None else f", weight {source['weight']:g}"
            table.add_row(
                "",
                f"{source['source']} ({source['format']}): {source['rows']} rows{weight}, "
                f"{100 * source['token_share']:.1f}% of the tokens per epoch",
            )
        table.add_row(
            "steps",
            f"{steps} (batch {recipe.train.batch_size} × accum {recipe.train.grad_accum}, "
            f"lr {recipe.train.lr:g}, {recipe.train.optimizer}, {recipe.train.scheduler})",
        )
        for i, line in enumerate(speed_lines or []):
            table.add_row("speed" if i == 0 else "", line)
        table.add_row("output", recipe.output_dir)
        self.console.print(table)

    @contextlib.contextmanager
    def status(self, text: str):
        if self.quiet:
            yield
            return
        with self.console.status(text):
            yield

    @contextlib.contextmanager
    def progress(self, steps: int, start: int):
        if self.quiet:
            yield _Bar(None, None)
            return
        progress = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("lr {task.fields[lr]:.2e}"),
            TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        with progress:
            task_id = progress.add_task(
                "train", total=steps, completed=start, loss=float("nan"), lr=0.0, tps=0.0, note=""
            )
            yield _Bar(progress, task_id)

    def result_table(self, result: TrainResult) -> Table:
        table = Table(title="result", title_justify="left")
        table.add_column("metric")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        before, after = result.eval_before or {}, result.eval_after or {}
        for key in METRIC_ORDER:
            if key in before or key in after:
                table.add_row(key, fmt(before.get(key)), fmt(after.get(key)))
        table.add_row("train loss (first → last step)", fmt(result.first_loss), fmt(result.last_loss))
        for task, metric, value, stderr in task_rows(result.tasks):
            table.add_row(
                f"{task} {metric} (lm-eval)", "", fmt(value) + (f" ± {stderr:.4f}" if stderr else "")
            )
        table.add_row("steps / time", "", f"{result.steps} / {result.elapsed_s:.1f}s")
        table.add_row("tokens/s", "", f"{result.tokens_per_s:,.0f}")
        table.add_row("adapter", "", str(result.adapter_dir))
        table.add_row("metrics", "", str(result.run_dir / "metrics.jsonl"))
        return table

    def summary_markdown(self, result: TrainResult, notes: list[str] | None = None) -> str:
        """summary.md; ``notes``: the method's own lines (Method.summary_lines), one bullet each."""
        before, after = result.eval_before or {}, result.eval_after or {}
        lines = [f"# Run {result.run_dir}", "", "| metric | before | after |", "|---|---|---|"]
        for key in METRIC_ORDER:
            if key in before or key in after:
                lines.append(f"| {key} | {fmt(before.get(key))} | {fmt(after.get(key))} |")
        lines.append(
            f"| train loss (first → last step) | {fmt(result.first_loss)} | {fmt(result.last_loss)} |"
        )
        for task, metric, value, stderr in task_rows(result.tasks):
            stderr_text = f" ± {stderr:.4f}" if stderr else ""
            lines.append(f"| {task} {metric} (lm-eval) | | {fmt(value)}{stderr_text} |")
        lines += [
            "",
            f"- steps: {result.steps}, time: {result.elapsed_s:.1f}s, tokens/s: {result.tokens_per_s:,.0f}",
            f"- trainable parameters: {result.trainable:,} of {result.total:,}",
            f"- adapter: {result.adapter_dir}",
            "- metrics: metrics.jsonl, results: results.json",
            *(f"- {note}" for note in notes or []),
            "",
        ]
        return "\n".join(lines)


def task_rows(tasks: dict[str, dict[str, Any]] | None) -> list[tuple[str, str, Any, float | None]]:
    """(task, metric, value, stderr) for each lm-eval metric, stderr folded into its metric's row."""
    rows = []
    for task, metrics in (tasks or {}).items():
        for metric, value in metrics.items():
            if metric == "samples" or "_stderr" in metric:
                continue
            stderr_key = metric.replace("/", "_stderr/", 1) if "/" in metric else f"{metric}_stderr"
            stderr = metrics.get(stderr_key)
            rows.append((task, metric, value, stderr if isinstance(stderr, float) else None))
    return rows


def task_table(result: dict[str, Any]) -> Table:
    """`peftcli eval --tasks`: one row per task and metric, with lm-eval's standard error."""
    fewshot = result.get("num_fewshot")
    table = Table(
        title=f"lm-eval {result['target']} ({result['kind']}"
        + (f", {fewshot}-shot" if fewshot is not None else "")
        + ")",
        title_justify="left",
    )
    for name, justify in (("task", "left"), ("metric", "left"), ("value", "right"), ("stderr", "right")):
        table.add_column(name, justify=justify)
    table.add_column("samples", justify="right")
    for task, metric, value, stderr in task_rows(result["tasks"]):
        samples = result["tasks"][task].get("samples")
        table.add_row(task, metric, fmt(value), fmt(stderr), "-" if samples is None else str(samples))
    return table


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
