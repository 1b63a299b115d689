"""Issue 21's methods on a QLoRA base (4-bit NF4, double-quantized, fp32 compute, CPU), against peft
0.21 on the base a peft user loads (transformers' own ``BitsAndBytesConfig``):

- VeRA, OFT, BOFT, MiSS, C3A, RandLoRA and RoAd train through the 4-bit layers (one step of the loop's Stepper moves the adapter and
  leaves the 4-bit codes bit-identical), and peft loads the adapter on the same 4-bit base with our
  logits (≤ 1e-4, QLoRA's tolerance in tests/test_qlora.py; measured 0); ``peftcli merge`` folds it
  into the full-precision base and reports the 4-bit gap, and the merged model equals the adapter on
  the full-precision base (≤ 1e-4);
- trainable tokens and adaption prompt train on the 4-bit base (the embedding stays in full precision;
  the prompt runs through the frozen 4-bit projections), leave the 4-bit codes bit-identical, and peft
  loads the adapter on the same 4-bit base with our logits (≤ 1e-4);
- LoHa and LoKr are refused at start in one line: peft's LyCORIS layers size their factors by the
  packed 4-bit weight's shape, so peft could not load such an adapter (the last test shows it).
"""

from __future__ import annotations

import warnings

import kit
import pytest
import torch

from peftcli.export import load_adapter, merge_adapter
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
warnings.filterwarnings("ignore", module="bitsandbytes")

QUANTIZED = [
    "model.quantization.bits=4",
    "model.quantization.quant_type=nf4",
    "model.quantization.double_quant=true",
    "model.quantization.compute_dtype=float32",
]


def peft_user_base(path: str):
    """The 4-bit base as a peft user loads it (transformers' BitsAndBytesConfig), fp32 compute."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map={"": "cpu"}, dtype=torch.float32
    )
    for module in model.modules():  # the fp32 CPU kernel our layers use (see tests/test_qlora.py)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.mark.parametrize("name", ["boft", "c3a", "miss", "oft", "randlora", "road", "vera"])
def test_trains_on_a_4bit_base_loads_in_peft_and_merges(name, tmp_path):
    built = kit.build(name, tmp_path, QUANTIZED)
    layer = built.method.layers(built.model)[0][1].base_layer
    assert type(layer).__name__ == "Linear4bit"
    codes = layer.weight.data.clone()
    trained = {n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad}
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    kit.train_step(built.model, built.method, batch, recipe=built.recipe)
    assert torch.equal(layer.weight.data, codes)
    params = dict(built.model.named_parameters())
    assert any(not torch.equal(params[n], before) for n, before in trained.items())
    kit.perturb(built.model)  # well away from init
    ours = kit.logits(built.model, batch)
    adapter = kit.save(tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe)

    base = peft_user_base(built.base_path)
    plain = kit.logits(base, batch)
    kit.boft_in_torch()  # peft's BOFT butterfly on the CPU (see tests/kit/peft.py)
    theirs = peft.PeftModel.from_pretrained(base, str(adapter))
    theirs.eval()
    assert kit.max_diff(ours, plain) > 1e-2  # the adapter is loaded and not trivial
    assert kit.max_diff(ours, kit.peft_logits(theirs, batch)) <= 1e-4

    result = merge_adapter(adapter, tmp_path / "merged")
    assert any("4-bit" in line for line in result["report_lines"])
    full = load_adapter(adapter, quantized=False)  # the adapter on the full-precision base
    merged = type(base).from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert kit.max_diff(kit.logits(full.model, batch), kit.logits(merged.eval(), batch)) <= 1e-4


@pytest.mark.parametrize("name", ["loha", "lokr"])
def test_lycoris_on_a_4bit_base_is_refused_at_start(name, tmp_path):
    with pytest.raises(RecipeError) as err:
        kit.tiny_recipe(name, tmp_path, QUANTIZED)
    assert err.value.key == "model.quantization"


def test_peft_sizes_lycoris_factors_by_the_packed_4bit_weight():
    """Why LoHa and LoKr are refused: peft's own LoHa on a 4-bit q_proj (64 → 64) makes W1a
    (packed rows, r), not (64, r), so no adapter trained on the real shapes could load there."""
    from peftcli.models import resolve_model_name

    base = peft_user_base(resolve_model_name("tiny:llama"))
    model = peft.get_peft_model(base, peft.LoHaConfig(r=4, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.out_features == 64 and layer.hada_w1_a["default"].shape[0] != 64


@pytest.mark.parametrize("name", ["adaption_prompt", "trainable_tokens"])
def test_beside_the_4bit_layers_trains_and_loads_in_peft(name, tmp_path):
    built = kit.build(name, tmp_path, QUANTIZED)
    quantized = built.model.model.layers[-1].mlp.down_proj
    assert type(quantized).__name__ == "Linear4bit"
    codes = quantized.weight.data.clone()
    trained = {n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad}
    batch = kit.batch("causal_lm", built.model.config.vocab_size, lengths=(10, 7))
    kit.train_step(built.model, built.method, batch, recipe=built.recipe)
    assert torch.equal(quantized.weight.data, codes)
    params = dict(built.model.named_parameters())
    assert any(not torch.equal(params[n], before) for n, before in trained.items())
    kit.perturb(built.model)
    ours = kit.logits(built.model, batch)
    adapter = kit.save(tmp_path, built.model, built.method, built.tokenizer, built.base_path, built.recipe)
    base = peft_user_base(built.base_path)
    assert kit.max_diff(ours, kit.logits(base, batch)) > 1e-3  # the adapter is loaded and not trivial
    theirs = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    assert kit.max_diff(ours, kit.peft_logits(theirs, batch)) <= 1e-4
