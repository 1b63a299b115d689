"""The base weights a quantized adapter was trained on, dequantized, for ``peftcli merge --dequantize``.

A QLoRA adapter learned its update against ``dequant(quant(W0))``, not against ``W0``. The default merge
adds the update to the original ``W0`` (what the adapter was meant to improve); ``--dequantize`` adds
it to ``dequant(quant(W0))`` (what the adapter was trained with), so the merged fp32 model is the
trained 4-bit adapter model up to rounding. The base is quantized exactly as training did it, by
loading it through the adapter's saved quantization config; only the quantized layers' weights are
taken from there, and everything else (embeddings, norms, head, the adapter) from the full-precision
load that the merge folds into.
"""

from __future__ import annotations

import torch
from torch import nn

from peftcli.quantize import import_bitsandbytes, is_quantized_layer


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every bitsandbytes layer by full module name (kept small: the packed weights, not fp32 copies)."""
    return {name: module for name, module in model.named_modules() if is_quantized_layer(module)}


@torch.no_grad()
def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a bitsandbytes layer multiplies by, as an fp32 ``(out, in)`` matrix."""
    bnb = import_bitsandbytes()
    weight = layer.weight
    if type(layer).__name__ == "Linear8bitLt":  # int8 rows with one absmax per row: W = CB · SCB / 127
        # bitsandbytes moves the row scales from the weight to the layer's state on the first forward
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()


@torch.no_grad()
def load_dequantized_weights(model: nn.Module, layers: dict[str, nn.Module]) -> int:
    """Overwrite the full-precision weights of ``model`` with those of the same-named quantized
    ``layers``; return how many were replaced. A GPT-2 ``Conv1D`` stores ``(in, out)``, so it gets
    the transpose (transformers transposed it when it quantized)."""
    for name, layer in layers.items():
        target = model.get_submodule(name)
        weight = dequantized_weight(layer)
        if type(target).__name__ == "Conv1D":
            weight = weight.T
        if tuple(weight.shape) != tuple(target.weight.shape):
            raise ValueError(f"{name}: dequantized {tuple(weight.shape)} vs {tuple(target.weight.shape)}")
        target.weight.copy_(weight.to(target.weight.dtype))
    return len(layers)
