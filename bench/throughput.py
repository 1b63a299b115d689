"""LoRA fine-tuning throughput and memory: the real ``peftcli train`` against the stacks users would pick
instead, on the same model config, data, micro-batch, accumulation, max length, seed, LoRA rank and
targets. Results are measurements, never asserted in unit tests.

    python bench/throughput.py --quick     # tiny sizes: proves the script works (a minute or two)
    python bench/throughput.py             # the benchmark (CPU: ≤ 10 minutes on 2 idle cores)
    python bench/throughput.py --device cuda --hidden 2048 --layers 16 --batch 8   # on a GPU

Sides, each a fresh subprocess per run (so peak memory is its own), interleaved, ``--repeats`` times:

    peftcli              peftcli train, shuffled batches padded to the longest   (packing off)
    peftcli-grouped      peftcli train, train.group_by_length: true
    peftcli-packed       peftcli train, train.packing: true
    trainer              transformers.Trainer + peft, DataCollatorForLanguageModeling (padding to the
                         longest), fed peftcli's batch order and initial adapter: the same work, so its
                         first losses must equal peftcli's (checked, 1e-4)
    trainer-grouped      the same with group_by_length=True (Trainer's own sampler)
    trl-packed           TRL SFTTrainer, packing (bfd) + padding_free, when trl is installed

Data: ``--examples`` texts of lognormal length (16 to ``--max-length`` tokens) over a word-level
vocabulary, so every side trains on exactly the token ids peftcli's data stage produces. Every side
but TRL trains one full epoch, so each sees every example once and the sides differ only in how they
batch them (a fixed number of steps would favour a sampler that happens to put its longest batches
first, as Trainer's group_by_length does). Per side: non-padding tokens/s and s/step over the steps
after ``--warmup``, peak RSS (CPU) or
max_memory_allocated (CUDA), time from process launch to the end of the first optimizer step, and
the first 20 losses. Then the memory case: a ``--memory-vocab`` vocabulary, ``--memory-seq`` tokens ×
``--memory-batch`` rows (peftcli's chunked loss against Trainer's full logits), peak memory only.
Writes bench/results/throughput.{md,json} with the command, machine and versions.
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
SIDES = ["peftcli", "trainer", "peftcli-grouped", "trainer-grouped", "peftcli-packed", "trl-packed"]
SAME_WORK = ("peftcli", "trainer")  # identical batches, init and optimizer: losses must match
FIXED_STEPS = ("trl-packed",)  # context only (no goal against it), and slow: --other-steps, not an epoch
LOSS_TOLERANCE = 1e-4


# -- setup: tokenizer, model, data, recipe ---------------------------------------------------------


def prepare(args, work: Path, vocab: int, lengths_seed: int) -> dict:
    """A word-level tokenizer of ``vocab`` ids, a random llama saved in safetensors, a JSONL of texts, a
    peftcli recipe, and the initial LoRA adapter peftcli builds (the reference stacks load it)."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_dir = work / f"model-{vocab}"
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = specials + [f"w{i}" for i in range(vocab - len(specials))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    # bench/gpu.py names every shape (a 1B-class llama); this script derives them from --hidden
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=getattr(args, "intermediate", None) or args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=getattr(args, "heads", None) or max(1, args.hidden // 64),
        num_key_value_heads=getattr(args, "kv_heads", None) or max(1, args.hidden // 128),
        max_position_embeddings=max(args.max_length, args.memory_seq) + 8,
        tie_word_embeddings=getattr(args, "tie", False),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if args.device == "cuda":  # built in bf16 on the GPU: a 1B model in fp32 on the CPU takes minutes
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
    else:
        model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir)
    del model

    rng = np.random.default_rng(lengths_seed)
    if vocab == args.vocab:  # instruction-like: lognormal lengths, median ~exp(mu)
        lengths = np.clip(
            rng.lognormal(args.length_mu, args.length_sigma, args.examples), 16, args.max_length - 2
        )
        n_examples, max_length = args.examples, args.max_length
    else:  # the memory case: every row at full length
        lengths = np.full(args.memory_batch * 4, args.memory_seq - 2)
        n_examples, max_length = len(lengths), args.memory_seq
    data = work / f"train-{vocab}.jsonl"
    completion = args.format == "completion" and vocab == args.vocab
    with data.open("w") as handle:
        for n in lengths.astype(int):
            text = [words[i] for i in rng.integers(len(specials), vocab, size=n)]
            if completion:  # an instruction: the first prompt_share of the words carry no loss
                cut = max(1, round(n * args.prompt_share))
                row = {"prompt": " ".join(text[:cut]), "completion": " ".join(text[cut:])}
            else:
                row = {"text": " ".join(text)}
            handle.write(json.dumps(row) + "\n")
    return {"model": str(model_dir), "data": str(data), "n_examples": n_examples, "max_length": max_length}


def recipe_for(args, setup: dict, side: str, run_dir: Path, memory_case: bool) -> Path:
    import yaml

    batch, accum, steps = (
        (args.memory_batch, 1, args.memory_steps)
        if memory_case
        else (args.batch, args.accum, args.other_steps if side in FIXED_STEPS else None)
    )
    steps = getattr(args, "steps", None) or steps  # bench/gpu.py: a fixed number of steps on every side
    train = {
        "max_steps": steps,  # None: one epoch, every example once (the same tokens on every side)
        "epochs": 1,
        "batch_size": batch,
        "grad_accum": accum,
        "lr": args.lr,
        "scheduler": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "seed": args.seed,
        "log_every": 1,
        "device": args.device,
        "mixed_precision": "bf16" if args.device == "cuda" else "no",
        "group_by_length": side == "peftcli-grouped",
        "packing": side == "peftcli-packed",
        "compile": args.compile,
    }
    recipe = {
        "model": {
            "name": setup["model"],
            "task": "causal_lm",
            "dtype": "bfloat16" if args.device == "cuda" else "float32",
        },
        "data": {
            "train": setup["data"],
            "format": "text" if memory_case else args.format,
            "max_length": setup["max_length"],
        },
        "method": {
            "name": "lora",
            "r": args.r,
            "alpha": 2 * args.r,
            "dropout": 0.0,
            "target_modules": "all-linear",
        },
        "train": train,
        "eval": {"generate": False},
        "output_dir": str(run_dir),
    }
    if getattr(args, "quantize", False):  # QLoRA, as the paper trains it: NF4, double quant, bf16 compute
        recipe["model"]["quantization"] = {
            "bits": 4,
            "quant_type": "nf4",
            "double_quant": True,
            "compute_dtype": "bfloat16" if args.device == "cuda" else "float32",
        }
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def tokenized_examples(recipe_path: Path) -> list[dict]:
    """The token ids and labels peftcli's data stage makes of the recipe's data: every side trains on them."""
    from peftcli.data.pipeline import load_data
    from peftcli.models import load_tokenizer
    from peftcli.recipe_loader import load_recipe

    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(recipe.model.name, recipe.model)
    train = load_data(recipe.data, tokenizer, "causal_lm").train
    take = getattr(train, "take", None)
    rows = take(list(range(len(train)))) if take is not None else list(train)
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in rows]


def initial_adapter(recipe_path: Path, out: Path, device: str = "cpu") -> None:
    """peftcli's LoRA init (seeded) in peft's key names, for the reference stacks to start from."""
    import torch
    from safetensors.torch import save_file

    from peftcli.methods.catalog import method_for
    from peftcli.models import build_model, load_tokenizer
    from peftcli.recipe_loader import load_recipe

    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(recipe.model.name, recipe.model)
    method = method_for(recipe)
    model = build_model(
        recipe.model.name,
        recipe.model,
        method,
        torch.device(device),
        seed=recipe.train.seed,
        pad_token_id=tokenizer.pad_token_id,
    )
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in method.adapter_state_dict(model).items()}, str(out)
    )


