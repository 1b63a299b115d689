"""DPO throughput and memory: ``peftcli train`` (objective dpo, reference base) against TRL's DPOTrainer +
peft on the same model, pairs, micro-batch, max length, β, lr, LoRA rank and targets, as a ratio in one
run. Results are measurements, never asserted in unit tests.

    python bench/dpo.py --quick     # tiny sizes: proves the script works (a minute or two)
    python bench/dpo.py             # the benchmark (CPU: a few minutes on 2 idle cores)
    python bench/dpo.py --device cuda --hidden 2048 --layers 16 --batch 8 --max-length 1024

Sides, each a fresh subprocess per run (so its peak memory is its own), alternated (the side that goes
first swaps every repeat), ``--repeats`` times; the report gives each side's medians and the ratios:

    peftcli   peftcli train: pairs as one 2B-row forward, the reference from the same weights with the
              adapter off (no second forward copy of the model)
    trl       trl.DPOTrainer (loss_type sigmoid) with a peft LoraConfig: TRL also takes the reference
              with the adapter disabled; its own tokenization and collator

Data: ``--pairs`` prompts of lognormal length, each with a chosen and a rejected answer of lognormal
length, over a word-level vocabulary (so both sides tokenize to the same ids: BOS, prompt, answer, EOS).
Both sides train one epoch (every pair once; TRL's sampler shuffles with its own order), so they process
the same tokens. Per run: tokens/s (non-padding tokens of both answers' rows, as DPOTrainer counts
``num_tokens``, over the steps after ``--warmup``), s/step, peak RSS (CPU) or max_memory_allocated
(CUDA), time from launch to the end of step 1, and the step-1 loss (log 2 on both: a fresh LoRA is the
reference). Writes bench/results/dpo.{json,md} with the command, machine, versions and the load average
before and after (the machine is shared: a loaded CPU lowers both sides, and the ratio is what to read).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIDES = ("peftcli", "trl")


# -- setup ----------------------------------------------------------------------------------------


def prepare(args, work: Path) -> dict:
    """A word-level tokenizer, a random llama in safetensors and a JSONL of preference pairs."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_dir = work / "model"
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = specials + [f"w{i}" for i in range(args.vocab - len(specials))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=args.max_length + 8,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)

    rng = np.random.default_rng(args.seed)
    budget = args.max_length - 2  # BOS and EOS
    data = work / "pairs.jsonl"
    with data.open("w") as handle:
        for _ in range(args.pairs):
            n_prompt = int(np.clip(rng.lognormal(3.0, 0.5), 4, budget // 2))
            n_chosen, n_rejected = (
                int(np.clip(rng.lognormal(3.3, 0.6), 2, budget - n_prompt)) for _ in range(2)
            )
            text = lambda n: " ".join(words[i] for i in rng.integers(len(specials), args.vocab, n))  # noqa: E731
            row = {
                "prompt": text(n_prompt),
                "chosen": " " + text(n_chosen),
                "rejected": " " + text(n_rejected),
            }
            handle.write(json.dumps(row) + "\n")
    return {"model": str(model_dir), "data": str(data)}


def write_recipe(args, setup: dict, run_dir: Path) -> Path:
    import yaml

    recipe = {
        "model": {"name": setup["model"], "dtype": "bfloat16" if args.device == "cuda" else "float32"},
        "data": {"train": setup["data"], "format": "preference", "max_length": args.max_length},
        "objective": {"name": "dpo", "beta": args.beta, "reference": "base"},
        "method": {
            "name": "lora",
            "r": args.r,
            "alpha": 2 * args.r,
            "dropout": 0.0,
            "target_modules": "all-linear",
        },
        "train": {
            "epochs": 1,
            "batch_size": args.batch,
            "lr": args.lr,
            "scheduler": "constant",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "seed": args.seed,
            "log_every": 1,
            "device": args.device,
            "mixed_precision": "bf16" if args.device == "cuda" else "no",
        },
        "eval": {"generate": False},
        "output_dir": str(run_dir),
    }
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# -- the sides (each in its own process) ------------------------------------------------------------


class StepLog:
    """Per optimizer step: end time, loss, non-padding tokens."""

    def __init__(self):
        self.times: list[float] = []
        self.losses: list[float] = []
        self.tokens: list[int] = []

    def result(self, args) -> dict:
        launched = float(os.environ["BENCH_LAUNCHED"])
        warm = min(args.warmup, len(self.times) - 1)
        timed = self.times[-1] - self.times[warm - 1] if warm > 0 else self.times[-1] - launched
        return {
            "steps": len(self.times),
            "first_step_s": self.times[0] - launched,
            "step_s": timed / max(len(self.times) - warm, 1),
            "tokens_per_s": sum(self.tokens[warm:]) / max(timed, 1e-9),
            "tokens": sum(self.tokens),
            "peak_mb": peak_memory_mb(args.device),
            "first_loss": self.losses[0],
        }


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_peftcli(args, recipe_path: Path) -> dict:
    """The real CLI (data stage, collation, loop), with optimizer_step wrapped to time each step."""
    import peftcli.training.loop as loop
    from peftcli.cli import main as cli_main

    log, step = StepLog(), loop.optimizer_step

    def timed_step(run, micro, n_targets, at_step):
        returned = step(run, micro, n_targets, at_step)
        if run.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        log.times.append(time.time())
        log.losses.append(returned[0])
        log.tokens.append(sum(int(batch["attention_mask"].sum()) for batch in micro))
        return returned

    loop.optimizer_step = timed_step
    sys.argv = ["peftcli", "train", str(recipe_path), "--quiet"]
    try:
        cli_main()
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    return log.result(args)


def run_trl(args, setup: dict, out: Path) -> dict:
    """trl.DPOTrainer + peft LoraConfig on the same model, pairs and settings (its reference: the
    adapter disabled). The prompt gets BOS in front, as peftcli's data stage puts it."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=dtype)
    rows = [json.loads(line) for line in Path(setup["data"]).read_text().splitlines()]
    rows = [{**r, "prompt": tokenizer.bos_token + " " + r["prompt"]} for r in rows]
    log = StepLog()
    holder: dict = {}

    class Timing(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if args.device == "cuda":
                torch.cuda.synchronize()
            trainer = holder["trainer"]
            log.times.append(time.time())
            log.tokens.append(trainer._total_train_tokens - sum(log.tokens))

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and not log.losses:
                log.losses.append(logs["loss"])

    config = DPOConfig(
        output_dir=str(out),
        beta=args.beta,
        loss_type="sigmoid",
        per_device_train_batch_size=args.batch,
        num_train_epochs=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=args.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=args.device != "cuda",
        bf16=args.device == "cuda",
        seed=args.seed,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules="all-linear")
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[Timing()],
    )
    holder["trainer"] = trainer
    trainer.train()
    return log.result(args)


def worker(args) -> None:
    setup = json.loads(Path(args.work, "setup.json").read_text())
    run_dir = Path(args.work) / f"{args.worker}-{args.run}"
    if args.worker == "peftcli":
        result = run_peftcli(args, write_recipe(args, setup, run_dir))
    else:
        result = run_trl(args, setup, run_dir)
    Path(args.result).write_text(json.dumps(result))


# -- the benchmark ----------------------------------------------------------------------------------


def launch(args, side: str, run: int) -> dict:
    result = Path(args.work) / f"result-{side}-{run}.json"
    cmd = [
        sys.executable,
        __file__,
        *sys.argv[1:],
        "--worker",
        side,
        "--run",
        str(run),
        "--result",
        str(result),
    ]
    if "--work" not in sys.argv:
        cmd += ["--work", args.work]
    env = {**os.environ, "BENCH_LAUNCHED": repr(time.time()), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{side} run {run} failed:\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def versions() -> dict:
    import peft
    import torch
    import transformers
    import trl

    import peftcli

    return {
        "peftcli": peftcli.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "python": platform.python_version(),
    }


def summarize(runs: dict[str, list[dict]]) -> dict:
    medians = {
        side: {
            k: statistics.median(r[k] for r in results)
            for k in ("tokens_per_s", "step_s", "peak_mb", "first_step_s")
        }
        for side, results in runs.items()
    }
    return {
        "medians": medians,
        "tokens_per_s_ratio": medians["peftcli"]["tokens_per_s"] / medians["trl"]["tokens_per_s"],
        "peak_memory_ratio": medians["peftcli"]["peak_mb"] / medians["trl"]["peak_mb"],
        "first_losses": {side: [r["first_loss"] for r in results] for side, results in runs.items()},
        "tokens_per_epoch": {side: sorted({r["tokens"] for r in results}) for side, results in runs.items()},
    }


def markdown(report: dict) -> str:
    m, s = report["summary"]["medians"], report["summary"]
    a = report["args"]
    lines = [
        "# DPO: peftcli train vs TRL DPOTrainer + peft",
        "",
        f"Made with `{report['command']}` on {report['machine']} ({report['device']}); "
        f"load average {report['load_before'][0]:.1f} before, {report['load_after'][0]:.1f} after "
        "(a shared machine: the absolute numbers move with the load, the ratio much less).",
        "",
        f"Model: random llama, hidden {a['hidden']}, {a['layers']} layers, vocab {a['vocab']}; {a['pairs']} pairs, "
        f"micro-batch {a['batch']} pairs, max length {a['max_length']}, LoRA r {a['r']} on all linear layers, "
        f"β {a['beta']}, one epoch per run; {a['repeats']} runs per side, alternated; medians.",
        "",
        "| side | tokens/s | s/step | peak memory | launch → step 1 |",
        "|---|---|---|---|---|",
    ]
    for side in SIDES:
        r = m[side]
        lines.append(
            f"| {side} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {r['peak_mb']:,.0f} MiB | {r['first_step_s']:.1f} s |"
        )
    lines += [
        "",
        f"**peftcli / TRL: tokens/s × {s['tokens_per_s_ratio']:.2f}, peak memory × {s['peak_memory_ratio']:.2f}.**",
        "",
        f"Step-1 losses (log 2 = 0.6931 when the fresh adapter is the reference): {s['first_losses']}. "
        f"Tokens per epoch: {s['tokens_per_epoch']} (the same pairs on both sides).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def bench(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "setup.json").write_text(json.dumps(prepare(args, work)))
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for run in range(args.repeats):
        order = SIDES if run % 2 == 0 else SIDES[::-1]
        for side in order:
            runs[side].append(launch(args, side, run))
            print(f"run {run} {side}: {runs[side][-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    report = {
        "command": "python bench/dpo.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "device": args.device,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "run", "result", "work")},
        "versions": versions(),
        "runs": runs,
        "summary": summarize(runs),
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dpo.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "dpo.md").write_text(markdown(report))
    print(markdown(report))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: proves the script works")
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--pairs", type=int, default=96)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s (compile, caches)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default="/tmp/peftcli-bench-dpo")
    p.add_argument("--output", default=str(HERE / "results"))
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.pairs, args.max_length, args.repeats = (
            64,
            2,
            500,
            32,
            64,
            1,
        )
        args.output = str(Path(args.work) / "quick-results")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    worker(arguments) if arguments.worker else bench(arguments)
