"""Train the two tiny stage-one adapters that recipes/tiny/adapter_fusion.yaml fuses (offline, ~1 min on a CPU).

    python recipes/tiny/fusion_sources/make_sources.py

- ``reverse/``: a Pfeiffer adapter (houlsby_adapter, config: pfeiffer) on tiny:llama trained on
  recipes/data/tiny_train.jsonl ("reverse apple =" -> " elppa").
- ``upper/``: the same on recipes/data/tiny_upper_train.jsonl ("upper apple =" -> " APPLE"), written here.

Only adapter_config.json, adapter_model.safetensors and peftcli_adapter.json are kept (a few KB each).
``base_model_name_or_path`` is set to ``tiny:llama``: the tiny model lives in a per-machine cache, and
peftcli rebuilds it from that name (the sidecar's ``model_name``).
"""

import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from peftcli.api import train
from peftcli.recipe_loader import recipe_from_dict

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "light",
    "table",
    "music",
    "ocean",
    "tiger",
    "house",
    "bread",
    "chair",
    "dream",
    "earth",
    "flame",
    "grape",
    "heart",
    "lemon",
    "night",
]
KEEP = ("adapter_config.json", "adapter_model.safetensors", "peftcli_adapter.json")


def write_upper_data() -> Path:
    rng = random.Random(1)
    pairs = [{"prompt": f"upper {w} =", "completion": f" {w.upper()}"} for w in WORDS]
    path = ROOT / "recipes" / "data" / "tiny_upper_train.jsonl"
    path.write_text("".join(json.dumps(rng.choice(pairs)) + "\n" for _ in range(256)))
    return path


def source_recipe(train_file: str, output_dir: str) -> dict:
    return {
        "model": {"name": "tiny:llama", "task": "causal_lm"},
        "data": {"train": train_file, "format": "completion", "max_length": 64},
        "method": {"name": "houlsby_adapter", "config": "pfeiffer", "bottleneck_size": 16},
        "train": {
            "max_steps": 40,
            "batch_size": 16,
            "lr": 3.0e-3,
            "scheduler": "cosine",
            "warmup_steps": 4,
            "log_every": 5,
            "seed": 0,
        },
        "eval": {"generate": False},
        "output_dir": output_dir,
    }


def main() -> None:
    upper = write_upper_data()
    sources = {"reverse": "recipes/data/tiny_train.jsonl", "upper": str(upper.relative_to(ROOT))}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in sources.items():
            result = train(recipe_from_dict(source_recipe(data, f"{tmp}/{name}")))
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
