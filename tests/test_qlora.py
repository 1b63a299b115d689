"""QLoRA: quantized bases, the peft oracle on the same 4-bit base, merge and its report, loud errors.

References and tolerances (fp32 compute, CPU, fixed seeds):
- peft 0.21.2 ``PeftModel.from_pretrained`` on the base loaded by transformers' own default
  ``BitsAndBytesConfig`` (not our code): logits ≤ 1e-4 of ours;
- the merged model vs the fp32 base + adapter (unmerged): ≤ 1e-4;
- the merge report's 4-bit difference vs the same difference recomputed from peft's 4-bit model: ≤ 1e-5;
- stored bits per parameter vs the blockwise formula written out here: exact.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from kit import ROOT

from peftcli import api
from peftcli.export import load_adapter, merge_adapter
from peftcli.models import load_model, resolve_model_name
from peftcli.quantize import probe_batch, storage_report
from peftcli.recipe import ModelConfig, QuantizationConfig, RecipeError
from peftcli.recipe_loader import load_recipe

RECIPE = ROOT / "recipes" / "tiny" / "qlora.yaml"

warnings.filterwarnings("ignore", module="bitsandbytes")


def hf_quantized_base(path: str, bits: int = 4, compute_dtype: torch.dtype = torch.float32):
    """The base as a peft user loads it: transformers' BitsAndBytesConfig with its default skip list."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map={"": "cpu"}, dtype=torch.float32
    )
    for module in model.modules():  # bitsandbytes' bf16 eval kernel on AVX512-BF16 CPUs: the fp32 path
        if hasattr(module, "support_avx512bf16_for_cpu"):  # the adapter trained with (see prepare_for_kbit)
            module.support_avx512bf16_for_cpu = False
    return model


def fixed_batch(vocab: int = 260) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, vocab, (2, 12), generator=gen)
    mask = torch.ones_like(input_ids)
    mask[1, 9:] = 0
    return {"input_ids": input_ids, "attention_mask": mask}


