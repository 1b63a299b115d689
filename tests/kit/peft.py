"""peft as the oracle (a test dependency only): our adapter loaded by peft, our weights copied into peft,
and the logits both are compared on."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kit.batches import inputs
from peftcli.export import save_adapter


def logits(model, batch: dict[str, torch.Tensor], task: str = "causal_lm") -> torch.Tensor:
    """The model's logits without gradients; for causal_lm on the real (unpadded) positions only."""
    with torch.no_grad():
        out = model(**inputs(batch, task)).logits
    return out[batch["attention_mask"].bool()] if task == "causal_lm" else out


def peft_logits(peft_model, batch: dict[str, torch.Tensor], task: str = "causal_lm") -> torch.Tensor:
    """``logits`` of a peft model: for input prompts (prompt tuning, P-tuning) peft returns
    [B, n_virtual + T, V] on causal_lm; the real positions are the last T."""
    with torch.no_grad():
        out = peft_model(**inputs(batch, task)).logits
    if task != "causal_lm":
        return out
    return out[:, -batch["input_ids"].shape[1] :][batch["attention_mask"].bool()]


def perturb(model, seed: int = 1, scale: float = 0.05) -> None:
    """Move every trainable tensor to a random point, so forward comparisons see non-trivial adapters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def save(tmp_path: Path, model, method, tokenizer, base_path: str, recipe, labels=None) -> Path:
    """Our adapter written to ``tmp_path/adapter`` as ``peftcli train`` writes it."""
    return save_adapter(
        tmp_path / "adapter",
        model,
        method,
        tokenizer,
        base_path,
        recipe.model,
        labels,
        seed=recipe.train.seed,
    )


def load_in_peft(adapter_dir: Path, base_path: str, auto_class=None, **base_options):
    """Our adapter loaded by peft on the original base (fp32, CPU), as a user would."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    boft_in_torch()
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if config.get("peft_type") == "XLORA":  # peft's X-LoRA refuses a base that caches keys and values
        base_options.setdefault("use_cache", False)
    base = (auto_class or AutoModelForCausalLM).from_pretrained(
        base_path, dtype=torch.float32, **base_options
    )
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model


def copy_into_peft(peft_model, state: dict[str, torch.Tensor]) -> None:
    """Load our on-disk-named state into an in-memory peft model; every adapter key must land."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state)
    unexpected = list(getattr(result, "unexpected_keys", []))
    assert not unexpected, f"peft did not take {unexpected[:3]}"
    missing = [k for k in getattr(result, "missing_keys", []) if any(t in k for t in ("lora_", "ia3_"))]
    assert not missing, f"peft's adapter tensors left at init: {missing[:3]}"


class _TorchBlockDiagonal:
    """Stands in for peft's ``fbd_cuda`` extension (BOFT's block diagonal, compiled with nvcc where it
    can be): the same map in plain torch, so peft's butterfly code runs on the CPU as the oracle. Without
    it peft drops to ``boft_n_butterfly_factor: 1`` (and tries to compile on every layer it builds)."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad: torch.Tensor, blocks: torch.Tensor) -> list[torch.Tensor]:
        _, d, h, _ = blocks.shape
        views = [grad[:, i * h : (i + 1) * h, i * h : (i + 1) * h] for i in range(d)]
        return [torch.stack(views, dim=1)]


def boft_in_torch() -> None:
    """Let peft's BOFT build its butterfly on the CPU (idempotent; no effect on other methods)."""
    from peft.tuners.boft import layer

    if layer._FBD_CUDA is None:
        layer._FBD_CUDA = _TorchBlockDiagonal()
