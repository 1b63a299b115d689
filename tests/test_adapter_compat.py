"""Classification adapters written by peft itself load here (issue 13).

peft writes ``modules_to_save: ["classifier", "score"]`` into every SEQ_CLS adapter, whatever head the
model has. Reference: the peft model that wrote the adapter (its logits); tolerances 1e-5 for the
loaded adapter (same fp32 computation, different module layout) and 1e-4 for the merged model
(the update is folded into the weights, so the matmuls round differently).
"""

from __future__ import annotations

import json
import logging

import kit
import peft
import pytest
import torch
import transformers

import peftcli
from peftcli.export import load_adapter, merge_adapter
from peftcli.methods.lora import LoRA, LoraConfig
from peftcli.models import resolve_model_name
from peftcli.recipe import RecipeError


def peft_classifier_adapter(arch: str, out_dir):
    """A LoRA SEQ_CLS adapter made by peft on tiny:<arch>, its weights moved off init; returns the
    peft model (eval mode) for reference logits."""
    base = resolve_model_name(f"tiny:{arch}")
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    model.config.pad_token_id = model.config.pad_token_id or 0
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear")
    peft_model = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init would make the LoRA part invisible
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(out_dir)
    peft_model.eval()
    return peft_model


@pytest.mark.parametrize(
    "arch, head, missing",
    [("bert", "classifier", "score"), pytest.param("llama", "score", "classifier", marks=pytest.mark.slow)],
)
def test_peft_seq_cls_adapter_loads_and_merges(arch, head, missing, tmp_path, caplog):
    peft_model = peft_classifier_adapter(arch, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(written["modules_to_save"]) == ["classifier", "score"]  # what peft writes
    inputs = kit.batch("causal_lm", peft_model.config.vocab_size, lengths=(10, 10, 10), seed=2, labels=False)
    with torch.no_grad():
        expected = peft_model(**inputs).logits

    with caplog.at_level(logging.WARNING, logger="peftcli"):
        model, _ = peftcli.load(tmp_path / "adapter")
    assert f"'{missing}'" in caplog.text and "skipped" in caplog.text
    with torch.no_grad():
        got = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the trained head really came from the adapter (not a fresh random head)
    peft_head = peft_model.base_model.model.get_submodule(head).modules_to_save["default"].weight
    torch.testing.assert_close(model.get_submodule(head).weight, peft_head, atol=0, rtol=0)

    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    merged.eval()
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
    torch.testing.assert_close(merged_logits, expected, atol=1e-4, rtol=0)


def test_recipe_typo_in_modules_to_save_is_still_an_error():
    base = resolve_model_name("tiny:bert")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    method = LoRA(LoraConfig(name="lora", r=4, modules_to_save=["clasifier"]), "seq_cls")
    with pytest.raises(RecipeError, match=r"method.modules_to_save: 'clasifier' matches no module"):
        method.attach(model)


def test_our_own_adapter_with_a_bad_modules_to_save_is_not_silently_fixed(tmp_path):
    """Only peft-written adapters are forgiven: with our sidecar the saved config is a recipe's."""
    peft_classifier_adapter("bert", tmp_path / "adapter")
    sidecar = {
        "method": "lora",
        "method_config": {"name": "lora", "r": 4, "alpha": 8.0, "modules_to_save": ["score"]},
        "task": "seq_cls",
        "model_name": "tiny:bert",
        "quantization": None,
        "label_names": None,
    }
    (tmp_path / "adapter" / "peftcli_adapter.json").write_text(json.dumps(sidecar))
    with pytest.raises(RecipeError, match="'score' matches no module"):
        load_adapter(tmp_path / "adapter")
