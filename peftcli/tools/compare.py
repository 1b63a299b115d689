"""`peftcli compare`: several PEFT methods on one base, one data set and one budget, side by side.

Two entry points. :func:`compare_recipe` trains the recipe once per method (each from the method's
own defaults plus ``--set METHOD.key=value``; the recipe's ``method`` section is dropped), every
training in its own ``peftcli train`` subprocess so that its peak memory is its own, then compares
the runs. :func:`compare_runs` compares finished run directories.

The columns, per run (``compare.json`` keeps the raw numbers; a column that does not apply holds a
string saying why, never a silent 0):

- ``trainable``: parameters with requires_grad during training (results.json), and as % of the base;
- ``added``: parameters the saved adapter adds to the base at inference (the loaded adapter model
  minus the plain base); 0 for methods that only train base weights (BitFit); training-only parts
  (prefix projection, P-tuning's encoder) are trainable but not added;
- ``changed_after_merge``: base weights (scalars) whose value differs after ``merge`` — what a merged
  checkpoint really changes; ``"n/a (not mergeable)"`` for methods that cannot merge (``"n/a (not
  mergeable on this model)"`` where the method merges but not on this base: timed unmerged);
- ``adapter_bytes``: size of ``adapter_model.safetensors`` on disk;
- ``peak_memory_bytes``: the training process's peak (ru_maxrss on CPU, CUDA max allocated on GPU),
  recorded by the loop in results.json;
- ``tokens_per_s``: training throughput (results.json);
- ``inference_ratio``: median forward time per token of the tuned model (merged where the method
  merges) over the base's, on one fixed batch, the two timed alternately;
- the eval metrics after training (and before, for reference).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.table import Table

from peftcli.methods.catalog import get_method_class, list_methods
from peftcli.methods.registry import count_parameters
from peftcli.recipe import RecipeError, apply_overrides, did_you_mean, dump_recipe, read_yaml
from peftcli.recipe_loader import build_recipe
from peftcli.tools.report import PRIMARY_METRICS, REWARD_METRICS, SCORE_METRICS, run_objective, save_png

SECTIONS = ("model", "data", "train", "eval")
NOT_MERGEABLE = "n/a (not mergeable)"
MERGE_REFUSED = "n/a (not mergeable on this model)"  # e.g. BEFT where the layers have no bias
NOT_RECORDED = "n/a (not in results.json)"
TIMING_BATCH = (4, 32)  # (sequences, tokens) of the fixed inference batch
TIMING_REPEATS = 7


# --------------------------------------------------------------------------------------------
# Training every method
# --------------------------------------------------------------------------------------------


def parse_methods(methods: str) -> list[str]:
    """``"lora,ia3"`` or ``"all"`` (every registered method) → validated names, in order."""
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if names == ["all"]:
        return [m.name for m in list_methods()]
    if not names:
        raise RecipeError("--methods", "names no method", "e.g. --methods lora,ia3,prompt_tuning, or all")
    for name in names:
        get_method_class(name)  # RecipeError with did-you-mean
    if len(set(names)) != len(names):
        raise RecipeError("--methods", "names a method twice", "list each method once")
    return names


def parse_sets(sets: list[str], methods: list[str]) -> dict[str, list[str]]:
    """``lora.r=16`` → ``{"lora": ["method.r=16"]}``; ``ia3.train.lr=3e-2`` → ``{"ia3": ["train.lr=3e-2"]}``."""
    per_method: dict[str, list[str]] = {m: [] for m in methods}
    for item in sets:
        head, _, rest = item.partition(".")
        if not rest or "=" not in rest or "=" in head:
            raise RecipeError(
                "--set", f"{item!r} is not METHOD.key=value", "e.g. --set lora.r=16 --set ia3.train.lr=3e-2"
            )
        if head not in per_method:
            hint = did_you_mean(head, methods) or f"the methods compared are: {', '.join(methods)}"
            raise RecipeError("--set", f"{item!r} names {head!r}, which is not in --methods", hint)
        section = rest.split(".", 1)[0]
        per_method[head].append(rest if section in SECTIONS else f"method.{rest}")
    return per_method


def method_recipes(
    recipe_path: str | Path,
    methods: list[str],
    overrides: list[str],
    sets: list[str],
    steps: int | None,
    output: Path,
) -> dict[str, str]:
    """The resolved recipe (YAML text) of each method's run, all validated before anything trains."""
    per_method = parse_sets(sets, methods)
    base = apply_overrides(read_yaml(recipe_path), overrides)
    base.pop("method", None)
    if steps is not None:
        base.setdefault("train", {})["max_steps"] = steps
    texts = {}
    for name in methods:
        raw = yaml.safe_load(yaml.safe_dump(base))  # a deep copy
        raw["method"] = {"name": name}
        raw["output_dir"] = str(output / "runs" / name)
        recipe = build_recipe(apply_overrides(raw, per_method[name]), source=str(recipe_path))
        texts[name] = dump_recipe(recipe)
    return texts


