"""The GPU tier (bench/gpu.py, bench/gpu_checks.py, docs/gpu.md).

- ``pytest -m gpu``: every correctness check of bench/gpu_checks.py on CUDA at its ``gpu`` size, the
  same functions ``bench/gpu.py`` runs; each compares numbers with its reference (the tolerances are in
  bench/gpu_checks.py's docstring). Without CUDA they skip and say so; a check whose package is absent
  (liger-kernel, flash-attn) skips with that reason.
- The FLOP count behind MFU against torch's own matmul counter (``FlopCounterMode``) on a LoRA llama:
  equal to 1e-9 (both count exactly the matmuls; attention without the causal halving, as the counter
  counts the full score matrix).
- A step that hangs is killed at its limit and reported, and the report is still written.
- (slow) ``bench/gpu.py --dry-run``: the whole report on the CPU, its schema, every check that can run
  here passing, every throughput row measured or skipped with its reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import kit
import pytest
import torch
from kit import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu
import gpu_checks

CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(
    not CUDA, reason="needs a CUDA GPU (python bench/gpu.py --dry-run runs the checks on the CPU)"
)
@pytest.mark.parametrize("name", list(gpu_checks.CHECKS))
def test_check_on_cuda(name, tmp_path):
    found = gpu_checks.run_check(name, "cuda", "gpu", tmp_path)
    if found["passed"] is None:
        pytest.skip(found["skipped"])
    assert found["passed"], found["detail"]


def test_checks_that_need_cuda_skip_on_the_cpu_saying_why(tmp_path):
    found = gpu_checks.run_check("liger_loss", "cpu", "tiny", tmp_path)
    assert found["passed"] is None and "needs CUDA" in found["skipped"]


def test_flops_per_token_is_what_torch_counts_for_lora_training():
    """Forward + backward of a frozen llama with LoRA on every linear layer: FlopCounterMode's matmul
    FLOPs (mm, addmm, bmm: eager attention) against :func:`gpu.flops_per_token`, without the causal
    halving (the counter counts every score)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = kit.build("lora", overrides=["method.r=4"]).model
    model.set_attn_implementation("eager")
    c = model.config
    shape = dict(
        hidden=c.hidden_size,
        layers=c.num_hidden_layers,
        heads=c.num_attention_heads,
        kv_heads=c.num_key_value_heads,
        intermediate=c.intermediate_size,
        vocab=c.vocab_size,
    )
    batch, length = 3, 40
    ids = torch.randint(5, c.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
    counted = counter.get_total_flops()
    expected = gpu.flops_per_token(shape, 4, mean_context=length, causal=False) * batch * length
    assert expected == pytest.approx(counted, rel=1e-9)
    # the parts are not vacuous: LoRA's and attention's terms both move the total
    assert gpu.flops_per_token(shape, 0, length, causal=False) < expected / (batch * length)
    assert gpu.flops_per_token(shape, 4, length) < expected / (batch * length)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        (None, None),
    ],
)
def test_peak_flops_come_from_the_table_by_device_name(name, peak):
    assert gpu.peak_tflops(name)[0] == peak


@pytest.mark.slow  # waits for a step's time limit
def test_a_hanging_step_is_killed_at_its_limit_and_the_report_is_still_written(tmp_path):
    args = type("Args", (), {"budget_s": 60.0, "out": str(tmp_path), "work": str(tmp_path / "work")})()
    report = gpu.Report(tmp_path, "test", dry_run=True, budget_s=60.0)
    runner = gpu.Runner(args, report)
    started = time.time()
    hung = runner.run("hang", ["-c", "import time; time.sleep(120)"], limit=6)
    assert "timed out after 6 s" in hung["error"] and time.time() - started < 30
    crashed = runner.run("crash", ["-c", "raise SystemExit('boom')"], limit=30)
    assert crashed["error"] == "exit 1: boom"
    fine = runner.run("fine", ["-c", "print('noise'); print('{\"x\": 1}')"], limit=30)
    assert fine["x"] == 1
    report.step("hang", "failed", 6.0, hung["error"])
    report.save()
    saved = json.loads((tmp_path / "report.json").read_text())
    assert (
        saved["steps"][0]["note"].startswith("timed out")
        and "| hang | failed |" in (tmp_path / "report.md").read_text()
    )
    assert "==== hang" in (tmp_path / "log.txt").read_text()


ROW_KEYS = {"tool", "method", "packing", "tokens_per_s", "peak_mem_gib", "mfu"}


@pytest.mark.slow
def test_dry_run_writes_the_whole_report_on_the_cpu(tmp_path):
    """What the GPU run will do, at tiny sizes: so it cannot fail on a typo."""
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "report.json").read_text())
    assert data["schema"] == gpu.SCHEMA_VERSION and data["dry_run"] and data["finished"]
    env = data["environment"]
    assert env["device_name"] == "cpu" and env["peak_tflops"] is None
    assert set(env["packages"]) == set(gpu.PACKAGES) and env["packages"]["torch"] == torch.__version__

    checks = {c["name"]: c for c in data["checks"]}
    assert list(checks) == list(gpu_checks.CHECKS)
    for name, check in checks.items():
        assert set(check) >= {"name", "passed", "detail", "skipped"}
        if check["passed"] is None:  # only what needs CUDA may skip on the CPU
            assert "CUDA" in check["skipped"], (name, check["skipped"])
        else:
            assert check["passed"] is True, (name, check["detail"])
    assert checks["liger_loss"]["passed"] is None

    t = data["throughput"]
    assert t["flops"]["per_token"] > 0 and "4·N_frozen" in t["flops"]["formula"]
    rows = t["rows"]
    assert [(r["tool"], r["method"], r["packing"]) for r in rows] == [row[:3] for row in gpu.ROWS]
    for row in rows:
        assert set(row) >= ROW_KEYS and row["mfu"] is None  # no peak FLOP/s for a CPU
        if row["tool"] == "trl-sft" and row.get("note", "").startswith("skipped"):
            continue
        assert not row.get("error"), row
        assert row["tokens_per_s"] > 0 and row["peak_mem_gib"] > 0 and row["steps"] == 3
    assert all(g["verdict"] == "not judged (dry run)" for g in data["goals"])
    md = (out / "report.md").read_text()
    assert "## Checks" in md and "| peftcli | qlora | packed |" in md
