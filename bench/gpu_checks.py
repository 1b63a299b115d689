"""The correctness checks of the GPU tier: each one a function that trains or runs a small llama on a
device and compares numbers with a reference. ``bench/gpu.py`` runs each in its own process under a
time limit and writes the results into its report; ``tests/test_gpu.py`` runs the same functions under
``pytest -m gpu`` (they skip without CUDA). With ``bench/gpu.py --dry-run`` they run on the CPU with
the ``tiny`` size: checks that need CUDA say so and skip.

Each check returns :class:`Result` (passed, a one-line detail) or raises :class:`Skipped` (why).
References and tolerances, per check (fp32 unless it says otherwise):

- ``bf16_autocast``: 50 steps with bf16 autocast against 50 fp32 steps from the same start: each of
  the first 10 steps' losses within 2% (relative) of fp32's, where only rounding separates the two runs,
  and the mean of the last 10 within 2%, where the curves may have parted step by step (a transient bf16
  spike at lr 1e-2 was seen on one CPU: step 35 at 5.81 against 5.28, back within 1% three steps later);
  the curves not bit-identical (autocast engaged) and the fp32 loss fallen by more than twice the
  tolerance (so the curve left the band). On the CPU the loop never autocasts, so the check turns CPU
  autocast on through ``setup.autocast_dtype``: the same ``optimizer_step`` code runs under
  ``torch.autocast``.
- ``qlora_peft``: a QLoRA adapter (NF4, double quantization, fp32 compute) trained by peftcli, loaded
  by peft on transformers' own 4-bit base: logits within 1e-4 × max|logit| of ours, and the adapter
  moves the logits by more than 100× that.
- ``merge_dequantize``: ``merge --dequantize`` of that adapter, loaded as a plain fp32 model: logits
  within 1e-4 × max|logit| of the trained 4-bit adapter model.
- ``paged_adamw_8bit``: ``paged_adamw_8bit`` against ``adamw_8bit`` (the same 8-bit algorithm
  without paging), 8 steps; on CUDA the card is first filled with plain allocations to a few GiB free
  and every paged state tensor is sent to host memory before each step, so each step pages it back.
  Losses and adapters equal within 1e-6.
- ``fused_loss``: peftcli's torch fused linear cross-entropy against the plain logits path: the
  summed loss within 1e-5 (relative) and every trainable gradient within 1e-4 of the largest.
- ``liger_loss``: the same comparison for Liger's fused linear cross-entropy (CUDA, liger-kernel).
- ``packed_attention``: the same examples packed into rows (position ids restarting per example) and
  padded one per row: mean loss within 1e-5 (relative) for transformers' SDPA mask and peftcli's
  per-example SDPA, 2e-3 under bf16 autocast for flash-attention's varlen kernel (CUDA, flash-attn);
  attention sharpened (q, k ×4; v, o ×10) so that a leak between examples moves the loss by at least
  3 tolerances (checked: the control lets every token attend across examples).
- ``compile``: ``train.compile`` on and off, 4 steps: losses within 5e-4 (relative), and dynamo
  really compiled a graph.
- ``resume``: a run SIGKILLed after its step-2 checkpoint and resumed, against an uninterrupted run
  (LoRA dropout 0.1, so the RNG state must come back; bf16 autocast on CUDA): every adapter tensor
  within max(1e-6, 2 × the difference between two uninterrupted runs), the run-to-run noise floor.
- ``fsdp2_one_rank``: the loop with a 1-rank FSDP2 group (``fully_shard`` per decoder layer and the
  root) against plain training: losses and adapter within 1e-5.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "data" / "quickstart_train.jsonl"  # learnable: reverse a word
KILLER = ROOT / "tests" / "helpers" / "kill_after_checkpoint.py"

BF16_REL_TOL = 0.02
BF16_EARLY_STEPS = 10
LOGIT_REL_TOL = 1e-4
PAGED_TOL = 1e-6
LOSS_REL_TOL = 1e-5
GRAD_REL_TOL = 1e-4
LIGER_LOSS_REL_TOL, LIGER_GRAD_REL_TOL = 1e-4, 1e-3
FLASH_REL_TOL = 2e-3
LEAK_MARGIN = 3  # the leak control must exceed this many tolerances
COMPILE_REL_TOL = 5e-4
RESUME_TOL = 1e-6
FSDP_TOL = 1e-5
PRESSURE_FREE_GIB = 3.0  # what the paged check leaves free on the card
PAGED_MIN_ELEMENTS = 100_000  # bitsandbytes pages only the state of parameters this large


class Skipped(Exception):
    """The check cannot run here (no CUDA, a package missing); the message says why."""


@dataclass
class Result:
    passed: bool
    detail: str


@dataclass(frozen=True)
class Size:
    """The llama the checks train (byte-level tokenizer, random weights) and their data sizes."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    max_length: int
    examples: int
    batch: int


