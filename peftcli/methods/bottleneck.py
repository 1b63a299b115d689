"""Shared building blocks of the bottleneck-adapter family (Houlsby, Pfeiffer, parallel, AdapterFusion).

Not a method itself: the registered methods (``houlsby_adapter``, ``parallel_adapter``,
``adapter_fusion``, ...) compose what is here.

- :class:`Bottleneck`: ``up(σ(down(x)))``, the adapter's delta, with ``up`` at zero at init.
- :func:`find_sublayers`: the attention and feed-forward sublayers of every transformer layer, found
  from the module structure (not from the model's class name), with the module whose *output* is the
  sublayer output and the module whose *input* is the sublayer input.
- :func:`attach`: put a block on a sublayer. The block becomes a child named ``adapter`` of the
  sublayer's output module, and a forward hook replaces that module's output ``h`` (the first element
  when the module returns a tuple) by ``block(h, x)``, where ``x`` is the sublayer's input. This is the
  same computation as wrapping the module, but every base parameter keeps its name.

Placement per family (where ``h`` is read and the result goes back):

=============================  ===================================  ===================================
family                         attention sublayer                   feed-forward sublayer
=============================  ===================================  ===================================
llama, qwen2, mistral, ...     output of ``layers[i].self_attn``    output of ``layers[i].mlp``
(pre-norm decoders)            (before the residual add);           (before the residual add);
                               input: its ``hidden_states``         input: its argument
gpt2                           output of ``h[i].attn``              output of ``h[i].mlp``
bert, roberta, ...             output of                            output of ``layer[i].output.dense``
(post-norm encoders)           ``layer[i].attention.output.dense``  (before dropout, residual and
                               (before dropout, residual and        LayerNorm: Houlsby's placement);
                               LayerNorm: Houlsby's placement);     input: ``layer[i].intermediate``'s
                               input: ``attention.self``'s input    input
=============================  ===================================  ===================================

In BERT the adapter sits before the sublayer's dropout, so in training mode the dropout also falls on
the adapter's output; in eval mode (and in every test) this is exactly Houlsby's placement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from peftcli.recipe import RecipeError

ADAPTER_ATTR = "adapter"
POSITIONS = ("attn", "ffn")
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
FEED_FORWARD_NAMES = ("mlp", "feed_forward", "ffn")

NONLINEARITIES = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,  # swish = x·sigmoid(x), AdapterHub's Houlsby default
    "tanh": nn.Tanh,
}


class Bottleneck(nn.Module):
    """``up(σ(down(x)))``: a d → m → d bottleneck. The caller adds the skip connection."""

    def __init__(self, hidden_size: int, bottleneck_size: int, nonlinearity: str):
        super().__init__()
        self.hidden_size, self.bottleneck_size = hidden_size, bottleneck_size
        self.down = nn.Linear(hidden_size, bottleneck_size)
        self.act = NONLINEARITIES[nonlinearity]()
        self.up = nn.Linear(bottleneck_size, hidden_size)
        # down: kaiming-uniform as nn.Linear; up = 0 (weight and bias): the delta is 0 at init, so the
        # adapted layer starts as the identity (Houlsby's near-identity init, made exact).
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, d) -> (B, T, d)
        return self.up(self.act(self.down(x)))

    @staticmethod
    def parameter_count(hidden_size: int, bottleneck_size: int) -> int:
        return 2 * hidden_size * bottleneck_size + bottleneck_size + hidden_size


def bottleneck_width(
    hidden_size: int,
    reduction_factor: float | None,
    bottleneck_size: int | None,
    default_reduction: float = 16.0,
) -> int:
    if bottleneck_size is not None:
        return bottleneck_size
    return max(1, int(hidden_size // (reduction_factor or default_reduction)))


@dataclass
class Sublayer:
    layer: int
    position: str  # "attn" or "ffn"
    output_module: str  # full name of the module whose output is the sublayer output h
    input_module: str  # full name of the module whose first input is the sublayer input x
    hidden_size: int
    layer_norms: list[str] = field(default_factory=list)  # norms of this transformer layer


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _layer_kind(layer: nn.Module) -> str | None:
    if _has(layer, "attention.output.dense") and _has(layer, "intermediate") and _has(layer, "output.dense"):
        return "post_norm"
    if any(_has(layer, n) for n in ATTENTION_NAMES) and any(_has(layer, n) for n in FEED_FORWARD_NAMES):
        return "pre_norm"
    return None


def transformer_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The longest ``nn.ModuleList`` whose members all look like transformer layers."""
    best: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > len(best)
            and all(_layer_kind(c) for c in module)
        ):
            best = [(f"{name}.{i}", child) for i, child in enumerate(module)]
    return best