def train_method(name: str, recipe_text: str, output: Path) -> tuple[Path, str | None]:
    """Train one method in a subprocess; returns (run dir, None) or (run dir, the error line).

    A finished run of the very same recipe in OUTPUT/runs is reused, so a comparison that failed
    half-way continues where it stopped."""
    run_dir = output / "runs" / name
    if (run_dir / "results.json").is_file() and (run_dir / "recipe.yaml").read_text() == recipe_text:
        return run_dir, None
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe_file = output / "recipes" / f"{name}.yaml"
    recipe_file.parent.mkdir(parents=True, exist_ok=True)
    recipe_file.write_text(recipe_text)
    cmd = [sys.executable, "-m", "peftcli", "train", str(recipe_file), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        return run_dir, (lines[-1] if lines else f"exit code {proc.returncode}").removeprefix("error: ")
    return run_dir, None


# --------------------------------------------------------------------------------------------
# Measuring a finished run
# --------------------------------------------------------------------------------------------


def changed_after_merge(base: torch.nn.Module, merged: torch.nn.Module) -> int:
    """Scalars of the base's parameters whose value differs in the merged model (same names)."""
    base_params = dict(base.named_parameters())
    merged_params = dict(merged.named_parameters())
    assert base_params.keys() == merged_params.keys(), "merge must give back the base's parameter names"
    return sum(int((base_params[n].detach() != merged_params[n].detach()).sum()) for n in base_params)


def forward_seconds(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str) -> float:
    kwargs = dict(batch)
    if task == "seq2seq":
        kwargs["decoder_input_ids"] = batch["input_ids"]
    start = time.perf_counter()
    with torch.inference_mode():
        model(**kwargs)
    return time.perf_counter() - start


def inference_timing(
    base: torch.nn.Module, tuned: torch.nn.Module, vocab: int, task: str, device, repeats: int
) -> dict[str, float]:
    """Median forward time per token of ``base`` and ``tuned`` on one fixed batch, timed alternately
    (so a machine that slows down mid-way slows both) after one warm-up each."""
    generator = torch.Generator().manual_seed(0)
    sequences, tokens = TIMING_BATCH
    input_ids = torch.randint(4, vocab, (sequences, tokens), generator=generator).to(device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    forward_seconds(base, batch, task), forward_seconds(tuned, batch, task)
    base_times, tuned_times = [], []
    for _ in range(repeats):
        base_times.append(forward_seconds(base, batch, task))
        tuned_times.append(forward_seconds(tuned, batch, task))
    per_token = sequences * tokens
    base_s, tuned_s = statistics.median(base_times) / per_token, statistics.median(tuned_times) / per_token
    return {
        "base_us_per_token": base_s * 1e6,
        "us_per_token": tuned_s * 1e6,
        "inference_ratio": tuned_s / base_s,
    }


def measure_run(run_dir: str | Path, repeats: int = TIMING_REPEATS) -> dict[str, Any]:
    """One row of the comparison, from a finished run directory."""
    from peftcli.export import ADAPTER_WEIGHTS, is_adapter_dir, load_adapter
    from peftcli.models import load_model

    run_dir = Path(run_dir)
    adapter_dir = run_dir / "adapter"
    results_path = run_dir / "results.json"
    if not results_path.is_file() or not is_adapter_dir(adapter_dir):
        raise RecipeError(
            "RUN_DIR",
            f"{run_dir} is not a finished run (no results.json or adapter/)",
            "compare finished runs, or finish this one with peftcli train RECIPE --resume",
        )
    results = json.loads(results_path.read_text())
    device = torch.device("cpu")
    loaded = load_adapter(adapter_dir, device=device)
    base = load_model(
        loaded.base_path,
        _model_cfg(loaded),
        device,
        label_names=loaded.label_names,
        pad_token_id=loaded.tokenizer.pad_token_id,
        dtype=torch.float32,
    )
    base.eval()
    base_total = count_parameters(base)[1]
    tuned_total = count_parameters(loaded.model)[1]
    method = loaded.method
    row: dict[str, Any] = {
        "method": method.name,
        "objective": run_objective(run_dir),
        "run_dir": str(run_dir),
        "steps": results["steps"],
        "base_parameters": base_total,
        "trainable": results["trainable_parameters"],
        "trainable_percent_of_base": 100.0 * results["trainable_parameters"] / base_total,
        "added": tuned_total - base_total,
        "adapter_bytes": os.path.getsize(adapter_dir / ADAPTER_WEIGHTS),
        "peak_memory_bytes": results.get("peak_memory_bytes") or NOT_RECORDED,
        "tokens_per_s": results["tokens_per_s"],
        "eval_before": results.get("eval_before"),
        "eval": results.get("eval_after"),
    }
    tuned, merged = loaded.model, False
    row["changed_after_merge"] = NOT_MERGEABLE
    if method.mergeable:
        try:
            tuned, merged = method.merge(loaded.model), True
        except RecipeError:  # the method merges, but not on this model: time the adapter model
            row["changed_after_merge"] = MERGE_REFUSED
        else:
            tuned.eval()
            row["changed_after_merge"] = changed_after_merge(base, tuned)
    row["merged_for_inference"] = merged
    row.update(inference_timing(base, tuned, _vocab_size(base), loaded.task, device, repeats))
    return row


def _model_cfg(loaded):
    from peftcli.recipe import ModelConfig

    return ModelConfig(name=loaded.base_path, task=loaded.task, dtype="float32")


def _vocab_size(model: torch.nn.Module) -> int:
    config = model.config
    return int(getattr(config, "vocab_size", None) or config.get_text_config().vocab_size)


# --------------------------------------------------------------------------------------------
# The comparison and its outputs
# --------------------------------------------------------------------------------------------


def compare_runs(
    run_dirs: list[str | Path],
    output: str | Path,
    command: str | None = None,
    failures: dict[str, str] | None = None,
    console=None,
    repeats: int = TIMING_REPEATS,
) -> dict[str, Any]:
    """Measure each finished run, then write compare.json, compare.md and compare.png to ``output``."""
    output = Path(output)
    rows = []
    with _progress(console, len(run_dirs), "measuring") as working_on:
        for run_dir in run_dirs:
            working_on(Path(run_dir).name)
            rows.append(measure_run(run_dir, repeats))
    rows += [{"method": name, "error": error} for name, error in (failures or {}).items()]
    result = {
        "command": command,
        "primary_metric": _primary([r for r in rows if "error" not in r]),
        "timing_batch": {"sequences": TIMING_BATCH[0], "tokens": TIMING_BATCH[1], "repeats": repeats},
        "rows": rows,
    }
    output.mkdir(parents=True, exist_ok=True)
    from peftcli.checkpoint import atomic_write_text

    atomic_write_text(output / "compare.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(output / "compare.md", markdown(result))
    result["files"] = [str(output / "compare.json"), str(output / "compare.md")]
    if any("error" not in r for r in rows):
        result["files"].append(str(plot(result, output / "compare.png")))
    return result


def compare_recipe(
    recipe_path: str | Path,
    methods: str,
    output: str | Path,
    overrides: list[str] | None = None,
    sets: list[str] | None = None,
    steps: int | None = None,
    command: str | None = None,
    console=None,
    repeats: int = TIMING_REPEATS,
) -> dict[str, Any]:
    """Train ``recipe_path`` once per method (subprocesses), then :func:`compare_runs` the runs."""
    from peftcli.tools.report import require_matplotlib

    require_matplotlib()
    output = Path(output)
    names = parse_methods(methods)
    texts = method_recipes(recipe_path, names, overrides or [], sets or [], steps, output)
    run_dirs, failures = [], {}
    with _progress(console, len(names), "training") as working_on:
        for name in names:
            working_on(name)
            run_dir, error = train_method(name, texts[name], output)
            if error is None:
                run_dirs.append(run_dir)
            else:
                failures[name] = error
    return compare_runs(run_dirs, output, command, failures, console, repeats)


def _primary(rows: list[dict[str, Any]]) -> str | None:
    for name, _ in PRIMARY_METRICS:
        if rows and all(name in (r.get("eval") or {}) for r in rows):
            return name
    return None


def _human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _mib(n: Any) -> str:
    return f"{n / 2**20:,.0f} MiB" if isinstance(n, (int, float)) else str(n)


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells shared by the rich table and compare.md. Runs of a preference
    objective add an objective column and show its eval metrics (rewards, margins, accuracy)."""
    names = ("eval_loss", "perplexity", *SCORE_METRICS, *REWARD_METRICS)
    metrics = [m for m in dict.fromkeys(names) if any(m in (r.get("eval") or {}) for r in result["rows"])]
    objectives = any(r.get("objective", "sft") != "sft" for r in result["rows"])
    header = [
        "method",
        *(["objective"] if objectives else []),
        "trainable (% of base)",
        "added",
        "changed by merge",
        "adapter file",
        "peak train memory",
        "train tok/s",
        "infer time/token ÷ base",
        *metrics,
    ]
    cells = []
    for row in result["rows"]:
        if "error" in row:
            cells.append([row["method"], f"failed: {row['error']}", *[""] * (len(header) - 2)])
            continue
        changed = row["changed_after_merge"]
        evals = row.get("eval") or {}
        cells.append(
            [
                row["method"],
                *([row.get("objective", "sft")] if objectives else []),
                f"{row['trainable']:,} ({row['trainable_percent_of_base']:.3g}%)",
                f"{row['added']:,}",
                f"{changed:,}" if isinstance(changed, int) else changed,
                _kib(row["adapter_bytes"]),
                _mib(row["peak_memory_bytes"]),
                f"{row['tokens_per_s']:,.0f}",
                f"{row['inference_ratio']:.2f}×" + (" (merged)" if row["merged_for_inference"] else ""),
                *[f"{evals[m]:.4f}" if m in evals else "-" for m in metrics],
            ]
        )
    return header, cells


def compare_table(result: dict[str, Any]) -> Table:
    """`peftcli compare`'s table: one row per method, the cells compare.md has."""
    header, cells = table_rows(result)
    table = Table(title="peftcli compare", title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0, overflow="fold")
    for row in cells:
        table.add_row(*row)
    return table


def markdown(result: dict[str, Any]) -> str:
    header, cells = table_rows(result)
    ok = [r for r in result["rows"] if "error" not in r]
    lines = ["# peftcli compare", ""]
    if result.get("command"):
        lines += ["Made with:", "", "```bash", result["command"], "```", ""]
    if ok:
        base = ok[0]
        lines += [
            f"Base: {base['base_parameters']:,} parameters; {base['steps']} training steps per method. "
            f"Inference: median of {result['timing_batch']['repeats']} forwards of a fixed "
            f"{result['timing_batch']['sequences']}×{result['timing_batch']['tokens']} batch, tuned and base "
            "timed alternately (merged where the method merges).",
            "",
        ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    lines += [
        "",
        "- trainable: parameters updated in training; added: parameters the method adds to the base "
        "(0 when it trains base weights, as BitFit); changed by merge: base weights (scalars) that differ "
        "once the adapter is merged (n/a where the method cannot merge).",
        "- adapter file: adapter_model.safetensors; peak train memory: the training process's peak "
        "RSS (CPU) or CUDA max allocated (GPU); infer time/token ÷ base: the tuned model's median "
        "forward time per token over the base's (merged where the method merges, so ~1×).",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], output: Path) -> Path:
    """Eval loss (and the score, where there is one) against trainable parameters; peak memory."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in result["rows"] if "error" not in r]
    score = next((m for m in SCORE_METRICS if all(m in (r.get("eval") or {}) for r in rows)), None)
    metrics = ["eval_loss", *([score] if score else [])]
    height = max(5.0, 1.5 + 0.2 * len(rows))  # one bar per method stays legible with 50 of them
    figure = Figure(figsize=(5.5 * (len(metrics) + 1), height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(metrics) + 1)
    for ax, metric in zip(axes, metrics, strict=False):
        points = [
            (r["trainable"], r["eval"][metric], r["method"]) for r in rows if metric in (r.get("eval") or {})
        ]
        for x, y, name in points:
            ax.scatter(x, y, s=30)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} after training vs trainable parameters")
        ax.grid(True, alpha=0.3, which="both")
    ax = axes[-1]
    memory = [
        (r["method"], r["peak_memory_bytes"] / 2**20)
        for r in rows
        if isinstance(r["peak_memory_bytes"], (int, float))
    ]
    if memory:
        names, values = zip(*memory, strict=True)
        bars = ax.barh(names, values, color="tab:gray")
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=3, fontsize=8)
        ax.invert_yaxis()
        ax.margins(x=0.15)
    ax.set_xlabel("peak training memory (MiB)")
    ax.set_title("peak training memory")
    ax.grid(True, axis="x", alpha=0.3)
    figure.suptitle("peftcli compare")
    return save_png(figure, output)


class _progress:
    """A rich progress bar over the methods; ``working_on(name)`` marks the previous one done."""

    def __init__(self, console, total: int, verb: str):
        self.console, self.total, self.verb, self.started = console, total, verb, False

    def __enter__(self):
        if self.console is None:
            return lambda name: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn(f"{self.verb} {{task.description}}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.bar.__enter__()
        self.task = self.bar.add_task("", total=self.total)
        return self.working_on

    def working_on(self, name: str) -> None:
        self.bar.update(self.task, advance=1 if self.started else 0, description=name)
        self.started = True

    def __exit__(self, *exc):
        if self.console is not None:
            self.bar.update(self.task, completed=self.total)
            self.bar.__exit__(*exc)
        return False
