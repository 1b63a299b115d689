"""``register()`` checks the method contract at import: one bad class per rule, each refused with a one-line
message that names the method and what it lacks; every shipped method passes every rule."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from torch import nn

from peftcli.methods.catalog import list_methods
from peftcli.methods.kit import LayerMethod
from peftcli.methods.registry import Method, contract_problems, register, registered, unregister
from peftcli.recipe import MethodConfig


@dataclass
class GoodConfig(MethodConfig):
    r: int = field(default=4)


class Good(Method):
    """A complete method: every rule below breaks exactly one thing of it."""

    name = "good_toy"
    description = "test only: a complete method"
    config_cls = GoodConfig
    trainable_formula = "nothing"
    parameter_prefix = "toy_"

    def apply(self, model: nn.Module) -> nn.Module:
        return model


class GoodLayers(LayerMethod):
    name = "good_layers"
    description = "test only: a complete wrapped-layer method"
    config_cls = GoodConfig
    trainable_formula = "nothing"
    parameter_prefix = "toy_"
    layer_types = (nn.Linear,)

    def create_layer(self, name: str, base: nn.Module) -> nn.Module:
        return base


@dataclass
class RenamedConfig(MethodConfig):
    name: str = field(default="other")


def bad(base: type = Good, **attributes) -> type:
    return type("Bad", (base,), attributes)


def merge(self, model):
    return model


def live_state_dict(self, model):
    return {}


# (the broken class, the words the message must contain)
RULES = {
    "name not an identifier": (bad(name="my-method"), "name must be a Python identifier"),
    "name missing": (bad(name=None), "name must be a Python identifier"),
    "name taken": (bad(name="lora"), "registered twice"),
    "description empty": (bad(description=""), "description must be one non-empty line"),
    "description two lines": (bad(description="one\ntwo"), "description must be one non-empty line"),
    "formula empty": (bad(trainable_formula=""), "trainable_formula"),
    "config not a dataclass": (
        bad(config_cls=dict),
        "config_cls must be a dataclass subclass of MethodConfig",
    ),
    "config not a MethodConfig": (
        bad(config_cls=dataclass(type("Loose", (), {}))),
        "config_cls must be a dataclass subclass of MethodConfig",
    ),
    "config names another method": (bad(config_cls=RenamedConfig), "redeclares name with default 'other'"),
    "rename of no field": (bad(adapter_renames={"alpha": "lora_alpha"}), "adapter_renames names 'alpha'"),
    "omit of no field": (bad(adapter_omits=("ratio",)), "adapter_omits names 'ratio'"),
    "apply not overridden": (
        type("Bad", (Method,), dict(vars(Good), apply=Method.apply)),
        "apply is not overridden",
    ),
    "nothing to save": (bad(parameter_prefix=None), "set parameter_prefix or override live_state_dict"),
    "empty prefix": (bad(parameter_prefix=""), "parameter_prefix must be a non-empty string"),
    "mergeable without merge": (bad(mergeable=True), "mergeable is True but merge is not overridden"),
    "merge without mergeable": (bad(merge=merge), "merge is overridden but mergeable is False"),
    "peft_type not peft's": (bad(peft_type="lora"), "peft_type must be None or peft's upper-case name"),
    "flag not a bool": (bad(supports_packing="yes"), "supports_packing must be True or False"),
    "kit without create_layer": (
        bad(GoodLayers, create_layer=LayerMethod.create_layer),
        "create_layer is not overridden",
    ),
    "kit without layer_types": (bad(GoodLayers, layer_types=()), "layer_types is empty"),
}


def test_the_complete_methods_pass():
    assert contract_problems(Good) == [] and contract_problems(GoodLayers) == []
    assert contract_problems(bad(parameter_prefix=None, live_state_dict=live_state_dict)) == []
    assert contract_problems(bad(mergeable=True, merge=merge)) == []


@pytest.mark.parametrize("rule", list(RULES))
def test_register_refuses_a_method_that_breaks_a_rule(rule):
    cls, words = RULES[rule]
    before = registered()
    with pytest.raises(TypeError) as error:
        register(cls)
    message = str(error.value)
    assert words in message and "\n" not in message
    assert message.startswith(f"method {getattr(cls, 'name', None)!r}: ")
    assert registered() == before  # nothing half-registered


def test_each_rule_is_broken_alone():
    for rule, (cls, _) in RULES.items():
        assert len(contract_problems(cls)) == 1, rule


def test_register_then_unregister():
    register(Good)
    try:
        assert registered()["good_toy"] is Good
    finally:
        unregister("good_toy")
    assert "good_toy" not in registered()


@pytest.mark.parametrize("method", list_methods(), ids=lambda m: m.name)
def test_every_shipped_method_keeps_the_contract(method):
    others = {k: v for k, v in registered().items() if v is not method}
    assert [p for p in contract_problems(method) if "registered twice" not in p] == []
    assert method.name not in others
