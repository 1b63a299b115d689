"""Every class of user mistake gives one line naming the key, exit code 2, no traceback.

Most cases run the CLI in-process (typer's CliRunner); two run the real console script in a
subprocess to prove that nothing but the one line reaches the terminal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from kit import EVAL, TRAIN
from typer.testing import CliRunner

from peftcli.cli import app


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


BASE = f"""
model: {{name: "tiny:llama"}}
data: {{train: {TRAIN}, eval: {EVAL}, format: completion}}
method: {{name: lora, r: 4}}
train: {{max_steps: 2, batch_size: 4}}
"""


def run_cli(args: list[str]):
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    return result, lines


def assert_one_line_error(result, lines, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (
            BASE.replace("max_steps: 2", "max_step: 2"),
            ["train.max_step", "unknown key", "did you mean 'max_steps'"],
        ),
        (
            BASE.replace("batch_size: 4", "batch_size: four"),
            ["train.batch_size", "expected an integer", "'four'"],
        ),
        (BASE.replace("batch_size: 4", "batch_size: 0"), ["train.batch_size", "must be >= 1"]),
        (BASE + "\noutput_dir: [1, 2]\n", ["output_dir", "expected a string"]),
        (BASE.replace("name: lora", "name: lorra"), ["method.name", "unknown method", "did you mean 'lora'"]),
        (BASE.replace("r: 4", "rank: 4"), ["method.rank", "unknown key", "did you mean 'r'"]),
        (
            BASE.replace("format: completion", "format: compleiton"),
            ["data.format", "did you mean 'completion'"],
        ),
        (BASE.replace(TRAIN, "/nope/train.jsonl"), ["data.train", "file not found"]),
        (BASE.replace("tiny:llama", "./no/such/model"), ["model.name", "not found"]),
        (BASE.replace("tiny:llama", "tiny:lama"), ["model.name", "did you mean 'tiny:llama'"]),
        ("model: [unclosed\n", ["recipe", "not valid YAML", "line"]),
        ("", ["recipe", "empty"]),
        ("- a\n- b\n", ["recipe", "must be a mapping"]),
        (
            BASE.replace('model: {name: "tiny:llama"}', "model: {task: causal_lm}"),
            ["model.name", "is required"],
        ),
    ],
)
def test_validate_rejects_with_one_line(tmp_path, text, needles):
    result, lines = run_cli(["validate", str(write_recipe(tmp_path, text))])
    assert_one_line_error(result, lines, *needles)


def test_missing_recipe_file(tmp_path):
    result, lines = run_cli(["validate", str(tmp_path / "absent.yaml")])
    assert_one_line_error(result, lines, "recipe", "file not found")


def test_bad_override(tmp_path):
    path = write_recipe(tmp_path, BASE)
    result, lines = run_cli(["validate", str(path), "train.lr=fast"])
    assert_one_line_error(result, lines, "train.lr", "expected a number", "'fast'")
    result, lines = run_cli(["validate", str(path), "train.lrr=1e-3"])
    assert_one_line_error(result, lines, "train.lrr", "did you mean 'lr'")
    result, lines = run_cli(["validate", str(path), "train.lr"])
    assert_one_line_error(result, lines, "key.path=value")


def test_numbers_written_the_way_people_write_them(tmp_path):
    from peftcli.recipe_loader import load_recipe

    recipe = load_recipe(write_recipe(tmp_path, BASE + "\n"), ["train.lr=3e-4", "train.weight_decay=1e-2"])
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.train.weight_decay == pytest.approx(1e-2)
    raw = BASE.replace("batch_size: 4}", "batch_size: 4, lr: 2e-4}")  # YAML 1.1 reads 2e-4 as a string
    assert load_recipe(write_recipe(tmp_path, raw)).train.lr == pytest.approx(2e-4)


def test_target_module_that_matches_nothing(tmp_path):
    text = BASE.replace("r: 4", "r: 4, target_modules: [q_proj, query]")
    result, lines = run_cli(
        ["train", str(write_recipe(tmp_path, text)), f"output_dir={tmp_path / 'run'}", "-q"]
    )
    assert_one_line_error(result, lines, "method.target_modules", "'query' matches no module", "q_proj")
    assert not (tmp_path / "run" / "adapter").exists()


def test_missing_dataset_column(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    text = BASE.replace(TRAIN, str(data)).replace(f", eval: {EVAL}", "")
    result, lines = run_cli(
        ["train", str(write_recipe(tmp_path, text)), f"output_dir={tmp_path / 'run'}", "-q"]
    )
    assert_one_line_error(result, lines, "data.columns", "'prompt'", "question")


def test_existing_run_is_not_overwritten(tmp_path):
    path = write_recipe(tmp_path, BASE)
    run = tmp_path / "run"
    first, _ = run_cli(["train", str(path), f"output_dir={run}", "-q"])
    assert first.exit_code == 0, first.output
    before = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    result, lines = run_cli(["train", str(path), f"output_dir={run}", "-q"])
    assert_one_line_error(result, lines, "output_dir", "--resume")
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.slow  # runs the installed console script: a fresh interpreter importing everything (~8 s)
def test_real_console_script_prints_no_traceback(tmp_path):
    path = write_recipe(tmp_path, BASE.replace("max_steps: 2", "max_stepz: 2"))
    proc = subprocess.run(
        [sys.executable, "-m", "peftcli", "train", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "train.max_stepz" in err[0] and "did you mean 'max_steps'" in err[0]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "peftcli",
            "merge",
            str(tmp_path / "nothing"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "adapter_config.json" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_hub_model_without_network_is_one_line_and_quick(tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE, no network, nothing cached: one line naming model.name, no retry noise
    (huggingface_hub would otherwise retry each file for ~45 s, logging every attempt)."""
    from huggingface_hub import constants

    import peftcli.models

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(peftcli.models, "_hub_reachable", lambda endpoint: False)
    recipe = write_recipe(tmp_path, BASE.replace('"tiny:llama"', "nobody-here/no-such-model"))
    result = CliRunner().invoke(app, ["train", str(recipe), "--output-dir", str(tmp_path / "run")])
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert_one_line_error(result, lines, "model.name", "cannot reach the Hugging Face Hub", "nobody-here")
    validated = CliRunner().invoke(app, ["validate", str(recipe)])
    assert validated.exit_code == 0 and "Retry" not in validated.output
    notes = [line for line in validated.output.splitlines() if "cannot reach" in line]
    assert len(notes) == 1 and notes[0].startswith("data not checked: "), validated.output
