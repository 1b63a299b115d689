"""The GPU tier in one command: environment, correctness checks and a throughput table, in one report.

    python bench/gpu.py --out DIR              # on a CUDA machine: ≤ 8 minutes (--budget-s)
    python bench/gpu.py --out DIR --dry-run    # tiny sizes on the CPU: the same code path and schema

Steps, each in its own process under its own time limit, so a hang or an out-of-memory in one loses
nothing else; DIR/report.json and DIR/report.md are rewritten (temp + rename) after every step, and
DIR/log.txt keeps the tail of each step's output:

1. **environment**: Python, torch, CUDA, the GPU's name and memory, the peak bf16 FLOP/s used for MFU
   (a table keyed on the device name), and the versions of bitsandbytes, liger-kernel, flash-attn,
   trl, peft, transformers, datasets (None where absent).
2. **checks**: ``bench/gpu_checks.py`` (the functions ``pytest -m gpu`` runs): each one name, passed
   true/false (null when skipped), a one-line detail.
3. **throughput**: a 1B-class llama (Llama-3.2-1B's shapes, random weights, built here: nothing is
   downloaded), generated variable-length instruction rows up to 2,048 tokens; LoRA and QLoRA; peftcli
   padded and packed, transformers.Trainer + peft padded, TRL SFTTrainer packed + padding-free (where
   trl is installed). Each row: tool, method, packing, tokens_per_s, peak_mem_gib, mfu. The FLOP
   count is :func:`flops_per_token` (docs/gpu.md writes it out).

A step that cannot start or finish in the time left is reported as not run, with the reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_checks  # noqa: E402

SCHEMA_VERSION = 1
PACKAGES = {  # report name: (module, distribution)
    "torch": ("torch", "torch"),
    "transformers": ("transformers", "transformers"),
    "peft": ("peft", "peft"),
    "datasets": ("datasets", "datasets"),
    "bitsandbytes": ("bitsandbytes", "bitsandbytes"),
    "liger-kernel": ("liger_kernel", "liger-kernel"),
    "flash-attn": ("flash_attn", "flash-attn"),
    "trl": ("trl", "trl"),
    "accelerate": ("accelerate", "accelerate"),
    "triton": ("triton", "triton"),
    "pyarrow": ("pyarrow", "pyarrow"),  # datasets' floor; the GPU image brings its own
    "regex": ("regex", "regex"),  # transformers checks its floor at import
}
# Dense bf16 tensor-core peak per GPU, TFLOP/s, from the vendors' datasheets (without sparsity). The
# first entry whose key is in the device name wins, so the more specific names come first.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
]
GOALS = {"vs_trainer_tokens_per_s": 2.0, "mfu_lora": 0.45, "mfu_qlora": 0.35}

# The throughput case: Llama-3.2-1B's shapes (tied embeddings, GQA 32/8), and a tiny stand-in for --dry-run.
MODELS = {
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tie=True),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1000, tie=True),
}
CASES = {  # data and steps per row
    "1b": dict(max_length=2048, examples=480, batch=4, warmup=2, steps=8, length_mu=6.0, length_sigma=0.8),
    "tiny": dict(max_length=128, examples=48, batch=2, warmup=1, steps=3, length_mu=3.5, length_sigma=0.8),
}
LORA_R = 16
# (tool, method, packing) → the side bench/throughput.py runs
ROWS = [
    ("peftcli", "lora", "padded", "peftcli"),
    ("peftcli", "lora", "packed", "peftcli-packed"),
    ("trainer+peft", "lora", "padded", "trainer"),
    ("trl-sft", "lora", "padding-free", "trl-packed"),
    ("peftcli", "qlora", "padded", "peftcli"),
    ("peftcli", "qlora", "packed", "peftcli-packed"),
    ("trainer+peft", "qlora", "padded", "trainer"),
    ("trl-sft", "qlora", "padding-free", "trl-packed"),
]


# -- the FLOP count --------------------------------------------------------------------------------


def matmul_parameters(model: dict[str, Any], r: int) -> dict[str, int]:
    """Weights that multiply every token: the frozen linear layers of the body, the head, and LoRA's A
    and B (rank ``r``) on every linear layer of the body. Embedding lookups are no matmul."""
    d, heads, kv, inter = model["hidden"], model["heads"], model["kv_heads"], model["intermediate"]
    head_dim = d // heads
    shapes = {  # (in, out) of each linear layer of one decoder layer
        "q": (d, heads * head_dim),
        "k": (d, kv * head_dim),
        "v": (d, kv * head_dim),
        "o": (heads * head_dim, d),
        "gate": (d, inter),
        "up": (d, inter),
        "down": (inter, d),
    }
    layer = sum(i * o for i, o in shapes.values())
    lora = sum(r * (i + o) for i, o in shapes.values())
    first_inputs = sum(i * o for name, (i, o) in shapes.items() if name in "qkv")
    first_inputs_lora = sum(r * i for name, (i, o) in shapes.items() if name in "qkv")
    return {
        "frozen": model["layers"] * layer + d * model["vocab"],
        "trainable": model["layers"] * lora if r else 0,
        "no_input_grad": first_inputs + (first_inputs_lora if r else 0),
        "attention_width": heads * head_dim,
    }


def flops_per_token(model: dict[str, Any], r: int, mean_context: float, causal: bool = True) -> float:
    """Training FLOPs per token (forward + backward) of a frozen base with LoRA rank ``r`` (0: none).

    A frozen weight costs 2 FLOPs per token forward and 2 for the gradient of its input (its own
    gradient is never computed): 4·N_frozen. A trainable one adds 2 for its weight gradient:
    6·N_trainable. The first layer's q, k and v projections (and their LoRA A) see the frozen
    embeddings, which need no gradient: −2·N_no_input_grad. Attention: Q·Kᵀ and A·V cost 2·2·ℓ·d_attn
    per token of an example of ℓ tokens per layer forward, half of it under a causal mask, times 3 with
    backward: 6·ℓ·d_attn·layers (12 without the causal halving). ``mean_context`` is the token-weighted
    mean example length Σℓ²/Σℓ: each example attends within itself, padded or packed."""
    n = matmul_parameters(model, r)
    matmuls = 4 * n["frozen"] + 6 * n["trainable"] - 2 * n["no_input_grad"]
    attention = (6 if causal else 12) * mean_context * n["attention_width"] * model["layers"]
    return float(matmuls + attention)


def peak_tflops(device_name: str | None) -> tuple[float | None, str]:
    for key, value in PEAK_BF16_TFLOPS:
        if device_name and key in device_name:
            return value, f"dense bf16 datasheet peak for {key}"
    return None, f"no peak bf16 figure for {device_name or 'the CPU'}: MFU not computed"


# -- the report ----------------------------------------------------------------------------------


class Report:
    """The report as it grows; every ``save`` rewrites report.json and report.md atomically."""

    def __init__(self, out: Path, command: str, dry_run: bool, budget_s: float):
        self.out = out
        self.started = time.time()
        self.data: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "command": command,
            "dry_run": dry_run,
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": budget_s,
            "elapsed_s": 0.0,
            "finished": False,
            "environment": None,
            "checks": [],
            "throughput": {"model": None, "settings": None, "flops": None, "rows": []},
            "goals": [],
            "steps": [],
        }

    def step(self, name: str, status: str, seconds: float, note: str = "") -> None:
        self.data["steps"].append(
            {"step": name, "status": status, "seconds": round(seconds, 1), "note": note}
        )
        elapsed = time.time() - self.started
        print(f"[{elapsed:5.0f} s] {name}: {status} ({seconds:.0f} s) {note}".rstrip(), flush=True)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.time() - self.started, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / "report.json", json.dumps(self.data, indent=2) + "\n")
        atomic_write(self.out / "report.md", markdown(self.data))


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown(data: dict[str, Any]) -> str:
    env = data["environment"] or {}
    lines = [
        "# GPU tier report" + (" (dry run: tiny sizes on the CPU)" if data["dry_run"] else ""),
        "",
        f"Command: `{data['command']}`  ",
        f"Started {data['started_utc']}, {data['elapsed_s']:.0f} s of a {data['budget_s']:.0f} s budget"
        + ("" if data["finished"] else " (**not finished**: the report holds the steps done so far)"),
        "",
        "## Environment",
        "",
    ]
    if env:
        lines += [
            f"- device: {env.get('device_name')} ({env.get('device_memory_gib') or '-'} GiB), CUDA "
            f"{env.get('cuda') or '-'}, Python {env.get('python')}",
            f"- peak for MFU: {env.get('peak_tflops') or '-'} TFLOP/s ({env.get('peak_source')})",
            "- packages: "
            + ", ".join(f"{k} {v or 'absent'}" for k, v in (env.get("packages") or {}).items()),
        ]
    else:
        lines.append("- not recorded")
    lines += ["", "## Checks", "", "| check | result | detail |", "|---|---|---|"]
    for check in data["checks"]:
        verdict = "skipped" if check["passed"] is None else "pass" if check["passed"] else "**FAIL**"
        lines.append(f"| {check['name']} | {verdict} | {check['detail'].replace('|', '/')} |")
    t = data["throughput"]
    lines += ["", "## Throughput", ""]
    if t["model"]:
        m, s = t["model"], t["settings"]
        lines += [
            f"llama {m['hidden']} hidden, {m['layers']} layers, {m['heads']}/{m['kv_heads']} heads, "
            f"vocab {m['vocab']:,} ({m['parameters'] / 1e9:.2f}B parameters, random weights); "
            f"{s['examples']} generated instruction rows of lognormal length ≤ {s['max_length']} tokens; "
            f"micro-batch {s['batch']} rows (packed: {s['batch']} × {s['max_length']} tokens); LoRA r "
            f"{s['r']} on every linear layer; QLoRA: NF4 + double quant, bf16 compute; {s['steps']} steps, "
            f"the first {s['warmup']} untimed.",
            "",
        ]
    if t["flops"]:
        lines += [f"FLOPs per token: {t['flops']['formula']}", ""]
    lines += [
        "| tool | method | packing | tokens/s | peak mem (GiB) | MFU | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in t["rows"]:
        lines.append(
            f"| {row['tool']} | {row['method']} | {row['packing']} | {_num(row['tokens_per_s'], ',.0f')} | "
            f"{_num(row['peak_mem_gib'], '.2f')} | {_num(row['mfu'], '.1%')} | {row.get('note') or ''} |"
        )
    if data["goals"]:
        lines += ["", "## Goals", "", "| goal | measured | verdict |", "|---|---|---|"]
        for goal in data["goals"]:
            lines.append(f"| {goal['goal']} | {goal['measured']} | {goal['verdict']} |")
    lines += ["", "## Steps", "", "| step | status | seconds | note |", "|---|---|---|---|"]
    for step in data["steps"]:
        lines.append(f"| {step['step']} | {step['status']} | {step['seconds']} | {step['note']} |")
    return "\n".join(lines) + "\n"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


# -- steps, each a subprocess under a time limit -------------------------------------------------------


class Runner:
    def __init__(self, args, report: Report):
        self.args, self.report = args, report
        self.deadline = report.started + args.budget_s
        self.log = Path(args.out) / "log.txt"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p),
            "PEFTCLI_CACHE": str(Path(args.work) / "cache"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }

    def left(self) -> float:
        return self.deadline - time.time()

    def run(self, name: str, argv: list[str], limit: float, extra_env: dict | None = None) -> dict:
        """Run ``python bench/gpu.py ARGV`` (or another script) in a new session; the JSON its last stdout
        line holds, or {"error": why}. Killed with its whole process group at ``limit`` seconds."""
        limit = min(limit, self.left())
        if limit < 5:
            return {"error": "not run: the time budget was spent"}
        env = {**self.env, **(extra_env or {})}
        started = time.time()
        proc = subprocess.Popen(
            [sys.executable, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # a timeout kills its children (torchrun, compile workers) too
        )
        try:
            stdout, stderr = proc.communicate(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            timed_out = True
        seconds = time.time() - started
        with self.log.open("a") as handle:
            handle.write(f"==== {name} ({seconds:.1f} s, exit {proc.returncode}) ====\n{stderr[-4000:]}\n")
        if timed_out:
            return {"error": f"timed out after {limit:.0f} s", "seconds": seconds}
        lines = stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            last = (stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"exit {proc.returncode}: {last[:300]}", "seconds": seconds}
        try:
            found = json.loads(lines[-1])
        except ValueError:
            return {"error": f"no JSON result: {lines[-1][:200]}", "seconds": seconds}
        return {**found, "seconds": seconds}


def step_environment(runner: Runner) -> None:
    started = time.time()
    found = runner.run("environment", [__file__, "--internal", "environment"], 120)
    ok = "error" not in found
    runner.report.data["environment"] = found if ok else {"error": found["error"]}
    runner.report.step("environment", "ok" if ok else "failed", time.time() - started, found.get("error", ""))
    runner.report.save()


def environment() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else None
    peak, source = peak_tflops(name)
    return {
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "device_name": name or "cpu",
        "device_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if cuda
        else None,
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "peak_tflops": peak,
        "peak_source": source,
        "packages": {name: gpu_checks._version(*spec) for name, spec in PACKAGES.items()},
    }


def step_checks(runner: Runner, device: str) -> None:
    size = "tiny" if runner.args.dry_run else "gpu"
    names = runner.args.checks.split(",") if runner.args.checks else list(gpu_checks.CHECKS)
    for name in names:
        started = time.time()
        limit = runner.args.check_timeout * (2 if name == "compile" else 1)
        argv = [__file__, "--internal", "check", "--name", name, "--device", device, "--size", size]
        found = runner.run(f"check {name}", [*argv, "--work", str(Path(runner.args.work) / "checks")], limit)
        if "error" in found:
            title = gpu_checks.CHECKS[name][1]
            not_run = found["error"].startswith("not run")  # the budget was spent: not a failure of the check
            found = {
                "name": name,
                "title": title,
                "passed": None if not_run else False,
                "skipped": found["error"] if not_run else None,
                "detail": found["error"],
            }
        found.pop("seconds", None)
        found["seconds"] = round(time.time() - started, 1)
        runner.report.data["checks"].append(found)
        status = "skipped" if found["passed"] is None else "passed" if found["passed"] else "failed"
        runner.report.step(f"check {name}", status, time.time() - started)
        runner.report.save()


def throughput_args(args, quantize: bool) -> argparse.Namespace:
    """bench/throughput.py's settings for this case (its prepare, recipe_for and sides read them)."""
    model, case = MODELS[args.model], CASES[args.model]
    return argparse.Namespace(
        device=args.device,
        hidden=model["hidden"],
        layers=model["layers"],
        heads=model["heads"],
        kv_heads=model["kv_heads"],
        intermediate=model["intermediate"],
        tie=model["tie"],
        vocab=model["vocab"],
        examples=case["examples"],
        max_length=case["max_length"],
        length_mu=case["length_mu"],
        length_sigma=case["length_sigma"],
        format="completion",
        prompt_share=0.35,
        batch=case["batch"],
        accum=1,
        steps=case["steps"],
        other_steps=case["steps"],
        warmup=case["warmup"],
        r=LORA_R,
        lr=2e-4,
        seed=0,
        compile=False,
        memory_seq=case["max_length"],
        quantize=quantize,
    )


