"""peft parity both ways, the shape every method file's option table shares.

- :func:`peft_loads_ours`: our adapter, moved off its init, saved as ``peftcli train`` saves it and loaded
  by peft on the original base; returns both sides' logits difference (and the built model and peft's).
- :func:`we_load_peft`: an adapter peft makes with a config, moved off its init and saved, loaded by
  ``peftcli.export.load_adapter`` and merged by ``peftcli merge``; returns both differences.

Each asserts the adapter is not trivial (it moves the logits by more than 1e-3), so a parity of 0 means
something; the tolerances are the caller's (the issue's: 1e-5 for logits, 1e-4 for a merge).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kit.batches import batch
from kit.models import TASK_MODELS, Built, base_model, build
from kit.peft import boft_in_torch, load_in_peft, logits, peft_logits, perturb, save
from peftcli.export import load_adapter, merge_adapter
from peftcli.models import resolve_model_name

PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}


def auto_class(task: str):
    """transformers' auto class for a task, as a user loads the base for peft."""
    import transformers

    return {
        "causal_lm": transformers.AutoModelForCausalLM,
        "seq_cls": transformers.AutoModelForSequenceClassification,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
    }[task]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@dataclass
class OursInPeft:
    built: Built
    peft_model: Any
    diff: float  # max |our logits − peft's| on the probe batch


def peft_loads_ours(method: str, tmp_path: Path, overrides: list[str] | None = None) -> OursInPeft:
    built = build(method, tmp_path, overrides)
    perturb(built.model)
    probe = batch(built.task, built.model.config.vocab_size, lengths=(10, 7))
    ours = logits(built.model, probe, built.task)
    base = base_model(built.base_path, built.recipe, pad_token_id=built.tokenizer.pad_token_id)
    assert max_diff(ours, logits(base, probe, built.task)) > 1e-3  # the adapter is not trivial
    adapter = save(
        tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe, built.labels
    )
    extra = {"num_labels": len(built.labels)} if built.labels else {}
    theirs = load_in_peft(adapter, built.base_path, auto_class(built.task), **extra)
    return OursInPeft(built, theirs, max_diff(ours, peft_logits(theirs, probe, built.task)))


@dataclass
class PeftInOurs:
    method: str  # the method peftcli read the adapter as
    loaded: float  # max |peft's logits − ours, loaded|
    merged: float | None  # max |peft's logits − the model `peftcli merge` wrote| (None: not merged)


def we_load_peft(
    config_cls, task: str, tmp_path: Path, model_name: str | None = None, merges: bool = True, **options
) -> PeftInOurs:
    """``config_cls(task_type=..., **options)`` on the task's tiny model (or ``model_name``); with
    ``merges: False`` (a method that does not merge) no ``peftcli merge``."""
    import peft

    boft_in_torch()
    torch.manual_seed(0)
    extra = {"num_labels": 2} if task == "seq_cls" else {}
    name = resolve_model_name(model_name or TASK_MODELS[task])
    base = auto_class(task).from_pretrained(name, dtype=torch.float32, **extra)
    peft_model = peft.get_peft_model(base, config_cls(task_type=PEFT_TASK_TYPES[task], **options))
    perturb(peft_model, seed=2)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()
    probe = batch(task, peft_model.config.vocab_size, lengths=(10, 7))
    theirs = peft_logits(peft_model, probe, task)
    with peft_model.disable_adapter():
        assert max_diff(theirs, peft_logits(peft_model, probe, task)) > 1e-3  # the adapter is not trivial
    loaded = load_adapter(tmp_path / "adapter")
    ours = max_diff(theirs, logits(loaded.model, probe, task))
    if not merges:
        return PeftInOurs(loaded.method.name, ours, None)
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")  # peftcli merge of peft's adapter
    merged = auto_class(task).from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    return PeftInOurs(loaded.method.name, ours, max_diff(theirs, logits(merged, probe, task)))
