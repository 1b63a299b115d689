"""``peftcli combine``: LoRA adapters combined into one, against peft's ``add_weighted_adapter``.

References and tolerances (fp32, CPU, fixed seeds; adapters of rank 4 and 8 on tiny:llama, made by
``kit.build`` + ``kit.perturb`` + ``kit.save``):
- peft 0.21's ``PeftModel.add_weighted_adapter`` with the same adapters, weights and options: the
  combined adapter's tensors ≤ 1e-4 and the logits ≤ 1e-4, for linear, cat, svd, ties and
  magnitude_prune. svd's singular vectors are defined up to a sign per pair, so those tensors are
  compared after matching each pair's sign (and B·A with none);
- dare_linear / dare_ties: peft draws its masks from torch's global generator after its own layer inits,
  so no seed of ours reproduces them; with peft's ``torch.bernoulli`` handed our masks (in peft's order),
  the tensors and logits equal peft's ≤ 1e-4. The defining properties without peft: a kept entry is
  the input divided by the density, the expected value is the input (the mean over 2000 seeds within
  5 standard errors of every entry) and the kept fraction is the density (± 0.01);
- peft loads our combined adapter with our logits (≤ 1e-4), and ``peftcli merge`` of it gives them too
  (the merged model's logits ≤ 1e-4);
- the refusals are one RecipeError line naming the problem.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from kit import base_model, batch_of, build, load_in_peft, logits, perturb, save
from safetensors.torch import load_file
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.combining import combine_adapters, dare_seed, drop_and_rescale, keep_largest, parse_weights
from peftcli.export import load_adapter
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

# name -> (tiny recipe, overrides, perturbation seed): two of rank 4 with different scales, one of rank 8
ADAPTERS = {
    "r4": ("lora", ["method.r=4", "method.alpha=8"], 1),
    "r4b": ("lora", ["method.r=4", "method.alpha=16"], 2),
    "r8": ("lora", ["method.r=8", "method.alpha=16"], 3),
}
TOLERANCE = 1e-4


def make_adapter(root: Path, name: str, recipe: str, overrides: list[str], seed: int) -> Path:
    built = build(recipe, root / name, overrides)
    perturb(built.model, seed=seed, scale=0.2)  # B ≠ 0: every adapter moves the logits
    return save(root / name, built.model, built.method, built.tokenizer, built.base_path, built.recipe)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(root, name, *spec) for name, spec in ADAPTERS.items()}


@pytest.fixture(scope="module")
def base():
    built = build("lora")
    return built.base_path, built.recipe, batch_of(built.model.config.vocab_size)


def peft_combined(paths: list[Path], weights: list[float], how: str, base_path: str, **options):
    """peft's own combination: the adapters loaded side by side, ``add_weighted_adapter``, set active."""
    from peft import get_peft_model_state_dict

    model = load_in_peft(paths[0], base_path)
    for index, path in enumerate(paths[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{index}")
    names = ["default", *(f"a{i}" for i in range(1, len(paths)))]
    model.add_weighted_adapter(names, weights, "combined", combination_type=how, **options)
    model.set_adapter("combined")
    model.eval()
    return model, get_peft_model_state_dict(model, adapter_name="combined")


def our_combined(tmp_path: Path, paths: list[Path], weights: list[float], how: str, **options):
    out = combine_adapters(paths, weights, how, tmp_path / "combined", **options)["output"]
    return Path(out), load_file(str(Path(out) / "adapter_model.safetensors"))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_same_tensors(ours: dict, theirs: dict, svd: bool = False) -> None:
    assert sorted(ours) == sorted(theirs)
    for key in sorted(ours):
        if not key.endswith("lora_B.weight"):
            continue
        a_key = key.replace("lora_B", "lora_A")
        b, a, peft_b, peft_a = ours[key], ours[a_key], theirs[key], theirs[a_key]
        assert max_diff(b @ a, peft_b @ peft_a) <= TOLERANCE, key
        if svd:  # each singular pair's sign is free: take peft's before comparing the factors
            sign = torch.sign((b * peft_b).sum(dim=0))
            sign[sign == 0] = 1
            b, a = b * sign, a * sign[:, None]
        assert max_diff(b, peft_b) <= TOLERANCE, key
        assert max_diff(a, peft_a) <= TOLERANCE, a_key


CASES = {  # mode -> (adapters, weights, options)
    "linear": (["r4", "r4b"], [0.7, 0.3], {}),
    "linear_negative": (["r4", "r4b"], [1.0, -0.5], {}),
    "cat": (["r4", "r8"], [0.7, 0.3], {}),
    "svd": (["r4", "r8"], [0.7, 0.3], {}),
    "ties": (["r4", "r4b"], [0.7, 0.3], {"density": 0.5}),
    "ties_frequency": (["r4", "r4b"], [1.0, 1.0], {"density": 0.3, "majority_sign": "frequency"}),
    "magnitude_prune": (["r4", "r4b"], [0.7, 0.3], {"density": 0.5}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_combined_adapter_equals_peft(case, adapters, base, tmp_path):
    names, weights, options = CASES[case]
    how = case.split("_")[0] if case not in ("magnitude_prune",) else case
    base_path, recipe, batch = base
    paths = [adapters[n] for n in names]
    out, ours = our_combined(tmp_path, paths, weights, how, **options)
    peft_options = {"majority_sign_method": options["majority_sign"]} if "majority_sign" in options else {}
    if "density" in options:
        peft_options["density"] = options["density"]
    peft_model, theirs = peft_combined(paths, weights, how, base_path, **peft_options)
    assert_same_tensors(ours, theirs, svd=how == "svd")
    combined_logits = logits(load_adapter(out).model, batch)
    assert max_diff(combined_logits, logits(peft_model, batch)) <= TOLERANCE
    assert max_diff(combined_logits, logits(load_in_peft(out, base_path), batch)) <= TOLERANCE
    assert max_diff(combined_logits, logits(base_model(base_path, recipe), batch)) > 1e-2  # not the base


def test_cat_is_exactly_the_weighted_sum_of_updates(adapters, tmp_path):
    """cat's B·A is Σ w_i s_i B_i A_i, written out by hand from the input files (no peft), with an rsLoRA
    adapter among them (s = α/√r; peft would scale this result by √r, see docs/merging.md)."""
    rslora = make_adapter(tmp_path, "rs", "rslora", ["method.r=16", "method.alpha=4"], 4)
    weights = [0.7, -0.3, 0.5]
    out, ours = our_combined(tmp_path, [adapters["r4"], adapters["r8"], rslora], weights, "cat")
    inputs = [
        load_file(str(p / "adapter_model.safetensors")) for p in (adapters["r4"], adapters["r8"], rslora)
    ]
    scales = [8 / 4, 16 / 8, 4 / 16**0.5]
    for key in (k for k in ours if k.endswith("lora_B.weight")):
        a_key = key.replace("lora_B", "lora_A")
        expected = sum(w * s * x[key] @ x[a_key] for w, s, x in zip(weights, scales, inputs, strict=True))
        assert max_diff(ours[key] @ ours[a_key], expected) <= 1e-5
        assert ours[a_key].shape[0] == 4 + 8 + 16
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (28, 28, False)


def peft_order_masks(peft_model, seed: int, density: float, shapes: dict[str, tuple], count: int):
    """Our DARE masks in the order peft draws its own: modules in model order; in each, the A's of every
    adapter, then the B's."""
    from peft.tuners.lora import LoraLayer

    masks = []
    for name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for factor in ("A", "B"):
            for index in range(count):
                generator = torch.Generator().manual_seed(dare_seed(seed, name, factor, index))
                masks.append(
                    torch.bernoulli(torch.full(shapes[f"{name}.{factor}"], density), generator=generator)
                )
    return masks


class BernoulliFrom:
    """A stand-in for the ``torch`` module inside peft's merge_utils whose ``bernoulli`` hands out the
    given masks in turn (everything else is torch's)."""

    def __init__(self, masks: list[torch.Tensor]):
        self.masks = list(masks)

    def bernoulli(self, probabilities: torch.Tensor) -> torch.Tensor:
        mask = self.masks.pop(0)
        assert mask.shape == probabilities.shape
        return mask

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.mark.parametrize("how", ["dare_linear", "dare_ties"])
def test_dare_equals_peft_given_the_same_masks(how, adapters, base, tmp_path, monkeypatch):
    from peft.utils import merge_utils

    base_path, _, batch = base
    paths, weights, density, seed = [adapters["r4"], adapters["r4b"]], [0.7, 0.3], 0.5, 7
    out, ours = our_combined(tmp_path, paths, weights, how, density=density, seed=seed)
    shapes = {
        k[len("base_model.model.") : -len(".lora_A.weight")] + f".{k[-8]}": tuple(v.shape)
        for k, v in ours.items()
    }
    peft_model = load_in_peft(paths[0], base_path)
    peft_model.load_adapter(str(paths[1]), adapter_name="a1")
    stand_in = BernoulliFrom(peft_order_masks(peft_model, seed, density, shapes, count=2))
    monkeypatch.setattr(merge_utils, "torch", stand_in)
    peft_model.add_weighted_adapter(
        ["default", "a1"], weights, "combined", combination_type=how, density=density
    )
    assert not stand_in.masks  # peft drew exactly our masks, one per tensor
    monkeypatch.undo()
    peft_model.set_adapter("combined")
    peft_model.eval()
    theirs = peft.get_peft_model_state_dict(peft_model, adapter_name="combined")
    assert_same_tensors(ours, theirs)
    assert max_diff(logits(load_adapter(out).model, batch), logits(peft_model, batch)) <= TOLERANCE


def test_dare_keeps_the_expected_value_and_the_density():
    torch.manual_seed(0)
    tensor, density, draws = torch.randn(32, 64), 0.3, 2000
    samples = torch.stack(
        [drop_and_rescale(tensor, density, torch.Generator().manual_seed(s)) for s in range(draws)]
    )
    kept = samples != 0
    assert torch.equal(samples[kept], (tensor.expand_as(samples) / density)[kept])  # kept: x / density
    assert abs(kept.float().mean().item() - density) <= 0.01
    standard_error = tensor.abs() * ((1 - density) / (density * draws)) ** 0.5
    assert ((samples.mean(dim=0) - tensor).abs() <= 5 * standard_error).all()


def test_dare_seed_decides_the_masks(adapters, tmp_path):
    paths, density = [adapters["r4"], adapters["r4b"]], 0.4

    def run(seed: int, where: str) -> dict:
        out = combine_adapters(paths, [0.5, 0.5], "dare_linear", tmp_path / where, density=density, seed=seed)
        return load_file(str(Path(out["output"]) / "adapter_model.safetensors"))

    first, again, other = run(3, "a"), run(3, "b"), run(4, "c")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    a = torch.cat([v.flatten() for k, v in first.items() if "lora_A" in k])
    # an entry of the sum is zero only where both adapters dropped it: probability (1 - density)²
    assert abs((a != 0).float().mean().item() - (1 - (1 - density) ** 2)) <= 0.01


def test_ties_trim_keeps_the_largest_entries():
    tensor = torch.tensor([[0.1, -3.0, 2.0], [-0.5, 0.2, 1.0]])
    assert torch.equal(keep_largest(tensor, 0.5), torch.tensor([[0.0, -3.0, 2.0], [0.0, 0.0, 1.0]]))
    assert torch.equal(keep_largest(tensor, 1.0), tensor)


def test_merge_accepts_the_combined_adapter(adapters, base, tmp_path):
    from transformers import AutoModelForCausalLM

    from peftcli.api import merge

    _, _, batch = base
    out, _ = our_combined(tmp_path, [adapters["r4"], adapters["r8"]], [0.6, 0.4], "svd")
    merge(out, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert max_diff(logits(merged, batch), logits(load_adapter(out).model, batch)) <= TOLERANCE


def test_cli_writes_the_combined_adapter(adapters, tmp_path):
    args = ["combine", str(adapters["r4"]), str(adapters["r8"]), "--weights", "0.7,0.3", "--how", "cat"]
    result = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "rank 12" in result.output
    config = json.loads((tmp_path / "cli" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (12, 12, "LORA")
    _, direct = our_combined(tmp_path, [adapters["r4"], adapters["r8"]], [0.7, 0.3], "cat")
    written = load_file(str(tmp_path / "cli" / "adapter_model.safetensors"))
    assert all(torch.equal(written[k], direct[k]) for k in direct)
    assert (tmp_path / "cli" / "tokenizer_config.json").is_file()


# -- refusals ---------------------------------------------------------------------------------------


def edited_copy(source: Path, where: Path, **changes) -> Path:
    shutil.copytree(source, where)
    config = json.loads((where / "adapter_config.json").read_text())
    (where / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return where


@pytest.fixture(scope="module")
def other_adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("others")
    return {
        "ia3": make_adapter(root, "ia3", "ia3", [], 1),
        "qv": make_adapter(root, "qv", "lora", ["method.r=4", "method.target_modules=[q_proj,v_proj]"], 1),
        "dora": make_adapter(root, "dora", "dora", ["method.r=4"], 1),
    }


def refusal(adapters, other_adapters, tmp_path, case: str):
    r4, r4b, r8 = adapters["r4"], adapters["r4b"], adapters["r8"]
    cases = {
        "bases": ([r4, edited_copy(r4b, tmp_path / "moved", base_model_name_or_path="/else")], "cat", {}),
        "methods": ([r4, other_adapters["ia3"]], "cat", {}),
        "targets": ([r4, other_adapters["qv"]], "cat", {}),
        "ranks": ([r4, r8], "linear", {}),
        "dora": ([r4, other_adapters["dora"]], "cat", {}),
        "loftq": ([r4, edited_copy(r4b, tmp_path / "loftq", init_lora_weights="loftq")], "cat", {}),
        "density": ([r4, r4b], "ties", {}),
        "density_unused": ([r4, r4b], "cat", {"density": 0.5}),
    }
    paths, how, options = cases[case]
    return lambda: combine_adapters(paths, [1.0] * len(paths), how, tmp_path / "out", **options)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("bases", "different bases"),
        ("methods", "IA3 adapter"),
        ("targets", "adapt different modules"),
        ("ranks", "needs equal ranks"),
        ("dora", "DoRA adapter"),
        ("loftq", "LoftQ adapter"),
        ("density", "--density"),
        ("density_unused", "does not prune"),
    ],
)
def test_refuses_what_cannot_be_combined(case, needle, adapters, other_adapters, tmp_path):
    with pytest.raises(RecipeError, match=needle) as err:
        refusal(adapters, other_adapters, tmp_path, case)()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_the_public_function_is_not_shadowed_by_its_module():
    """``peftcli.combine`` is the API function even after the module (``peftcli.combining``) is loaded."""
    import peftcli
    import peftcli.combining
    from peftcli.api import combine

    assert peftcli.combine is combine


def test_weights_must_match_the_adapters():
    assert parse_weights("0.7, 0.3", 2) == [0.7, 0.3]
    with pytest.raises(RecipeError, match="1 weight"):
        parse_weights("1", 2)
    with pytest.raises(RecipeError, match="'x' is not a number"):
        parse_weights("1,x", 2)


def test_cli_refusal_is_one_line_exit_2(adapters, tmp_path):
    args = ["combine", str(adapters["r4"]), str(adapters["r8"]), "--weights", "1", "--how", "linear"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "out")])
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "--weights" in lines[0], result.output


def test_rank_patterns_give_per_module_ranks(adapters, base, tmp_path):
    """Inputs with a rank_pattern: cat's per-module ranks differ, so the result carries a rank_pattern
    (escaped full names) that peft reads; its logits equal peft's add_weighted_adapter (which pads every
    module to the largest rank with zeros) and peft loads ours with them (≤ 1e-4)."""
    base_path, _, batch = base
    patterned = make_adapter(
        tmp_path, "patterned", "lora", ["method.r=4", "method.rank_pattern={down_proj: 2}"], 5
    )
    paths, weights = [adapters["r8"], patterned], [0.5, 0.5]
    out, ours = our_combined(tmp_path, paths, weights, "cat")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 12 and set(config["rank_pattern"].values()) == {10}
    assert ours["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape[0] == 10
    combined_logits = logits(load_adapter(out).model, batch)
    peft_model, _ = peft_combined(paths, weights, "cat", base_path)
    assert max_diff(combined_logits, logits(peft_model, batch)) <= TOLERANCE
    assert max_diff(combined_logits, logits(load_in_peft(out, base_path), batch)) <= TOLERANCE
