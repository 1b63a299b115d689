"""Faults during real (tiny) runs, through the loop and the CLI. Faults are caused from the test side:
a monkeypatched function in this process, or a wrapper script in tests/helpers; the library has no hooks.

References (fp32, CPU, fixed seeds): an uninterrupted run of the same recipe; its adapter must be
bit-identical (torch.equal) to a run that crashed, was damaged or ran out of disk and was resumed.

- defect 1: a second ``train --resume`` while the first runs is refused (exit 2, names the pid), the
  first finishes undisturbed with the reference adapter;
- defect 2: a checkpoint whose safetensors file has its last bytes zeroed is detected on --resume, named
  in a warning, and the run falls back to the previous checkpoint and ends with the reference adapter;
- a full disk while writing a checkpoint: exit 2, one line, previous checkpoint intact, resume exact;
- a finished run is refused without --resume; --overwrite discards it; a stale lock is cleared with a note;
- train.on_nan: stop names the step, the examples and the last good checkpoint; skip leaves weights and
  optimizer state untouched (checkpoint before == after) and logs it; max_skipped_steps stops the run;
- CUDA out of memory (raised on CPU by a patched step): exit code 3 and advice with this run's numbers.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kit import HELPERS, ROOT, TRAIN
from safetensors.torch import load_file
from typer.testing import CliRunner

import peftcli.checkpoint as ckpt
import peftcli.training.loop as loop
import peftcli.training.loss as loss_module
from peftcli.cli import app
from peftcli.data.sampler import BatchSampler
from peftcli.recipe import RecipeError
from peftcli.recipe_loader import load_recipe
from peftcli.training.console import Reporter

pytestmark = pytest.mark.slow  # every test here trains (seconds each)

PAUSE = HELPERS / "pause_after_checkpoint.py"
STEPS = 6
RECIPE = f"""
model: {{name: "tiny:llama"}}
data: {{train: {TRAIN}, format: completion, max_train_examples: 48}}
method: {{name: lora, r: 4, alpha: 8, dropout: 0.1}}
train: {{max_steps: {STEPS}, batch_size: 4, lr: 5.0e-3, log_every: 1, save_every: 2, keep_checkpoints: 3,
         seed: 5, scheduler: cosine, loss: plain}}
