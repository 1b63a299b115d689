"""End to end through the real entry points: train → run directory → peft → merge → eval → resume.

References and tolerances (fp32, CPU, fixed seeds):
- peft.PeftModel.from_pretrained(base, RUN/adapter) gives our logits: ≤ 1e-5;
- the merged model loaded with AutoModelForCausalLM gives the adapter model's logits: ≤ 1e-4;
- a run SIGKILLed right after a checkpoint and resumed ends with the uninterrupted run's adapter: ≤ 1e-6.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import kit
import pytest
import torch
from kit import EVAL, HELPERS, TRAIN
from safetensors.torch import load_file
from typer.testing import CliRunner

import peftcli
from peftcli.cli import app

pytestmark = pytest.mark.slow  # every test here rides on a real training run (~30 s each)

KILL_AFTER_CHECKPOINT = HELPERS / "kill_after_checkpoint.py"  # SIGKILL after checkpoint N

RECIPE = f"""
model: {{name: "tiny:llama"}}
data: {{train: {TRAIN}, eval: {EVAL}, format: completion, max_train_examples: 64}}
method: {{name: lora, r: 4, alpha: 8, dropout: 0.1}}
train: {{max_steps: 8, batch_size: 8, grad_accum: 2, lr: 5.0e-3, log_every: 1, save_every: 3, seed: 3,
         scheduler: cosine, warmup_steps: 2}}
