"""LoRA on parameters (``method.target_parameters``, peft's ``ParamWrapper``): the 3-D expert stacks of MoE
models, on tiny Mixtral and Qwen3-MoE, against peft 0.21.2.

References and tolerances (fp32, CPU, fixed seeds):
- peft's own layout: ``get_peft_model`` with the same ``target_parameters`` names exactly our adapter
  keys with exactly our shapes (the nesting order of two parameters on one module included);
- peft as the oracle: our saved adapter (trained tensors moved to a random point) loaded with
  ``PeftModel.from_pretrained`` on the original base gives our logits, ≤ 1e-5, and those logits differ
  from the base's (> 1e-3), so the adapter really loaded;
- the equation: expert ``e``'s update is ``s · B_e A_e`` with peft's slicing of A [r·E, in] (rows) and
  B [out, r·E] (columns ``e::E``), written out per expert, ≤ 1e-6;
- merge: ``peftcli merge``'s plain transformers model gives the adapter model's logits, ≤ 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch
from kit import base_model, batch_of, build, load_in_peft, logits, perturb, save

from peftcli.export import merge_adapter
from peftcli.methods.lora import LoRAParameter
from peftcli.recipe import RecipeError

peft = pytest.importorskip("peft")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ARCHS = ["mixtral", "qwen3_moe"]


def experts_recipe(arch: str, tmp_path, extra: list[str] | None = None):
    overrides = [f"model.name=tiny:{arch}", f"method.target_parameters=[{','.join(EXPERTS)}]"]
    return build("lora", tmp_path, overrides + (extra or []))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_expert_lora_matches_peft_and_merges(arch, tmp_path):
    recipe, base_path, tokenizer, model, method = experts_recipe(arch, tmp_path)
    wrappers = method.parameter_layers(model)
    assert len(wrappers) == 2 * model.config.num_hidden_layers
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == method.expected_trainable_parameters(model)
    perturb(model, scale=0.05)
    batch = batch_of(model.config.vocab_size)
    ours = logits(model, batch)
    adapter = save(tmp_path, model, method, tokenizer, base_path, recipe)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_parameters"] == EXPERTS

    # peft's own injection: the same keys (nesting order included) and shapes as our file
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    theirs = get_peft_model(
        base_model(base_path, recipe),
        LoraConfig(
            r=recipe.method.r, lora_alpha=recipe.method.alpha, target_modules=[], target_parameters=EXPERTS
        ),
    )
    their_shapes = {
        k.replace(".default", ""): tuple(v.shape) for k, v in theirs.state_dict().items() if "lora_" in k
    }
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    ours_experts = {k: tuple(v.shape) for k, v in saved.items() if ".experts." in k}
    assert ours_experts == their_shapes

    loaded = load_in_peft(adapter, base_path)
    assert (logits(loaded, batch) - ours).abs().max().item() <= 1e-5
    assert (logits(base_model(base_path, recipe), batch) - ours).abs().max().item() > 1e-3

    merge_adapter(adapter, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert (logits(merged, batch) - ours).abs().max().item() <= 1e-4


def test_expert_update_is_each_experts_b_times_a(tmp_path):
    """The per-expert slicing, written out: A_e = A[e·r:(e+1)·r], B_e = B[:, e::E]."""
    _, _, _, model, method = experts_recipe("mixtral", tmp_path)
    perturb(model, scale=0.1)
    _, wrapper = method.parameter_layers(model)[0]
    assert isinstance(wrapper, LoRAParameter)
    experts, r = wrapper.num_experts, wrapper.r
    a, b = wrapper.lora_A.weight, wrapper.lora_B.weight
    delta = wrapper.delta_weight()
    assert delta.shape == wrapper.parameter().shape
    for e in range(experts):
        expected = wrapper.scaling * b[:, e::experts] @ a[e * r : (e + 1) * r]
        assert torch.allclose(delta[e], expected, atol=1e-6)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (["method.dropout=0.1"], "method.dropout"),
        (["method.use_dora=true"], "method.use_dora"),
        (["method.target_parameters=[mlp.experts.nope]"], "method.target_parameters"),
        (["method.target_parameters=[self_attn.q_proj.weight]"], "method.target_parameters"),
    ],
    ids=["dropout", "dora", "no-match", "both-ways"],
)
def test_bad_target_parameters_are_one_line_errors(extra, key, tmp_path):
    with pytest.raises(RecipeError) as err:
        experts_recipe("mixtral", tmp_path, extra)
    assert err.value.key == key and "\n" not in str(err.value)


def test_empty_target_modules_need_target_parameters(tmp_path):
    with pytest.raises(RecipeError, match="nothing would train"):
        build("lora", tmp_path, ["method.target_modules=[]"])