def real_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**batch).logits.float()
    return logits[batch["attention_mask"].bool()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny QLoRA recipe trained once through the real CLI path (api.train)."""
    out = tmp_path_factory.mktemp("qlora") / "run"
    result = api.train(RECIPE, overrides=[f"output_dir={out}"])
    return result


@pytest.mark.slow  # a whole recipe through api.train (~40 s on 2 cores)
def test_tiny_qlora_recipe_trains_and_loss_falls(trained):
    events = [json.loads(line) for line in (trained.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert trained.last_loss < trained.first_loss - 0.2, (trained.first_loss, trained.last_loss)
    assert losses[-1] < losses[0]
    sidecar = json.loads((trained.adapter_dir / "peftcli_adapter.json").read_text())
    assert sidecar["quantization"]["bits"] == 4 and sidecar["quantization"]["quant_type"] == "nf4"


def test_base_is_4bit_nf4_with_fp32_norms_and_unquantized_head(tmp_path):
    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path}"])
    model = load_model(resolve_model_name(recipe.model.name), recipe.model, torch.device("cpu"))
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    linears = [n for n, k in kinds.items() if k in ("Linear", "Linear4bit")]
    assert kinds["lm_head"] == "Linear"  # the head is never quantized
    assert all(kinds[n] == "Linear4bit" for n in linears if n != "lm_head")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)


def test_skip_modules_keeps_them_in_full_precision_and_rejects_unknown_names(tmp_path):
    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path}", "model.quantization.skip_modules=[down_proj]"])
    model = load_model(resolve_model_name(recipe.model.name), recipe.model, torch.device("cpu"))
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "Linear"
    assert type(model.model.layers[1].mlp.up_proj).__name__ == "Linear4bit"
    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path}", "model.quantization.skip_modules=[down_prj]"])
    with pytest.raises(RecipeError) as err:
        load_model(resolve_model_name(recipe.model.name), recipe.model, torch.device("cpu"))
    assert err.value.key == "model.quantization.skip_modules" and "down_prj" in err.value.message


def expected_4bit_bytes(n: int, double_quant: bool, blocksize: int = 64) -> int:
    """The QLoRA storage formula: 4-bit codes + one absmax per block (fp32, or 8-bit with one fp32
    scale per 256 absmax values and one fp32 offset under double quantization)."""
    blocks = math.ceil(n / blocksize)
    if not double_quant:
        return math.ceil(n / 2) + 4 * blocks
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4


@pytest.mark.parametrize("double_quant", [True, False])
def test_stored_bits_per_parameter_match_the_formula(double_quant):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(1024, 1024, bias=False), torch.nn.LayerNorm(1024))
    layer = bnb.nn.Linear4bit(
        1024,
        1024,
        bias=False,
        compute_dtype=torch.float32,
        quant_type="nf4",
        compress_statistics=double_quant,
    )
    layer.weight = bnb.nn.Params4bit(
        dense[0].weight.data.clone(), requires_grad=False, compress_statistics=double_quant, quant_type="nf4"
    )
    model = torch.nn.Sequential(layer.to("cpu"), dense[1])
    for p in model.parameters():
        p.requires_grad_(False)
    report = storage_report(model)
    n = 1024 * 1024
    assert report["quantized_parameters"] == n
    assert report["quantized_bytes"] == expected_4bit_bytes(n, double_quant)
    bits = report["quantized_bits_per_parameter"]
    if double_quant:  # 4 + 8/64 + 32/(64·256) + 32/n: the paper's ≈ 4.127
        assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n, abs=1e-9)
        assert round(bits, 3) == 4.127
    else:
        assert bits == 4.5
    assert report["total_parameters"] == n + 2 * 1024
    assert report["total_bytes"] == expected_4bit_bytes(n, double_quant) + 2 * 1024 * 4


def test_tiny_model_storage_report_counts_every_quantized_layer(tmp_path):
    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path}"])
    model = load_model(resolve_model_name(recipe.model.name), recipe.model, torch.device("cpu"))
    report = storage_report(model)
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert report["quantized_layers"] == len(layers) == 14
    assert report["quantized_parameters"] == sum(m.in_features * m.out_features for m in layers)
    assert report["quantized_bytes"] == sum(
        expected_4bit_bytes(m.in_features * m.out_features, True) for m in layers
    )


@pytest.mark.slow  # a whole recipe through api.train (~40 s on 2 cores)
def test_adapter_loads_in_peft_on_the_same_4bit_base(trained):
    from peft import PeftModel

    ours = load_adapter(trained.adapter_dir).model
    base = hf_quantized_base(str(resolve_model_name("tiny:llama")))
    # Same 4-bit base: transformers' own load quantizes to bit-identical codes and constants.
    ours_layer = ours.model.layers[0].mlp.down_proj.base_layer
    theirs_layer = base.model.layers[0].mlp.down_proj
    assert torch.equal(ours_layer.weight.data, theirs_layer.weight.data)
    assert torch.equal(ours_layer.weight.quant_state.absmax, theirs_layer.weight.quant_state.absmax)
    batch = fixed_batch()
    base_logits = real_logits(base, batch)
    peft_model = PeftModel.from_pretrained(base, str(trained.adapter_dir))
    assert (
        type(peft_model.base_model.model.model.layers[0].mlp.down_proj).__module__ == "peft.tuners.lora.bnb"
    )
    peft_logits = real_logits(peft_model, batch)
    our_logits = real_logits(ours, batch)
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter really is loaded and not zero
    assert (our_logits - peft_logits).abs().max() <= 1e-4


@pytest.mark.slow  # trains the QLoRA recipe (module fixture) and merges
def test_merge_is_exact_against_the_fp32_base_plus_adapter_and_reports_the_4bit_gap(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    info = merge_adapter(trained.adapter_dir, out)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not hasattr(merged.config, "quantization_config")  # never re-quantized
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())

    # Exact path: fp32 base + adapter, unmerged.
    unmerged = load_adapter(trained.adapter_dir, quantized=False).model
    batch = fixed_batch()
    assert (real_logits(merged, batch) - real_logits(unmerged, batch)).abs().max() <= 1e-4

    # The report: recompute the 4-bit gap independently, with peft on transformers' 4-bit base.
    probe = {
        "input_ids": torch.tensor(info["probe"]["input_ids"]),
        "attention_mask": torch.tensor(info["probe"]["attention_mask"]),
    }
    tokenizer = load_adapter(trained.adapter_dir, quantized=False).tokenizer
    assert torch.equal(probe["input_ids"], probe_batch(tokenizer)["input_ids"])
    peft_model = PeftModel.from_pretrained(
        hf_quantized_base(str(resolve_model_name("tiny:llama"))), str(trained.adapter_dir)
    )
    diff = (real_logits(merged, probe) - real_logits(peft_model, probe)).abs()
    assert info["probe"]["max_abs_logit_diff"] == pytest.approx(float(diff.max()), abs=1e-5)
    assert info["probe"]["mean_abs_logit_diff"] == pytest.approx(float(diff.mean()), abs=1e-6)
    assert info["probe"]["positions"] == int(probe["attention_mask"].sum())
    assert float(diff.max()) > 1e-3  # a 4-bit base really differs from the fp32 one
    assert any("max |Δlogit|" in line for line in info["report_lines"])
    on_disk = json.loads((out / "merge_report.json").read_text())
    assert on_disk["probe"]["max_abs_logit_diff"] == info["probe"]["max_abs_logit_diff"]


def lora_delta(adapter_dir: Path, module: str) -> torch.Tensor:
    """s·B·A of one layer, read straight from the adapter's safetensors (peft's key names)."""
    from safetensors.torch import load_file

    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    prefix = f"base_model.model.{module}"
    a, b = state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"]
    return (b @ a) * (config["lora_alpha"] / config["r"])


@pytest.mark.slow
def test_merge_dequantize_equals_the_trained_4bit_model(trained, tmp_path):
    """--dequantize: the merged fp32 model is the 4-bit adapter model it was trained as. References:
    peft's LoRA on transformers' own 4-bit base (fp32 compute), 1e-4; the weights against
    bitsandbytes' quantize/dequantize of the fp32 base weight done here, 1e-6."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged-dequantized"
    info = merge_adapter(trained.adapter_dir, out, dequantize=True)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not hasattr(merged.config, "quantization_config")
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())

    base_path = str(resolve_model_name("tiny:llama"))
    peft_model = PeftModel.from_pretrained(hf_quantized_base(base_path), str(trained.adapter_dir))
    batch = fixed_batch()
    assert (real_logits(merged, batch) - real_logits(peft_model, batch)).abs().max() <= 1e-4
    ours_4bit = load_adapter(trained.adapter_dir).model
    assert (real_logits(merged, batch) - real_logits(ours_4bit, batch)).abs().max() <= 1e-4

    # One weight, rebuilt independently: dequant(quant(W0)) as the recipe quantizes (nf4, double quant,
    # bitsandbytes' default block of 64), plus the adapter's s·B·A.
    module = "model.layers.1.mlp.down_proj"
    fp32_base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    w0 = fp32_base.get_submodule(module).weight.detach()
    packed, state = bnb.functional.quantize_4bit(w0, quant_type="nf4", compress_statistics=True)
    expected = bnb.functional.dequantize_4bit(packed, state).float() + lora_delta(trained.adapter_dir, module)
    torch.testing.assert_close(merged.get_submodule(module).weight, expected, atol=1e-6, rtol=0)
    assert (expected - w0).abs().max() > 1e-3  # and that is not the original weight plus the update

    # The report: ≈ 0 here, recomputed from peft's 4-bit model on the probe texts.
    probe = {k: torch.tensor(info["probe"][k]) for k in ("input_ids", "attention_mask")}
    gap = (real_logits(merged, probe) - real_logits(peft_model, probe)).abs()
    assert info["dequantized"] is True and info["probe"]["dequantized"] is True
    assert info["probe"]["max_abs_logit_diff"] <= 1e-4
    assert info["probe"]["max_abs_logit_diff"] == pytest.approx(float(gap.max()), abs=1e-5)
    assert "dequantized 4-bit weights" in info["report_lines"][1]
    on_disk = json.loads((out / "merge_report.json").read_text())
    assert on_disk["dequantized"] is True
    assert on_disk["probe"]["max_abs_logit_diff"] == info["probe"]["max_abs_logit_diff"]


