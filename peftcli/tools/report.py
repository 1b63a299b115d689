"""`peftcli report RUN_DIR`: a run's curves as one PNG and its numbers as a summary.

Everything comes from ``RUN/metrics.jsonl``, so a run that is still going or was interrupted reports
as well as a finished one (``results.json`` only says which it is). The summary's numbers:

- ``objective``: the run's objective (recipe.yaml's objective.name; sft when it names none). A
  preference run (dpo, ipo, kto, ...) shows its objective's eval metrics (docs/objectives.md): its loss,
  rewards/chosen, rewards/rejected, margins and accuracy, instead of the SFT ones;
- ``best_eval``: the eval event with the best primary metric (exact_match or accuracy, higher is
  better, when the run scores answers; rewards/accuracy for a preference run; else eval_loss, lower is
  better); ties go to the lower eval loss, then to the earlier step;
- ``before`` / ``final``: the eval at step 0 and the last eval logged;
- ``tokens_per_s`` and ``training_time_s``: the last train event's (tokens/s since the process
  started, i.e. since the resume for a resumed run; training time across resumes, evals included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from peftcli.recipe import RecipeError
from peftcli.training import metrics
from peftcli.training.console import METRIC_ORDER, fmt
from peftcli.training.metrics import metrics_path

PRIMARY_METRICS = (
    ("exact_match", True),
    ("accuracy", True),
    ("rewards/accuracy", True),
    ("eval_loss", False),
)
SCORE_METRICS = ("exact_match", "accuracy", "rewards/accuracy")  # shares of examples right, in [0, 1]
# A preference objective's eval metrics, in table order (kl: KTO's).
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "kl")


def run_objective(run_dir: str | Path) -> str:
    """The objective a run trained (its recipe.yaml's objective.name; sft when it names none)."""
    path = Path(run_dir) / "recipe.yaml"
    raw = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    return (raw.get("objective") or {}).get("name") or "sft"


def table_metrics(objective: str) -> tuple[str, ...]:
    """The eval metrics a table shows for a run of ``objective``."""
    return METRIC_ORDER if objective == "sft" else ("eval_loss", *REWARD_METRICS)


def loss_label(objective: str) -> str:
    return "loss (token-weighted CE)" if objective == "sft" else f"loss ({objective})"


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """The events of ``RUN/metrics.jsonl`` (read by :mod:`peftcli.training.metrics`'s one rule)."""
    path = metrics_path(run_dir)
    if not Path(run_dir).is_dir():
        raise RecipeError("RUN_DIR", f"{run_dir} is not a directory", "pass a run directory (output_dir)")
    if not path.is_file():
        raise RecipeError(
            "RUN_DIR", f"{path} does not exist", "pass a directory written by peftcli train (its output_dir)"
        )
    return metrics.read_events(path)


def eval_metrics(event: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in event.items() if k not in ("event", "step")}


def primary_metric(evals: list[dict[str, Any]]) -> tuple[str, bool] | None:
    """(name, higher_is_better) of the metric that ranks evals in this run."""
    for name, higher in PRIMARY_METRICS:
        if any(name in e for e in evals):
            return name, higher
    return None


def best_eval(evals: list[dict[str, Any]]) -> dict[str, Any] | None:
    chosen = primary_metric(evals)
    if chosen is None:
        return None
    name, higher = chosen
    scored = [e for e in evals if name in e]

    def rank(event: dict[str, Any]) -> tuple[float, float, int]:
        # better primary first, then lower eval loss (exact match often ties at 0 early on), then earlier
        primary = -event[name] if higher else event[name]
        return primary, event.get("eval_loss", float("inf")), event["step"]

    best = min(scored, key=rank)
    return {"step": best["step"], "metric": name, "value": best[name], "higher_is_better": higher}


def summarize(run_dir: str | Path, events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    events = read_events(run_dir) if events is None else events
    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    before = next((eval_metrics(e) for e in evals if e["step"] == 0), None)
    final = evals[-1] if evals and evals[-1]["step"] > 0 else None
    planned = None
    recipe_path = run_dir / "recipe.yaml"
    if recipe_path.is_file():
        raw = yaml.safe_load(recipe_path.read_text()) or {}
        planned = (raw.get("train") or {}).get("max_steps")
        method = (raw.get("method") or {}).get("name")
    else:
        method = None
    last = train[-1] if train else None
    return {
        "run_dir": str(run_dir),
        "status": "finished" if (run_dir / "results.json").is_file() else "running or interrupted",
        "method": method,
        "objective": run_objective(run_dir),
        "last_step": max((e["step"] for e in events), default=0),
        "planned_steps": planned,
        "best_eval": best_eval(evals),
        "before": before,
        "final": eval_metrics(final) if final else None,
        "final_step": final["step"] if final else None,
        "train_loss_first": train[0]["loss"] if train else None,
        "train_loss_last": last["loss"] if last else None,
        "tokens_per_s": last.get("tokens_per_s") if last else None,
        "training_time_s": last.get("elapsed_s") if last else None,
    }


def require_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise RecipeError(
            "plot",
            "matplotlib is not installed",
            "pip install 'peftcli[plots]', or pass --no-plot for the summary only",
        )


def plot_run(events: list[dict[str, Any]], output: Path, title: str, objective: str = "sft") -> Path:
    """Four panels against the optimizer step: train loss, eval loss, eval score (a preference run:
    rewards/accuracy), learning rate."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    best = best_eval(evals)
    score = next((m for m in SCORE_METRICS if any(m in e for e in evals)), None)

    figure = Figure(figsize=(11, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2, sharex=True)
    panels = [
        (axes[0][0], "train loss", loss_label(objective), train, "loss", "tab:blue"),
        (axes[0][1], "eval loss", loss_label(objective), evals, "eval_loss", "tab:orange"),
        (
            axes[1][0],
            f"eval {score or 'perplexity'}",
            score or "perplexity",
            evals,
            score or "perplexity",
            "tab:green",
        ),
        (axes[1][1], "learning rate", "lr", train, "lr", "tab:purple"),
    ]
    for index, (ax, name, ylabel, series, key, color) in enumerate(panels):
        points = [(e["step"], e[key]) for e in series if key in e]
        ax.set_title(name)
        if index >= 2:  # the bottom row; the top row shares its x axis
            ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if key in SCORE_METRICS:
            ax.set_ylim(-0.03, 1.03)  # a fraction of examples right
        ax.grid(True, alpha=0.3)
        if not points:
            ax.text(
                0.5, 0.5, f"no {name} logged", ha="center", va="center", transform=ax.transAxes, color="gray"
            )
            continue
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, color=color, marker="o" if len(points) <= 30 else None, markersize=3)
        if best is not None and series is evals:
            ax.axvline(best["step"], color="gray", linestyle=":", label=f"best eval (step {best['step']})")
            ax.legend(loc="best", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[1][1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    figure.suptitle(title)
    return save_png(figure, output)


def save_png(figure, output: str | Path) -> Path:
    """Write a matplotlib figure to ``output`` through a temporary file and a rename."""
    import os
    import tempfile

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".png", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            figure.savefig(handle, format="png")
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output


def report(run_dir: str | Path, output: str | Path | None = None, plot: bool = True) -> dict[str, Any]:
    """Summarize a run (finished, running or interrupted) and draw ``report.png`` (``output``)."""
    if plot:
        require_matplotlib()
    run_dir = Path(run_dir)
    events = read_events(run_dir)
    summary = summarize(run_dir, events)
    if plot:
        target = Path(output) if output else run_dir / "report.png"
        steps = f"step {summary['last_step']}" + (
            f"/{summary['planned_steps']}" if summary["planned_steps"] else ""
        )
        name = summary["method"] or "run"
        if summary["objective"] != "sft":
            name += f" ({summary['objective']})"
        title = f"{run_dir.name}: {name}, {steps}, {summary['status']}"
        summary["plot"] = str(plot_run(events, target, title, summary["objective"]))
    return summary


def report_table(summary: dict[str, Any]) -> Table:
    """`peftcli report`'s summary: metrics before training, at the best eval and at the end."""
    steps = f"{summary['last_step']}" + (
        f" of {summary['planned_steps']}" if summary["planned_steps"] else ""
    )
    objective = summary.get("objective", "sft")
    state = f"{summary['status']}, step {steps}"
    if objective != "sft":  # an SFT run's title reads as before objectives existed
        state = f"{objective}, {state}"
    table = Table(title=f"report {summary['run_dir']} ({state})", title_justify="left")
    best = summary["best_eval"]
    before, final = summary["before"] or {}, summary["final"] or {}
    table.add_column("metric")
    table.add_column("before (step 0)", justify="right")
    table.add_column(
        f"final (step {summary['final_step']})" if summary["final_step"] else "final", justify="right"
    )
    for key in table_metrics(objective):
        if key in before or key in final:
            label = f"{key} ({objective})" if key == "eval_loss" and objective != "sft" else key
            table.add_row(label, fmt(before.get(key)), fmt(final.get(key)))
    table.add_row(
        "train loss (first → last event)", fmt(summary["train_loss_first"]), fmt(summary["train_loss_last"])
    )
    if best is not None:
        table.add_row("best eval", "", f"{best['metric']} {fmt(best['value'])} at step {best['step']}")
    tokens = summary["tokens_per_s"]
    table.add_row("tokens/s", "", "-" if tokens is None else f"{tokens:,.0f}")
    elapsed = summary["training_time_s"]
    table.add_row("training time", "", "-" if elapsed is None else f"{elapsed:.1f}s")
    if summary.get("plot"):
        table.add_row("plot", "", summary["plot"])
    return table
