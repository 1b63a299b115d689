"""Adapters on disk (peft's format) and merging them into a plain transformers model.

An adapter directory holds:

- ``adapter_config.json``: peft's config (``peft_type``, ``task_type``, ``base_model_name_or_path`` and
  the method's fields under peft's names). Methods peft lacks write no ``peft_type`` (peft must not
  mistake them for one of its own) and name our method in ``peftcli_method``.
- ``adapter_model.safetensors``: the trained tensors under peft's key names.
- ``peftcli_adapter.json``: our own record (method name and full options, task, label names, the
  base as the recipe named it), kept out of ``adapter_config.json`` because peft warns on unknown keys.
- the tokenizer files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftcli.adapter_compat import drop_unmatched_modules_to_save
from peftcli.checkpoint import ADAPTER_WEIGHTS, AtomicDir, check_tensors, read_adapter_state
from peftcli.dequantize import load_dequantized_weights, quantized_layers
from peftcli.methods.catalog import get_method_class, list_methods
from peftcli.methods.registry import Method
from peftcli.models import (
    PEFT_TASK_TYPE,
    TASK_FROM_PEFT,
    build_model,
    load_tokenizer,
    resolve_model_name,
)
from peftcli.recipe import ModelConfig, QuantizationConfig, RecipeError, coerce, from_dict, to_dict

ADAPTER_CONFIG = "adapter_config.json"
SIDECAR = "peftcli_adapter.json"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def save_adapter(
    out_dir: str | Path,
    model: nn.Module,
    method: Method,
    tokenizer,
    base_path: str,
    model_cfg: ModelConfig,
    label_names: list[str] | None = None,
    extra: dict[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """Write the adapter directory atomically (a crash leaves the previous one intact)."""
    method.on_save(model)
    config: dict[str, Any] = {
        "task_type": PEFT_TASK_TYPE[method.task],
        "base_model_name_or_path": base_path,
        "inference_mode": True,
        "revision": model_cfg.revision,
        **method.adapter_config(model),
    }
    if method.peft_type:
        config["peft_type"] = method.peft_type
    else:
        config["peftcli_method"] = method.name
    sidecar = {
        "method": method.name,
        "method_config": to_dict(method.cfg),
        "task": method.task,
        "model_name": model_cfg.name,
        "quantization": to_dict(model_cfg.quantization) if model_cfg.quantization else None,
        "label_names": label_names,
        "seed": seed,  # the adapter's init seed: load_adapter rebuilds the model with it
        **(extra or {}),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in method.adapter_state_dict(model).items()}
    from safetensors.torch import save_file

    with AtomicDir(out_dir) as tmp:
        config.update(method.adapter_parts(model, tmp, Path(out_dir)))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for name, tensors in method.adapter_files(model).items():
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def read_adapter_info(path: str | Path) -> dict[str, Any]:
    """Method class, its config, task and base from an adapter dir (ours, or one peft wrote)."""
    path = Path(path)
    if not is_adapter_dir(path):
        raise RecipeError(
            "adapter", f"{path} has no {ADAPTER_CONFIG}", "point at an adapter directory (RUN/adapter)"
        )
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    sidecar_path = path / SIDECAR
    if sidecar_path.is_file():
        sidecar = json.loads(sidecar_path.read_text())
        method_cls = get_method_class(sidecar["method"])
        method_cfg = method_cls.config_at(
            from_dict(method_cls.config_cls, sidecar["method_config"], "method"), path
        )
        task = sidecar["task"]
        model_name = sidecar.get("model_name") or config.get("base_model_name_or_path")
        quant = sidecar.get("quantization")
        label_names = sidecar.get("label_names")
        seed = sidecar.get("seed", 0)
    else:  # an adapter written by peft itself
        peft_type = config.get("peft_type")
        candidates = [m for m in list_methods() if m.peft_type == peft_type]
        if not candidates:
            raise RecipeError(
                "adapter",
                f"peft_type {peft_type!r} is not a method peftcli can load",
                f"peftcli loads: {', '.join(sorted({m.peft_type for m in list_methods() if m.peft_type}))}",
            )
        method_cls = candidates[0]
        method_cfg = method_cls.config_from_adapter(config)
        task = TASK_FROM_PEFT.get(config.get("task_type") or "CAUSAL_LM", "causal_lm")
        model_name = config.get("base_model_name_or_path")
        quant, label_names, seed = None, None, 0
    return {
        "written_by_peft": not sidecar_path.is_file(),
        "config": config,
        "method_cls": method_cls,
        "method_cfg": method_cfg,
        "task": task,
        "base_path": config.get("base_model_name_or_path"),
        "model_name": model_name,
        "quantization": quant,
        "label_names": label_names,
        "seed": seed,
    }


def resolve_base(info: dict[str, Any], base: str | None) -> str:
    """The base to load: ``--base``, else the recorded path, else the recipe's name (rebuilds tiny:)."""
    if base:
        return resolve_model_name(base)
    recorded = info["base_path"]
    if recorded and Path(recorded).is_dir():
        return recorded
    name = info["model_name"] or recorded
    if not name:
        raise RecipeError("adapter", "the adapter does not name its base model", "pass --base MODEL")
    return resolve_model_name(name)


