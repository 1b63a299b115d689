"""Train the two tiny LoRA experts that recipes/tiny/xlora.yaml mixes (offline, about a minute on a CPU).

    python recipes/tiny/xlora_experts/make_experts.py

- ``reverse/``: LoRA (r 4 on q_proj, v_proj, down_proj) on tiny:llama trained on
  recipes/data/tiny_train.jsonl ("reverse apple =" -> " elppa");
- ``upper/``: the same on recipes/data/tiny_upper_train.jsonl ("upper apple =" -> " APPLE").

Only adapter_config.json, adapter_model.safetensors and peftcli_adapter.json are kept (a few KB each),
with ``base_model_name_or_path: tiny:llama``: the tiny model lives in a per-machine cache and peftcli
rebuilds it from that name. The experts are committed, so the recipe runs from a fresh clone.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from peftcli.api import train
from peftcli.recipe_loader import recipe_from_dict

EXPERTS = {"reverse": "recipes/data/tiny_train.jsonl", "upper": "recipes/data/tiny_upper_train.jsonl"}
KEEP = ("adapter_config.json", "adapter_model.safetensors", "peftcli_adapter.json")


def expert_recipe(train_file: str, output_dir: str) -> dict:
    return {
        "model": {"name": "tiny:llama", "task": "causal_lm"},
        "data": {"train": train_file, "format": "completion", "max_length": 64},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "train": {
            "max_steps": 60,
            "batch_size": 16,
            "lr": 2.0e-2,
            "scheduler": "cosine",
            "warmup_steps": 4,
            "seed": 0,
        },
        "eval": {"generate": False},
        "output_dir": output_dir,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in EXPERTS.items():
            result = train(recipe_from_dict(expert_recipe(data, f"{tmp}/{name}")))
            print(f"{name}: train loss {result.first_loss:.3f} -> {result.last_loss:.3f}")
            target = HERE / name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            for file in KEEP:
                shutil.copy(result.adapter_dir / file, target / file)
            config = json.loads((target / "adapter_config.json").read_text())
            config["base_model_name_or_path"] = "tiny:llama"
            (target / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
