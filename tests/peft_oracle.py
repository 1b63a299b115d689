"""Helpers shared by the method tests that use peft as the oracle (peft is a test dependency only)."""

from __future__ import annotations

from pathlib import Path

import torch

from peftcli.export import save_adapter
from peftcli.methods.catalog import method_for
from peftcli.models import build_model, load_model, load_tokenizer, resolve_model_name
from peftcli.recipe_loader import load_recipe
from peftcli.training.loop import token_loss_sum

ROOT = Path(__file__).resolve().parents[1]


def build(recipe_name: str, tmp_path: Path, overrides: list[str] | None = None):
    """(recipe, base_path, tokenizer, model, method) for ``recipes/tiny/<recipe_name>.yaml`` + overrides."""
    recipe = load_recipe(
        ROOT / "recipes" / "tiny" / f"{recipe_name}.yaml",
        [f"output_dir={tmp_path / 'run'}", *(overrides or [])],
    )
    base_path = resolve_model_name(recipe.model.name)
    tokenizer = load_tokenizer(base_path, recipe.model)
    method = method_for(recipe)
    model = build_model(
        base_path,
        recipe.model,
        method,
        torch.device("cpu"),
        seed=recipe.train.seed,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.eval()
    return recipe, base_path, tokenizer, model, method


def base_model(base_path: str, recipe):
    model = load_model(base_path, recipe.model, torch.device("cpu"), pad_token_id=None)
    model.eval()
    return model


def batch_of(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (2, 12), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits[batch["attention_mask"].bool()]


def train_steps(model, method, batch, steps: int = 1, lr: float = 1e-2, start_step: int = 0) -> None:
    """Plain AdamW steps with the method's hooks in the loop's order (so weights are non-trivial)."""
    model.train()
    optimizer = torch.optim.AdamW(method.param_groups(model, lr, 0.0), lr=lr)
    for step in range(start_step, start_step + steps):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss_sum, n = token_loss_sum(out.logits, batch["labels"], "causal_lm")
        loss = loss_sum / n
        extra = method.extra_loss(model)
        if extra is not None:
            loss = loss + extra
        loss.backward()
        method.after_backward(model, step)
        optimizer.step()
        method.after_step(model, step)
        optimizer.zero_grad()
    model.eval()


def perturb(model, seed: int = 1, scale: float = 0.05) -> None:
    """Move every trainable tensor to a random point, so forward comparisons see non-trivial adapters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def save(tmp_path: Path, model, method, tokenizer, base_path: str, recipe) -> Path:
    return save_adapter(tmp_path / "adapter", model, method, tokenizer, base_path, recipe.model)


def load_in_peft(adapter_dir: Path, base_path: str):
    """Our adapter loaded by peft on the original base (fp32, CPU), as a user would."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
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
