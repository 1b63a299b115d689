"""The method kit (``peftcli.methods.kit`` and the defaults in ``peftcli.methods.registry``), checked with
numbers (fp32, CPU, fixed seeds):

- merge then unmerge: the base weights come back (≤ 1e-5) and so do the adapter's logits (≤ 1e-5), for
  every layer that can take its update back out (LoRA and its DoRA/PiSSA variants, (IA)3, AdaLoRA,
  LoHa, LoKr, VeRA, OFT);
- the adapter-config round trip: for every registered method, config → adapter_config → config gives
  a config that writes the same adapter_config again, and the fields the method did not resolve on the
  model (targets) come back equal;
- model-level shared state: a test-only method that shares one projection across its layers saves it
  once, under peft's key for a tuner attribute (``base_model.<name>``), and a save → load round trip
  restores it and the logits (≤ 1e-6).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from kit import ROOT, base_model, batch_of, build, logits, perturb, train_steps
from torch import nn

from peftcli.export import load_adapter, save_adapter
from peftcli.methods.catalog import list_methods, method_for
from peftcli.methods.kit import SHARED_ATTR, AdapterLayer, LayerMethod, write_weight
from peftcli.methods.registry import register, unregister
from peftcli.models import build_model, load_tokenizer, resolve_model_name
from peftcli.recipe import MethodConfig, to_dict
from peftcli.recipe_loader import load_recipe

# name -> (tiny recipe, overrides): layers that can unmerge
UNMERGEABLE = {
    "lora": ("lora", []),
    "lora_gpt2": ("lora", ["model.name=tiny:gpt2"]),
    "dora": ("dora", []),
    "pissa_dora": ("dora", ["method.init=pissa"]),
    "olora": ("lora", ["method.init=olora"]),
    "lora_moe": ("lora_moe", []),
    "ia3": ("ia3", []),
    "ia3_gpt2": (
        "ia3",
        ["model.name=tiny:gpt2", "method.target_modules=null", "method.feedforward_modules=null"],
    ),
    "adalora": ("adalora", []),
    "loha": ("loha", []),
    "lokr": ("lokr", []),
    "lokr_decomposed": ("lokr", ["method.r=2", "method.decompose_both=true"]),
    "vera": ("vera", []),
    "vera_gpt2": ("vera", ["model.name=tiny:gpt2"]),
    "oft": ("oft", []),
    "oft_exact_block_share": ("oft", ["method.use_cayley_neumann=false", "method.block_share=true"]),
}


def frozen_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("case", list(UNMERGEABLE))
def test_merge_then_unmerge_gives_back_the_base_weights_and_the_adapter_logits(case, tmp_path):
    recipe_name, overrides = UNMERGEABLE[case]
    _, _, _, model, method = build(recipe_name, tmp_path, overrides)
    perturb(model)  # every adapter tensor away from its identity init
    batch = batch_of(model.config.vocab_size)
    ours, before = logits(model, batch), frozen_weights(model)

    method.merge_adapter(model)
    assert all(layer.merged for _, layer in method.layers(model))
    changed = max((before[n] - p).abs().max().item() for n, p in frozen_weights(model).items())
    assert changed > 1e-4  # the merge really moved the base weights
    assert (logits(model, batch) - ours).abs().max().item() <= 1e-4  # merged: the update lives in W

    method.unmerge_adapter(model)
    after = frozen_weights(model)
    assert after.keys() == before.keys()
    assert max((before[n] - after[n]).abs().max().item() for n in before) <= 1e-5
    assert (logits(model, batch) - ours).abs().max().item() <= 1e-5


def test_merge_unloads_to_a_plain_model_and_unmerge_needs_the_layers(tmp_path):
    _, _, _, model, method = build("lora", tmp_path)
    perturb(model)
    batch = batch_of(model.config.vocab_size)
    ours = logits(model, batch)
    merged = method.merge(model)
    assert not method.layers(merged) and not any("lora_" in n for n, _ in merged.named_parameters())
    assert not any(p.requires_grad for p in merged.parameters())
    assert (logits(merged, batch) - ours).abs().max().item() <= 1e-4


# -- the adapter-config round trip ------------------------------------------------------------
RESOLVED = {"target_modules", "feedforward_modules", "modules_to_save", "lora_target_modules"}


def built(name: str, tmp_path: Path, method_cfg: MethodConfig | None = None):
    recipe = load_recipe(ROOT / "recipes" / "tiny" / f"{name}.yaml", [f"output_dir={tmp_path / 'run'}"])
    if method_cfg is not None:
        recipe.method = method_cfg
    base_path = resolve_model_name(recipe.model.name)
    tokenizer = load_tokenizer(base_path, recipe.model)
    labels = ["negative", "positive"] if recipe.model.task == "seq_cls" else None
    method = method_for(recipe)
    model = build_model(
        base_path,
        recipe.model,
        method,
        torch.device("cpu"),
        seed=recipe.train.seed,
        label_names=labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model, method


def written(method, model) -> dict:
    """adapter_config as export writes it (JSON, sorted keys)."""
    method.on_save(model)
    return json.loads(json.dumps(method.adapter_config(model), sort_keys=True))


@pytest.mark.parametrize("name", [m.name for m in list_methods()])
def test_adapter_config_round_trips_through_the_config(name, tmp_path):
    model, method = built(name, tmp_path)
    config = written(method, model)
    back = type(method).config_from_adapter(config)
    assert isinstance(back, method.config_cls) and back.name == name
    again_model, again = built(name, tmp_path, back)
    # prompt tuning reloads with the cheapest init on purpose: the stored prompt replaces it
    init_only = {"prompt_tuning": {"prompt_tuning_init", "prompt_tuning_init_text"}}.get(name, set())
    rewritten = written(again, again_model)
    assert {k: v for k, v in rewritten.items() if k not in init_only} == {
        k: v for k, v in config.items() if k not in init_only
    }
    # every field written under its own (renamed) key comes back, but those resolved on the model
    written_fields = [
        f.name for f in dataclasses.fields(back) if method.adapter_renames.get(f.name, f.name) in config
    ]
    original, rebuilt = to_dict(method.cfg), to_dict(back)
    differing = {k for k in written_fields if k not in RESOLVED and original[k] != rebuilt[k]}
    # AdaLoRA writes the schedule it ran (total_step), Houlsby the preset's values it resolved, prefix
    # tuning the encoder width it used, CPT the context it laid out from its context file
    allowed = {
        "adalora": {"total_step"},
        "cpt": {"cpt_token_ids", "cpt_mask", "cpt_tokens_type_mask"},
        "houlsby_adapter": set(original) - {"name"},
        "prefix_tuning": {"encoder_hidden_size"},
    }.get(name, set())
    assert differing <= allowed, f"{name}: {sorted(differing)} did not round-trip"


def test_lora_reads_peft_inits_and_defaults_from_peft_files():
    from peftcli.methods.lora import LoRA

    cfg = LoRA.config_from_adapter(
        {"r": 4, "init_lora_weights": "pissa_niter_4", "target_modules": ["q_proj"]}
    )
    assert (cfg.r, cfg.alpha, cfg.init, cfg.target_modules) == (4, 8.0, "pissa", ["q_proj"])
    assert LoRA.config_from_adapter({"init_lora_weights": "olora"}).init == "olora"
    assert LoRA.config_from_adapter({"init_lora_weights": False}).target_modules == "all-linear"
    only_parameters = LoRA.config_from_adapter({"target_parameters": ["mlp.experts.down_proj"]})
    assert only_parameters.target_modules == [] and only_parameters.target_parameters == [
        "mlp.experts.down_proj"
    ]


# -- model-level shared state: a test-only method ------------------------------------------------
@dataclass
class SharedToyConfig(MethodConfig):
    r: int = field(default=4)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


class SharedToyLinear(AdapterLayer):
    """``W0 x + toy_b (P x)``: P (r, in) is one frozen projection shared by every layer, toy_b (out, r) the
    layer's own (zero at init)."""

    def __init__(self, base_layer: nn.Module, shared, r: int):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "shared", shared)  # a reference, not a submodule: P has one name
        self.toy_b = nn.Parameter(torch.zeros(self.out_features, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        return result if self.merged else result + (x @ self.shared.toy_P.T) @ self.toy_b.T

    def merge(self) -> None:
        write_weight(self.base_layer.weight, self.base_layer.weight + self.toy_b @ self.shared.toy_P)


class SharedToy(LayerMethod):
    name = "shared_toy"
    description = "test only: one projection shared by every adapted layer"
    config_cls = SharedToyConfig
    mergeable = True
    trainable_formula = "out·r per adapted layer"
    parameter_prefix = "toy_"
    layer_types = (SharedToyLinear,)

    def build_shared(self, model: nn.Module) -> dict[str, torch.Tensor]:
        hidden = model.get_input_embeddings().embedding_dim
        return {"toy_P": torch.randn(self.cfg.r, hidden, generator=torch.Generator().manual_seed(3))}

    def create_layer(self, name: str, base: nn.Module) -> SharedToyLinear:
        return SharedToyLinear(base, self.shared_state, self.cfg.r)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        return sum(m.out_features * self.cfg.r for _, m in self.layers(model))


@pytest.fixture
def shared_toy():
    register(SharedToy)
    yield SharedToy
    unregister(SharedToy.name)


def test_shared_state_is_saved_once_and_round_trips(shared_toy, tmp_path):
    recipe, base_path, tokenizer, model, method = build("lora", tmp_path, ["method={name: shared_toy}"])
    assert isinstance(method, SharedToy)
    shared = getattr(model, SHARED_ATTR)
    with torch.no_grad():
        shared.toy_P.mul_(-2.0)  # not what a fresh build draws: loading must restore it
    batch = batch_of(model.config.vocab_size)
    train_steps(model, method, batch, steps=2)
    ours = logits(model, batch)
    assert (ours - logits(base_model(base_path, recipe), batch)).abs().max().item() > 1e-3

    state = method.adapter_state_dict(model)
    assert [k for k in state if "toy_P" in k] == ["base_model.toy_P"]  # once, peft's tuner-level key
    assert len([k for k in state if k.endswith(".toy_b")]) == 4  # q and v of two layers
    assert method.expected_trainable_parameters(model) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )

    adapter = save_adapter(tmp_path / "adapter", model, method, tokenizer, base_path, recipe.model)
    loaded = load_adapter(adapter)
    assert (getattr(loaded.model, SHARED_ATTR).toy_P - shared.toy_P).abs().max().item() == 0.0
    assert (logits(loaded.model, batch) - ours).abs().max().item() <= 1e-6

    merged = method.merge(model)
    assert not hasattr(merged, SHARED_ATTR)
    assert (logits(merged, batch) - ours).abs().max().item() <= 1e-4
