"""BEFT: Bias-Efficient Fine-Tuning (2025, arXiv 2509.15974).

The paper fine-tunes only bias terms and finds that, of the query, key and value projections' biases,
the value projection's is the one worth training in low-data regimes. Each adapted linear layer keeps W
and b frozen and trains one extra bias vector β (1 × out)::

    y = W x + b + β

β starts at zero, so step 0 is the base (peft's ``init_weights: false`` draws it from N(0, 1) instead).
By default the adapted layers are the value projections (``v_proj``, ``value``, ``v``: peft's default
targets for the method). Merging adds β into the layer's bias, which the layer must have: a layer with
no bias (llama's ``v_proj``) cannot hold the sum in a plain model, so the merge is refused there, as peft
refuses it. Saved as peft names it: ``beft_bias`` (1, out) under each module, ``peft_type`` ``BEFT``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from peftcli.inject import match_targets
from peftcli.methods.kit import AdapterLayer, LayerMethod, write_weight
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc

VALUE_PROJECTIONS = ("v_proj", "value", "v")  # peft's default BEFT targets, over its model families


@dataclass
class BeftConfig(MethodConfig):
    """peft's ``BeftConfig`` fields."""

    target_modules: str | list[str] | None = field(
        default=None,
        metadata=doc(
            "module names (list) or a regex on full names; default: the value projections "
            "(v_proj, value or v), the targets the paper picks"
        ),
    )
    init_weights: bool = field(
        default=True,
        metadata=doc("start the bias at zero (step 0 is the base); false: N(0, 1), as peft draws it"),
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=doc("modules trained in full and saved whole; seq_cls heads are added"),
    )


class BeftLinear(AdapterLayer):
    """``base_layer(x) + β`` around a frozen ``nn.Linear``."""

    def __init__(self, base_layer: nn.Linear, init_weights: bool):
        super().__init__()
        self.base_layer = base_layer
        shift = torch.zeros(1, self.out_features) if init_weights else torch.randn(1, self.out_features)
        self.beft_bias = nn.Parameter(shift.to(base_layer.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        return (result + self.beft_bias.flatten()).to(result.dtype)

    def base_bias(self) -> torch.Tensor:
        bias = self.base_layer.bias
        if bias is None:
            raise RecipeError(
                "merge",
                "a BEFT layer's base has no bias to add β into (a plain model would drop it)",
                "keep the adapter (peftcli.load), or target layers with biases (e.g. qwen2's v_proj)",
            )
        return bias

    def merge(self) -> None:
        bias = self.base_bias()
        write_weight(bias, bias.float() + self.beft_bias.detach().float().flatten())

    def unmerge(self) -> None:
        bias = self.base_bias()
        write_weight(bias, bias.float() - self.beft_bias.detach().float().flatten())


@register
class Beft(LayerMethod):
    name = "beft"
    description = "BEFT: one trained bias vector added to each value projection (arXiv 2509.15974)"
    config_cls = BeftConfig
    mergeable = True  # into the base bias, where the layer has one (else refused in one line)
    peft_type = "BEFT"
    supports_quantized_base = False  # not checked on a 4-bit base here: refused at start, not guessed
    supports_packing = True  # a per-token shift: packed examples never meet
    supports_fsdp = False  # not yet run under FSDP here (tests/test_distributed.py): refused at start
    trainable_formula = "out per adapted layer (the bias β), plus modules_to_save"
    parameter_prefix = "beft_"  # saved as base_model.model.<module>.beft_bias, peft's key
    layer_types = (BeftLinear,)
    target_kind = "nn.Linear layers"
    target_hint = "peft's BEFT adapts nn.Linear only; GPT-2's Conv1D biases train with bitfit"
    accepts_target = staticmethod(lambda module: type(module) is nn.Linear)

    cfg: BeftConfig

    def resolve_targets(self, model: nn.Module) -> list[str]:
        if self.cfg.target_modules is not None:
            return super().resolve_targets(model)
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is nn.Linear}
        values = [v for v in VALUE_PROJECTIONS if v in names]
        if not values:
            raise RecipeError(
                "method.target_modules",
                f"found no value projection (v_proj, value, v) in {type(model).__name__}",
                "set method.target_modules to the layers whose outputs get a trained bias",
            )
        return match_targets(model, values)

    def create_layer(self, name: str, base: nn.Module) -> BeftLinear:
        return BeftLinear(base, self.cfg.init_weights)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(m.out_features for _, m in self.layers(model))
        return count + self.saved_modules_count(model)


__all__ = ["Beft", "BeftConfig", "BeftLinear"]