SIZES = {
    "tiny": Size("tiny", hidden=64, layers=2, heads=4, kv_heads=2, max_length=64, examples=400, batch=8),
    "gpu": Size("gpu", hidden=512, layers=4, heads=8, kv_heads=4, max_length=128, examples=2000, batch=16),
}


@dataclass
class Context:
    device: str  # "cpu" or "cuda"
    size: Size
    root: Path  # the whole run's scratch directory: the check model and the shared QLoRA run live here
    name: str  # this check's own directory under root

    @property
    def work(self) -> Path:
        return self.root / self.name

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


# -- shared set-up ---------------------------------------------------------------------------------


def check_model(ctx: Context) -> Path:
    """A random llama of ``ctx.size`` with peftcli's byte-level tokenizer, saved once per work dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from peftcli.tiny import _byte_tokenizer, quiet_transformers

    size = ctx.size
    path = ctx.root / f"model-{size.name}"
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    quiet_transformers()
    backend, vocab, _ = _byte_tokenizer("llama")
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=size.hidden,
        intermediate_size=128
        * math.ceil(size.hidden * 8 / 3 / 128),  # bitsandbytes CPU 4-bit: multiples of 128
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=4 * size.max_length,
        tie_word_embeddings=False,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
    )
    torch.manual_seed(0)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with contextlib.suppress(OSError):  # another check's process may have finished it first
        tmp.rename(path)
    shutil.rmtree(tmp, ignore_errors=True)
    return path


def recipe_dict(ctx: Context, out: Path, steps: int) -> dict[str, Any]:
    """LoRA on every linear layer of the check model, quickstart's word reversal, fp32, constant lr."""
    return {
        "model": {"name": str(check_model(ctx)), "task": "causal_lm", "dtype": "float32"},
        "data": {
            "train": str(QUICKSTART),
            "format": "completion",
            "max_length": ctx.size.max_length,
            "max_train_examples": ctx.size.examples,
        },
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {
            "max_steps": steps,
            "batch_size": ctx.size.batch,
            "lr": 3e-3,
            "scheduler": "constant",
            "warmup_steps": 0,
            "seed": 0,
            "log_every": 1,
            "device": ctx.device,
            "mixed_precision": "no",
        },
        "eval": {"generate": False},
        "output_dir": str(out),
    }


def write_recipe(ctx: Context, name: str, steps: int, edit: Callable[[dict], None] | None = None) -> Path:
    import yaml

    out = ctx.work / name
    shutil.rmtree(out, ignore_errors=True)
    recipe = recipe_dict(ctx, out, steps)
    if edit is not None:
        edit(recipe)
    path = ctx.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def train(ctx: Context, name: str, steps: int, edit: Callable[[dict], None] | None = None) -> Path:
    """Train through the real loop (``peftcli.api.train``); the run directory."""
    from peftcli import api

    path = write_recipe(ctx, name, steps, edit)
    api.train(path)
    return ctx.work / name


def losses(run: Path) -> list[float]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "train"]