@dataclass
class LoadedAdapter:
    model: nn.Module
    tokenizer: Any
    method: Method
    task: str
    label_names: list[str] | None
    base_path: str


def load_adapter(
    path: str | Path,
    base: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    quantized: bool = True,
    allow_pickle: bool = False,
) -> LoadedAdapter:
    """Rebuild the tuned model: load the base, apply the method, load the trained tensors.

    ``quantized=False`` loads a QLoRA adapter's base in full precision (what merge does).
    ``allow_pickle`` lets a base with only .bin (pickle) weights load, as ``model.allow_pickle`` does.
    """
    path = Path(path)
    info = read_adapter_info(path)
    base_path = resolve_base(info, base)
    quant = info["quantization"] if quantized else None
    model_cfg = ModelConfig(
        name=base_path,
        task=info["task"],
        quantization=coerce(quant, QuantizationConfig, "quantization") if quant else None,
        allow_pickle=allow_pickle,
    )
    tokenizer_src = str(path) if (path / "tokenizer_config.json").exists() else base_path
    tokenizer = load_tokenizer(tokenizer_src, model_cfg)
    device = torch.device(device)
    method = info["method_cls"](info["method_cfg"], info["task"])
    model = build_model(
        base_path,
        model_cfg,
        method,
        device,
        seed=info["seed"],
        label_names=info["label_names"],
        pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
        trainable_fp32=False,
        before_attach=(
            (lambda base: drop_unmatched_modules_to_save(base, info["method_cfg"], str(path)))
            if info["written_by_peft"]
            else None
        ),
    )
    state = method.adapter_file_state(read_adapter_state(path))
    # Names and dtype kinds must be what this method writes for this base, listed if not. Shapes are
    # checked once loaded (a pruned AdaLoRA adapter resizes the model to its ranks): a file tensor whose
    # shape differs from what the model now holds was broadcast or cut, never loaded as written.
    source = f"adapter {path}"
    check_tensors(state, method.adapter_state_dict(model), source, exact_dtype=False, shapes=False)
    method.load_adapter_state_dict(model, state)
    check_tensors(method.as_saved(model, state), method.adapter_state_dict(model), source, exact_dtype=False)
    model.to(device)
    model.eval()
    return LoadedAdapter(model, tokenizer, method, info["task"], info["label_names"], base_path)


