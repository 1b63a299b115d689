"""`peftcli report`: the PNG is a real image of a sensible size, and every number of the summary equals
the value recomputed here from metrics.jsonl (exact: both read the same JSON floats), for a finished
run, a run being written (torn last line, no results.json) and a run killed with SIGKILL."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import kit
import pytest
from helpers.kill_after_checkpoint import run_killed_after_checkpoint
from PIL import Image
from typer.testing import CliRunner

import peftcli
from peftcli.cli import app
from peftcli.tools.report import best_eval, report


def write_recipe(directory: Path, **train) -> Path:
    return kit.write_recipe(
        directory,
        data={"max_train_examples": 32},
        method={"r": 2},
        train={
            "max_steps": 6,
            "batch_size": 8,
            "lr": 1.0e-2,
            "log_every": 1,
            "eval_every": 2,
            "seed": 2,
            **train,
        },
        eval={"generate": True, "max_new_tokens": 2, "max_generate_examples": 4},
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("report")
    peftcli.train(write_recipe(directory))
    return directory / "run"


def recomputed(run: Path) -> dict:
    """The summary's numbers, computed here straight from the JSON lines."""
    events = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a torn last line
            events.append(json.loads(line))
    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    strip = lambda e: {k: v for k, v in e.items() if k not in ("event", "step")}  # noqa: E731
    best = sorted(evals, key=lambda e: (-e["exact_match"], e["eval_loss"], e["step"]))[0]
    return {
        "before": strip(evals[0]),
        "final": strip(evals[-1]),
        "final_step": evals[-1]["step"],
        "best_step": best["step"],
        "best_value": best["exact_match"],
        "train_loss_first": train[0]["loss"],
        "train_loss_last": train[-1]["loss"],
        "tokens_per_s": train[-1]["tokens_per_s"],
        "training_time_s": train[-1]["elapsed_s"],
        "last_step": max(e["step"] for e in events),
    }


def check_summary(summary: dict, run: Path) -> None:
    want = recomputed(run)
    assert summary["before"] == want["before"]
    assert summary["final"] == want["final"] and summary["final_step"] == want["final_step"]
    assert summary["best_eval"]["metric"] == "exact_match"
    assert (summary["best_eval"]["step"], summary["best_eval"]["value"]) == (
        want["best_step"],
        want["best_value"],
    )
    for key in ("train_loss_first", "train_loss_last", "tokens_per_s", "training_time_s", "last_step"):
        assert summary[key] == want[key], key


def check_png(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (1100, 700)  # 11 × 7 inches at 100 dpi
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 50  # drawn on, not a blank canvas


def test_finished_run(finished_run, tmp_path):
    out = tmp_path / "custom.png"
    summary = report(finished_run, out)
    assert summary["status"] == "finished" and summary["planned_steps"] == 6
    assert summary["plot"] == str(out)
    check_png(out)
    check_summary(summary, finished_run)
    # the same numbers through the CLI's --json, and report.png beside the run by default
    result = CliRunner().invoke(app, ["report", str(finished_run), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    check_summary(printed, finished_run)
    check_png(finished_run / "report.png")


def test_run_being_written(finished_run, tmp_path):
    """No results.json, metrics cut after step 3 and a half-written line: still reports up to step 3."""
    run = tmp_path / "partial"
    shutil.copytree(finished_run, run)
    (run / "results.json").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= 3]
    (run / "metrics.jsonl").write_text("\n".join(kept) + '\n{"event": "train", "st')
    summary = report(run)
    assert summary["status"] == "running or interrupted" and summary["last_step"] == 3
    check_summary(summary, run)
    check_png(run / "report.png")


@pytest.mark.slow
def test_run_killed_with_sigkill(tmp_path):
    path = write_recipe(tmp_path, max_steps=8, save_every=4)
    proc = run_killed_after_checkpoint(4, path)
    assert proc.returncode < 0, proc.stderr
    run = tmp_path / "run"
    summary = report(run)
    assert summary["status"] == "running or interrupted" and summary["last_step"] == 4
    assert summary["planned_steps"] == 8
    check_summary(summary, run)
    check_png(run / "report.png")


def test_best_eval_ranks_by_metric_then_loss_then_step():
    evals = [
        {"event": "eval", "step": 0, "eval_loss": 3.0, "accuracy": 0.5},
        {"event": "eval", "step": 2, "eval_loss": 2.0, "accuracy": 0.75},
        {"event": "eval", "step": 4, "eval_loss": 1.5, "accuracy": 0.75},
        {"event": "eval", "step": 6, "eval_loss": 1.5, "accuracy": 0.75},
    ]
    assert best_eval(evals) == {"step": 4, "metric": "accuracy", "value": 0.75, "higher_is_better": True}
    losses = [{"event": "eval", "step": s, "eval_loss": v} for s, v in ((0, 3.0), (2, 1.0), (4, 1.2))]
    assert best_eval(losses)["step"] == 2 and best_eval(losses)["higher_is_better"] is False


def test_bad_run_dir_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "metrics.jsonl does not exist" in result.output and "Traceback" not in result.output
    (tmp_path / "metrics.jsonl").write_text(
        '{"event": "eval", "step": 0}\nnot json\n{"event": "eval", "step": 1}\n'
    )
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--no-plot"])
    assert result.exit_code == 2 and "metrics.jsonl:2: is not a metrics event" in result.output
