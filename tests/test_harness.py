"""``peftcli eval --tasks`` and a recipe's ``eval.tasks``: lm-evaluation-harness on our unmerged model.

Reference: lm-eval's own CLI (``python -m lm_eval --model hf``) on the shipped local multiple-choice
task (recipes/data/tasks/tiny_reverse_choice.yaml, offline): for LoRA on the merged model
(``peftcli merge``), for prefix tuning (which cannot merge) on the base with our adapter loaded by
peft (``peft=ADAPTER``). Accuracy and length-normalised accuracy must be equal. Adapters are made by
peftcli on tiny:llama with their weights moved off init; fp32 on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from kit import ROOT
from typer.testing import CliRunner

from peftcli.cli import app

TASKS_DIR = "recipes/data/tasks"  # the task's data_files path is relative to the repository root
TASK = "tiny_reverse_choice"


def one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_tasks_without_lm_eval_name_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    line = one_line_error(["eval", str(tmp_path), "--tasks", TASK])
    assert "lm-evaluation-harness is not installed" in line and "pip install 'peftcli[eval]'" in line


def test_tasks_do_not_mix_with_the_data_options(tmp_path):
    line = one_line_error(["eval", str(tmp_path), "--tasks", TASK, "--data", "x.jsonl"])
    assert "--tasks" in line and "--data" in line


def test_task_yaml_that_runs_code_is_refused_unless_allowed(tmp_path):
    pytest.importorskip("lm_eval")
    (tmp_path / "t.yaml").write_text(
        "task: t\n# !function in a comment is fine\nprocess_docs: !function utils.go\n"
    )
    line = one_line_error(["eval", str(tmp_path), "--tasks", "t", "--include-path", str(tmp_path)])
    assert (
        "--include-path" in line and f"{tmp_path / 't.yaml'} line 3" in line and "--allow-task-code" in line
    )
    line = one_line_error(["eval", str(tmp_path), "--tasks", "t", "--include-path", str(tmp_path / "none")])
    assert "is not a directory" in line


def lm_eval_cli(model_args: str, out: Path) -> dict:
    """lm-eval's own CLI on the shipped task; returns its results for the task."""
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", TASK,
        "--include_path", TASKS_DIR, "--device", "cpu", "--batch_size", "16", "--output_path", str(out),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    return json.loads(results_file.read_text())["results"][TASK]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "prefix_tuning"])
def test_task_accuracy_equals_lm_eval_cli(method, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    pytest.importorskip("peft")
    from kit import build, perturb, save

    from peftcli.api import evaluate_tasks, merge

    recipe, base_path, tokenizer, model, method_obj = build(method, tmp_path)
    perturb(model, scale=0.2)
    adapter = save(tmp_path, model, method_obj, tokenizer, base_path, recipe)
    monkeypatch.chdir(ROOT)
    ours = evaluate_tasks(adapter, [TASK], include_path=TASKS_DIR)
    assert ours["kind"] == "adapter" and ours["tasks"][TASK]["samples"] == 20

    if method_obj.mergeable:
        merge(adapter, tmp_path / "merged")
        model_args = f"pretrained={tmp_path / 'merged'},dtype=float32"
    else:  # our adapter through peft's own forward
        model_args = f"pretrained={base_path},peft={adapter},dtype=float32"
    theirs = lm_eval_cli(model_args, tmp_path / "lm_eval_out")
    for metric in ("acc", "acc_norm"):
        assert ours["tasks"][TASK][metric] == theirs[f"{metric},none"], metric
        assert ours["tasks"][TASK][f"{metric}_stderr"] == pytest.approx(theirs[f"{metric}_stderr,none"])


@pytest.mark.slow
def test_recipe_eval_tasks_land_in_results_json(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from peftcli.api import evaluate_tasks, train

    monkeypatch.chdir(ROOT)
    overrides = [
        "train.max_steps=3",
        f"eval.tasks=[{TASK}]",
        f"eval.task_include_path={TASKS_DIR}",
        "eval.task_limit=8",
    ]
    result = train("recipes/tiny/lora.yaml", overrides, output_dir=str(tmp_path / "run"))
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    again = evaluate_tasks(result.adapter_dir, [TASK], include_path=TASKS_DIR, limit=8)
    assert written["tasks"][TASK]["samples"] == 8
    assert written["tasks"][TASK] == again["tasks"][TASK]  # the saved adapter scores what training saw
    assert f"{TASK} acc (lm-eval)" in (tmp_path / "run" / "summary.md").read_text()

    # A typo is caught before training, with a suggestion.
    typo = [*overrides[:1], "eval.tasks=[tiny_reverse_choise]", *overrides[2:]]
    result = CliRunner().invoke(app, ["train", "recipes/tiny/lora.yaml", *typo, "-o", str(tmp_path / "r2")])
    assert result.exit_code == 2 and "did you mean 'tiny_reverse_choice'" in result.output, result.output
    assert not (tmp_path / "r2" / "checkpoints").exists()


@pytest.mark.slow
def test_generation_requests_equal_hflm_on_the_merged_model(tmp_path):
    """lm-eval's generate_until through our decoding loop on the unmerged LoRA adapter gives the text
    lm-eval's own HFLM generates (transformers' generate) on the merged model."""
    pytest.importorskip("lm_eval")
    from kit import build, perturb, save
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from peftcli.api import merge
    from peftcli.harness import make_lm
    from peftcli.use.load import load_model_or_adapter

    recipe, base_path, tokenizer, model, method = build("lora", tmp_path)
    perturb(model, scale=0.2)
    adapter = save(tmp_path, model, method, tokenizer, base_path, recipe)
    merge(adapter, tmp_path / "merged")
    contexts = ["reverse apple =", "hi", "a longer context, so the batch is ragged", "reverse stone ="]
    until = [tokenizer.decode([c]) for c in b"eao"]  # common letters: some rows stop early
    requests = [
        Instance("generate_until", {}, (context, {"until": until, "max_gen_toks": 10}), i)
        for i, context in enumerate(contexts)
    ]
    loaded = load_model_or_adapter(adapter)
    ours = make_lm(loaded.model, loaded.tokenizer, "causal_lm", loaded.model.device, 4).generate_until(
        requests
    )
    theirs = HFLM(pretrained=str(tmp_path / "merged"), dtype="float32", device="cpu", batch_size=4)
    assert ours == theirs.generate_until(requests)
    assert any(len(text) < 10 for text in ours)  # a stop string cut at least one row
