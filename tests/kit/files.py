"""Files tests write: JSONL data and whole recipes for end-to-end runs on the tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from kit.paths import EVAL, TRAIN


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_recipe(directory: Path, output_dir: bool = True, **sections: dict) -> Path:
    """``directory/recipe.yaml``: LoRA on tiny:llama over the tiny reverse-words data (completion format),
    without generation; each keyword replaces keys of that section (model, data, method, train, eval).
    The run goes to ``directory/run`` unless ``output_dir`` is false (then the caller passes ``-o``)."""
    recipe = {
        "model": {"name": "tiny:llama"},
        "data": {"train": TRAIN, "eval": EVAL, "format": "completion"},
        "method": {"name": "lora"},
        "train": {},
        "eval": {"generate": False},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    if output_dir:
        recipe["output_dir"] = str(directory / "run")
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