eval: {{generate: false}}
"""


class Crash(Exception):
    """Stands in for a kill at a chosen point, in this process."""


class Warnings(Reporter):
    def __init__(self):
        super().__init__(quiet=True)
        self.lines: list[str] = []

    def warn(self, text: str) -> None:
        self.lines.append(text)

    def note(self, text: str) -> None:
        self.lines.append(text)


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def recipe(path: Path, run: Path, *overrides: str):
    return load_recipe(path, list(overrides), str(run))


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(run: Path, reference: Path) -> None:
    got, want = adapter(run), adapter(reference)
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.fixture(scope="module")
def reference(recipe_path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    loop.train(recipe(recipe_path, run))
    return run


def crash_after(monkeypatch, step: int) -> None:
    real = ckpt.save_checkpoint

    def save_then_crash(run_dir, at_step, payload, keep):
        path = real(run_dir, at_step, payload, keep)
        if at_step == step:
            raise Crash(path)
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_crash)


def test_damaged_checkpoint_is_detected_and_resume_falls_back(recipe_path, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    crash_after(monkeypatch, 4)
    with pytest.raises(Crash):
        loop.train(recipe(recipe_path, run))
    monkeypatch.undo()
    weights = run / "checkpoints" / "step-4" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-16:] = bytes(16)  # the defect: last bytes zeroed on disk, still a loadable safetensors file
    weights.write_bytes(bytes(data))
    assert load_file(str(weights))  # safetensors alone does not notice
    reporter = Warnings()
    loop.train(recipe(recipe_path, run), resume=True, reporter=reporter)
    assert any("step-4 is not usable: trainable.safetensors is damaged" in line for line in reporter.lines)
    assert "resuming from step-2 instead" in reporter.lines
    assert_same_adapter(run, reference)


def test_second_resume_while_the_first_runs_is_refused(recipe_path, reference, tmp_path):
    run, paused, go = tmp_path / "run", tmp_path / "paused", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        [
            sys.executable,
            str(PAUSE),
            "2",
            str(paused),
            str(go),
            "--",
            "train",
            str(recipe_path),
            "-o",
            str(run),
            "-q",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "peftcli", "train", str(recipe_path), "-o", str(run), "--resume", "-q"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr
        assert f"is in use by another peftcli train (pid {first.pid} on " in " ".join(second.stderr.split())
    finally:
        go.write_text("")
        first.wait(timeout=120)
    assert first.returncode == 0, first.stderr.read()
    assert_same_adapter(run, reference)
    assert not (run / ".peftcli.lock").exists()


def test_full_disk_during_a_checkpoint_then_resume_is_exact(recipe_path, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = ckpt.save_file

    def full_disk(tensors, filename, metadata=None):
        if "step-4" in str(Path(filename).parent.name):
            with open(filename, "wb") as handle:
                handle.write(b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    result = CliRunner().invoke(app, ["train", str(recipe_path), "-o", str(run), "-q"])
    monkeypatch.undo()
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "could not write checkpoint step-4" in lines[0] and "No space left on device" in lines[0]
    assert "it needs about" in lines[0] and "step-2 is intact" in lines[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    result = CliRunner().invoke(app, ["train", str(recipe_path), "-o", str(run), "-q", "--resume"])
    assert result.exit_code == 0, result.output
    assert_same_adapter(run, reference)


def test_finished_run_is_refused_and_overwrite_discards_it(recipe_path, reference, tmp_path):
    run = tmp_path / "run"
    runner = CliRunner()
    assert (
        runner.invoke(app, ["train", str(recipe_path), "-o", str(run), "-q", "train.max_steps=2"]).exit_code
        == 0
    )
    refused = runner.invoke(app, ["train", str(recipe_path), "-o", str(run), "-q", "train.max_steps=2"])
    assert refused.exit_code == 2
    text = " ".join(refused.output.split())
    assert f"{run} holds a finished run (2 steps" in text
    assert "--resume" in text and "--output-dir" in text and "--overwrite" in text
    (run / "notes.txt").write_text("kept")
    again = runner.invoke(app, ["train", str(recipe_path), "-o", str(run), "-q", "--overwrite"])
    assert again.exit_code == 0, again.output
    assert_same_adapter(run, reference)
    assert (run / "notes.txt").read_text() == "kept"
    both = runner.invoke(app, ["train", str(recipe_path), "-o", str(run), "--resume", "--overwrite"])
    assert both.exit_code == 2 and "--overwrite: cannot be combined with --resume" in both.output


def test_stale_lock_from_a_killed_run_is_cleared_with_a_note(recipe_path, reference, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead.kill()
    dead.wait()
    (run / ".peftcli.lock").write_text(
        json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "x"})
    )
    reporter = Warnings()
    loop.train(recipe(recipe_path, run), reporter=reporter)
    assert any(f"removed a stale lock in {run}: pid {dead.pid}" in line for line in reporter.lines)
    assert_same_adapter(run, reference)


def patch_loss(monkeypatch, poison, at_calls):
    """Make token_loss_sum's result non-finite (``poison``) on the given 1-based calls (one per step here).
    The recipe sets ``train.loss: plain``, so every micro-batch's loss goes through this function."""
    real = loss_module.token_loss_sum
    calls = []

    def patched(logits, labels, task):
        calls.append(1)
        loss, n = real(logits, labels, task)
        if len(calls) in at_calls:
            loss = poison(loss, logits)
        return loss, n

    monkeypatch.setattr(loss_module, "token_loss_sum", patched)


def nan_loss(loss, logits):
    return loss * float("nan")


def nan_gradient(loss, logits):
    # Finite value, NaN gradient: the unselected branch of where() still back-propagates 0 · NaN.
    poison = torch.sqrt(-(logits.float().abs().sum() + 1.0))
    return loss + torch.where(torch.tensor(True), torch.zeros(()), poison)


