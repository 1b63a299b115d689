"""Soak: a run SIGKILLed again and again (at random moments, and inside checkpoint writes), resumed
each time, ends with an adapter bit-identical (torch.equal) to an uninterrupted run's.

The kills are made from outside the training process by tests/helpers/soak.py (a zygote that forks
each attempt). Also checked after the last attempt: no partial files, no lock left, every remaining
checkpoint verifies against its manifest, and metrics.jsonl holds each step's train event exactly once.

The short variant (4 kills, 16 steps) runs with the other slow tests; the long one (≥ 20 kills,
60 steps) runs when PEFTCLI_SOAK=1 (PEFTCLI_SOAK_KILLS sets the number of kills).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kit import HELPERS, ROOT, TRAIN
from safetensors.torch import load_file

import peftcli.checkpoint as ckpt

SOAK = HELPERS / "soak.py"


def soak(tmp_path: Path, kills: int, steps: int, seed: int) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""
model: {{name: "tiny:llama"}}
data: {{train: {TRAIN}, format: completion, max_train_examples: 64}}
method: {{name: lora, r: 4, alpha: 8, dropout: 0.1}}
train: {{max_steps: {steps}, batch_size: 4, lr: 5.0e-3, log_every: 1, save_every: 2, keep_checkpoints: 2,
         seed: 7, scheduler: cosine, warmup_steps: 2}}
eval: {{generate: false}}
"""
    )
    reference, run, report_path = tmp_path / "reference", tmp_path / "run", tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            str(recipe),
            str(reference),
            str(run),
            str(kills),
            str(seed),
            str(report_path),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    attempts = report["attempts"]
    assert report["kills"] >= kills, report
    assert attempts[-1]["status"] == 0, (attempts[-1], proc.stderr[-3000:])
    assert all(a["status"] in (0, -9) for a in attempts), attempts
    assert report["kills_inside_writes"] >= max(1, kills // 4), report
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]

    want = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key

    assert not (run / ".peftcli.lock").exists()
    leftovers = [p.name for d in (run, run / "checkpoints") for p in d.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    for _, path in ckpt.list_checkpoints(run):
        assert ckpt.verify_checkpoint(path) is None, path
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == list(range(1, steps + 1))


@pytest.mark.slow
def test_soak_short(tmp_path):
    soak(tmp_path, kills=4, steps=16, seed=1)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PEFTCLI_SOAK") != "1", reason="the long soak runs with PEFTCLI_SOAK=1")
def test_soak_long(tmp_path):
    soak(tmp_path, kills=max(20, int(os.environ.get("PEFTCLI_SOAK_KILLS", "20"))), steps=60, seed=2)
