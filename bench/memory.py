"""Peak memory of LoRA fp32, LoRA bf16 and QLoRA (NF4 + double quant) on the same model, peftcli vs
transformers + peft.

    python bench/memory.py                              # CPU, a ~100M-parameter llama, a few steps
    python bench/memory.py --config 1b --device cuda    # a 1.1B llama (TinyLlama shape) on a GPU

The model is a llama config with random weights, built once and saved to disk, so every run loads it
the real way (``from_pretrained``, quantizing while loading). Each configuration runs in a fresh
subprocess, so no allocator cache or import from one run inflates the next. Per run:

- CPU: resident set size after loading, the peak RSS *during training* (the kernel's high-water mark,
  reset through ``/proc/self/clear_refs`` after loading), and the peak over the whole process
  (``ru_maxrss``, which includes loading);
- CUDA: ``torch.cuda.max_memory_allocated`` after loading and during training (reset in between);
- stored bytes per base parameter, for the quantized linear weights and the whole base;
- seconds per step and tokens/s.

Both stacks train the same LoRA (r=16, alpha=32, all linear layers) with torch AdamW on the same
random batches. The peft stack follows peft's documented QLoRA path: BitsAndBytesConfig,
``prepare_model_for_kbit_training``, ``get_peft_model``. Results go to ``bench/results/memory.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    # ~49M parameters, 83% of them in linear layers: small enough for a few CPU steps in minutes.
    "50m": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 8192,
    },
    # ~97M parameters, 88% of them in linear layers (an 8B llama has 87%): what QLoRA compresses.
    "100m": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "vocab_size": 8192,
    },
    # TinyLlama-1.1B's shape.
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
}
VARIANTS = {
    # name: (load dtype, quantization or None)
    "lora_fp32": ("float32", None),
    "lora_bf16": ("bfloat16", None),
    "qlora_nf4_dq": (
        "bfloat16",
        {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
    ),
}
RUNS = [("peftcli", v) for v in VARIANTS] + [
    ("peft", "lora_fp32"),
    ("peft", "lora_bf16"),
    ("peft", "qlora_nf4_dq"),
]
LORA = {"r": 16, "alpha": 32.0}


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def proc_status(field: str) -> int:
    """A field of /proc/self/status in bytes (Linux)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else -1


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc), so RSS shows live memory rather than what the
    allocator kept from loading (e.g. the fp32 copy a bf16 load converts from)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_model_dir(config_name: str, cache: Path) -> Path:
    """A llama with random weights, saved once (fp32 safetensors) and reused by every run."""
    path = cache / f"llama-{config_name}"
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftcli.tiny import ensure_tiny

    torch.manual_seed(0)
    config = LlamaConfig(
        **CONFIGS[config_name],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    # Any tokenizer whose ids fit the vocabulary: peftcli's loader wants one next to the weights.
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(ensure_tiny("llama")).save_pretrained(tmp)
    tmp.rename(path)
    return path


def batches(steps: int, batch: int, seq: int, vocab: int):
    import torch

    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(3, vocab, (batch, seq), generator=gen) for _ in range(steps)]


