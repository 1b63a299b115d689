"""P-tuning v2 (Liu et al., 2022, arXiv 2110.07602): trainable key/value prompts in every layer.

    head_l(x) = softmax(q [P_k^l; K]^T / √d) [P_v^l; V]

The same deep prompt as prefix tuning without its MLP reparameterisation: the prefixes are the
parameters. Saved as peft's PREFIX_TUNING (``prompt_embeddings`` [n, L·2·token_dim]). The shared
machinery (geometry, key/value cache, encoder prefixes for seq2seq) is
:class:`peftcli.methods.prefix_tuning.DeepPrompts`.
"""

from __future__ import annotations

from peftcli.methods.prefix_tuning import DeepPrompts, PTuningV2Config
from peftcli.methods.registry import register


@register
class PTuningV2(DeepPrompts):
    name = "p_tuning_v2"
    description = (
        "P-tuning v2: trainable key/value prompts in every layer, no reparameterisation (arXiv 2110.07602)"
    )
    config_cls = PTuningV2Config
    trainable_formula = (
        "num_virtual_tokens · num_layers · 2 · kv_heads · head_dim "
        "(+ the same over the encoder layers with encoder_prefix)"
    )


__all__ = ["PTuningV2", "PTuningV2Config"]
