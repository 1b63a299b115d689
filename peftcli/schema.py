"""The recipe as a JSON Schema (draft 2020-12), generated from the dataclasses in ``peftcli.recipe``
and each method's ``config_cls``, so editors complete and check recipes (YAML language server).

    peftcli schema                                   # print it
    peftcli schema --output schema/recipe.schema.json

The schema mirrors what ``peftcli.recipe.coerce`` accepts: a number may also be written as a string
that looks like one (PyYAML reads ``3e-4`` as a string), a boolean as yes/no/on/off, a list of names
as a single name. Cross-field checks (``validate_config``, ``_cross_checks``) and local files stay
with ``peftcli validate``; the schema is the typing and spelling half.

``schema/recipe.schema.json`` is the committed copy the shipped recipes point at; a test fails when
it differs from what this module generates.

Why the recipe stays dataclasses rather than pydantic v2 (issue 13 asked): the generator below is ~100
lines. pydantic 2.14 would give the schema (and a discriminated union for ``method``) for free, but not
the same strictness or messages: it rejects ``bits: "4"`` (Literal), ``max_steps: "1e3"`` and a single
name for a list, which the recipe accepts, says "Extra inputs are not permitted" with no did-you-mean,
and writes ``type: number`` for ``lr`` (so a PyYAML-read ``3e-4`` fails its own schema). Matching ours
needs before-validators, an error translator to ``RecipeError`` and schema overrides, plus a rewrite of
the 21 config classes and ``peftcli.docs``: more code of ours than this module, for the same behaviour.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from peftcli.methods.catalog import list_methods
from peftcli.recipe import REQUIRED, Recipe, _type_name, resolved_types, to_dict

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "schema" / "recipe.schema.json"

# The same grammar as ``peftcli.recipe._NUMBER``, in ECMA-262 syntax for JSON Schema.
NUMBER_STRING = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"
BOOLEAN_STRING = r"^([Tt]rue|TRUE|[Ff]alse|FALSE|[Yy]es|YES|[Nn]o|NO|[Oo]n|ON|[Oo]ff|OFF)$"


def _limits(meta: dict[str, Any]) -> dict[str, Any]:
    limits = {}
    if "min" in meta:
        limits["minimum"] = meta["min"]
    if "max" in meta:
        limits["maximum"] = meta["max"]
    if "min_exclusive" in meta:
        limits["exclusiveMinimum"] = meta["min_exclusive"]
    return limits


def type_schema(tp: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """The schema of one annotation; ``meta`` carries the field's min/max (applied to numbers)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        branches = [type_schema(arg, meta) for arg in typing.get_args(tp) if arg is not type(None)]
        if type(None) in typing.get_args(tp):
            branches.append({"type": "null"})
        return branches[0] if len(branches) == 1 else {"anyOf": branches}
    if origin is Literal:
        choices = list(typing.get_args(tp))
        return {"enum": choices + [str(c) for c in choices if isinstance(c, int)]}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        items = type_schema(item_tp, meta)
        array = {"type": "array", "items": items}
        return {"anyOf": [array, items]} if item_tp is str else array  # a single name is a list of one
    if origin is dict:
        _, value_tp = typing.get_args(tp)
        return {"type": "object", "additionalProperties": type_schema(value_tp, meta)}
    if dataclasses.is_dataclass(tp):
        return section_schema(tp)
    if tp is Any:
        return {}
    if tp is bool:
        return {"anyOf": [{"type": "boolean"}, {"type": "string", "pattern": BOOLEAN_STRING}]}
    if tp in (int, float):
        number = {"type": "integer" if tp is int else "number", **_limits(meta)}
        return {"anyOf": [number, {"type": "string", "pattern": NUMBER_STRING}]}
    if tp is str:  # coerce turns any scalar into a string (a revision written as 2024)
        return {"type": ["string", "number", "boolean"]}
    raise TypeError(f"unsupported annotation {tp!r}")  # a schema bug, as in recipe.coerce


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return to_dict(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return to_dict(f.default_factory())  # type: ignore[misc]
    return None


def section_schema(cls: type, skip: tuple[str, ...] = (), path: str = "") -> dict[str, Any]:
    """An object with one property per dataclass field and nothing else."""
    hints = resolved_types(cls)
    properties = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        prop = {"description": f.metadata.get("help", ""), **type_schema(hints[f.name], f.metadata)}
        full = f"{path}.{f.name}" if path else f.name
        if full in REQUIRED:
            prop["description"] += " (required: here or as an override on the command line)"
        elif not dataclasses.is_dataclass(hints[f.name]):
            prop["default"] = _default(f)
        properties[f.name] = prop
    return {"type": "object", "properties": properties, "additionalProperties": False}


def method_schema() -> dict[str, Any]:
    """One branch per registered method, told apart by ``name: {const: ...}`` (absent name = lora)."""
    branches = []
    for cls in list_methods():
        branch = section_schema(cls.config_cls, path="method")
        branch["title"] = cls.name
        branch["description"] = cls.description
        branch["properties"]["name"] = {"const": cls.name, "description": cls.description}
        if cls.name != "lora":
            branch["required"] = ["name"]
        branches.append(branch)
    return {
        "description": "the PEFT method and its options; method.name picks the method (default lora)",
        "type": "object",
        "oneOf": branches,
    }


def recipe_schema() -> dict[str, Any]:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "peftcli recipe",
        "description": "A peftcli training recipe (`peftcli validate` also checks cross-field rules and files).",
    }
    hints = resolved_types(Recipe)
    properties = {}
    for f in dataclasses.fields(Recipe):
        if f.name == "method":
            properties["method"] = method_schema()
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            properties[f.name] = {"description": f.metadata["help"], **section_schema(tp, path=f.name)}
        else:
            properties[f.name] = {
                "description": f.metadata["help"],
                "default": _default(f),
                **type_schema(tp, f.metadata),
            }
    schema.update({"type": "object", "properties": properties, "additionalProperties": False})
    return schema


def schema_text() -> str:
    return json.dumps(recipe_schema(), indent=2, ensure_ascii=False) + "\n"


def methods_as_json() -> list[dict[str, Any]]:
    """The registry as data, for `peftcli methods --json`."""
    out = []
    for cls in list_methods():
        hints = resolved_types(cls.config_cls)
        options = []
        for f in dataclasses.fields(cls.config_cls):
            if f.name == "name":
                continue
            option = {
                "name": f.name,
                "type": _type_name(hints[f.name]),
                "default": _default(f),
                "help": f.metadata.get("help", ""),
                **_limits(f.metadata),
            }
            options.append(option)
        out.append(
            {
                "name": cls.name,
                "description": cls.description,
                "mergeable": cls.mergeable,
                "peft_type": cls.peft_type,
                "supports_quantized_base": cls.supports_quantized_base,
                "trainable_formula": cls.trainable_formula,
                "options": options,
            }
        )
    return out
