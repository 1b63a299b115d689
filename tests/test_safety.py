"""No surprise code execution, and no silently wrong tensors.

- a model directory with only pickle weights (.bin) is refused unless ``model.allow_pickle`` is set,
  which warns naming the model; safetensors directories load without a warning;
- ``trust_remote_code`` reaches transformers only when the recipe sets it, with a warning naming the model;
- no ``torch.load`` in the package without ``weights_only=True``, no pickle import (checked on the source);
- an adapter whose tensors have unexpected names, shapes or dtypes is refused with the names listed;
- a damaged adapter file is a one-line error, not a safetensors traceback.
"""

from __future__ import annotations

import ast
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from kit import EVAL
from safetensors.torch import load_file, save_file

import peftcli
from peftcli.checkpoint import check_tensors
from peftcli.models import load_model, resolve_model_name, weights_policy
from peftcli.recipe import ModelConfig, RecipeError, RecipeWarning


@pytest.fixture(scope="module")
def bin_only_model(tmp_path_factory):
    """tiny:llama saved as pytorch_model.bin (a pickle) and nothing else."""
    source = Path(resolve_model_name("tiny:llama"))
    target = tmp_path_factory.mktemp("bin-only")
    for file in source.iterdir():
        if file.suffix != ".safetensors" and file.is_file():
            shutil.copy(file, target / file.name)
    torch.save(load_file(str(source / "model.safetensors")), target / "pytorch_model.bin")
    return target


def test_pickle_only_model_dir_is_refused_by_default(bin_only_model):
    cfg = ModelConfig(name=str(bin_only_model))
    with pytest.raises(RecipeError) as err:
        load_model(str(bin_only_model), cfg, torch.device("cpu"))
    text = str(err.value)
    assert text.startswith("model.name: ") and "only pickle weights (pytorch_model.bin)" in text
    assert "model.allow_pickle: true" in text and "\n" not in text