def test_merge_dequantize_of_an_unquantized_adapter_is_a_user_error(tmp_path):
    import peft
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from peftcli.cli import app

    base = AutoModelForCausalLM.from_pretrained(str(resolve_model_name("tiny:llama")))
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    result = CliRunner().invoke(
        app, ["merge", str(tmp_path / "a"), "-o", str(tmp_path / "m"), "--dequantize"]
    )
    assert result.exit_code == 2, result.output
    assert "--dequantize" in result.output and "not trained on a quantized base" in result.output
    assert not (tmp_path / "m").exists()


def test_8bit_base_trains_and_loads_in_peft(tmp_path):
    from peft import PeftModel

    out = tmp_path / "run8"
    result = api.train(
        RECIPE,
        overrides=[
            f"output_dir={out}",
            "model.quantization.bits=8",
            "train.max_steps=12",
            "train.optimizer=adamw_8bit",
        ],
    )
    assert result.last_loss < result.first_loss
    ours = load_adapter(result.adapter_dir).model
    assert type(ours.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear8bitLt"
    base = hf_quantized_base(str(resolve_model_name("tiny:llama")), bits=8)
    peft_model = PeftModel.from_pretrained(base, str(result.adapter_dir))
    batch = fixed_batch()
    assert (real_logits(ours, batch) - real_logits(peft_model, batch)).abs().max() <= 1e-4

    # merge --dequantize: each weight is LLM.int8's row-wise dequantization, int8 · absmax / 127 (computed
    # here from the quantized layer), plus s·B·A; the activations' int8 rounding stays in the report.
    from transformers import AutoModelForCausalLM

    info = merge_adapter(result.adapter_dir, tmp_path / "merged8", dequantize=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged8", dtype=torch.float32)
    module = "model.layers.0.self_attn.q_proj"
    layer = ours.get_submodule(module).base_layer
    scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    int8_weight = layer.weight.data.float() * scales.float()[:, None] / 127
    expected = int8_weight + lora_delta(result.adapter_dir, module)
    torch.testing.assert_close(merged.get_submodule(module).weight, expected, atol=1e-6, rtol=0)
    assert "activations" in info["report_lines"][1]


def test_bf16_base_and_compute_train_on_cpu_and_the_head_stays_bf16(tmp_path):
    """No autocast on a CPU: fp32 norms feed a bf16 LM head, which must cast its input itself."""
    out = tmp_path / "bf16"
    result = api.train(
        RECIPE,
        overrides=[
            f"output_dir={out}",
            "model.dtype=bfloat16",
            "model.quantization.compute_dtype=bfloat16",
            "train.max_steps=8",
        ],
    )
    assert math.isfinite(result.last_loss) and result.last_loss < result.first_loss
    model = load_adapter(result.adapter_dir, dtype=torch.bfloat16).model
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.base_layer.compute_dtype == torch.bfloat16


# -- loud errors ------------------------------------------------------------------------------


def test_missing_bitsandbytes_is_a_recipe_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    cfg = ModelConfig(name="tiny:llama", quantization=QuantizationConfig(compute_dtype="float32"))
    with pytest.raises(RecipeError) as err:
        load_model(resolve_model_name(cfg.name), cfg, torch.device("cpu"))
    assert err.value.key == "model.quantization" and "bitsandbytes" in err.value.message


def test_bitsandbytes_that_cannot_run_4bit_here_is_a_recipe_error(monkeypatch):
    import bitsandbytes as bnb

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", broken)
    cfg = ModelConfig(name="tiny:llama", quantization=QuantizationConfig(compute_dtype="float32"))
    with pytest.raises(RecipeError) as err:
        load_model(resolve_model_name(cfg.name), cfg, torch.device("cpu"))
    assert err.value.key == "model.quantization" and "cannot run 4-bit nf4" in err.value.message


def test_method_without_quantized_support_fails_at_validate(monkeypatch, tmp_path):
    from peftcli.methods.lora import LoRA

    monkeypatch.setattr(LoRA, "supports_quantized_base", False)
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPE, [f"output_dir={tmp_path}"])
    assert err.value.key == "model.quantization" and "lora" in err.value.message


@pytest.mark.parametrize(
    "path", ["recipes/tiny/qlora.yaml", "recipes/qlora-llama-3.1-8b.yaml", "recipes/qlora-qwen2.5-7b.yaml"]
)
def test_shipped_qlora_recipes_validate(path, monkeypatch):
    from typer.testing import CliRunner

    from peftcli.cli import app

    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, ["validate", path])
    assert result.exit_code == 0, result.output
    recipe = load_recipe(ROOT / path)
    q = recipe.model.quantization
    assert q is not None and (q.bits, q.quant_type, q.double_quant) == (4, "nf4", True)
    assert recipe.train.optimizer.startswith("paged_")


def test_4bit_layers_compute_in_eval_as_in_training_on_the_cpu():
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first eval forward and
    multiplies in bf16. Our loaded bases never do: eval logits are the trained model's, and merge
    --dequantize reads the layout it expects. Reference: the fp32 dequantize path (train mode), 1e-6."""
    from peftcli.dequantize import dequantized_weight, quantized_layers

    cfg = load_recipe(RECIPE).model
    model = load_model(str(resolve_model_name("tiny:llama")), cfg, torch.device("cpu"))
    layers = quantized_layers(model)
    before = {name: dequantized_weight(layer) for name, layer in layers.items()}
    batch = fixed_batch()
    trained_path = real_logits(model.train(), batch)  # no dropout in tiny:llama
    eval_path = real_logits(model.eval(), batch)
    assert (eval_path - trained_path).abs().max() <= 1e-6
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers.values())
    assert all(torch.equal(dequantized_weight(layer), before[name]) for name, layer in layers.items())
