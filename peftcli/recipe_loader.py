"""Load a recipe: YAML, ``key=value`` overrides, then every section validated against its schema, the
method section against the schema of the method that ``method.name`` names.

The schema itself is :mod:`peftcli.recipe`, which imports no other peftcli module; resolving the method
section needs the method catalog, so it happens here, one layer above both.
"""

from __future__ import annotations

from pathlib import Path

from peftcli.methods.catalog import get_method_class
from peftcli.recipe import (
    REQUIRED,
    Recipe,
    RecipeError,
    apply_overrides,
    cross_checks,
    expand_path,
    from_dict,
    looks_local,
    read_yaml,
    show,
)
from peftcli.tiny import parse_tiny


def build_recipe(raw: dict, source: str | None = None) -> Recipe:
    """Validate a raw mapping into a :class:`Recipe` (the method section by its own schema)."""
    raw = dict(raw)
    method_raw = raw.pop("method", None)
    if method_raw is None:
        method_raw = {}
    if not isinstance(method_raw, dict):
        raise RecipeError(
            "method", f"expected a mapping, got {show(method_raw)}", "e.g. method: {name: lora, r: 8}"
        )
    recipe = from_dict(Recipe, raw, "")
    name = method_raw.get("name", "lora")
    method_cls = get_method_class(str(name))  # RecipeError with did-you-mean on a typo
    recipe.method = from_dict(method_cls.config_cls, method_raw, "method")
    recipe.method.name = method_cls.name
    for key in sorted(REQUIRED):
        section, name_ = key.split(".")
        if not getattr(getattr(recipe, section), name_):
            raise RecipeError(
                key, "is required", f"set {key} in the recipe or as {key}=... on the command line"
            )
    if not recipe.output_dir:
        stem = Path(source).stem if source else "run"
        recipe.output_dir = str(Path("runs") / stem)
    cross_checks(recipe)
    if recipe.model.quantization is not None and not method_cls.supports_quantized_base:
        raise RecipeError(
            "model.quantization",
            f"method {method_cls.name} cannot train on a quantized base",
            "remove model.quantization, or pick a method that can (lora)",
        )
    if recipe.train.packing and not method_cls.supports_packing:
        raise RecipeError(
            "train.packing",
            f"method {method_cls.name} {method_cls.packing_refusal}",
            "set train.packing: false (train.group_by_length: true also cuts padding)",
        )
    method_cls.validate_config(recipe.method, recipe)
    return recipe


def load_recipe(
    path: str | Path, overrides: list[str] | None = None, output_dir: str | None = None
) -> Recipe:
    raw = read_yaml(path)
    raw = apply_overrides(raw, overrides or [])
    if output_dir:
        raw["output_dir"] = output_dir
    return build_recipe(raw, source=str(path))


def recipe_from_dict(raw: dict, overrides: list[str] | None = None) -> Recipe:
    raw = apply_overrides(dict(raw), overrides or [])
    return build_recipe(raw)


def validate_files(recipe: Recipe) -> None:
    """Check that local paths the recipe names exist (hub ids are left for load time)."""
    name = recipe.model.name
    if parse_tiny(name) is None and looks_local(name) and not Path(expand_path(name)).is_dir():
        raise RecipeError(
            "model.name", f"model directory not found: {name}", "check the path or use a hub id"
        )
    adapter = recipe.model.adapter
    if adapter and not Path(expand_path(adapter)).is_dir():
        raise RecipeError(
            "model.adapter",
            f"adapter directory not found: {adapter}",
            "point at a run's adapter (RUN/adapter)",
        )
    paths = [(f"data.train[{i}].path", source.path) for i, source in enumerate(recipe.data.sources())]
    if isinstance(recipe.data.train, str):
        paths = [("data.train", recipe.data.train)]
    for key, value in [*paths, ("data.eval", recipe.data.eval)]:
        if value and looks_local(value) and not Path(expand_path(value)).exists():
            raise RecipeError(
                key,
                f"file not found: {value}",
                "check the path (relative paths are relative to where you run peftcli)",
            )