def adapter_tensors(run: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def max_tensor_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    if a.keys() != b.keys():
        return math.inf
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def max_rel_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not a:
        return math.inf
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def set_train(**values: Any) -> Callable[[dict], None]:
    return lambda recipe: recipe["train"].update(values)


def need_cuda(ctx: Context, what: str) -> None:
    if not ctx.cuda:
        raise Skipped(f"{what} needs CUDA (this run is on the CPU)")


def loop_pieces(ctx: Context, name: str):
    """The loop's own model (base + LoRA, trainable fp32), tokenizer and tokenized training rows."""
    import torch

    from peftcli.data.pipeline import load_data
    from peftcli.methods.catalog import method_for
    from peftcli.models import build_model, load_tokenizer
    from peftcli.recipe_loader import load_recipe
    from peftcli.training.setup import seed_everything

    recipe = load_recipe(write_recipe(ctx, name, 1))
    tokenizer = load_tokenizer(recipe.model.name, recipe.model)
    rows = load_data(recipe.data, tokenizer, "causal_lm").train
    seed_everything(0)
    method = method_for(recipe)
    model = build_model(
        recipe.model.name,
        recipe.model,
        method,
        torch.device(ctx.device),
        seed=recipe.train.seed,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model, tokenizer, rows


def trainable_grads(model) -> dict[str, Any]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# -- the checks ----------------------------------------------------------------------------------


def check_bf16_autocast(ctx: Context) -> Result:
    import torch

    import peftcli.training.setup as setup

    steps = 50
    fp32 = losses(train(ctx, "fp32", steps, set_train(lr=1e-2)))
    patched = contextlib.nullcontext()
    if not ctx.cuda:  # the loop autocasts only on CUDA: turn it on for the CPU, same optimizer_step
        patched = _patched(setup, "autocast_dtype", lambda recipe, device: torch.bfloat16)
    with patched:
        bf16 = losses(train(ctx, "bf16", steps, set_train(lr=1e-2, mixed_precision="bf16")))
    early = max_rel_diff(bf16[:BF16_EARLY_STEPS], fp32[:BF16_EARLY_STEPS])
    late = abs(mean(bf16[-BF16_EARLY_STEPS:]) - mean(fp32[-BF16_EARLY_STEPS:])) / mean(
        fp32[-BF16_EARLY_STEPS:]
    )
    fell = fp32[-1] < (1 - 2 * BF16_REL_TOL) * fp32[0]  # it trained: the curve left the tolerance band
    passed = len(fp32) == len(bf16) == steps and early <= BF16_REL_TOL and late <= BF16_REL_TOL
    passed = passed and bf16 != fp32 and fell
    detail = (
        f"{steps} steps: first {BF16_EARLY_STEPS} worst |Δloss|/loss {early:.2e}, last {BF16_EARLY_STEPS} "
        f"mean {late:.2e} (tolerance {BF16_REL_TOL:g}; worst step {max_rel_diff(bf16, fp32):.2e}); "
        f"fp32 {fp32[0]:.3f} → {fp32[-1]:.3f}, bf16 {bf16[0]:.3f} → {bf16[-1]:.3f}"
    )
    if bf16 == fp32:
        detail += "; bf16 equals fp32 bit for bit: autocast did not engage"
    return Result(passed, detail)


def trained_qlora(ctx: Context) -> Path:
    """One QLoRA run (NF4 + double quant, fp32 compute) shared by the QLoRA checks of this work dir."""
    run = ctx.root / "qlora-shared"
    if (run / "adapter" / "adapter_model.safetensors").exists():
        return run

    def quantized(recipe: dict) -> None:
        recipe["model"]["quantization"] = {
            "bits": 4,
            "quant_type": "nf4",
            "double_quant": True,
            "compute_dtype": "float32",
        }
        recipe["train"]["lr"] = 1e-2  # the adapter must move the logits well past the tolerance

    return train(Context(ctx.device, ctx.size, ctx.root, ""), "qlora-shared", 12, quantized)


def quantized_base_as_peft_loads_it(model_dir: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=config,
        device_map={"": 0 if device == "cuda" else "cpu"},
        dtype=torch.float32,
    )
    for module in model.modules():  # on AVX512-BF16 CPUs bitsandbytes' eval kernel is bf16: the fp32 path
        if hasattr(module, "support_avx512bf16_for_cpu"):  # as training and peftcli's loads take it
            module.support_avx512bf16_for_cpu = False
    return model


def probe_batch(device: str, vocab: int = 260) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (2, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def real_logits(model, batch) -> Any:
    import torch

    with torch.no_grad():
        logits = model(**batch).logits.float()
    return logits[batch["attention_mask"].bool()]


def check_qlora_peft(ctx: Context) -> Result:
    from peft import PeftModel

    from peftcli.export import load_adapter

    _require("bitsandbytes")
    run = trained_qlora(ctx)
    batch = probe_batch(ctx.device)
    base = quantized_base_as_peft_loads_it(str(check_model(ctx)), ctx.device)
    base_logits = real_logits(base, batch)
    theirs = PeftModel.from_pretrained(base, str(run / "adapter"))
    wrapped = type(theirs.base_model.model.model.layers[0].mlp.down_proj).__module__
    peft_logits = real_logits(theirs, batch)
    ours = real_logits(load_adapter(run / "adapter", device=ctx.device).model, batch)
    scale = float(peft_logits.abs().max())
    diff = float((ours - peft_logits).abs().max())
    moved = float((peft_logits - base_logits).abs().max())
    tol = LOGIT_REL_TOL * max(1.0, scale)
    passed = diff <= tol and moved > 100 * tol and wrapped == "peft.tuners.lora.bnb"
    return Result(
        passed,
        f"max |Δlogit| peftcli vs peft {diff:.2e} (tolerance {tol:.1e}); the adapter moves the 4-bit "
        f"base's logits by {moved:.2e}; peft's layer: {wrapped}",
    )


def check_merge_dequantize(ctx: Context) -> Result:
    import torch
    from transformers import AutoModelForCausalLM

    from peftcli.export import load_adapter, merge_adapter

    _require("bitsandbytes")
    run = trained_qlora(ctx)
    out = ctx.work / "merged"
    shutil.rmtree(out, ignore_errors=True)
    info = merge_adapter(run / "adapter", out, dequantize=True)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(ctx.device)
    quantized_layers = sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in merged.modules())
    batch = probe_batch(ctx.device)
    ours = real_logits(load_adapter(run / "adapter", device=ctx.device).model, batch)
    theirs = real_logits(merged, batch)
    diff = float((theirs - ours).abs().max())
    tol = LOGIT_REL_TOL * max(1.0, float(ours.abs().max()))
    passed = diff <= tol and quantized_layers == 0 and info["dequantized"] is True
    return Result(
        passed,
        f"merged fp32 model vs the trained 4-bit adapter model: max |Δlogit| {diff:.2e} "
        f"(tolerance {tol:.1e}); 4-bit layers left in the merged model: {quantized_layers}",
    )


def check_paged_adamw_8bit(ctx: Context) -> Result:
    _require("bitsandbytes")
    steps = 8
    # bitsandbytes pages the state of parameters with ≥ 1e5 elements only: on CUDA, a rank that makes
    # every LoRA A matrix that large
    rank = max(8, math.ceil(PAGED_MIN_ELEMENTS / ctx.size.hidden)) if ctx.cuda else 8

    def optimizer(name: str) -> Callable[[dict], None]:
        def edit(recipe: dict) -> None:
            recipe["train"]["optimizer"] = name
            recipe["method"].update(r=rank, alpha=2 * rank)

        return edit

    reference = train(ctx, "adamw8", steps, optimizer("adamw_8bit"))
    with _memory_pressure(ctx) as pressure, _state_sent_to_host_each_step(ctx) as paged:
        run = train(ctx, "paged8", steps, optimizer("paged_adamw_8bit"))
    loss_diff = max((abs(a - b) for a, b in zip(losses(run), losses(reference), strict=True)), default=0.0)
    weight_diff = max_tensor_diff(adapter_tensors(run), adapter_tensors(reference))
    same = loss_diff <= PAGED_TOL and weight_diff <= PAGED_TOL and len(losses(run)) == steps
    if ctx.cuda:
        passed = same and paged["tensors"] > 0 and paged["evictions"] >= steps
        how = (
            f"card filled to {pressure['free_gib']:.1f} GiB free ({pressure['filled_gib']:.0f} GiB of plain "
            f"allocations); {paged['tensors']} paged state tensors ({paged['mib']:.1f} MiB, LoRA r {rank}) "
            f"sent to host memory before each of {paged['evictions']} steps"
        )
    else:
        passed = same
        how = "CPU: bitsandbytes keeps paged state in ordinary memory, nothing pages (CUDA only)"
    return Result(
        passed,
        f"paged vs unpaged 8-bit AdamW, {steps} steps: max |Δloss| {loss_diff:.1e}, max |Δweight| "
        f"{weight_diff:.1e} (tolerance {PAGED_TOL:g}); {how}",
    )


@contextlib.contextmanager
def _memory_pressure(ctx: Context) -> Iterator[dict[str, float]]:
    """Fill the card with plain (cudaMalloc) allocations until PRESSURE_FREE_GIB are left: never managed
    memory, and never more than is free (oversubscribing managed memory can hang the GPU)."""
    found = {"free_gib": 0.0, "filled_gib": 0.0}
    if not ctx.cuda:
        yield found
        return
    import torch

    blocks, gib = [], 2**30
    try:
        while True:
            free, _ = torch.cuda.mem_get_info()
            chunk = min(4 * gib, free - int(PRESSURE_FREE_GIB * gib))
            if chunk < gib // 4:
                break
            blocks.append(torch.empty(chunk, dtype=torch.uint8, device="cuda"))
        found["free_gib"] = torch.cuda.mem_get_info()[0] / gib
        found["filled_gib"] = sum(b.numel() for b in blocks) / gib
        yield found
    finally:
        blocks.clear()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _state_sent_to_host_each_step(ctx: Context) -> Iterator[dict[str, float]]:
    """Before every optimizer step, prefetch each paged state tensor to host memory: the step must page
    it back in (bitsandbytes prefetches it to the device inside ``step``)."""
    import peftcli.training.loop as loop

    found = {"tensors": 0, "mib": 0.0, "evictions": 0}
    if not ctx.cuda:
        yield found
        return
    import bitsandbytes.functional as F

    manager = F.GlobalPageManager.get_instance()
    manager.paged_tensors.clear()
    step = loop.optimizer_step

    def evict_then_step(run, micro, n_targets, at_step):
        if manager.paged_tensors:
            manager.prefetch_all(to_cpu=True)
            found["evictions"] += 1
        return step(run, micro, n_targets, at_step)

    with _patched(loop, "optimizer_step", evict_then_step):
        yield found
    found["tensors"] = len(manager.paged_tensors)
    found["mib"] = sum(t.nbytes for t in manager.paged_tensors) / 2**20


def _loss_and_grads(model, batch: dict[str, Any], path: str) -> tuple[float, dict[str, Any]]:
    from peftcli.training.loss import micro_batch_loss_sum

    model.zero_grad(set_to_none=True)
    loss = micro_batch_loss_sum(model, batch, "causal_lm", path)
    loss.backward()
    return float(loss), trainable_grads(model)


def _compare_loss_paths(ctx: Context, path: str, loss_tol: float, grad_tol: float) -> Result:
    from peftcli.data.collate import collate_rows
    from peftcli.training.loss import PLAIN

    model, tokenizer, rows = loop_pieces(ctx, "loss-path")
    batch = collate_rows(rows, list(range(ctx.size.batch)), tokenizer, "causal_lm")
    batch = {k: v.to(ctx.device) for k, v in batch.items()}
    plain_loss, plain_grads = _loss_and_grads(model, batch, PLAIN)
    fused_loss, fused_grads = _loss_and_grads(model, batch, path)
    loss_rel = abs(fused_loss - plain_loss) / abs(plain_loss)
    scale = max(float(g.abs().max()) for g in plain_grads.values())
    grad_rel = max_tensor_diff(fused_grads, plain_grads) / scale
    return Result(
        loss_rel <= loss_tol and grad_rel <= grad_tol and scale > 0,
        f"{path} vs plain: |Δloss|/loss {loss_rel:.1e} (tolerance {loss_tol:g}), max |Δgrad| / max |grad| "
        f"{grad_rel:.1e} over {len(plain_grads)} tensors (tolerance {grad_tol:g})",
    )


def check_fused_loss(ctx: Context) -> Result:
    from peftcli.training.loss import FUSED

    return _compare_loss_paths(ctx, FUSED, LOSS_REL_TOL, GRAD_REL_TOL)


def check_liger_loss(ctx: Context) -> Result:
    from peftcli.training.loss import LIGER

    need_cuda(ctx, "Liger's Triton kernel")
    _require("liger_kernel", "liger-kernel")
    return _compare_loss_paths(ctx, LIGER, LIGER_LOSS_REL_TOL, LIGER_GRAD_REL_TOL)


def check_packed_attention(ctx: Context) -> Result:
    """Mean loss of the same examples packed vs padded, per attention path. A random model's attention
    is nearly uniform, so a leak between packed examples would hardly show: its attention weights are
    scaled up first, and the control (the packed rows with positions that do not restart, so every
    token attends across examples) must move the loss by at least LEAK_MARGIN × each tolerance."""
    import torch

    from peftcli.data.batching import collate_packed
    from peftcli.data.collate import collate_rows, pad_token_id
    from peftcli.training.attention import use_packed_attention
    from peftcli.training.loss import PLAIN, count_targets, micro_batch_loss_sum

    model, tokenizer, rows = loop_pieces(ctx, "packed")
    model.eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".base_layer" in name and any(p in name for p in ("q_proj", "k_proj")):
                param.mul_(4)
            if ".base_layer" in name and any(p in name for p in ("v_proj", "o_proj")):
                param.mul_(10)
    n = 2 * ctx.size.batch
    padded = collate_rows(rows, list(range(n)), tokenizer, "causal_lm")
    examples = rows.take(list(range(n)))
    packed = collate_packed([examples[: n // 2], examples[n // 2 :]], pad_token_id(tokenizer))
    leaking = {
        **packed,
        "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]),
    }

    def mean_loss(batch: dict[str, Any], bf16: bool) -> float:
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        with torch.no_grad(), torch.autocast(ctx.device, dtype=torch.bfloat16, enabled=bf16):
            total = micro_batch_loss_sum(model, batch, "causal_lm", PLAIN)
        return float(total) / count_targets(batch, "causal_lm")

    model.set_attn_implementation("sdpa")
    reference = {bf16: mean_loss(padded, bf16) for bf16 in (False, True)}
    leak = {bf16: abs(mean_loss(leaking, bf16) - reference[bf16]) / reference[bf16] for bf16 in (False, True)}
    found, skipped, passed = [], [], True

    def compare(label: str, bf16: bool, tol: float) -> None:
        nonlocal passed
        rel = abs(mean_loss(packed, bf16) - reference[bf16]) / reference[bf16]
        passed = passed and rel <= tol and leak[bf16] >= LEAK_MARGIN * tol
        found.append(f"{label} {rel:.1e} (tolerance {tol:g})")

    compare("sdpa (transformers' block mask)", False, LOSS_REL_TOL)
    switched, why = use_packed_attention(model)
    if switched:
        compare("peftcli per-example sdpa", False, LOSS_REL_TOL)
        model.set_attn_implementation("sdpa")
    else:
        passed = False
        found.append(f"peftcli per-example sdpa not used: {why}")
    if not ctx.cuda:
        skipped.append("flash-attention varlen needs CUDA")
    elif _version("flash_attn", "flash-attn") is None:
        skipped.append("flash-attn is not installed")
    else:
        model.set_attn_implementation("flash_attention_2")
        compare("flash-attention varlen, bf16 autocast", True, FLASH_REL_TOL)
    head = f"{n} examples in 2 packed rows vs {n} padded rows: |Δ mean loss|/loss: "
    control = f"; a leak across examples moves it {leak[False]:.1e} (bf16 {leak[True]:.1e})"
    tail = f"; skipped: {', '.join(skipped)}" if skipped else ""
    return Result(passed, head + "; ".join(found) + control + tail)


def check_compile(ctx: Context) -> Result:
    import torch._dynamo

    steps = 4
    eager = losses(train(ctx, "eager", steps, set_train(loss="plain")))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = losses(train(ctx, "compiled", steps, set_train(loss="plain", compile=True)))
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    worst = max_rel_diff(compiled, eager)
    return Result(
        worst <= COMPILE_REL_TOL and graphs > 0,
        f"{steps} steps: worst |Δloss|/loss compiled vs eager {worst:.1e} (tolerance {COMPILE_REL_TOL:g}); "
        f"dynamo compiled {graphs} graph(s)",
    )


def check_resume(ctx: Context) -> Result:
    steps = 6

    def edit(recipe: dict) -> None:
        recipe["method"]["dropout"] = 0.1  # dropout draws: the RNG state must come back exactly
        recipe["train"].update(save_every=2, mixed_precision="auto")

    full = adapter_tensors(train(ctx, "full", steps, edit))
    again = adapter_tensors(train(ctx, "full-again", steps, edit))
    recipe = write_recipe(ctx, "killed", steps, edit)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(KILLER), "2", "--", "train", str(recipe), "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    killed_run = ctx.work / "killed"
    was_killed = proc.returncode == -9 and not (killed_run / "adapter").exists()
    if not was_killed:
        return Result(False, f"the run to kill exited {proc.returncode}: {proc.stderr.strip()[-200:]}")
    from peftcli import api

    api.train(recipe, resume=True)
    diff = max_tensor_diff(adapter_tensors(killed_run), full)
    noise = max_tensor_diff(again, full)
    tol = max(RESUME_TOL, 2 * noise)
    return Result(
        diff <= tol,
        f"SIGKILL after checkpoint 2 of {steps}, resumed: max |Δ adapter| {diff:.1e} vs the uninterrupted "
        f"run (tolerance {tol:.0e}; two uninterrupted runs differ by {noise:.1e})",
    )


def check_fsdp2_one_rank(ctx: Context) -> Result:
    import torch
    import torch.distributed as torch_dist

    import peftcli.training.loop as loop
    from peftcli.recipe_loader import load_recipe
    from peftcli.training.distributed import Dist

    steps = 4
    # the fused loss would call the body and the head directly, past FSDP's root hooks: plain on both
    plain = train(ctx, "plain", steps, set_train(loss="plain"))
    recipe = load_recipe(write_recipe(ctx, "fsdp", steps, set_train(loss="plain")))
    if ctx.cuda:
        torch.cuda.set_device(0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch_dist.init_process_group(
        "nccl" if ctx.cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    one_rank = Dist("fsdp", rank=0, world_size=1, local_rank=0, owns_group=True)
    ok = False
    try:  # distributed.init refuses fsdp on one process (users gain nothing): enter the loop below it
        loop._train(recipe, False, None, False, one_rank, ctx.device)
        ok = True
    finally:
        one_rank.shutdown(ok)
    run = ctx.work / "fsdp"
    loss_diff = max((abs(a - b) for a, b in zip(losses(run), losses(plain), strict=True)), default=math.inf)
    weight_diff = max_tensor_diff(adapter_tensors(run), adapter_tensors(plain))
    return Result(
        loss_diff <= FSDP_TOL and weight_diff <= FSDP_TOL and len(losses(run)) == steps,
        f"1-rank FSDP2 vs plain, {steps} steps: max |Δloss| {loss_diff:.1e}, max |Δ adapter| "
        f"{weight_diff:.1e} (tolerance {FSDP_TOL:g})",
    )


# -- registry and helpers ----------------------------------------------------------------------------

CHECKS: dict[str, tuple[Callable[[Context], Result], str]] = {
    "bf16_autocast": (check_bf16_autocast, "bf16 autocast training tracks fp32 over 50 steps"),
    "qlora_peft": (check_qlora_peft, "QLoRA NF4 + double quant: peft loads the adapter with our logits"),
    "merge_dequantize": (check_merge_dequantize, "merge --dequantize equals the trained 4-bit model"),
    "paged_adamw_8bit": (check_paged_adamw_8bit, "paged AdamW 8-bit under memory pressure = unpaged"),
    "fused_loss": (check_fused_loss, "torch fused loss = plain loss, gradients too"),
    "liger_loss": (check_liger_loss, "Liger fused loss = plain loss, gradients too"),
    "packed_attention": (check_packed_attention, "packed batches give the unpacked loss"),
    "compile": (check_compile, "torch.compile on and off give equal losses"),
    "resume": (check_resume, "resume after SIGKILL is exact"),
    "fsdp2_one_rank": (check_fsdp2_one_rank, "1-rank FSDP2 equals plain training"),
}


def run_check(name: str, device: str, size: str, work: Path) -> dict[str, Any]:
    """Run one check; its report entry: name, passed (None when skipped), detail, skipped."""
    check, title = CHECKS[name]
    ctx = Context(device, SIZES[size], work, name)
    shutil.rmtree(ctx.work, ignore_errors=True)
    ctx.work.mkdir(parents=True)
    try:
        result = check(ctx)
    except Skipped as why:
        return {"name": name, "title": title, "passed": None, "skipped": str(why), "detail": str(why)}
    return {
        "name": name,
        "title": title,
        "passed": bool(result.passed),
        "skipped": None,
        "detail": result.detail,
    }


@contextlib.contextmanager
def _patched(module: Any, attribute: str, value: Any) -> Iterator[None]:
    saved = getattr(module, attribute)
    setattr(module, attribute, value)
    try:
        yield
    finally:
        setattr(module, attribute, saved)


def _version(module: str, dist_name: str | None = None) -> str | None:
    """The installed version of a package, or None when it is absent or cannot be imported."""
    import importlib
    import importlib.metadata as md

    try:
        importlib.import_module(module)
    except Exception:
        return None
    try:
        return md.version(dist_name or module)
    except md.PackageNotFoundError:
        return "unknown"


def _require(module: str, dist_name: str | None = None) -> None:
    if _version(module, dist_name) is None:
        raise Skipped(f"{dist_name or module} is not installed")
