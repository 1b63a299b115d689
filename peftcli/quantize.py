"""Quantized bases for QLoRA (Dettmers et al., 2023, arXiv 2305.14314): 4-bit NF4/FP4 and 8-bit.

The frozen base stores its linear layers in bitsandbytes' formats; adapters train in fp32 beside
them. A 4-bit weight is stored blockwise: 64 weights share one absmax ``c``, each weight is a 4-bit
index ``q`` into a 16-entry table (NF4: quantiles of N(0, 1); FP4: a tiny float format), and::

    W ≈ c_block · table[q]                       (dequantized to compute_dtype for each matmul)

Double quantization stores the absmax values themselves in 8 bits (blocks of 256, fp32 scale each), so
the stored cost per weight is ``4 + 8/64 + 32/(64·256) ≈ 4.127`` bits instead of ``4 + 32/64 = 4.5``.
An 8-bit weight (LLM.int8(), arXiv 2208.07339) is int8 with one fp32 scale per output row.

We load through transformers' ``BitsAndBytesConfig`` (it runs on the CPU with bitsandbytes ≥ 0.45,
and it is what peft users load), so "the same 4-bit base" is the same code path for peft and for us.
Quantization is deterministic: loading the same checkpoint twice gives bit-identical 4-bit weights.

bitsandbytes is imported lazily and its CPU warnings are silenced (`peftcli --help` stays instant).
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftcli.inject import HEAD_NAMES, output_head_names
from peftcli.recipe import RecipeError

if TYPE_CHECKING:
    from peftcli.recipe import ModelConfig, QuantizationConfig

QUANTIZED_CLASS_NAMES = ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4")
KEY = "model.quantization"


def import_bitsandbytes(key: str = KEY, hint: str = "or remove model.quantization"):
    """Import bitsandbytes lazily and quietly (it warns about missing GPUs at import), or raise a
    RecipeError naming ``key``; ``hint`` is the alternative offered after the install command."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise RecipeError(
            key,
            f"bitsandbytes is not usable here ({first})",
            f"pip install 'bitsandbytes>=0.45' (CPU and CUDA), {hint}",
        ) from None
    # "MatMul8bitLt: inputs will be cast ... to float16" is logged on every 8-bit matmul on the CPU.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return bitsandbytes


def check_bitsandbytes_runs(q: QuantizationConfig, device: torch.device) -> None:
    """Quantize and dequantize one small block on ``device``: a setup bitsandbytes cannot run fails
    here, loudly and before minutes of model loading, rather than deep inside the first forward."""
    bnb = import_bitsandbytes()
    what = f"{q.bits}-bit" + (f" {q.quant_type}" if q.bits == 4 else "")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = torch.linspace(-1.0, 1.0, 256, device=device).reshape(4, 64)
            if q.bits == 4:
                packed, state = bnb.functional.quantize_4bit(
                    probe, blocksize=64, quant_type=q.quant_type, compress_statistics=q.double_quant
                )
                restored = bnb.functional.dequantize_4bit(packed, state)
            else:
                layer = bnb.nn.Linear8bitLt(64, 4, bias=False, has_fp16_weights=False)
                layer.weight = bnb.nn.Int8Params(probe.cpu(), requires_grad=False, has_fp16_weights=False)
                layer = layer.to(device)
                restored = layer(torch.eye(64, device=device)).T
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise RecipeError(
            KEY,
            f"bitsandbytes {bnb.__version__} cannot run {what} on {device} ({first})",
            "use a CUDA GPU or a CPU build of bitsandbytes >= 0.45, or remove model.quantization",
        ) from None
    if not torch.allclose(restored.float().cpu(), probe.cpu(), atol=0.2):
        raise RecipeError(
            KEY,
            f"bitsandbytes {bnb.__version__} {what} on {device} gives wrong numbers",
            "upgrade bitsandbytes, or remove model.quantization",
        )


