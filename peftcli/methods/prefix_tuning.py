"""Prefix tuning (Li & Liang, 2021, arXiv 2101.00190) and P-tuning v2 (Liu et al., 2022, arXiv 2110.07602).

Every attention layer ``l`` gets ``n`` trainable key and value vectors in front of the real ones::

    head_l(x) = softmax(q [P_k^l; K]^T / √d) [P_v^l; V]

**Prefix tuning** reparameterises the prefixes through an MLP for stable training (Sec. 4.3), on by
default (``prefix_projection``)::

    [P_k^1, P_v^1, …, P_k^L, P_v^L] = W_2 tanh(W_1 E + b_1) + b_2        E ∈ R^{n×token_dim}

**P-tuning v2** is the same deep prompt without the reparameterisation: the prefixes are the
parameters. Both are saved as peft's PREFIX_TUNING: ``prompt_embeddings`` [n, L·2·token_dim], the
prefixes *after* the projection (so the MLP is dropped at export and a reload replays fixed rows).

Init: ``random`` (N(0, 1) embeddings and default Linear init, as peft), or ``real_words`` (the paper's
finding that initialising from real words helps, Sec. 7.2): the keys and values the frozen model
computes for ``init_text`` at positions 0…n-1, exactly where the prefix sits. With the projection on,
the rows are a fixed offset and the MLP's last layer starts at zero, so step 0 reproduces them too.

**Encoder prefixes (seq2seq, ``encoder_prefix: true``).** By default a seq2seq model's prefixes reach
the decoder's self-attention only (peft's layout, so peft loads the adapter). With ``encoder_prefix``
a second prefix of the same kind (own embedding, own MLP when projected) gives every *encoder*
self-attention layer ``n`` more keys and values::

    head_l^enc(x) = softmax(q [P_k^l; K]^T + [0; B]) [P_v^l; V]      (T5: no 1/√d, B = relative bias)

The prefix positions get zero relative-position bias ``0`` (they have no place in the text) and are
never masked (the attention mask grows by ``n`` ones). T5's encoder stack drops any cache it is
given, so the prefix reaches its attention through forward pre-hooks (:func:`attach_encoder_prefix`):
each encoder ``T5Attention`` gets a one-layer cache holding its prefix (``update`` returns
``[P; computed]``), a mask padded with ``n`` "attend" columns, and the padded bias. peft has no
encoder prefixes, so such an adapter writes no ``peft_type`` (a peft load would silently drop them)
and stores the encoder rows as an extra tensor, ``encoder_prompt_embeddings`` [n, L_enc·2·token_dim].

For reuse (MAM adapter, UniPELT): :class:`PrefixEncoder` produces the per-layer ``(key, value)``
pairs, optionally scaled by ``gate(layer)``; :class:`~peftcli.methods.soft_prompt.PromptedModel`
turns them into the KV cache the base model reads (``prefix_cache``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from peftcli.checkpoint import read_adapter_state
from peftcli.compat import cache_argument, output_cache, pop_cache
from peftcli.methods.registry import register
from peftcli.methods.soft_prompt import (
    PrefixGeometry,
    PromptedModel,
    SoftPromptConfig,
    SoftPromptMethod,
    load_base_tokenizer,
    prefix_geometry,
    repeat_to,
    rows_to_key_values,
)
from peftcli.recipe import RecipeError, doc


@dataclass
class PTuningV2Config(SoftPromptConfig):
    init: Literal["random", "real_words"] = field(
        default="random",
        metadata=doc("prefix init: random, or real_words (the model's keys/values of init_text)"),
    )
    init_text: str = field(
        default="", metadata=doc("init: real_words — the words whose activations start the prefix")
    )
    encoder_prefix: bool = field(
        default=False,
        metadata=doc(
            "seq2seq (T5): also prefix every encoder self-attention layer; the adapter is then "
            "peftcli-only (peft has no encoder prefixes)"
        ),
    )


@dataclass
class PrefixTuningConfig(PTuningV2Config):
    prefix_projection: bool = field(
        default=True, metadata=doc("reparameterise the prefixes through a 2-layer tanh MLP while training")
    )
    encoder_hidden_size: int | None = field(
        default=None, metadata=doc("width of the projection MLP (default: the model's hidden size)", min=1)
    )


class PrefixEncoder(nn.Module):
    """Trainable key/value prefixes for every attention layer.

    ``forward()`` returns the flattened rows (n, L·2·token_dim) that peft stores: row block ``2l`` is
    layer ``l``'s key, ``2l + 1`` its value (each ``kv_heads × head_dim``; see ``PrefixGeometry``).
    ``key_values(batch_size)`` returns per layer ``(key, value)``, each (B, kv_heads, n, head_dim),
    multiplied by ``gate(layer)`` when a gate is set (a scalar or anything broadcastable to that shape).
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        geometry: PrefixGeometry,
        projection: bool = False,
        encoder_hidden_size: int | None = None,
    ):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.geometry = geometry
        self.projection = projection
        if projection:
            width = encoder_hidden_size or geometry.token_dim
            self.embedding = nn.Embedding(num_virtual_tokens, geometry.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(geometry.token_dim, width), nn.Tanh(), nn.Linear(width, geometry.row_size)
            )
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, geometry.row_size)
        self.register_buffer("offset", None)  # fixed rows added to the projection (real-word / SPoT init)
        self.gate: Callable[[int], torch.Tensor] | None = None

    def forward(self) -> torch.Tensor:
        rows = (
            self.transform(self.embedding.weight) if self.projection else self.embedding.weight
        )  # (n, L·2·token_dim)
        if self.offset is not None:
            rows = rows + self.offset
        return rows

    def key_values(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = rows_to_key_values(self(), self.geometry, batch_size)
        if self.gate is None:
            return pairs
        return [(k * self.gate(layer), v * self.gate(layer)) for layer, (k, v) in enumerate(pairs)]

    def start_from(self, rows: torch.Tensor) -> None:
        """Make ``forward()`` return exactly ``rows`` now, keeping every parameter trainable."""
        with torch.no_grad():
            if self.projection:
                last = self.transform[-1]
                nn.init.zeros_(last.weight)  # the MLP adds 0 at step 0 and learns from there
                nn.init.zeros_(last.bias)
                self.offset = rows.detach().clone().to(last.weight)
            else:
                self.embedding.weight.copy_(rows)

    def trainable_count(self) -> int:
        g, n = self.geometry, self.num_virtual_tokens
        if not self.projection:
            return n * g.row_size
        width = self.transform[0].out_features
        return n * g.token_dim + (g.token_dim * width + width) + (width * g.row_size + g.row_size)


def real_word_rows(model: nn.Module, n: int, text: str, geometry: PrefixGeometry) -> torch.Tensor:
    """The frozen causal LM's keys and values of ``text`` (repeated or cut to n tokens) as prefix rows."""
    tokenizer = load_base_tokenizer(model, "method.init_text")
    ids = repeat_to(tokenizer(text, add_special_tokens=False)["input_ids"], n)
    if not ids:
        raise RecipeError(
            "method.init_text",
            "init: real_words needs a non-empty init_text",
            "set method.init_text to words that describe the task",
        )
    return kv_cache_rows(model, ids, geometry)


def kv_cache_rows(model: nn.Module, ids: list[int], geometry: PrefixGeometry) -> torch.Tensor:
    """The frozen causal LM's keys and values of the tokens ``ids``, read from its KV cache, as prefix
    rows (len(ids), L·2·token_dim) in peft's ``[k_0, v_0, k_1, v_1, …]`` layout (also Cartridge's init)."""
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        cache = output_cache(model(input_ids=torch.tensor([ids], device=device), use_cache=True))
    blocks = []
    for layer in range(geometry.num_layers):
        cached = cache.layers[layer]
        blocks += [cached.keys[0], cached.values[0]]  # each (H, n, d)
    rows = torch.stack(blocks).permute(2, 0, 1, 3)  # (n, 2L, H, d)
    return rows.reshape(len(ids), geometry.row_size).float()


# --------------------------------------------------------------------------------------------
# Encoder prefixes (seq2seq)
# --------------------------------------------------------------------------------------------

ENCODER_KEY = "encoder_prompt_embeddings"


def encoder_self_attentions(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every encoder layer of a T5-style model, or a RecipeError."""
    get_encoder = getattr(model, "get_encoder", None)
    encoder = get_encoder() if callable(get_encoder) else None
    try:
        attentions = [block.layer[0].SelfAttention for block in encoder.block]
    except (AttributeError, IndexError, TypeError):
        attentions = []
    if not attentions or not all(hasattr(a, "compute_bias") for a in attentions):
        raise RecipeError(
            "method.encoder_prefix",
            f"encoder prefixes need a T5-style encoder "
            f"(encoder.block[i].layer[0].SelfAttention); {type(model).__name__} has none",
            "set method.encoder_prefix: false (decoder prefixes only)",
        )
    return attentions


def encoder_prefix_geometry(model: nn.Module) -> PrefixGeometry:
    """The encoder's prefix shapes: one (key, value) pair per encoder layer, plain ``[k_0, v_0, …]`` rows."""
    attentions = encoder_self_attentions(model)
    first = attentions[0]
    return PrefixGeometry(len(attentions), first.n_heads, first.key_value_proj_dim, encoder_decoder=False)


class PrefixKeyValues:
    """The one-layer cache an encoder ``T5Attention`` reads: ``update`` returns ``[prefix; computed]``.

    Stateless (nothing is stored between calls), so the encoder can run any number of times.
    """

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        self.key, self.value = key, value  # each (B, heads, n, head_dim)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.key.shape[-2]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_: Any, **__: Any):
        return torch.cat([self.key, key], dim=-2), torch.cat([self.value, value], dim=-2)


def _encoder_started(model: PromptedModel, _module: nn.Module, _args: Any) -> None:
    # One projection per encoder run, shared by its layers: per layer (1, heads, n, head_dim).
    model.encoder_key_values = model.encoder_prefix.key_values(1)


def _encoder_finished(model: PromptedModel, _module: nn.Module, _args: Any, _output: Any) -> None:
    model.encoder_key_values = None


def _prefixed_self_attention(
    model: PromptedModel, layer: int, attention: nn.Module, args: tuple, kwargs: dict[str, Any]
):
    """Forward pre-hook of encoder layer ``layer``'s ``T5Attention``: hand it the prefix."""
    key_values = getattr(model, "encoder_key_values", None)
    if key_values is None:  # the attention module called on its own, outside an encoder run
        key_values = model.encoder_prefix.key_values(1)
    hidden = args[0] if args else kwargs["hidden_states"]
    batch, length = hidden.shape[:2]
    key, value = (t.to(hidden.dtype).expand(batch, -1, -1, -1) for t in key_values[layer])
    n = key.shape[-2]
    kwargs = dict(kwargs)
    pop_cache(kwargs)  # an encoder runs without a cache; the prefix is the only one
    kwargs[cache_argument()] = PrefixKeyValues(key, value)
    mask = kwargs.get("mask")
    if mask is not None:  # bool (True = attend) or additive float (0 = attend): the prefix is always seen
        attend = torch.ones if mask.dtype == torch.bool else torch.zeros
        kwargs["mask"] = torch.cat(
            [attend((*mask.shape[:-1], n), dtype=mask.dtype, device=mask.device), mask], -1
        )
    bias = kwargs.get("position_bias")
    if bias is None and attention.has_relative_attention_bias:  # layer 0 computes the bias the stack shares
        bias = attention.compute_bias(length, length, device=hidden.device)  # (1, heads, T, T)
    if bias is not None and bias.shape[-1] == length:  # zero bias on the prefix columns
        bias = torch.cat([bias.new_zeros((*bias.shape[:-1], n)), bias], -1)  # (1, heads, T, n + T)
    kwargs["position_bias"] = bias
    return args, kwargs


def attach_encoder_prefix(model: PromptedModel, prefix: PrefixEncoder) -> None:
    """Make every encoder self-attention layer of ``model.base_model`` attend to ``prefix``'s keys/values.

    The hooks read ``model.encoder_prefix`` at call time, so a reload may replace the module.
    """
    model.encoder_prefix = prefix
    model.encoder_key_values = None
    encoder = model.base_model.get_encoder()
    encoder.register_forward_pre_hook(partial(_encoder_started, model))
    encoder.register_forward_hook(partial(_encoder_finished, model))
    for layer, attention in enumerate(encoder_self_attentions(model.base_model)):
        attention.register_forward_pre_hook(partial(_prefixed_self_attention, model, layer), with_kwargs=True)


class DeepPrompts(SoftPromptMethod):
    """Key/value prompts in every layer: what P-tuning v2 (``peftcli.methods.p_tuning_v2``, registered in
    its own file) is, and what prefix tuning adds its MLP to."""

    config_cls = PTuningV2Config
    peft_type = "PREFIX_TUNING"
    prompt_kind = "prefix"

    cfg: PTuningV2Config

    def __init__(self, cfg: PTuningV2Config, task: str = "causal_lm"):
        super().__init__(cfg, task)
        if self.uses_encoder_prefix:
            self.peft_type = None  # peft has no encoder prefixes: loading there would silently drop them

    @property
    def projection(self) -> bool:
        return bool(getattr(self.cfg, "prefix_projection", False))

    @property
    def uses_encoder_prefix(self) -> bool:
        return self.task == "seq2seq" and bool(self.cfg.encoder_prefix)

    @classmethod
    def validate_config(cls, cfg: PTuningV2Config, recipe) -> None:
        if recipe.model.gradient_checkpointing:
            raise RecipeError(
                "model.gradient_checkpointing",
                f"{cls.name} passes its prefixes as a KV cache, "
                "which transformers drops inside checkpointed layers",
                "set model.gradient_checkpointing: false, or use prompt_tuning / p_tuning",
            )
        if cfg.init == "real_words":
            if recipe.model.task != "causal_lm":
                raise RecipeError(
                    "method.init",
                    "init: real_words reads the model's KV cache, which only causal LMs "
                    "return for their inputs",
                    "use init: random for seq_cls and seq2seq",
                )
            if not cfg.init_text:
                raise RecipeError(
                    "method.init_text",
                    "init: real_words needs init_text",
                    "set method.init_text to words that describe the task",
                )
        if cfg.encoder_prefix and recipe.model.task != "seq2seq":
            raise RecipeError(
                "method.encoder_prefix",
                f"encoder_prefix is for seq2seq models; a {recipe.model.task} "
                "model has no separate encoder (its prefixes already reach every layer)",
                "remove method.encoder_prefix",
            )

    def check_model(self, model: nn.Module) -> None:
        """Refuse, at start and in one line, a model whose attention reads no KV cache (DeBERTa-v2,
        ModernBERT): the prefixes travel in the cache, so such a model would drop them while the attention
        mask grows by ``n``. The backbone's forward names the cache (``cache``, ``past_key_values`` before
        transformers 5.24) when its layers read one."""
        backbone = getattr(model, "base_model", model)
        accepted = inspect.signature(backbone.forward).parameters
        if not {"cache", "past_key_values"} & set(accepted):
            raise RecipeError(
                "method.name",
                f"the prefixes of this method travel in a KV cache, and {type(backbone).__name__} reads none",
                "use prompt_tuning or p_tuning (prompts on the input embeddings), lora or ia3",
            )

    def build_prompt(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        self.check_model(model)
        geometry = prefix_geometry(model.config, self.task)
        encoder = PrefixEncoder(
            cfg.num_virtual_tokens,
            geometry,
            self.projection,
            getattr(cfg, "encoder_hidden_size", None) or model.get_input_embeddings().weight.shape[1],
        )
        encoder.to(model.get_input_embeddings().weight.device)
        if cfg.init == "real_words":
            encoder.start_from(real_word_rows(model, cfg.num_virtual_tokens, cfg.init_text, geometry))
        return encoder

    def fixed_prompt(self, rows: torch.Tensor, model: PromptedModel) -> nn.Module:
        encoder = PrefixEncoder(rows.shape[0], prefix_geometry(model.config, self.task), projection=False)
        encoder.start_from(rows)
        return encoder

    def load_transferred_rows(self, model: PromptedModel, rows: torch.Tensor) -> None:
        model.prefix.start_from(rows)

    def prompt_parameter_count(self, model: PromptedModel) -> int:
        count = model.prefix.trainable_count()
        return count + (model.encoder_prefix.trainable_count() if self.uses_encoder_prefix else 0)

    def method_adapter_config(self, model: PromptedModel) -> dict[str, Any]:
        hidden = (
            getattr(self.cfg, "encoder_hidden_size", None) or model.get_input_embeddings().weight.shape[1]
        )
        extra = (
            {"encoder_prefix": True, "encoder_num_layers": model.encoder_prefix.geometry.num_layers}
            if self.uses_encoder_prefix
            else {}
        )
        return {"prefix_projection": self.projection, "encoder_hidden_size": hidden, **extra}

    # -- encoder prefixes (seq2seq) -------------------------------------------------------
    def apply(self, model: nn.Module) -> PromptedModel:
        wrapped = super().apply(model)  # the decoder prefix first: its init is the same with or without
        if self.uses_encoder_prefix:
            width = (
                getattr(self.cfg, "encoder_hidden_size", None) or model.get_input_embeddings().weight.shape[1]
            )
            prefix = PrefixEncoder(
                self.cfg.num_virtual_tokens, encoder_prefix_geometry(model), self.projection, width
            )
            attach_encoder_prefix(wrapped, prefix.to(model.get_input_embeddings().weight.device))
            if self.cfg.init_from:
                self.transfer_encoder_rows(wrapped, self.cfg.init_from)
        return wrapped

    def encoder_rows(self, model: PromptedModel) -> torch.Tensor:
        """What the encoder consumes: (n, L_enc·2·token_dim), after any projection."""
        module = model.encoder_prefix
        was_training = module.training
        module.eval()
        with torch.no_grad():
            rows = module().detach().float()
        module.train(was_training)
        return rows

    def check_encoder_rows(self, rows: torch.Tensor, model: PromptedModel, key: str) -> torch.Tensor:
        expected = tuple(self.encoder_rows(model).shape)
        if tuple(rows.shape) != expected:
            raise RecipeError(
                key,
                f"the encoder prefix there is {tuple(rows.shape)} but this model needs {expected} "
                "(virtual tokens × (encoder layers·2·kv dim))",
                "use the same base model family and method.num_virtual_tokens",
            )
        return rows

    def transfer_encoder_rows(self, model: PromptedModel, source: str) -> None:
        """SPoT with encoder prefixes: start from the source's encoder rows when it has them."""
        state = read_adapter_state(Path(source).expanduser())
        if ENCODER_KEY in state:  # a decoder-only source leaves the encoder prefix at its init
            model.encoder_prefix.start_from(
                self.check_encoder_rows(state[ENCODER_KEY], model, "method.init_from")
            )

    def adapter_state_dict(self, model: PromptedModel) -> dict[str, torch.Tensor]:
        state = super().adapter_state_dict(model)
        if self.uses_encoder_prefix:
            state[ENCODER_KEY] = self.encoder_rows(model)
        return state

    def load_adapter_state_dict(self, model: PromptedModel, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        rows = state.pop(ENCODER_KEY, None)
        if self.uses_encoder_prefix and rows is None:
            raise RecipeError(
                "adapter",
                f"this {self.name} adapter was configured with encoder_prefix but holds no {ENCODER_KEY}",
                "load it with the method options that wrote it",
            )
        if rows is not None and not self.uses_encoder_prefix:
            raise RecipeError(
                "adapter",
                f"the adapter holds encoder prefixes ({ENCODER_KEY}) but encoder_prefix is off",
                "set method.encoder_prefix: true (seq2seq)",
            )
        super().load_adapter_state_dict(model, state)
        if rows is not None:
            rows = self.check_encoder_rows(rows, model, "adapter")
            fixed = PrefixEncoder(rows.shape[0], model.encoder_prefix.geometry, projection=False)
            fixed.start_from(rows.to(self.encoder_rows(model).dtype))
            model.encoder_prefix = fixed.to(next(model.encoder_prefix.parameters()).device)


@register
class PrefixTuning(DeepPrompts):
    name = "prefix_tuning"
    description = (
        "Prefix tuning: trainable key/value prefixes in every layer, MLP-reparameterised (arXiv 2101.00190)"
    )
    config_cls = PrefixTuningConfig
    trainable_formula = (
        "with prefix_projection: n·t + t·e+e + e·(L·2·t)+L·2·t, else n·L·2·t "
        "(t = kv_heads·head_dim, e = encoder_hidden_size, L layers); export keeps n·L·2·t; "
        "encoder_prefix adds the same again with L = encoder layers"
    )

    cfg: PrefixTuningConfig
