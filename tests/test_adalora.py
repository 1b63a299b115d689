"""AdaLoRA against peft's AdaLoraModel (forward, orthogonal penalty, rank allocation, saved format) and
against the paper's cubic budget schedule. fp32, CPU, fixed seeds; tolerances named per test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import kit
import pytest
import torch
from kit import (
    HELPERS,
    ROOT,
    base_model,
    batch_of,
    build,
    copy_into_peft,
    load_in_peft,
    logits,
    perturb,
    save,
    train_steps,
)

from peftcli.recipe import RecipeError
from peftcli.training.loop import token_loss_sum

peft = pytest.importorskip("peft")

TOTAL = 8
SCHEDULE = [
    f"train.max_steps={TOTAL}",
    "method.init_r=4",
    "method.target_r=2",
    "method.tinit=1",
    "method.tfinal=2",
    "method.deltaT=1",
    "method.orth_reg_weight=0.3",
]


def peft_model_for(method, model, base_path, recipe):
    from peft import AdaLoraConfig

    fields = method.adapter_config(model)
    fields.pop("fan_in_fan_out")
    fields.pop("rank_pattern")
    config = AdaLoraConfig(task_type="CAUSAL_LM", **fields)
    peft_model = peft.get_peft_model(base_model(base_path, recipe), config)
    copy_into_peft(peft_model, method.adapter_state_dict(model))
    return peft_model


def built(tmp_path, extra=()):
    recipe, base_path, tokenizer, model, method = build("adalora", tmp_path, [*SCHEDULE, *extra])
    method.on_train_start(model, TOTAL)
    return recipe, base_path, tokenizer, model, method


def test_forward_and_orthogonal_penalty_equal_peft(tmp_path):
    recipe, base_path, _, model, method = built(tmp_path)
    perturb(model, scale=0.1)  # λ ≠ 0
    batch = batch_of(model.config.vocab_size)
    peft_model = peft_model_for(method, model, base_path, recipe)
    peft_model.eval()
    assert (logits(model, batch) - logits(peft_model, batch)).abs().max().item() <= 1e-5
    # peft adds orth_reg_weight · mean ‖·‖_F to outputs.loss; ours comes from extra_loss
    with torch.no_grad():
        out = peft_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        task_sum, n = token_loss_sum(out.logits, batch["labels"], "causal_lm")
        peft_penalty = out.loss - task_sum / n
        ours = method.extra_loss(model)
    assert peft_penalty.item() > 1e-3
    assert abs(ours.item() - peft_penalty.item()) <= 1e-5


def test_budget_follows_the_papers_cubic_schedule(tmp_path):
    _, _, _, _, method = built(tmp_path)
    n = len(method.targets)
    b0, bT, tinit, tfinal = 4 * n, 2 * n, 1, 2
    for step in range(TOTAL):
        budget, _ = method._budget(step)
        if step <= tinit:
            expected = b0
        elif step > TOTAL - tfinal:
            expected = bT
        else:
            expected = int((b0 - bT) * (1 - (step - tinit) / (TOTAL - tfinal - tinit)) ** 3 + bT)
        assert budget == expected, step
    assert method._budget(TOTAL - tfinal)[0] == bT


def test_training_with_allocation_matches_peft_step_for_step(tmp_path):
    """Same init, same AdamW, same batch: after every step the rank pattern and the logits equal peft's
    (peft's update_and_allocate called after optimizer.step, before zero_grad, with the 0-based step)."""
    recipe, base_path, _, model, method = built(tmp_path)
    batch = batch_of(model.config.vocab_size)
    peft_model = peft_model_for(method, model, base_path, recipe)
    peft_model.train()
    model.train()
    ours = kit.stepper(model, method, lr=1e-2, weight_decay=0.01)  # the loop's step; AdamW as peft's below
    peft_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(TOTAL):
        ours.step([batch], step)

        peft_out = peft_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        peft_out.loss.backward()
        peft_opt.step()
        peft_model.base_model.update_and_allocate(step)
        peft_opt.zero_grad()

        theirs = peft_model.peft_config["default"].rank_pattern
        if theirs is not None:
            theirs = {k.replace(".default", ""): v for k, v in theirs.items()}
        assert method.rank_pattern == theirs, f"rank patterns differ after step {step}"
    model.eval()
    peft_model.eval()
    assert (logits(model, batch) - logits(peft_model, batch)).abs().max().item() <= 1e-5
    kept = sum(sum(v) for v in method.rank_pattern.values())
    assert kept <= 2 * len(method.targets)  # the final budget target_r · n (ties may prune more)
    assert any(not all(v) for v in method.rank_pattern.values())


def test_pruned_adapter_saves_r_prime_rows_and_loads_in_peft_with_our_logits(tmp_path):
    recipe, base_path, tokenizer, model, method = built(tmp_path)
    batch = batch_of(model.config.vocab_size)
    train_steps(model, method, batch, steps=TOTAL, lr=1e-2)
    assert method.rank_pattern is not None
    ours = logits(model, batch)
    adapter = save(tmp_path, model, method, tokenizer, base_path, recipe)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == TOTAL
    from safetensors.torch import load_file

    state = load_file(str(adapter / "adapter_model.safetensors"))
    for key, keep in config["rank_pattern"].items():
        assert len(keep) == 4
        assert state[f"base_model.model.{key}"].shape == (sum(keep), 1)
    assert any(sum(keep) < 4 for keep in config["rank_pattern"].values())
    theirs = logits(load_in_peft(adapter, base_path), batch)
    assert (ours - logits(base_model(base_path, recipe), batch)).abs().max().item() > 1e-3
    assert (ours - theirs).abs().max().item() <= 1e-5

    # and our own loader rebuilds the pruned layers from the r′-row tensors
    from peftcli.export import load_adapter

    again = logits(load_adapter(adapter).model, batch)
    assert (ours - again).abs().max().item() <= 1e-6


def test_schedule_without_a_pruning_phase_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="method.tinit"):
        build("adalora", tmp_path, ["train.max_steps=10", "method.tinit=6", "method.tfinal=4"])
    with pytest.raises(RecipeError, match="method.target_r"):
        build("adalora", tmp_path, ["method.init_r=4", "method.target_r=6"])


@pytest.mark.slow
def test_resume_is_exact_through_the_cli(tmp_path):
    """Kill the run right after the step-5 checkpoint, resume, and compare with an uninterrupted run:
    the EMA scores and the rank pattern go through method_state(), so the adapters are identical."""
    overrides = [
        "train.max_steps=10",
        "method.tinit=2",
        "method.tfinal=3",
        "method.deltaT=2",
        "train.save_every=5",
        "data.eval=null",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(out, *extra, kill=None):
        # kill: SIGKILL the process right after that checkpoint (a test-side hook; see tests/helpers)
        launcher = [str(HELPERS / "kill_after_checkpoint.py"), str(kill), "--"]
        cmd = [
            sys.executable,
            *(launcher if kill else ["-m", "peftcli"]),
            "train",
            "recipes/tiny/adalora.yaml",
            *overrides,
            f"output_dir={out}",
            "--quiet",
            *extra,
        ]
        return subprocess.run(
            cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )

    straight = run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    killed = run(tmp_path / "resumed", kill=5)
    assert killed.returncode != 0
    resumed = run(tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    config_a = json.loads((tmp_path / "straight" / "adapter" / "adapter_config.json").read_text())
    config_b = json.loads((tmp_path / "resumed" / "adapter" / "adapter_config.json").read_text())
    assert config_a["rank_pattern"] == config_b["rank_pattern"] and config_a["rank_pattern"]
