r"""LoftQ: LoRA-fine-tuning-aware quantization (Li et al., 2023, arXiv 2310.08659).

QLoRA quantizes W and starts the adapter at zero, so training begins from ``Q = q(W)`` and spends its
first steps undoing the quantization error. LoftQ chooses the quantized base and the adapter together
so that ``Q + s·B·A ≈ W`` at step 0, by alternating, ``loftq_iter`` times::

    Q_t = dq(q(W − L_{t-1} R_{t-1}))          (L_0 R_0 = 0: the first Q is plain q(W))
    L_t R_t = the rank-r truncated SVD of W − Q_t

and starting the adapter at ``s·B·A = L R`` over the base ``Q``. ``q`` is NF4 with blocks of 64 and an
fp32 absmax per block, no double quantization (what peft's ``loftq_init`` uses), run by bitsandbytes,
which does it on the CPU too. ``Q`` holds exactly NF4 values: quantizing it again in those settings
gives the same codes, so the base written out (:func:`loftq_base_state`) loads in 4 bits as the model
was trained.

peft's ``init_lora_weights="loftq"`` sets ``B = L``, ``A = R`` whatever the scale, so its step 0 is
``Q + s·L·R`` (peft issue #1982); ours divides the scale out (``B = L/√s``, ``A = R/√s``), as PiSSA does,
and equals peft's when ``s = 1`` (``alpha = r``). ``Q`` does not depend on the scale, so both load each
other's adapters alike.
"""

from __future__ import annotations

import warnings

import torch

BLOCKSIZE = 64  # bitsandbytes' and peft's default 4-bit block


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """``dq(q(weight))``: NF4, blocks of 64, fp32 absmax, no double quantization (peft's LoftQ settings)."""
    from peftcli.quantize import import_bitsandbytes

    bnb = import_bitsandbytes("method.init", "or use another init")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed, state = bnb.functional.quantize_4bit(
            weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=False, quant_type="nf4"
        )
        return bnb.functional.dequantize_4bit(packed, state).float()


def rank_r(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L (out, r), R (r, in)) with ``L R`` the best rank-r approximation of ``matrix`` (the SVD split by
    √S, as peft's ``_low_rank_decomposition``)."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    root = torch.sqrt(S[:r])
    return U[:, :r] * root[None, :], root[:, None] * Vh[:r]


@torch.no_grad()
def loftq_decompose(
    weight: torch.Tensor, r: int, iterations: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, L, R) for the fp32 (out, in) ``weight`` after ``iterations`` alternations: ``Q`` the
    dequantized NF4 base, ``L R`` the rank-r SVD of ``weight − Q``."""
    weight = weight.float()
    low_rank = torch.zeros_like(weight)
    for _ in range(iterations):
        quantized = nf4_round_trip(weight - low_rank)
        left, right = rank_r(weight - quantized, r)
        low_rank = left @ right
    return quantized, left, right


def loftq_base_state(layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file of the base a LoftQ adapter pairs with: each adapted layer's ``Q`` under the base model's
    own key (``<module>.weight``), contiguous, on the CPU."""
    return {f"{name}.weight": weight.detach().contiguous().cpu() for name, weight in layers.items()}


__all__ = ["BLOCKSIZE", "loftq_base_state", "loftq_decompose", "nf4_round_trip", "rank_r"]