def prepare_throughput(args, work: Path) -> dict[str, Any]:
    """Model, data, every row's recipe and the shared initial adapter; lengths for the FLOP count."""
    import numpy as np
    import throughput as tp

    work.mkdir(parents=True, exist_ok=True)
    base = throughput_args(args, quantize=False)
    setup = tp.prepare(base, work, base.vocab, 0)
    recipes = {}
    for tool, method, packing, side in ROWS:
        case_args = throughput_args(args, quantize=method == "qlora")
        run_dir = work / f"{tool}-{method}-{packing}"
        recipes[f"{tool}/{method}/{packing}"] = str(tp.recipe_for(case_args, setup, side, run_dir, False))
    adapter = work / "init.safetensors"
    tp.initial_adapter(Path(recipes["peftcli/lora/padded"]), adapter, device=args.device)
    lengths = np.array(
        [len(row["input_ids"]) for row in tp.tokenized_examples(Path(recipes["peftcli/lora/padded"]))]
    )
    return {
        "recipes": recipes,
        "adapter": str(adapter),
        "mean_context": float((lengths**2).sum() / lengths.sum()),
        "tokens": int(lengths.sum()),
    }


def step_throughput(runner: Runner) -> None:
    args = runner.args
    model = MODELS[args.model]
    started = time.time()
    prepared = runner.run("throughput setup", [__file__, "--internal", "prepare", *_forward(args)], 300)
    runner.report.step(
        "throughput setup",
        "failed" if "error" in prepared else "ok",
        time.time() - started,
        prepared.get("error", ""),
    )
    case = CASES[args.model]
    n = matmul_parameters(model, LORA_R)
    parameters = n["frozen"] + model["vocab"] * model["hidden"] * (0 if model["tie"] else 1)
    t = runner.report.data["throughput"]
    t["model"] = {**model, "parameters": parameters}
    t["settings"] = {**case, "r": LORA_R, "device": args.device}
    env = runner.report.data["environment"] or {}
    peak = env.get("peak_tflops") if args.device == "cuda" else None
    if "error" in prepared:
        t["rows"] = [
            _row(tool, method, packing, error=prepared["error"]) for tool, method, packing, _ in ROWS
        ]
        runner.report.save()
        return
    per_token = flops_per_token(model, LORA_R, prepared["mean_context"])
    t["flops"] = {
        "per_token": per_token,
        "mean_context": prepared["mean_context"],
        "peak_tflops": peak,
        "formula": (
            f"4·N_frozen + 6·N_trainable − 2·N_no_input_grad + 6·ℓ̄·d_attn·layers = 4·{n['frozen']:,} + "
            f"6·{n['trainable']:,} − 2·{n['no_input_grad']:,} + 6·{prepared['mean_context']:.0f}·"
            f"{n['attention_width']}·{model['layers']} = {per_token / 1e9:.3f} GFLOP "
            "(ℓ̄ = Σℓ²/Σℓ over the examples; docs/gpu.md)"
        ),
    }
    runner.report.save()
    trl_missing = gpu_checks._version("trl") is None
    for tool, method, packing, side in ROWS:
        label = f"{tool}/{method}/{packing}"
        started = time.time()
        if tool == "trl-sft" and trl_missing:
            t["rows"].append(_row(tool, method, packing, note="skipped: trl is not installed"))
            runner.report.step(f"row {label}", "skipped", 0.0, "trl is not installed")
            runner.report.save()
            continue
        argv = [str(HERE / "throughput.py"), "--side", side, "--recipe", prepared["recipes"][label]]
        argv += ["--adapter", prepared["adapter"], "--device", args.device, "--warmup", str(case["warmup"])]
        found = runner.run(f"row {label}", argv, args.row_timeout, {"BENCH_LAUNCHED": repr(time.time())})
        if "error" in found:
            t["rows"].append(_row(tool, method, packing, error=found["error"]))
        else:
            tokens_per_s = found["tokens_per_s"]
            achieved = tokens_per_s * per_token
            t["rows"].append(
                _row(
                    tool,
                    method,
                    packing,
                    tokens_per_s=tokens_per_s,
                    peak_mem_gib=found["peak_mb"] / 1024,
                    mfu=achieved / (peak * 1e12) if peak else None,
                    tflops=achieved / 1e12,
                    steps=found["steps"],
                    step_s=found["step_s"],
                    first_step_s=found["first_step_s"],
                    first_losses=found["losses"][:5],
                )
            )
        row = t["rows"][-1]
        runner.report.step(
            f"row {label}",
            "failed" if row.get("error") else "ok",
            time.time() - started,
            row.get("error") or "",
        )
        runner.report.save()


