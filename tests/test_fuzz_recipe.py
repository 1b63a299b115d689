"""Fuzzing the recipe loader and the override parser with hypothesis.

Property: any YAML tree, any YAML text and any list of ``key=value`` overrides ends in either a valid
:class:`Recipe` or a :class:`RecipeError` that is one line and names a key, never another exception.
Through the CLI (``peftcli validate``), a sample ends with exit code 0 or 2 and no traceback.

Case counts: ``PEFTCLI_FUZZ_EXAMPLES`` (default 200 per target, derandomized so CI is repeatable);
the ``slow``-marked variants run at least 1,000 random cases per target.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.methods.catalog import list_methods
from peftcli.recipe import Recipe, RecipeError, read_yaml
from peftcli.recipe_loader import build_recipe, load_recipe

CI_EXAMPLES = int(os.environ.get("PEFTCLI_FUZZ_EXAMPLES", "200"))
SLOW_EXAMPLES = max(1000, CI_EXAMPLES)
COMMON = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)
ci = settings(max_examples=CI_EXAMPLES, derandomize=True, **COMMON)
slow = settings(max_examples=SLOW_EXAMPLES, **COMMON)

SECTIONS = {
    f.name: [g.name for g in dataclasses.fields(f.default_factory())]
    for f in dataclasses.fields(Recipe)
    if f.default_factory is not dataclasses.MISSING
}
METHOD_KEYS = sorted({g.name for m in list_methods() for g in dataclasses.fields(m.config_cls)})
METHOD_NAMES = [m.name for m in list_methods()]
ALL_KEYS = sorted({k for keys in SECTIONS.values() for k in keys} | set(METHOD_KEYS))
DOTTED = [f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys] + [f"method.{k}" for k in METHOD_KEYS]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        ["3e-4", "1e400", "-1", "0", "auto", "cpu", "lora", "tiny:llama", "q_proj", ".nan", "yes", "~"]
    ),
    st.sampled_from(METHOD_NAMES),
    st.dates(min_value=datetime.date(1990, 1, 1), max_value=datetime.date(2030, 1, 1)),
)
keys = st.one_of(st.sampled_from(ALL_KEYS), st.text(max_size=12), st.integers(-3, 3), st.booleans())
trees = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=5)),
    max_leaves=12,
)


@st.composite
def recipe_trees(draw):
    """Mostly-plausible recipes: known sections and keys with values of any type, and some noise."""
    raw = {}
    for section, known in SECTIONS.items():
        if draw(st.booleans()):
            if draw(st.integers(0, 9)) == 0:
                raw[section] = draw(trees)
                continue
            names = draw(
                st.lists(st.sampled_from(known + (METHOD_KEYS if section == "method" else [])), max_size=6)
            )
            raw[section] = {name: draw(trees) for name in names}
    raw.setdefault("model", {}).__class__ is dict and draw(st.booleans()) and raw["model"].update(
        name="tiny:llama"
    )
    if isinstance(raw.get("data"), dict) and draw(st.booleans()):
        raw["data"]["train"] = "tests/data/completion.jsonl"
    if isinstance(raw.get("method"), dict) and draw(st.booleans()):
        raw["method"]["name"] = draw(st.sampled_from(METHOD_NAMES))
    if draw(st.integers(0, 4)) == 0:
        raw[draw(keys)] = draw(trees)
    return raw


overrides = st.lists(
    st.one_of(
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(DOTTED), st.text(max_size=15)),
        st.builds(
            lambda k, v: f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}",
            st.sampled_from(DOTTED),
            trees,
        ),
        st.text(max_size=25),
        st.builds(lambda k: f"{k}=1", st.text(max_size=12)),
    ),
    max_size=5,
)


def assert_clean(call):
    """``call()`` returns a Recipe or raises a one-line RecipeError naming a key; anything else fails."""
    try:
        recipe = call()
    except RecipeError as err:
        text = str(err)
        assert err.key, f"no key named: {text!r}"
        assert "\n" not in text and "\r" not in text, f"not one line: {text!r}"
        return None
    assert isinstance(recipe, Recipe)
    return recipe


def _load_tree(raw) -> Recipe:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw, allow_unicode=True))
        return load_recipe(path)


def check_tree(raw):
    assert_clean(lambda: _load_tree(raw))
    if isinstance(raw, dict):  # the Python API takes the same mapping without the YAML round trip
        assert_clean(lambda: build_recipe(raw))


def check_text(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(text)
        assert_clean(lambda: build_recipe(read_yaml(path)))


def check_overrides(items):
    assert_clean(lambda: load_recipe("recipes/tiny/lora.yaml", items))


@ci
@given(recipe_trees())
def test_recipe_trees(raw):
    check_tree(raw)


@ci
@given(st.one_of(st.text(max_size=200), trees.map(lambda t: yaml.safe_dump(t, allow_unicode=True))))
def test_recipe_text(text):
    check_text(text)


@ci
@given(overrides)
def test_overrides(items):
    check_overrides(items)


@pytest.mark.slow
@slow
@given(recipe_trees())
def test_recipe_trees_slow(raw):
    check_tree(raw)


@pytest.mark.slow
@slow
@given(st.one_of(st.text(max_size=400), trees.map(lambda t: yaml.safe_dump(t, allow_unicode=True))))
def test_recipe_text_slow(text):
    check_text(text)


@pytest.mark.slow
@slow
@given(overrides)
def test_overrides_slow(items):
    check_overrides(items)


@settings(max_examples=25, derandomize=True, **COMMON)
@given(recipe_trees(), overrides)
def test_cli_validate_exits_0_or_2_without_traceback(raw, items):
    """A sample through the real command: exit code 0 or 2, one error line, never a traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw, allow_unicode=True))
        result = CliRunner().invoke(app, ["validate", str(path), *items])
    output = result.output
    assert result.exit_code in (0, 2), (result.exit_code, output, result.exception)
    assert "Traceback" not in output
    if result.exit_code == 2:
        assert output.startswith("error: ") and output.count("error:") == 1


def test_yaml_tags_that_run_code_are_refused(tmp_path):
    """safe_load: a python/object tag is an error naming the recipe, and nothing runs."""
    marker = tmp_path / "ran"
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(RecipeError, match="recipe: .* is not valid YAML"):
        load_recipe(path)
    # An override value that is not safe YAML stays the literal text it was.
    recipe = load_recipe(
        "recipes/tiny/lora.yaml", [f"model.name=!!python/object/apply:os.system ['{marker}']"]
    )
    assert recipe.model.name.startswith("!!python/object/apply:os.system")
    assert not marker.exists()


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e400"])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(RecipeError, match=r"train.lr: expected a finite number"):
        load_recipe("recipes/tiny/lora.yaml", [f"train.lr={value}"])