def test_allow_pickle_loads_the_same_weights_with_a_warning(bin_only_model):
    cfg = ModelConfig(name=str(bin_only_model), allow_pickle=True)
    with pytest.warns(RecipeWarning, match=f"pickle weights pytorch_model.bin of {bin_only_model}"):
        model = load_model(str(bin_only_model), cfg, torch.device("cpu"))
    reference_path = resolve_model_name("tiny:llama")
    reference = load_model(reference_path, ModelConfig(name="tiny:llama"), torch.device("cpu"))
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_python_api_and_cli_honour_allow_pickle(bin_only_model):
    """peftcli.load and `peftcli eval` refuse a pickle-only model dir unless asked by name, as recipes do."""
    from typer.testing import CliRunner

    from peftcli.cli import app

    with pytest.raises(RecipeError, match="model.allow_pickle: true"):
        peftcli.load(bin_only_model)
    with pytest.warns(RecipeWarning, match="pickle weights pytorch_model.bin"):
        model, _ = peftcli.load(bin_only_model, allow_pickle=True)
    reference, _ = peftcli.load(resolve_model_name("tiny:llama"))
    ids = torch.tensor([[5, 9, 13, 21]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    data = EVAL
    refused = CliRunner().invoke(app, ["eval", str(bin_only_model), "--data", data, "--max-examples", "2"])
    assert refused.exit_code == 2 and "only pickle weights" in refused.output
    allowed = CliRunner().invoke(
        app, ["eval", str(bin_only_model), "--data", data, "--max-examples", "2", "--allow-pickle", "--json"]
    )
    assert allowed.exit_code == 0, allowed.output


def test_safetensors_model_loads_without_warning_and_asks_transformers_for_safetensors_only():
    path = resolve_model_name("tiny:llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        assert weights_policy(path, ModelConfig(name="tiny:llama")) == {"use_safetensors": True}


def test_trust_remote_code_only_when_set_and_with_a_warning(monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    path = resolve_model_name("tiny:llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)
        load_model(path, ModelConfig(name="tiny:llama"), torch.device("cpu"))
    with pytest.warns(RecipeWarning, match="trust_remote_code is set: tiny:llama may run code"):
        load_model(path, ModelConfig(name="tiny:llama", trust_remote_code=True), torch.device("cpu"))
    assert seen == [False, True]


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_no_unsafe_deserialisation_in_the_package():
    root = Path(peftcli.__file__).parent
    offenders = []
    for file in root.rglob("*.py"):
        tree = ast.parse(file.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal") for n in names):
                    offenders.append(f"{file.name}: imports {names}")
        for call in _calls(tree):
            func = ast.unparse(call.func)
            if func.endswith("torch.load"):
                ok = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in call.keywords
                )
                if not ok:
                    offenders.append(f"{file.name}:{call.lineno}: torch.load without weights_only=True")
            if func in ("eval", "exec", "yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                offenders.append(f"{file.name}:{call.lineno}: {func}")
            if any(
                k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value
                for k in call.keywords
            ):
                offenders.append(f"{file.name}:{call.lineno}: trust_remote_code=True hard-coded")
    assert offenders == []


def test_tensor_check_lists_names_shapes_and_dtypes():
    expected = {"a.weight": torch.zeros(4, 2), "b.weight": torch.zeros(3), "c.weight": torch.zeros(2)}
    found = {
        "a.weight": torch.zeros(4, 3),
        "b.weight": torch.zeros(3, dtype=torch.int64),
        "evil.weight": torch.zeros(1),
    }
    with pytest.raises(RecipeError) as err:
        check_tensors(found, expected, "adapter x")
    text = str(err.value)
    assert text.startswith("adapter x: its tensors do not fit this model")
    assert "unexpected: evil.weight" in text and "missing: c.weight" in text
    assert "wrong shape: a.weight (4, 3) (expected (4, 2))" in text
    assert "wrong dtype: b.weight int64 (expected float32)" in text
    # A bf16 copy of the right tensors is fine where only the dtype kind must match.
    check_tensors({k: v.bfloat16() for k, v in expected.items()}, expected, "adapter", exact_dtype=False)
    with pytest.raises(RecipeError, match="wrong dtype"):
        check_tensors({k: v.bfloat16() for k, v in expected.items()}, expected, "checkpoint")


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    from peftcli.recipe_loader import load_recipe
    from peftcli.training.loop import train

    run = tmp_path_factory.mktemp("run")
    recipe = load_recipe("recipes/tiny/lora.yaml", ["train.max_steps=1"], str(run))
    return train(recipe).adapter_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    "edit, listed",
    [
        (
            lambda sd: {**sd, "base_model.model.evil.lora_A.weight": torch.zeros(2, 2)},
            lambda first: (
                "its tensors do not fit this model (unexpected: base_model.model.evil.lora_A.weight)"
            ),
        ),
        (
            lambda sd: {k: v for i, (k, v) in enumerate(sorted(sd.items())) if i},
            lambda first: f"its tensors do not fit this model (missing: {first})",
        ),
        (  # the method's own loader names it first (LoRA checks shapes as it copies)
            lambda sd: {k: (v[:1] if i == 0 else v) for i, (k, v) in enumerate(sorted(sd.items()))},
            lambda first: f"{first} has shape (1, ",
        ),
        (
            lambda sd: {
                k: (v.to(torch.int32) if i == 0 else v) for i, (k, v) in enumerate(sorted(sd.items()))
            },
            lambda first: (
                f"its tensors do not fit this model (wrong dtype: {first} int32 (expected float32))"
            ),
        ),
    ],
)
def test_adapter_with_unexpected_tensors_is_refused(trained_adapter, tmp_path, edit, listed):
    from peftcli.export import load_adapter

    copy = tmp_path / "adapter"
    shutil.copytree(trained_adapter, copy)
    state = load_file(str(copy / "adapter_model.safetensors"))
    save_file(edit(state), str(copy / "adapter_model.safetensors"))
    first = min(state)
    with pytest.raises(RecipeError) as err:
        load_adapter(copy)
    assert str(err.value).startswith("adapter") and listed(first) in str(err.value), str(err.value)


@pytest.mark.slow
def test_truncated_adapter_file_is_one_line(trained_adapter, tmp_path):
    from peftcli.export import load_adapter

    copy = tmp_path / "adapter"
    shutil.copytree(trained_adapter, copy)
    weights = copy / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(RecipeError, match="is not a readable safetensors file"):
        load_adapter(copy)