def _row(tool: str, method: str, packing: str, **found: Any) -> dict[str, Any]:
    row = {
        "tool": tool,
        "method": method,
        "packing": packing,
        "tokens_per_s": None,
        "peak_mem_gib": None,
        "mfu": None,
    }
    row.update(found)
    if row.get("error"):
        row["note"] = f"failed: {row['error']}"
    return row


def goals(data: dict[str, Any]) -> list[dict[str, str]]:
    """The issue's goals against the rows measured (none are judged in a dry run: tiny CPU figures)."""
    rows = {(r["tool"], r["method"], r["packing"]): r for r in data["throughput"]["rows"]}
    out = []
    for method in ("lora", "qlora"):
        trainer = rows.get(("trainer+peft", method, "padded"), {})
        best = max(
            (rows.get(("peftcli", method, p), {}) for p in ("padded", "packed")),
            key=lambda r: r.get("tokens_per_s") or 0,
        )
        if trainer.get("tokens_per_s") and best.get("tokens_per_s"):
            ratio = best["tokens_per_s"] / trainer["tokens_per_s"]
            memory = (best["peak_mem_gib"] or 0) <= (trainer["peak_mem_gib"] or 0)
            out.append(
                {
                    "goal": f"{method}: peftcli ≥ {GOALS['vs_trainer_tokens_per_s']:g}× Trainer + peft tokens/s at ≤ its memory",
                    "measured": f"{ratio:.2f}× ({best['packing']}), {best['peak_mem_gib']:.2f} vs {trainer['peak_mem_gib']:.2f} GiB",
                    "verdict": _verdict(data, ratio >= GOALS["vs_trainer_tokens_per_s"] and memory),
                }
            )
        goal = GOALS[f"mfu_{method}"]
        if best.get("mfu") is not None:
            out.append(
                {
                    "goal": f"{method}: MFU ≥ {goal:.0%}",
                    "measured": f"{best['mfu']:.1%} ({best['packing']})",
                    "verdict": _verdict(data, best["mfu"] >= goal),
                }
            )
    return out


