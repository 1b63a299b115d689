"""Training throughput of peftcli's LoRA loop against the reference stack (transformers Trainer + peft),
on the same model, data, batch and LoRA settings, in one run. Results are ratios, never asserted.

    python bench/throughput.py                      # CPU, a ~20M-parameter llama, 30 steps each
    python bench/throughput.py --device cuda --hidden 2048 --layers 16 --seq 1024 --batch 8   # on a GPU

Each side runs in a fresh subprocess (so peak memory is its own) and its first `--warmup` steps are
not timed. Writes bench/results/throughput.{md,json} with the command that produced them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return LlamaForCausalLM(config).to(dtype=dtype, device=args.device)


def batches(args):
    import torch

    gen = torch.Generator().manual_seed(0)
    for _ in range(args.steps + args.warmup):
        ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=gen)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_peftcli(args) -> dict:
    import torch

    from peftcli.loop import token_loss_sum
    from peftcli.methods.lora import LoRA, LoraConfig

    model = build_model(args)
    method = LoRA(LoraConfig(r=args.r, alpha=2 * args.r, target_modules="all-linear"))
    torch.manual_seed(0)
    model = method.attach(model)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    amp = args.device == "cuda"
    times = []
    for i, batch in enumerate(batches(args)):
        batch = {k: v.to(args.device) for k, v in batch.items()}
        start = time.perf_counter()
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=amp):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss_sum, n = token_loss_sum(out.logits, batch["labels"], "causal_lm")
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"step_s": sum(times) / len(times), "peak_mb": peak_memory_mb(args.device)}


def run_reference(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = build_model(args)
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear"))
    data = [{k: v[j] for k, v in b.items()} for b in batches(args) for j in range(args.batch)]
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    training_args = TrainingArguments(
        output_dir=os.environ.get("TMPDIR", "/tmp") + "/peftcli-bench-ref",
        per_device_train_batch_size=args.batch,
        max_steps=args.steps + args.warmup,
        learning_rate=1e-4,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        bf16=args.device == "cuda",
        use_cpu=args.device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        lr_scheduler_type="constant",
    )
    Trainer(model=model, args=training_args, train_dataset=data, callbacks=[Timer()]).train()
    timed = times[args.warmup :]
    return {"step_s": sum(timed) / len(timed), "peak_mb": peak_memory_mb(args.device)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating runs per side; the median is reported"
    )
    parser.add_argument("--side", choices=["peftcli", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()

    if args.side:
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        result = run_peftcli(args) if args.side == "peftcli" else run_reference(args)
        print(json.dumps(result))
        return

    argv = list(sys.argv[1:])
    runs: dict[str, list[dict]] = {"peftcli": [], "reference": []}
    for _ in range(args.repeats):  # alternate the sides so drifts in machine load hit both alike
        for side in runs:
            proc = subprocess.run(
                [sys.executable, __file__, *argv, "--side", side], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
            runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = {}
    for side, found in runs.items():
        step_times = sorted(r["step_s"] for r in found)
        results[side] = {
            "step_s": statistics.median(step_times),
            "step_s_all": step_times,
            "peak_mb": statistics.median(r["peak_mb"] for r in found),
            "tokens_per_s": args.batch * args.seq / statistics.median(step_times),
        }
    ratio_speed = results["peftcli"]["tokens_per_s"] / results["reference"]["tokens_per_s"]
    ratio_mem = results["peftcli"]["peak_mb"] / results["reference"]["peak_mb"]
    command = "python bench/throughput.py " + " ".join(argv)
    payload = {
        "command": command,
        "settings": {k: v for k, v in vars(args).items() if k not in ("side", "out")},
        "results": results,
        "speed_ratio_peftcli_over_reference": ratio_speed,
        "peak_memory_ratio_peftcli_over_reference": ratio_mem,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(payload, indent=2) + "\n")
    memory_kind = "peak CUDA memory allocated" if args.device == "cuda" else "peak process RSS"
    md = [
        f"# LoRA training throughput: peftcli vs transformers Trainer + peft ({args.device})",
        "",
        f"Command: `{command}`",
        "",
        f"Llama, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; batch {args.batch} × "
        f"{args.seq} tokens; LoRA r={args.r} on all linear layers; AdamW; {args.steps} timed steps after "
        f"{args.warmup} warm-up steps; each side run {args.repeats}× alternately in fresh processes, medians "
        "reported (per-run s/step in throughput.json).",
        "",
        f"| stack | s/step | tokens/s | {memory_kind} (MiB) |",
        "|---|---|---|---|",
    ]
    for side, label in (("peftcli", "peftcli"), ("reference", "transformers Trainer + peft")):
        r = results[side]
        md.append(f"| {label} | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} | {r['peak_mb']:,.0f} |")
    md += [
        "",
        f"Speed ratio (peftcli / reference): **{ratio_speed:.2f}×**; memory ratio: **{ratio_mem:.2f}×**.",
        "",
    ]
    (out / "throughput.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