def window_examples(step: int) -> list[int]:
    """The training examples of 1-based ``step`` (grad_accum 1, batch 4, seed 5), drawn independently."""
    return BatchSampler(48, 4, 5).epoch_batches(0)[step - 1]


@pytest.mark.parametrize("poison, what", [(nan_loss, "loss nan"), (nan_gradient, "gradient norm nan")])
def test_on_nan_stop_names_step_examples_and_last_checkpoint(
    recipe_path, tmp_path, monkeypatch, poison, what
):
    run = tmp_path / "run"
    patch_loss(monkeypatch, poison, {3})
    with pytest.raises(RecipeError) as err:
        loop.train(recipe(recipe_path, run))
    text = str(err.value)
    examples = ", ".join(str(i) for i in window_examples(3))
    assert text.startswith(f"train.on_nan: step 3: {what} on training examples [{examples}]")
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step-2'}" in text
    assert "train.on_nan: skip" in text
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step-2") is None


def test_on_nan_skip_drops_the_update_and_leaves_optimizer_state_untouched(
    recipe_path, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    patch_loss(monkeypatch, nan_gradient, {3})
    reporter = Warnings()
    result = loop.train(
        recipe(recipe_path, run, "train.on_nan=skip", "train.save_every=1", "train.keep_checkpoints=10"),
        reporter=reporter,
    )
    assert result.steps == STEPS
    before, after = (ckpt.load_checkpoint(run / "checkpoints" / f"step-{s}") for s in (2, 3))
    for name, value in before["trainable"].items():
        assert torch.equal(after["trainable"][name], value), name
    state_before, state_after = before["optimizer"]["state"], after["optimizer"]["state"]
    for index, slots in state_before.items():
        for slot, value in slots.items():
            assert torch.equal(state_after[index][slot], value), (index, slot)
    final = ckpt.load_checkpoint(run / "checkpoints" / f"step-{STEPS}")
    assert float(next(iter(final["optimizer"]["state"].values()))["step"]) == STEPS - 1  # Adam took 5 steps
    assert final["trainer_state"]["skipped_steps"] == 1
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [e for e in events if e["event"] == "skipped_step"]
    assert skipped == [
        {
            "event": "skipped_step",
            "step": 3,
            "reason": "gradient norm nan",
            "examples": window_examples(3),
            "skipped_total": 1,
        }
    ]
    assert any("skipped step 3: gradient norm nan" in line for line in reporter.lines)


def test_max_skipped_steps_stops_the_run(recipe_path, tmp_path, monkeypatch):
    run = tmp_path / "run"
    patch_loss(monkeypatch, nan_loss, set(range(1, 100)))
    with pytest.raises(RecipeError) as err:
        loop.train(recipe(recipe_path, run, "train.on_nan=skip", "train.max_skipped_steps=2"))
    assert str(err.value).startswith(
        "train.max_skipped_steps: 3 steps had a non-finite loss or gradient, more than 2"
    )
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "skipped_step"] == [1, 2]


def test_cuda_out_of_memory_gives_advice_and_exit_code_3(recipe_path, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = loss_module.token_loss_sum
    calls = []

    def out_of_memory_at_step_3(logits, labels, task):
        calls.append(1)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(logits, labels, task)

    monkeypatch.setattr(loss_module, "token_loss_sum", out_of_memory_at_step_3)
    result = CliRunner().invoke(app, ["train", str(recipe_path), "-o", str(run), "-q", "data.max_length=256"])
    assert result.exit_code == 3, result.output
    text = " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert (
        "CUDA ran out of memory during training at step 3 (micro-batch 4 × max_length 256, grad_accum 1)"
        in text
    )
    assert "train.batch_size=2 train.grad_accum=2" in text
    assert "model.gradient_checkpointing=true" in text and "data.max_length=128" in text
    assert "model.quantization.bits=4" in text
    assert f"{run / 'checkpoints' / 'step-2'}, is intact" in text
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step-2") is None
    assert not (run / ".peftcli.lock").exists()