# -- the sides ----------------------------------------------------------------------------------------


class StepLog:
    """Per optimizer step: end time, loss and non-padding tokens."""

    def __init__(self):
        self.times: list[float] = []
        self.losses: list[float] = []
        self.tokens: list[int] = []

    def result(self, args, device: str) -> dict:
        launched = float(os.environ["BENCH_LAUNCHED"])
        warm = min(args.warmup, len(self.times) - 1)
        timed = self.times[-1] - self.times[warm - 1] if warm > 0 else self.times[-1] - launched
        steps = len(self.times) - warm
        return {
            "steps": len(self.times),
            "first_step_s": self.times[0] - launched,
            "step_s": timed / max(steps, 1),
            "tokens_per_s": sum(self.tokens[warm:]) / max(timed, 1e-9),
            "real_tokens": sum(self.tokens),
            "peak_mb": peak_memory_mb(device),
            "losses": self.losses[:20],
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
        returned = step(run, micro, n_targets, at_step)  # (loss, tokens, lr, ...)
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
    return log.result(args, args.device)


def reference_model(recipe_path: Path, adapter: Path, device: str):
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from peftcli.recipe_loader import load_recipe

    recipe = load_recipe(recipe_path)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = recipe.model.quantization
    if q is None:
        model = AutoModelForCausalLM.from_pretrained(recipe.model.name, dtype=dtype).to(device)
    else:  # QLoRA as peft's users load it: transformers' BitsAndBytesConfig, prepare_model_for_kbit_training
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        )
        model = AutoModelForCausalLM.from_pretrained(
            recipe.model.name,
            dtype=dtype,
            quantization_config=quantization,
            device_map={"": 0 if device == "cuda" else "cpu"},
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=recipe.method.r, lora_alpha=recipe.method.alpha, lora_dropout=0.0, target_modules="all-linear"
    )
    model = get_peft_model(model, config)
    loaded = set_peft_model_state_dict(model, load_file(str(adapter)))
    assert not loaded.unexpected_keys, loaded.unexpected_keys[:3]
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model, recipe


