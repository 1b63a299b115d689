"""Attention over packed rows without a (T × T) mask: one causal attention call per example.

A packed row holds several examples end to end, with ``position_ids`` restarting at 0 at each. The
default transformers path turns that into a block-diagonal causal mask and runs SDPA over the whole
row, so on the CPU it computes (and back-propagates) every T² score and throws most of them away: at
1,024-token rows of ~130-token examples, 8× the attention work that is needed. Flash-attention's
varlen kernel avoids that on CUDA; there is no such kernel on the CPU.

``packed_sdpa`` is a transformers attention implementation (registered under ``ATTENTION_NAME``)
that reads the example boundaries from ``position_ids`` and calls SDPA with ``is_causal`` once per
example: only the sum of the examples' L² scores is computed, and no mask is built. Calls that are
not a packed self-attention (a padding mask, a KV cache, a decode step) go to transformers' own SDPA
path unchanged, so evaluation and generation in the same run are untouched. Its mask function
builds no mask when there is no padding mask to honour.

:func:`use_packed_attention` switches a model to it, after a probe forward proving that the model
hands ``position_ids`` to its attention (models that don't keep transformers' path). The losses
equal the mask path's (tests/test_batching.py); ``python bench/packed_attention.py`` times both.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_NAME = "peftcli_packed_sdpa"
_registered = False


def packed_sdpa(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, T, D)
    key: torch.Tensor,  # (B, H_kv, T, D)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    if (
        attention_mask is not None
        or position_ids is None
        or length == 1
        or key.shape[2] != length
        or position_ids.shape[-1] != length
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise RuntimeError("peftcli's per-example attention was given a sliding window or soft-capping")
    _record_probe()
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention; SDPA's enable_gqa would take the slow math kernel on the CPU
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    dropout_p = dropout if module.training else 0.0
    rows = position_ids.expand(query.shape[0], -1)
    out = []
    # split (not slicing): its backward concatenates the pieces' gradients once, where every slice's
    # backward would zero-fill a whole (H, T, D) tensor
    # (1, H, T, D) per row: the CPU flash kernel takes 4-D inputs only (3-D falls back to the math kernel)
    per_row = (t.split(1, dim=0) for t in (query, key, value))
    for q, k, v, starts in zip(*per_row, example_starts(rows), strict=True):
        sizes = [e - s for s, e in itertools.pairwise([*starts, length])]
        pieces = [
            F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout_p, is_causal=True, scale=scaling)
            for qs, ks, vs in zip(q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2), strict=True)
        ]
        out.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])  # (1, H, T, D)
    attn = torch.cat(out) if len(out) > 1 else out[0]  # (B, H, T, D)
    return attn.transpose(1, 2).contiguous(), None


def example_starts(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the offsets where an example starts (its position id is 0; offset 0 always starts one)."""
    starts = position_ids == 0
    starts[:, 0] = True
    flat = starts.nonzero().tolist()  # one host sync for the whole batch
    out: list[list[int]] = [[] for _ in range(position_ids.shape[0])]
    for row, column in flat:
        out[row].append(column)
    return out


def packed_mask(**kwargs):
    """No mask when nothing needs masking (no padding, queries = keys): packed_sdpa reads the examples
    from the position ids; otherwise transformers' SDPA mask."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None and kwargs.get("q_length") == kwargs.get("kv_length"):
        return None
    return sdpa_mask(**kwargs)


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, packed_sdpa)
    AttentionMaskInterface.register(ATTENTION_NAME, packed_mask)
    _registered = True


# -- switching a model over ------------------------------------------------------------------------

_probe_seen: list[bool] = []


def _record_probe() -> None:
    if _probe_seen:  # only while use_packed_attention's probe forward runs
        _probe_seen[0] = True


def _unsupported_attention(config) -> str | None:
    """What plain causal SDPA per example would get wrong for this model, if anything."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping"
    if "sliding_attention" in (getattr(text, "layer_types", None) or []):
        return "sliding-window layers"
    if getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True):
        return "a sliding attention window"
    return None


def use_packed_attention(model: nn.Module) -> tuple[bool, str]:
    """Switch ``model`` to per-example attention for packed rows; (switched, why). A tiny packed forward
    (two examples of two tokens) must reach packed_sdpa with the position ids, else nothing changes."""
    config = getattr(model, "config", None)
    setter = getattr(model, "set_attn_implementation", None)
    if config is None or setter is None:
        return False, "not a transformers model"
    before = getattr(config, "_attn_implementation", None)
    if before not in ("sdpa", "eager"):
        return False, f"attention is {before} (its own packed path)"
    unsupported = _unsupported_attention(config)
    if unsupported:
        return False, f"{unsupported}: transformers' mask handles it"
    register()
    try:
        setter(ATTENTION_NAME)
    except (ValueError, ImportError, AttributeError) as err:
        return False, f"{type(model).__name__} cannot take a custom attention ({str(err)[:80]})"
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 1, 1, 1]], device=device)
    positions = torch.tensor([[0, 1, 0, 1]], device=device)
    _probe_seen[:] = [False]
    was_training = model.training
    model.eval()  # no dropout draws: the run's random stream is untouched
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(input_ids=ids, position_ids=positions, use_cache=False)
        reached = _probe_seen[0]
    except Exception:
        reached = False
    finally:
        _probe_seen.clear()
        model.train(was_training)
    if not reached:
        setter(before)
        return False, f"{type(model).__name__} does not pass position_ids to its attention"
    return True, "per example (one causal SDPA call each, no T × T mask)"