def hidden_size_of(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = (
        getattr(config, "hidden_size", None)
        or getattr(config, "n_embd", None)
        or getattr(config, "d_model", None)
    )
    if not size:
        raise RecipeError(
            "model.name",
            f"cannot tell the hidden size of {type(model).__name__}",
            "bottleneck adapters need config.hidden_size",
        )
    return int(size)


def find_sublayers(model: nn.Module, positions: list[str] | tuple[str, ...] = POSITIONS) -> list[Sublayer]:
    """Every (layer, position) sublayer, in layer order; RecipeError when the structure is unknown."""
    layers = transformer_layers(model)
    if not layers:
        raise RecipeError(
            "model.name",
            f"found no transformer layers with attention and feed-forward sublayers in {type(model).__name__}",
            "bottleneck adapters support llama/qwen2/mistral-style, gpt2-style and bert-style layers",
        )
    hidden = hidden_size_of(model)
    found = []
    for index, (prefix, layer) in enumerate(layers):
        if _layer_kind(layer) == "post_norm":
            spots = {
                "attn": ("attention.output.dense", "attention.self"),
                "ffn": ("output.dense", "intermediate"),
            }
            norms = [n for n in ("attention.output.LayerNorm", "output.LayerNorm") if _has(layer, n)]
        else:
            attn = next(n for n in ATTENTION_NAMES if _has(layer, n))
            ffn = next(n for n in FEED_FORWARD_NAMES if _has(layer, n))
            spots = {"attn": (attn, attn), "ffn": (ffn, ffn)}
            norms = [
                n
                for n, m in layer.named_children()
                if "norm" in type(m).__name__.lower() or n.startswith("ln_")
            ]
        for position in POSITIONS:
            if position in positions:
                out_name, in_name = spots[position]
                found.append(
                    Sublayer(
                        index,
                        position,
                        f"{prefix}.{out_name}",
                        f"{prefix}.{in_name}",
                        hidden,
                        [f"{prefix}.{n}" for n in norms],
                    )
                )
    return found


# --------------------------------------------------------------------------------------------
# Hooks: put a block on a sublayer's output
# --------------------------------------------------------------------------------------------


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _stash_input(block: nn.Module, module: nn.Module, args: tuple, kwargs: dict) -> None:
    block.sublayer_input = _first_input(args, kwargs)


def _replace_output(
    block: nn.Module, same_module: bool, module: nn.Module, args: tuple, kwargs: dict, output
):
    h = output[0] if isinstance(output, tuple) else output  # (B, T, d)
    x = None
    if getattr(block, "needs_input", False):
        if same_module:
            x = _first_input(args, kwargs)
        else:
            x, block.sublayer_input = block.sublayer_input, None
    new = block(h, x)
    return (new, *output[1:]) if isinstance(output, tuple) else new


def attach(model: nn.Module, sublayer: Sublayer, block: nn.Module) -> None:
    """Make ``block(h, x)`` replace the sublayer output ``h`` (``x``: the sublayer input)."""
    out_module = model.get_submodule(sublayer.output_module)
    if hasattr(out_module, ADAPTER_ATTR):
        raise RecipeError(
            "method",
            f"{sublayer.output_module} already carries an adapter",
            "apply one bottleneck method per model",
        )
    out_module.add_module(ADAPTER_ATTR, block)
    same = sublayer.input_module == sublayer.output_module
    if getattr(block, "needs_input", False) and not same:
        block.sublayer_input = None
        model.get_submodule(sublayer.input_module).register_forward_pre_hook(
            partial(_stash_input, block), with_kwargs=True
        )
    # partial (not a closure) so that copy.deepcopy of the model rebinds the hook to the copied block
    out_module.register_forward_hook(partial(_replace_output, block, same), with_kwargs=True)


def block_of(model: nn.Module, sublayer: Sublayer) -> nn.Module:
    return getattr(model.get_submodule(sublayer.output_module), ADAPTER_ATTR)


# -- what Houlsby and parallel adapters share: the attached blocks and their count ----------------


def attached_blocks(model: nn.Module, sublayers: list[Sublayer]) -> list[tuple[str, nn.Module]]:
    """(output module name, block) for every sublayer an adapter block was attached to."""
    return [(sub.output_module, block_of(model, sub)) for sub in sublayers]


def blocks_parameter_count(model: nn.Module, sublayers: list[Sublayer]) -> int:
    """2·d·m + d + m per block (the formula, from each block's dims)."""
    return sum(
        Bottleneck.parameter_count(b.bottleneck.hidden_size, b.bottleneck.bottleneck_size)
        for _, b in attached_blocks(model, sublayers)
    )


def serial_block_key(parameter_name: str) -> str:
    """On-disk key of a Houlsby/parallel block parameter: ``<output module>.adapter.{down,up}.*`` (the
    ``bottleneck`` level of the module tree is not part of the file format)."""
    return parameter_name.replace(f".{ADAPTER_ATTR}.bottleneck.", f".{ADAPTER_ATTR}.")