def run_trainer(args, recipe_path: Path, adapter: Path, grouped: bool) -> dict:
    """transformers.Trainer + peft, DataCollatorForLanguageModeling. Ungrouped, it reads the examples in
    peftcli's order (the examples listed in that order, train_sampling_strategy="sequential"), so both
    sides do the same work; grouped, Trainer's own LengthGroupedSampler decides."""
    import torch
    from transformers import (
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from peftcli.data.sampler import BatchSampler

    model, recipe = reference_model(recipe_path, adapter, args.device)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.name)
    prompt_masked = recipe.data.format == "completion"
    keep = ("input_ids", "labels") if prompt_masked else ("input_ids",)
    examples = [{k: e[k] for k in keep} for e in tokenized_examples(recipe_path)]
    cfg = recipe.train
    if not grouped:
        order = [
            i
            for batch in BatchSampler(len(examples), cfg.batch_size, cfg.seed).epoch_batches(0)
            for i in batch
        ]
        examples = [examples[i] for i in order]
    log = StepLog()
    # Text: labels are the input ids (the LM collator). Instructions: peftcli's labels (prompt = -100),
    # padded with -100 by the seq2seq collator, as users of Trainer do for prompt-masked SFT.
    collator = (
        DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        if prompt_masked
        else DataCollatorForLanguageModeling(tokenizer, mlm=False)
    )
    batch_tokens: list[int] = []

    def collate(features):
        batch = collator(features)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    class Recording(Trainer):
        def training_step(self, *a, **k):
            loss = super().training_step(*a, **k)
            self.window_loss = getattr(self, "window_loss", 0.0) + loss.item()
            return loss

    class Timer(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if args.device == "cuda":
                torch.cuda.synchronize()
            log.times.append(time.time())
            log.losses.append(trainer.window_loss)
            trainer.window_loss = 0.0
            done = state.global_step * cfg.grad_accum
            log.tokens.append(sum(batch_tokens[done - cfg.grad_accum : done]))

    training_args = TrainingArguments(
        output_dir=str(Path(recipe.output_dir) / "trainer"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_steps=cfg.max_steps or -1,
        num_train_epochs=1,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch",
        seed=cfg.seed,
        train_sampling_strategy="group_by_length" if grouped else "sequential",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        bf16=args.device == "cuda",
        use_cpu=args.device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Recording(
        model=model, args=training_args, train_dataset=examples, data_collator=collate, callbacks=[Timer()]
    )
    trainer.train()
    return log.result(args, args.device)


def run_trl(args, recipe_path: Path, adapter: Path) -> dict:
    """TRL's SFTTrainer with packing (best-fit decreasing) and padding_free (position_ids)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model, recipe = reference_model(recipe_path, adapter, args.device)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.name)
    rows = tokenized_examples(recipe_path)
    if recipe.data.format == "completion":  # completion_only_loss: the prompt carries no loss
        rows = [
            {"input_ids": e["input_ids"], "completion_mask": [int(t != -100) for t in e["labels"]]}
            for e in rows
        ]
    else:
        rows = [{"input_ids": e["input_ids"]} for e in rows]
    dataset = Dataset.from_list(rows)
    cfg = recipe.train
    log = StepLog()

    class Timer(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if args.device == "cuda":
                torch.cuda.synchronize()
            log.times.append(time.time())

        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log.losses.append(logs["loss"])

    sft = SFTConfig(
        output_dir=str(Path(recipe.output_dir) / "trl"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch",
        seed=cfg.seed,
        max_length=recipe.data.max_length,
        packing=True,
        padding_free=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        bf16=args.device == "cuda",
        use_cpu=args.device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=sft, train_dataset=dataset, processing_class=tokenizer, callbacks=[Timer()]
    )
    real = []
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        real.append(int((batch["input_ids"] != tokenizer.pad_token_id).sum()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    log.tokens = [sum(real[i * cfg.grad_accum : (i + 1) * cfg.grad_accum]) for i in range(len(log.times))]
    return log.result(args, args.device)


def run_side(args) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    recipe, adapter = Path(args.recipe), Path(args.adapter)
    if args.side.startswith("peftcli"):
        return run_peftcli(args, recipe)
    if args.side.startswith("trainer"):
        return run_trainer(args, recipe, adapter, grouped=args.side == "trainer-grouped")
    return run_trl(args, recipe, adapter)


# -- orchestration -------------------------------------------------------------------------------------


def launch(args, side: str, recipe: Path, adapter: Path) -> dict:
    command = [sys.executable, __file__, "--side", side, "--recipe", str(recipe), "--adapter", str(adapter)]
    command += ["--device", args.device, "--warmup", str(args.warmup)]
    env = {**os.environ, "BENCH_LAUNCHED": repr(time.time())}
    proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        return {
            "error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:300]
            if (proc.stderr or proc.stdout)
            else "failed"
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def trl_status() -> str | None:
    try:
        import trl  # noqa: F401
    except ImportError:
        return "trl is not installed (pip install -e .[bench])"
    return None


def prepare_case(args, work: Path, vocab: int, memory_case: bool, sides: list[str]) -> tuple[dict, Path]:
    """Model, data, one recipe per side and the shared initial adapter (in a subprocess, so the parent
    stays light and its own RSS never counts)."""
    script = (
        f"import sys, json, argparse; sys.path.insert(0, {str(HERE)!r}); import throughput as t; "
        "args = argparse.Namespace(**json.loads(sys.argv[1])); "
        "print(json.dumps(t.prepare(args, t.Path(sys.argv[2]), int(sys.argv[3]), 0)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(vars(args)), str(work), str(vocab)],
        capture_output=True,
        text=True,
        check=True,
    )
    setup = json.loads(out.stdout.strip().splitlines()[-1])
    recipes = {
        side: recipe_for(args, setup, side, work / f"{'mem-' if memory_case else ''}{side}", memory_case)
        for side in sides
    }
    adapter = work / f"init-{vocab}.safetensors"
    script = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); import throughput as t; "
        "t.initial_adapter(t.Path(sys.argv[1]), t.Path(sys.argv[2]))"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(recipes[sides[0]]), str(adapter)], check=True, capture_output=True
    )
    return recipes, adapter


def clean_run_dirs(recipes: dict) -> None:
    import shutil

    for recipe in recipes.values():
        shutil.rmtree(recipe.with_suffix(""), ignore_errors=True)


def summarise(found: list[dict]) -> dict:
    ok = [r for r in found if "error" not in r]
    if not ok:
        return {"error": found[0].get("error", "failed")}
    med = lambda key: statistics.median(r[key] for r in ok)  # noqa: E731
    return {
        "tokens_per_s": med("tokens_per_s"),
        "tokens_per_s_all": sorted(r["tokens_per_s"] for r in ok),
        "step_s": med("step_s"),
        "first_step_s": med("first_step_s"),
        "peak_mb": med("peak_mb"),
        "losses": ok[0]["losses"],
        "steps": ok[0]["steps"],
        "real_tokens": ok[0]["real_tokens"],
        "runs": len(ok),
    }


def versions() -> dict:
    import importlib.metadata as md

    found = {}
    for name in ("torch", "transformers", "peft", "trl", "datasets", "peftcli"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def machine(device: str) -> str:
    text = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    if device == "cuda":
        import torch

        text += f", {torch.cuda.get_device_name()}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: proves the script runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--examples", type=int, default=240, help="training examples (one epoch per side)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--length-mu", type=float, default=4.5, help="lognormal mu of lengths (median e^mu)")
    parser.add_argument("--length-sigma", type=float, default=0.9)
    parser.add_argument(
        "--format",
        choices=["completion", "text"],
        default="completion",
        help="completion: instruction-like rows whose prompt carries no loss; text: every token trained",
    )
    parser.add_argument("--prompt-share", type=float, default=0.35, help="completion: prompt share of a row")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch (examples)")
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--other-steps", type=int, default=10, help="optimizer steps of the TRL side")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps not timed")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per side; medians reported")
    parser.add_argument("--compile", action="store_true", help="train.compile: true on the peftcli sides")
    parser.add_argument("--memory-vocab", type=int, default=128000)
    parser.add_argument("--memory-seq", type=int, default=1024)
    parser.add_argument("--memory-batch", type=int, default=8)
    parser.add_argument("--memory-steps", type=int, default=1)
    parser.add_argument("--no-memory-case", action="store_true")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--work", default=os.environ.get("TMPDIR", "/tmp") + "/peftcli-bench-throughput")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        print(json.dumps(run_side(args)))
        return
    if args.quick:
        args.hidden, args.layers, args.vocab, args.examples, args.max_length = 64, 2, 2000, 48, 128
        args.length_mu, args.other_steps, args.warmup, args.repeats = 3.5, 4, 2, 1
        args.accum = 2  # the quick run checks token weighting over an accumulation window too
        args.memory_vocab, args.memory_seq, args.memory_batch = 8000, 128, 2
    sides = args.sides.split(",")
    notes = []
    why_not = trl_status()
    if "trl-packed" in sides and why_not:
        sides.remove("trl-packed")
        notes.append(f"trl-packed not run: {why_not}")

    started = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipes, adapter = prepare_case(args, work, args.vocab, False, sides)
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for repeat in range(args.repeats):  # interleaved, so drifts in machine load hit every side alike
        for side in sides:
            clean_run_dirs({side: recipes[side]})
            runs[side].append(launch(args, side, recipes[side], adapter))
            print(
                f"repeat {repeat + 1}/{args.repeats} {side}: {json.dumps({k: v for k, v in runs[side][-1].items() if k != 'losses'})}",
                file=sys.stderr,
            )
    results = {side: summarise(found) for side, found in runs.items()}

    memory = {}
    if not args.no_memory_case:
        mem_sides = ["peftcli", "trainer"]
        mem_recipes, mem_adapter = prepare_case(args, work, args.memory_vocab, True, mem_sides)
        for side in mem_sides:
            clean_run_dirs({side: mem_recipes[side]})
            memory[side] = launch(args, side, mem_recipes[side], mem_adapter)
            print(
                f"memory case {side}: {json.dumps({k: v for k, v in memory[side].items() if k != 'losses'})}",
                file=sys.stderr,
            )

    report(args, results, memory, notes, time.time() - started)


def ratio(results: dict, a: str, b: str, key: str) -> float | None:
    if a in results and b in results and key in results[a] and key in results[b]:
        return results[a][key] / results[b][key]
    return None


def report(args, results: dict, memory: dict, notes: list[str], elapsed: float) -> None:
    same = None
    if all(side in results and "losses" in results[side] for side in SAME_WORK):
        a, b = (results[side]["losses"] for side in SAME_WORK)
        diff = max(abs(x - y) for x, y in zip(a, b, strict=False)) if a and b else float("inf")
        same = {
            "compared": min(len(a), len(b)),
            "max_abs_diff": diff,
            "ok": diff <= LOSS_TOLERANCE and len(a) == len(b),
        }
    ratios = {
        "packed_vs_trainer": ratio(results, "peftcli-packed", "trainer", "tokens_per_s"),
        "packed_vs_trainer_grouped": ratio(results, "peftcli-packed", "trainer-grouped", "tokens_per_s"),
        "grouped_vs_trainer": ratio(results, "peftcli-grouped", "trainer", "tokens_per_s"),
        "padded_vs_trainer": ratio(results, "peftcli", "trainer", "tokens_per_s"),
        "memory_case_peak_ratio": (
            memory["peftcli"]["peak_mb"] / memory["trainer"]["peak_mb"]
            if memory and all("peak_mb" in m for m in memory.values())
            else None
        ),
    }
    command = "python bench/throughput.py " + " ".join(sys.argv[1:])
    payload = {
        "command": command,
        "machine": machine(args.device),
        "versions": versions(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("side", "recipe", "adapter", "out")},
        "elapsed_s": round(elapsed, 1),
        "results": results,
        "memory_case": memory,
        "same_work_losses": same,
        "ratios": ratios,
        "notes": notes,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(payload, indent=2) + "\n")
    memory_kind = "peak CUDA allocated" if args.device == "cuda" else "peak RSS"
    params = f"llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}"
    md = [
        f"# LoRA fine-tuning throughput: `peftcli train` vs the alternatives ({args.device})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {payload['machine']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in payload["versions"].items() if v) + "  ",
        f"Total time: {elapsed:.0f} s",
        "",
        f"{params}; {args.examples} "
        + (
            f"instruction rows (prompt {args.prompt_share:.0%} of each row, no loss on it; `completion` format)"
            if args.format == "completion"
            else "texts (every token trained; `text` format)"
        )
        + f", lognormal lengths (median ≈ e^{args.length_mu}) clipped to 16–"
        f"{args.max_length} tokens; micro-batch {args.batch} × accumulation {args.accum}; LoRA r={args.r} on all "
        f"linear layers; AdamW lr {args.lr}, constant; seed {args.seed}; one epoch per side (every example once; "
        f"TRL: {args.other_steps} optimizer steps), the first {args.warmup} steps untimed; each side {args.repeats}× interleaved in fresh processes, medians.",
        "",
        f"| side | non-padding tokens/s | steps | tokens (non-padding) | s/step | first step (s, from launch) | {memory_kind} (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, r in results.items():
        if "error" in r:
            md.append(f"| {side} | failed: {r['error']} | | | | | |")
        else:
            md.append(
                f"| {side} | {r['tokens_per_s']:,.0f} | {r['steps']} | {r['real_tokens']:,} | {r['step_s']:.3f} | "
                f"{r['first_step_s']:.1f} | {r['peak_mb']:,.0f} |"
            )
    md.append("")
    for key, value in ratios.items():
        if value is not None:
            md.append(f"- {key.replace('_', ' ')}: **{value:.2f}×**")
    if same is not None:
        verdict = "match" if same["ok"] else "DO NOT match"
        md += [
            "",
            f"Same work: peftcli's first {same['compared']} losses and Trainer's {verdict} "
            f"(max |Δ| = {same['max_abs_diff']:.2e}, tolerance {LOSS_TOLERANCE:g}).",
        ]
    if memory:
        md += [
            "",
            f"Memory case: vocab {args.memory_vocab}, {args.memory_batch} × {args.memory_seq} tokens, "
            f"{args.memory_steps} steps:",
            "",
        ]
        for side, r in memory.items():
            md.append(
                f"- {side}: "
                + (f"failed: {r['error']}" if "error" in r else f"{memory_kind} {r['peak_mb']:,.0f} MiB")
            )
    md += ["", *[f"Note: {n}" for n in notes], "", "First losses per side are in throughput.json.", ""]
    (out / "throughput.md").write_text("\n".join(md))
    print("\n".join(md))
    if same is not None and not same["ok"]:
        sys.exit(
            f"peftcli's losses differ from Trainer's on the same work: max |Δ| = {same['max_abs_diff']:.2e}"
        )


if __name__ == "__main__":
    main()