def merge_adapter(
    adapter_dir: str | Path,
    output: str | Path,
    base: str | None = None,
    dtype: str = "float32",
    dequantize: bool = False,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Fold an adapter into its base and write a plain transformers model directory.

    The base is always reloaded in full precision (a QLoRA adapter's base too): the update is added
    to the fp32 weights, and only then is the model cast to ``dtype``. Nothing is re-quantized. We
    reload rather than dequantize because the original checkpoint's weights are exact, while
    dequantized 4-bit weights carry the quantization error into every merged weight for good.

    The adapter was trained on the quantized base, though, so the merged model is *not* the model
    that was trained: for a quantized adapter we also run the 4-bit (or 8-bit) adapter model on a
    fixed probe batch and report the max and mean logit difference (``report_lines``, ``probe``,
    and ``OUTPUT/merge_report.json``) instead of hiding it.

    ``dequantize=True`` merges into the dequantized 4-bit (8-bit) weights instead (``peftcli.dequantize``):
    the merged model is then the trained quantized adapter model up to rounding (docs/merging.md).
    """
    info = read_adapter_info(adapter_dir)
    _check_mergeable(info, adapter_dir, dequantize)
    probe, reference, trained_layers = None, None, {}
    if info["quantization"]:
        probe, reference, trained_layers = _probe_quantized(adapter_dir, base, dequantize, allow_pickle)
    loaded = load_adapter(
        adapter_dir, base=base, dtype=torch.float32, quantized=False, allow_pickle=allow_pickle
    )
    load_dequantized_weights(loaded.model, trained_layers)
    del trained_layers
    merged = loaded.method.merge(loaded.model)
    target = getattr(torch, dtype)
    merged.to(target)
    result: dict[str, Any] = {
        "output": str(output),
        "dtype": dtype,
        "method": loaded.method.name,
        "base": loaded.base_path,
        "task": loaded.task,
        "dequantized": dequantize,
        "report_lines": [],
    }
    if probe is not None:
        result.update(
            _quantization_report(
                merged, probe, reference, info["quantization"], dtype, loaded.task, dequantize
            )
        )
    _write_merged(output, merged, loaded.tokenizer, result if probe is not None else None)
    return result


def _check_mergeable(info: dict[str, Any], adapter_dir: str | Path, dequantize: bool) -> None:
    if not info["method_cls"].mergeable:
        raise RecipeError(
            "merge",
            f"method {info['method_cls'].name} cannot be merged into the base",
            "load the adapter directory directly (peftcli eval / peftcli.load)",
        )
    if dequantize and not info["quantization"]:
        raise RecipeError(
            "--dequantize",
            f"{adapter_dir} was not trained on a quantized base, so there is nothing to dequantize",
            "drop --dequantize",
        )


def _probe_quantized(
    adapter_dir: str | Path, base: str | None, dequantize: bool, allow_pickle: bool
) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    """The trained (quantized) adapter model's logits on a fixed probe batch, to compare the merged model
    with; with ``dequantize``, its quantized layers too. The quantized model is freed before returning, so
    that it and the merged model never sit in memory at once."""
    from peftcli.quantize import probe_batch, probe_logits

    quantized = load_adapter(
        adapter_dir, base=base, dtype=torch.float32, quantized=True, allow_pickle=allow_pickle
    )
    probe = probe_batch(quantized.tokenizer)
    reference = probe_logits(quantized.model, probe, quantized.task)
    trained_layers = quantized_layers(quantized.model) if dequantize else {}
    del quantized
    return probe, reference, trained_layers


def _write_merged(output: str | Path, merged, tokenizer, result: dict[str, Any] | None) -> None:
    """The merged model and tokenizer, atomically; merge_report.json when the base was quantized."""
    with AtomicDir(output) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if result is not None:
            report = {k: result[k] for k in ("dequantized", "probe", "report_lines")}
            (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")


def _quantization_report(
    merged: nn.Module,
    probe: dict[str, torch.Tensor],
    reference: torch.Tensor,
    quant: dict[str, Any],
    dtype: str,
    task: str,
    dequantize: bool = False,
) -> dict[str, Any]:
    from peftcli.quantize import PROBE_TEXTS, describe, logit_difference, probe_logits

    q = coerce(quant, QuantizationConfig, "quantization")
    diff = logit_difference(probe_logits(merged, probe, task), reference)
    positions = int(reference.shape[0])
    probe_info = {
        "texts": list(PROBE_TEXTS),
        "input_ids": probe["input_ids"].tolist(),
        "attention_mask": probe["attention_mask"].tolist(),
        "positions": positions,
        "merged_dtype": dtype,
        "dequantized": dequantize,
        "reference": f"the {q.bits}-bit adapter model ({describe(q)})",
        "quantization": quant,
        **diff,
    }
    gap = (
        f"merged model ({dtype}) vs the {q.bits}-bit adapter model it was trained as, on {positions} probe "
        f"positions: max |Δlogit| {diff['max_abs_logit_diff']:.4g}, mean {diff['mean_abs_logit_diff']:.4g} "
        f"(mean |logit| {diff['mean_abs_logit']:.4g})"
    )
    why = (
        f"the merge used the {dtype} base weights, not the {q.bits}-bit ones: the difference is the base's "
        "quantization error, which the adapter was trained around; nothing was re-quantized"
    )
    if dequantize:
        why = (
            f"merged into the dequantized {q.bits}-bit weights the adapter was trained with; what is left is "
            + (
                f"rounding (and the {dtype} cast)"
                if q.bits == 4
                else "LLM.int8's rounding of the activations inside every matmul, which no weights reproduce"
            )
        )
    lines = [gap, why]
    return {"probe": probe_info, "report_lines": lines}