def worker(args) -> dict:
    import torch

    warnings.filterwarnings("ignore")
    from peftcli.quantize import storage_report

    device = torch.device(args.device)
    dtype_name, quant = VARIANTS[args.variant]
    dtype = getattr(torch, dtype_name)
    path = str(args.model_dir)
    cuda = device.type == "cuda"
    # Both stacks import the same libraries before the baseline (peft too, though peftcli never uses it),
    # so the deltas below are the model and training, not which modules a stack happened to import.
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers
    from transformers.models.llama import modeling_llama  # noqa: F401

    import peftcli.training.loop  # noqa: F401

    transformers.AutoTokenizer.from_pretrained(path)
    trim_heap()
    rss_start = proc_status("VmRSS")
    t0 = time.perf_counter()

    if args.stack == "peftcli":
        from peftcli.methods.catalog import method_for
        from peftcli.models import build_model, load_tokenizer
        from peftcli.recipe_loader import recipe_from_dict
        from peftcli.training.loop import token_loss_sum
        from peftcli.training.optim import build_optimizer

        raw = {
            "model": {"name": path, "dtype": dtype_name, "gradient_checkpointing": args.grad_ckpt},
            "data": {"train": "unused.jsonl"},
            "method": {
                "name": "lora",
                "r": LORA["r"],
                "alpha": LORA["alpha"],
                "target_modules": "all-linear",
            },
            "train": {"optimizer": "adamw", "lr": 1e-4, "device": args.device},
            "output_dir": "unused",
        }
        if quant:
            raw["model"]["quantization"] = dict(quant)
        recipe = recipe_from_dict(raw)
        tokenizer = load_tokenizer(path, recipe.model)
        method = method_for(recipe)
        model = build_model(
            path, recipe.model, method, device, seed=recipe.train.seed, pad_token_id=tokenizer.pad_token_id
        )
        optimizer = build_optimizer(method.param_groups(model, 1e-4, 0.0), recipe.train)

        def loss_of(input_ids):
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
            total, count = token_loss_sum(logits, input_ids, "causal_lm")
            return total / count
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        kwargs = {"dtype": dtype}
        if quant:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=getattr(torch, quant["compute_dtype"]),
            )
            kwargs["device_map"] = {"": device.index or 0} if cuda else {"": "cpu"}
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if quant:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.grad_ckpt)
        else:
            model.to(device)
            if args.grad_ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
        model = get_peft_model(
            model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear")
        )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def loss_of(input_ids):
            return model(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids
            ).loss

    load_s = time.perf_counter() - t0
    storage = storage_report(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trim_heap()
    rss_loaded, anon_loaded = proc_status("VmRSS"), proc_status("RssAnon")
    hwm_reset = reset_peak_rss()
    if cuda:
        torch.cuda.synchronize()
        cuda_loaded = torch.cuda.memory_allocated()
        cuda_load_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    model.train()
    data = batches(args.steps, args.batch, args.seq, CONFIGS[args.config]["vocab_size"])
    losses, step_times = [], []
    for input_ids in data:
        input_ids = input_ids.to(device)
        start = time.perf_counter()
        loss = loss_of(input_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
        losses.append(float(loss))
    steady = step_times[1:] or step_times  # the first step allocates optimizer state and warms kernels
    result = {
        "stack": args.stack,
        "variant": args.variant,
        "config": args.config,
        "device": str(device),
        "load_dtype": dtype_name,
        "quantization": quant,
        "trainable_parameters": trainable,
        "base_parameters": storage["total_parameters"],
        "base_bytes": storage["total_bytes"],
        "base_bytes_per_parameter": storage["bytes_per_parameter"],
        "quantized_bits_per_parameter": storage["quantized_bits_per_parameter"],
        "load_s": round(load_s, 2),
        "s_per_step": round(sum(steady) / len(steady), 3),
        "tokens_per_s": round(args.batch * args.seq * len(steady) / sum(steady), 1),
        "losses": [round(x, 4) for x in losses],
        "rss_start": rss_start,
        "rss_after_load": rss_loaded,
        "rss_anon_after_load": anon_loaded,
        "peak_rss_training": proc_status("VmHWM") if hwm_reset else None,
        "peak_rss_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    result["rss_model"] = rss_loaded - rss_start  # what loading added: the base and the adapter
    result["rss_training_peak_above_baseline"] = (
        (result["peak_rss_training"] - rss_start) if hwm_reset else None
    )
    if cuda:
        result.update(
            cuda_allocated_after_load=cuda_loaded,
            cuda_peak_load=cuda_load_peak,
            cuda_peak_training=torch.cuda.max_memory_allocated(),
        )
    return result


# --------------------------------------------------------------------------------------------
# Driving and reporting
# --------------------------------------------------------------------------------------------


def mib(n: float | None) -> str:
    return "-" if n is None or n < 0 else f"{n / 2**20:,.0f}"


def versions() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def markdown(report: dict) -> str:
    cuda = report["device"].startswith("cuda")
    rows = report["runs"]
    peak_key = "cuda_peak_training" if cuda else "rss_training_peak_above_baseline"
    lines = [
        f"# Memory: LoRA fp32 vs LoRA bf16 vs QLoRA (NF4 + double quant), {report['config']} llama on {report['device']}",
        "",
        f"Command: `{report['command']}`",
        "",
        (
            f"Model: llama {report['model_config']} with random weights ({rows[0]['base_parameters']:,} parameters); "
            f"LoRA r={LORA['r']} alpha={LORA['alpha']:g} on all linear layers; torch AdamW; "
            f"{report['steps']} steps of batch {report['batch']} × {report['seq']} tokens; "
            f"gradient checkpointing {'on' if report['grad_ckpt'] else 'off'}."
        ),
        f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items() if v is not None)}.",
        "",
    ]
    if cuda:
        lines += [
            (
                "| stack | variant | base bytes/param | 4-bit bits/param | allocated after load MiB | "
                "peak training MiB | s/step | tokens/s |"
            ),
            "|---|---|---|---|---|---|---|---|",
        ]
    else:
        lines += [
            (
                "| stack | variant | base bytes/param | 4-bit bits/param | RSS added by loading MiB | "
                "peak RSS training, above baseline MiB | peak RSS training MiB | peak RSS process MiB | "
                "s/step | tokens/s |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for r in rows:
        bits = f"{r['quantized_bits_per_parameter']:.3f}" if r["quantized_bits_per_parameter"] else "-"
        if cuda:
            mem = [mib(r["cuda_allocated_after_load"]), mib(r["cuda_peak_training"])]
        else:
            mem = [
                mib(r["rss_model"]),
                mib(r["rss_training_peak_above_baseline"]),
                mib(r["peak_rss_training"]),
                mib(r["peak_rss_process"]),
            ]
        lines.append(
            f"| {r['stack']} | {r['variant']} | {r['base_bytes_per_parameter']:.3f} | {bits} | "
            + " | ".join(mem)
            + f" | {r['s_per_step']} | {r['tokens_per_s']:,.0f} |"
        )
    baseline = "" if cuda else " above each process's baseline (RSS after importing its libraries)"
    lines += ["", f"Ratios of peak training memory{baseline}:", ""]
    by = {(r["stack"], r["variant"]): r for r in rows}
    base = by.get(("peftcli", "lora_fp32"))
    for variant in VARIANTS:
        ours, theirs = by.get(("peftcli", variant)), by.get(("peft", variant))
        parts = []
        if ours and base and ours is not base and ours[peak_key] and base[peak_key]:
            parts.append(f"peftcli {variant} / peftcli lora_fp32 = {ours[peak_key] / base[peak_key]:.2f}")
        if ours and theirs and ours[peak_key] and theirs[peak_key]:
            parts.append(f"peftcli / transformers+peft = {ours[peak_key] / theirs[peak_key]:.2f}")
        if ours and theirs and not cuda:
            parts.append(
                f"same ratio of whole-process peak RSS = {ours['peak_rss_process'] / theirs['peak_rss_process']:.2f}"
            )
        if parts:
            lines.append(f"- {variant}: " + "; ".join(parts))
    if cuda:
        notes = [
            (
                "`allocated after load` and `peak training` are torch.cuda.memory_allocated / max_memory_allocated "
                "(the peak reset after loading)."
            )
        ]
    else:
        notes = [
            (
                "How to read: `RSS added by loading` = resident memory after loading minus before (heap trimmed "
                "with malloc_trim both times); `above baseline` = the kernel's peak RSS during the training steps "
                "(VmHWM, reset after loading) minus the same baseline; `peak RSS process` = ru_maxrss, loading "
                "included. Both stacks import the same libraries (torch, transformers, bitsandbytes, peft, "
                "peftcli) before the baseline is taken. On a CPU, torch/transformers themselves take ~200-300 MiB of RSS before any model, "
                "so the deltas are the numbers to compare. Timings on a shared CPU are indicative only."
            )
        ]
    lines += ["", *notes, *report.get("notes", []), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="50m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on")
    parser.add_argument(
        "--only", nargs="*", help="run only these stack:variant pairs, e.g. peftcli:qlora_nf4_dq"
    )
    parser.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("PEFTCLI_CACHE", "/tmp/peftcli-bench")) / "bench"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="memory", help="results file stem")
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stack", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    command = "python bench/memory.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    args.cache.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.config, args.cache)
    runs = [r for r in RUNS if not args.only or f"{r[0]}:{r[1]}" in args.only]
    results = []
    for stack, variant in runs:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--stack",
            stack,
            "--variant",
            variant,
            "--model-dir",
            str(model_dir),
            "--config",
            args.config,
            "--device",
            args.device,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
        ] + (["--grad-ckpt"] if args.grad_ckpt else [])
        start = time.perf_counter()
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"},
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{stack} {variant}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            sys.exit(1)
        result = json.loads(line[len("RESULT ") :])
        results.append(result)
        peak = result.get("cuda_peak_training") or result["rss_training_peak_above_baseline"]
        print(
            f"{stack:8s} {variant:13s} peak {mib(peak):>7s} MiB  base {result['base_bytes_per_parameter']:.3f} B/param "
            f"{result['s_per_step']} s/step  ({time.perf_counter() - start:.0f}s)",
            flush=True,
        )

    report = {
        "command": command,
        "config": args.config,
        "model_config": CONFIGS[args.config],
        "device": args.device,
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "grad_ckpt": args.grad_ckpt,
        "lora": LORA,
        "versions": versions(),
        "runs": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(report))
    print(f"wrote {args.out / args.name}.md and .json")


if __name__ == "__main__":
    main()
