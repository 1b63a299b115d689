"""The promises every registered method keeps, checked on its own smoke recipe.

For each method ``<name>`` the model and options come from ``recipes/tiny/<name>.yaml``. Every
check runs in fp32 on the CPU with a fixed seed, and compares numbers:

- identity at init (where the method promises it): logits equal the base's, max abs diff ≤ 1e-6;
- the trainable-parameter count equals the method's own formula, and no base *weight* is trainable
  (base biases may be, for methods that train them);
- after one optimizer step every frozen tensor is bit-identical, and the trainable ones moved;
- save → load (``peftcli.export``) reproduces the logits, ≤ 1e-6;
- merge (where the method merges) reproduces the logits, ≤ 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftcli.export import load_adapter, save_adapter
from peftcli.methods.catalog import list_methods, method_for
from peftcli.models import build_model, load_model, load_tokenizer, resolve_model_name
from peftcli.recipe_loader import load_recipe
from peftcli.training.loop import token_loss_sum

ROOT = Path(__file__).resolve().parents[1]
METHODS = [cls.name for cls in list_methods()]
IDENTITY = [cls.name for cls in list_methods() if cls.identity_at_init]
MERGEABLE = [cls.name for cls in list_methods() if cls.mergeable]
LABELS = ["negative", "positive"]


def recipe_for(name: str, tmp_path: Path):
    path = ROOT / "recipes" / "tiny" / f"{name}.yaml"
    return load_recipe(path, [f"output_dir={tmp_path / 'run'}"])


def batch_for(task: str, vocab_size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, vocab_size, (2, 10), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # right padding on the second row
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if task == "seq_cls":
        batch["labels"] = torch.tensor([0, 1])
    elif task == "seq2seq":
        batch["labels"] = torch.randint(5, vocab_size, (2, 6), generator=gen)
    else:
        labels = input_ids.clone()
        labels[attention_mask == 0] = -100
        batch["labels"] = labels
    return batch


def logits_of(model, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    kwargs = {"labels": batch["labels"]} if task == "seq2seq" else {}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    logits = out.logits
    if task == "causal_lm":  # compare real (unpadded) positions only
        logits = logits[batch["attention_mask"].bool()]
    return logits


def build(name: str, tmp_path: Path):
    recipe = recipe_for(name, tmp_path)
    base_path = resolve_model_name(recipe.model.name)
    tokenizer = load_tokenizer(base_path, recipe.model)
    labels = LABELS if recipe.model.task == "seq_cls" else None
    method = method_for(recipe)
    model = build_model(
        base_path,
        recipe.model,
        method,
        torch.device("cpu"),
        seed=recipe.train.seed,
        label_names=labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.eval()
    return recipe, base_path, tokenizer, model, method, labels


def one_step(model, method, batch, task) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    kwargs = {"labels": batch["labels"]} if task == "seq2seq" else {}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    loss_sum, n = token_loss_sum(out.logits, batch["labels"], task)
    loss = loss_sum / n
    extra = method.extra_loss(model)
    if extra is not None:
        loss = loss + extra
    loss.backward()
    method.after_backward(model, 0)
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


def test_every_method_has_a_smoke_recipe():
    missing = [n for n in METHODS if not (ROOT / "recipes" / "tiny" / f"{n}.yaml").exists()]
    assert not missing, f"methods without recipes/tiny/<name>.yaml: {missing}"


@pytest.mark.parametrize("name", IDENTITY)
def test_identity_at_init(name, tmp_path):
    recipe, base_path, tokenizer, model, _method, labels = build(name, tmp_path)
    base = load_model(
        base_path, recipe.model, torch.device("cpu"), label_names=labels, pad_token_id=tokenizer.pad_token_id
    )
    base.eval()
    if recipe.model.task == "seq_cls":  # the head is new and random: give both the same head
        head_state = {k: v for k, v in model.state_dict().items() if k.startswith(("classifier", "score"))}
        base.load_state_dict(head_state, strict=False)
    batch = batch_for(recipe.model.task, base.config.vocab_size)
    with torch.no_grad():
        diff = (
            (logits_of(model, batch, recipe.model.task) - logits_of(base, batch, recipe.model.task))
            .abs()
            .max()
        )
    assert diff.item() <= 1e-6


@pytest.mark.parametrize("name", METHODS)
def test_trainable_parameters_match_formula_and_no_base_weight_trains(name, tmp_path):
    recipe, base_path, tokenizer, model, method, labels = build(name, tmp_path)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "a method must train something"
    assert sum(p.numel() for p in trainable.values()) == method.expected_trainable_parameters(model)
    base = load_model(
        base_path, recipe.model, torch.device("cpu"), label_names=labels, pad_token_id=tokenizer.pad_token_id
    )
    base_weight_names = {n for n, _ in base.named_parameters() if not n.endswith("bias")}
    assert base_weight_names
    # Base weights may train only as whole-module copies the method declares (modules_to_save).
    saved = tuple(f"{m}." for m in method.saved_modules)
    for n in trainable:
        # Methods that wrap the model (soft prompts) hold it as `base_model`: compare in base naming.
        plain = n.replace(".base_layer.", ".")
        plain = (
            plain.removeprefix("base_model.")
            if plain.removeprefix("base_model.") in base_weight_names
            else plain
        )
        assert plain not in base_weight_names or plain.startswith(saved), f"base weight {n} is trainable"


@pytest.mark.parametrize("name", METHODS)
def test_step_moves_adapter_and_leaves_base_bit_identical(name, tmp_path):
    recipe, _base_path, _tokenizer, model, method, _labels = build(name, tmp_path)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = batch_for(recipe.model.task, model.config.vocab_size)
    one_step(model, method, batch, recipe.model.task)
    params = dict(model.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(params[n], before), f"frozen {n} changed"
    moved = [n for n, before in trained.items() if not torch.equal(params[n], before)]
    assert moved, "no trainable parameter moved after a step"


@pytest.mark.parametrize("name", METHODS)
def test_save_then_load_gives_equal_logits(name, tmp_path):
    recipe, base_path, tokenizer, model, method, labels = build(name, tmp_path)
    task = recipe.model.task
    batch = batch_for(task, model.config.vocab_size)
    one_step(model, method, batch, task)  # move away from init so the check is not trivial
    with torch.no_grad():
        ours = logits_of(model, batch, task)
    save_adapter(tmp_path / "adapter", model, method, tokenizer, base_path, recipe.model, labels)
    loaded = load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        again = logits_of(loaded.model, batch, task)
    assert (ours - again).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", MERGEABLE)
def test_merge_gives_equal_logits(name, tmp_path):
    recipe, _base_path, _tokenizer, model, method, _labels = build(name, tmp_path)
    task = recipe.model.task
    batch = batch_for(task, model.config.vocab_size)
    one_step(model, method, batch, task)
    with torch.no_grad():
        ours = logits_of(model, batch, task)
        merged = method.merge(model)
        assert not any(p.requires_grad for p in merged.parameters())
        after = logits_of(merged, batch, task)
    assert (ours - after).abs().max().item() <= 1e-4
