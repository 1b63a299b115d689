"""Where things are: the repository, its recipes, the tiny smoke recipes and the test data."""

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
TINY = RECIPES / "tiny"  # one smoke recipe per method: recipes/tiny/<name>.yaml
DATA = ROOT / "tests" / "data"  # small files in every supported format
TRAIN = str(RECIPES / "data" / "tiny_train.jsonl")  # "reverse apple =" -> " elppa"
EVAL = str(RECIPES / "data" / "tiny_eval.jsonl")
HELPERS = ROOT / "tests" / "helpers"  # scripts run in a subprocess (kill / pause after a checkpoint)
CPU = torch.device("cpu")