def skip_module_names(q: QuantizationConfig) -> list[str]:
    """Modules transformers must leave in full precision: every known head name plus ``skip_modules``.

    Passing any list replaces transformers' own default (the output embeddings), so the heads are
    always in it; names match a module's full name or its suffix."""
    return sorted(set(HEAD_NAMES) | set(q.skip_modules))


def quantization_kwargs(cfg: ModelConfig, device: torch.device) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that load ``cfg.name`` with its linear layers quantized."""
    from transformers import BitsAndBytesConfig

    q = cfg.quantization
    assert q is not None
    check_bitsandbytes_runs(q, device)
    compute_dtype = getattr(torch, q.compute_dtype)
    if q.bits == 4:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip_module_names(q),
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_module_names(q))
    place = device.index if device.type == "cuda" and device.index is not None else str(device)
    return {"quantization_config": config, "device_map": {"": place}}


def is_quantized_layer(module: nn.Module) -> bool:
    return type(module).__name__ in QUANTIZED_CLASS_NAMES


def prepare_for_kbit_training(model: nn.Module, cfg: ModelConfig) -> None:
    """What QLoRA does before training on a quantized base, and checks of what we promised.

    - Norm weights and other small non-quantized tensors (biases) go to fp32: they are a rounding
      error in memory and bf16 norms are a known source of instability. Embeddings and the LM head
      stay in the load dtype (peft's prepare_model_for_kbit_training upcasts them too, which costs
      4 bytes/param on a 128k vocabulary).
    - Unquantized bf16/fp16 linear layers (the heads) cast their fp32 input to their own dtype.
    - Input gradients with gradient checkpointing are switched on in ``models.load_model``.
    - 4-bit layers compute in eval as they do in training. On a CPU with AVX512-BF16, bitsandbytes'
      eval-only kernel repacks a 4-bit weight in place at its first no-grad forward and multiplies in
      bf16: eval logits would then differ (~1e-3) from the trained model's, and ``merge --dequantize``
      would dequantize the repacked layout (garbage). Its ``support_avx512bf16_for_cpu`` is turned off.
    - The output heads and every ``skip_modules`` entry must really be unquantized.
    """
    q = cfg.quantization
    assert q is not None
    for param in model.parameters():
        if param.is_floating_point() and param.dim() <= 1 and param.dtype != torch.float32:
            param.data = param.data.float()
    names = dict(model.named_modules())
    for module in names.values():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        weight = getattr(module, "weight", None)
        if type(module).__name__ == "Linear" and weight is not None and weight.dtype != torch.float32:
            # After the first fp32 norm the hidden states are fp32; an unquantized bf16/fp16 layer (the LM
            # head, skip_modules) casts them to its own dtype. Autocast does this on a GPU; on a CPU, nothing.
            module.register_forward_pre_hook(_cast_input_to_weight_dtype)
    for head in output_head_names(model):
        if is_quantized_layer(names[head]):
            raise RecipeError(
                KEY, f"the head {head} was quantized", "add it to model.quantization.skip_modules"
            )
    for entry in q.skip_modules:
        hits = [
            n for n in names if n and (n == entry or n.endswith("." + entry) or n.startswith(entry + "."))
        ]
        if not hits:
            raise RecipeError(
                f"{KEY}.skip_modules",
                f"{entry!r} matches no module in {type(model).__name__}",
                "use module names such as down_proj or model.layers.0.mlp",
            )
        if any(is_quantized_layer(names[n]) for n in hits):
            raise RecipeError(
                f"{KEY}.skip_modules", f"{entry!r} was quantized anyway", "report this as a bug"
            )


def _cast_input_to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    dtype = module.weight.dtype
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


# --------------------------------------------------------------------------------------------
# Stored bytes per parameter
# --------------------------------------------------------------------------------------------


def _bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def stored_bytes(param: torch.Tensor) -> tuple[int, int]:
    """(logical parameter count, bytes stored for it) of one parameter.

    4-bit: the packed codes, the per-block absmax and, with double quantization, the second-level
    absmax and offset. The 16/256-entry lookup tables are constants of the data type, not storage
    that grows with the model, and are left out.
    8-bit: the int8 codes and one fp32 scale per output row.
    """
    state = getattr(param, "quant_state", None)
    if state is not None:
        count = int(torch.Size(state.shape).numel())
        size = _bytes(param) + _bytes(state.absmax)
        if getattr(state, "nested", False) and state.state2 is not None:
            size += _bytes(state.state2.absmax) + _bytes(state.offset)
        return count, size
    scale = getattr(param, "SCB", None)
    if param.dtype == torch.int8 and scale is not None:
        return param.numel(), _bytes(param) + _bytes(scale)
    return param.numel(), _bytes(param)


def storage_report(model: nn.Module) -> dict[str, Any]:
    """Parameter counts and stored bytes, for the quantized linear weights and for the whole frozen base
    (trainable tensors, i.e. the adapter, are not part of the base and are left out)."""
    quantized_params = quantized_bytes = total_params = total_bytes = 0
    seen: set[int] = set()
    quantized_weights = {id(m.weight) for m in model.modules() if is_quantized_layer(m)}
    layers = len(quantized_weights)
    for param in model.parameters():
        if id(param) in seen or param.requires_grad:
            continue
        seen.add(id(param))
        count, size = stored_bytes(param)
        total_params, total_bytes = total_params + count, total_bytes + size
        if id(param) in quantized_weights:
            quantized_params, quantized_bytes = quantized_params + count, quantized_bytes + size
    return {
        "quantized_layers": layers,
        "quantized_parameters": quantized_params,
        "quantized_bytes": quantized_bytes,
        "quantized_bits_per_parameter": 8 * quantized_bytes / quantized_params if quantized_params else None,
        "total_parameters": total_params,
        "total_bytes": total_bytes,
        "bits_per_parameter": 8 * total_bytes / total_params if total_params else None,
        "bytes_per_parameter": total_bytes / total_params if total_params else None,
    }


def describe(q: QuantizationConfig) -> str:
    if q.bits == 8:
        return "int8 (LLM.int8)"
    return f"{q.quant_type}{' + double quant' if q.double_quant else ''}, compute {q.compute_dtype}"


def summary_lines(model: nn.Module, q: QuantizationConfig) -> list[str]:
    """Lines for the start-up summary: what is quantized and what it costs per parameter."""
    r = storage_report(model)
    layers = (
        f"{describe(q)}: {r['quantized_layers']} linear layers, {r['quantized_parameters']:,} weights "
        f"stored at {r['quantized_bits_per_parameter']:.3f} bits/param"
    )
    whole = (
        f"whole base: {human_bytes(r['total_bytes'])} for {r['total_parameters']:,} params = "
        f"{r['bytes_per_parameter']:.3f} bytes/param (heads, embeddings, norms unquantized)"
    )
    return [layers, whole]


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------------------------
# How far a merged model is from the quantized model it was trained as
# --------------------------------------------------------------------------------------------

# Plain sentences that any tokenizer splits into ordinary tokens; fixed so reports are comparable.
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Low-rank adapters are trained beside a frozen, quantized base model.",
    "Question: what is 12 plus 30? Answer: 42",
    "def add(a, b):\n    return a + b\n",
)


def probe_batch(tokenizer, max_length: int = 64) -> dict[str, torch.Tensor]:
    batch = tokenizer(
        list(PROBE_TEXTS), return_tensors="pt", padding=True, truncation=True, max_length=max_length
    )
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def probe_logits(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """fp32 logits at the real (unpadded) positions: (tokens, vocab), or (examples, classes) for seq_cls."""
    device = next(p for p in model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    kwargs = {"labels": batch["input_ids"]} if task == "seq2seq" else {}
    logits = (
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        .logits.float()
        .cpu()
    )
    if task == "seq_cls":
        return logits
    return logits[batch["attention_mask"].bool().cpu()]


def logit_difference(merged: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    diff = (merged - reference).abs()
    return {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "mean_abs_logit": float(reference.abs().mean()),
    }