eval: {{generate: true, max_new_tokens: 4, max_generate_examples: 4}}
"""


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def finished_run(recipe_path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "full"
    result = CliRunner().invoke(app, ["train", str(recipe_path), "--output-dir", str(run), "-q"])
    assert result.exit_code == 0, result.output
    return run


def test_run_directory_layout(finished_run):
    names = {p.name for p in finished_run.iterdir()}
    assert {"recipe.yaml", "metrics.jsonl", "checkpoints", "adapter", "results.json", "summary.md"} <= names
    assert {p.name for p in (finished_run / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    steps = sorted(int(p.name.split("-")[1]) for p in (finished_run / "checkpoints").iterdir())
    assert steps == [6, 8]  # save_every 3 plus the final step; keep_checkpoints 2 dropped step-3
    events = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train_events] == list(range(1, 9))
    assert all({"step", "epoch", "loss", "lr", "tokens_per_s", "elapsed_s"} <= set(e) for e in train_events)
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 8]
    assert all({"eval_loss", "perplexity", "exact_match"} <= set(e) for e in evals)
    # the scheduler really did warm up then decay (cosine), as the recipe says
    lrs = [e["lr"] for e in train_events]
    assert lrs[0] < lrs[1] and lrs[2] > lrs[-1]
    results = json.loads((finished_run / "results.json").read_text())
    assert results["steps"] == 8 and results["eval_after"]["eval_loss"] == evals[-1]["eval_loss"]
    config = json.loads((finished_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert Path(config["base_model_name_or_path"]).is_dir()


def test_peft_loads_our_adapter_with_our_logits(finished_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours, _ = peftcli.load(finished_run / "adapter")
    config = json.loads((finished_run / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, finished_run / "adapter").eval()
    batch = kit.batch("causal_lm", 260, lengths=(12, 12), seed=1, labels=False)
    with torch.no_grad():
        a, b = ours(**batch).logits, theirs(**batch).logits
    assert (a - b).abs().max().item() <= 1e-5
    lora_b = [
        v
        for k, v in load_file(finished_run / "adapter" / "adapter_model.safetensors").items()
        if "lora_B" in k
    ]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "training moved every B away from zero"


def test_merge_writes_a_plain_model_with_the_same_logits(finished_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", str(finished_run / "adapter"), "--output", str(out)])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours, _ = peftcli.load(finished_run / "adapter")
    batch = kit.batch("causal_lm", 260, lengths=(12, 12), seed=1, labels=False)
    with torch.no_grad():
        assert (merged(**batch).logits - ours(**batch).logits).abs().max().item() <= 1e-4
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    assert (out / "tokenizer.json").exists()

    half = tmp_path / "merged-bf16"
    result = CliRunner().invoke(
        app, ["merge", str(finished_run / "adapter"), "--output", str(half), "--dtype", "bfloat16"]
    )
    assert result.exit_code == 0, result.output
    assert all(v.dtype == torch.bfloat16 for v in load_file(half / "model.safetensors").values())


def test_eval_json_matches_the_runs_final_eval(finished_run):
    result = CliRunner().invoke(app, ["eval", str(finished_run / "adapter"), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    final = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert printed["kind"] == "adapter"
    assert printed["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-6)
    assert printed["exact_match"] == final["exact_match"]


def test_eval_of_a_merged_model_and_of_a_data_file(finished_run, tmp_path):
    out = tmp_path / "merged"
    peftcli.merge(finished_run / "adapter", out)
    adapter_eval = peftcli.evaluate_target(finished_run / "adapter", data=EVAL)
    merged_eval = peftcli.evaluate_target(out, data=EVAL)
    assert merged_eval["kind"] == "model"
    assert merged_eval["eval_loss"] == pytest.approx(adapter_eval["eval_loss"], abs=1e-4)
    assert merged_eval["perplexity"] == pytest.approx(adapter_eval["perplexity"], rel=1e-4)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(finished_run, recipe_path, tmp_path):
    run = tmp_path / "killed"
    cmd = [sys.executable, str(KILL_AFTER_CHECKPOINT), "3", "--", "train", str(recipe_path)]
    cmd += ["--output-dir", str(run), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (run / "checkpoints" / "step-3" / "complete").exists()
    assert not (run / "adapter").exists()
    result = CliRunner().invoke(app, ["train", str(recipe_path), "--output-dir", str(run), "--resume", "-q"])
    assert result.exit_code == 0, result.output
    full, resumed = _adapter(finished_run), _adapter(run)
    assert full.keys() == resumed.keys()
    assert max((full[k] - resumed[k]).abs().max().item() for k in full) <= 1e-6
    steps = [
        json.loads(line)["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["event"] == "train"
    ]
    assert steps == list(range(1, 9)), "events after the checkpoint were dropped and logged once"


def test_sigterm_writes_a_checkpoint_and_resume_finishes(recipe_path, tmp_path):
    run = tmp_path / "term"
    cmd = [
        sys.executable,
        "-m",
        "peftcli",
        "train",
        str(recipe_path),
        "--output-dir",
        str(run),
        "-q",
        "train.max_steps=400",
        "train.save_every=1000",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"train"' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "--resume" in err
    saved = [p for p in (run / "checkpoints").iterdir() if (p / "complete").exists()]
    assert len(saved) == 1
    stopped_at = int(saved[0].name.split("-")[1])
    assert 1 <= stopped_at < 400
    state = json.loads((saved[0] / "trainer_state.json").read_text())
    assert state["step"] == stopped_at


def test_resume_refuses_a_changed_recipe(finished_run, recipe_path):
    result = CliRunner().invoke(
        app, ["train", str(recipe_path), "--output-dir", str(finished_run), "--resume", "train.lr=1e-2", "-q"]
    )
    assert result.exit_code == 2
    assert "--resume" in result.output and "differs" in result.output


def _saved_by_an_older_release(text: str, edit: str) -> str:
    """recipe.yaml as an earlier peftcli (or a hand edit) left it: ``edit`` is section.key to drop,
    section.key=value to change, or section.key+ to add a key this release does not know."""
    import yaml

    raw = yaml.safe_load(text)
    section, key = edit.rstrip("+").split("=")[0].split(".")
    if edit.endswith("+"):
        raw[section][key] = 1
    elif "=" in edit:
        raw[section][key] = yaml.safe_load(edit.split("=")[1])
    else:
        del raw[section][key]
    return yaml.safe_dump(raw, sort_keys=False)


@pytest.mark.parametrize(
    ("edit", "same"),
    [
        ("method.init", True),  # a key added after the run started: its default is what the run used
        ("train.on_nan", True),
        ("objective.name", True),
        ("train.lr=0.01", False),  # a real change still refuses
        ("method.r=4", False),
        ("method.no_such_key+", False),  # a key this release cannot read: the text stays as written
    ],
)
def test_resume_reads_an_older_recipe_with_this_releases_defaults(edit, same):
    from peftcli.recipe import dump_recipe
    from peftcli.recipe_loader import load_recipe
    from peftcli.training.checkpoints import saved_identity, training_identity

    current = dump_recipe(load_recipe(kit.ROOT / "recipes/quickstart.yaml"))
    older = _saved_by_an_older_release(current, edit)
    assert (saved_identity(older) == training_identity(current)) is same