def _verdict(data: dict[str, Any], met: bool) -> str:
    if data["dry_run"]:
        return "not judged (dry run)"
    return "met" if met else "not met"


def _forward(args) -> list[str]:
    """The options an internal step needs to rebuild the same case."""
    return ["--device", args.device, "--model", args.model, "--work", str(args.work)]


# -- entry point -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="report directory (report.json, report.md, log.txt)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: same steps and schema")
    parser.add_argument(
        "--budget-s", type=float, help="total seconds (default 460 on a GPU, 2400 in a dry run)"
    )
    parser.add_argument(
        "--check-timeout", type=float, help="seconds per check, compile twice (60; dry run 300)"
    )
    parser.add_argument("--row-timeout", type=float, help="seconds per throughput row (75; dry run 300)")
    parser.add_argument("--checks", help="comma-separated check names (default: all)")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--work", help="scratch directory, outside --out (default: a new temporary one)")
    parser.add_argument("--internal", choices=["environment", "check", "prepare"], help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    if "--internal" in argv:  # a step's own process: --out is not needed there
        argv = ["--out", "-", *argv]
    args = parser.parse_args(argv)
    unknown = set(args.checks.split(",") if args.checks else []) - set(gpu_checks.CHECKS)
    if unknown:
        parser.error(
            f"--checks: unknown {', '.join(sorted(unknown))}; choose from {', '.join(gpu_checks.CHECKS)}"
        )

    if args.internal == "environment":
        print(json.dumps(environment()))
        return
    if args.internal == "check":
        print(json.dumps(gpu_checks.run_check(args.name, args.device, args.size, Path(args.work))))
        return
    if args.internal == "prepare":
        print(json.dumps(prepare_throughput(args, Path(args.work) / "throughput")))
        return

    # A dry run's CPU is slow but has no lease to fit: its limits only catch a hang.
    args.budget_s = args.budget_s or (2400.0 if args.dry_run else 460.0)
    args.check_timeout = args.check_timeout or (300.0 if args.dry_run else 60.0)
    args.row_timeout = args.row_timeout or (300.0 if args.dry_run else 75.0)
    args.model = "tiny" if args.dry_run else "1b"
    out = Path(args.out)
    args.work = args.work or tempfile.mkdtemp(prefix="peftcli-gpu-")  # never under --out: it all comes back
    Path(args.work).mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").write_text("")
    report = Report(out, "python bench/gpu.py " + " ".join(sys.argv[1:]), args.dry_run, args.budget_s)
    runner = Runner(args, report)
    step_environment(runner)
    env = report.data["environment"] or {}
    cuda = bool(env.get("cuda"))
    if not args.dry_run and not cuda:
        report.step("device", "failed", 0.0, "no CUDA device: run with --dry-run on a CPU")
        args.device = "cpu"
    else:
        args.device = "cpu" if args.dry_run else "cuda"
    if args.device == "cuda" or args.dry_run:
        step_checks(runner, args.device)
        if not args.no_throughput:
            step_throughput(runner)
    report.data["goals"] = goals(report.data)
    report.data["finished"] = True
    report.save()
    print(markdown(report.data))


if __name__ == "__main__":
    main()
