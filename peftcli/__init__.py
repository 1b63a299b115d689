"""peftcli: parameter-efficient fine-tuning of Hugging Face models from YAML recipes.

``import peftcli`` stays light (no torch) so the CLI starts fast; the API loads on first use.
"""

__version__ = "0.1.0"
__all__ = [
    "RecipeError",
    "__version__",
    "chat",
    "combine",
    "evaluate_target",
    "evaluate_tasks",
    "generate",
    "load",
    "merge",
    "train",
]


def __getattr__(name: str):
    if name in ("load", "train", "merge", "combine", "evaluate_target", "evaluate_tasks", "generate", "chat"):
        from peftcli import api

        return getattr(api, name)
    if name == "RecipeError":
        from peftcli.recipe import RecipeError

        return RecipeError
    raise AttributeError(name)
