"""What the soft-prompt methods share: the wrapper that feeds prompts to a frozen model, the prefix
geometry, the KV cache the prefixes travel in, and prompt transfer (SPoT).

Soft prompts change a model's *inputs*, not its layers, so ``apply`` returns a wrapper,
:class:`PromptedModel`, around the frozen transformers model. It takes up to two prompt sources:

- an **input prompt** (prompt tuning, P-tuning): ``n`` trainable vectors prepended to the input
  embeddings, ``[P; E(x)]``;
- a **prefix** (prefix tuning, P-tuning v2, and, composed with other modules, MAM / UniPELT): per
  layer trainable keys and values ``P_k, P_v`` that every attention layer sees before the real ones,
  ``softmax(q [P_k; K]^T / √d) [P_v; V]``. They are handed to the model as a prefilled KV cache
  (:func:`prefix_cache`), built fresh on every forward so no step sees another step's cache.

Virtual tokens occupy cache positions ``0 … n-1``; real tokens follow at ``n + (their position among
the unpadded tokens)``, computed from the attention mask, so left and right padding give the same
logits. The wrapper returns logits for the real positions only (``[B, T, V]`` for a causal LM) and
inserts the prompt once: a call that continues a non-empty cache (``greedy_generate``'s decoding
steps) only extends the attention mask and shifts the positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from peftcli.checkpoint import read_adapter_state
from peftcli.compat import cache_argument, output_cache, pop_cache
from peftcli.inject import classifier_heads, make_trainable_copies, modules_to_save_state
from peftcli.methods.registry import Method
from peftcli.recipe import MethodConfig, RecipeError, doc


@dataclass
class SoftPromptConfig(MethodConfig):
    num_virtual_tokens: int = field(
        default=20,
        metadata=doc("virtual tokens: every sequence grows by this many positions (typical 10–100)", min=1),
    )
    init_from: str | None = field(
        default=None,
        metadata=doc(
            "SPoT prompt transfer: start from the prompt of this adapter directory (same shapes required)"
        ),
    )


# --------------------------------------------------------------------------------------------
# Geometry: where prefixes go
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefixGeometry:
    """Shapes of the key/value prefixes of one model.

    ``token_dim = kv_heads · head_dim``: with grouped-query attention the cache holds the *key/value*
    heads, so a prefix has ``kv_heads`` heads, not ``num_attention_heads`` (peft's config then says
    ``num_attention_heads = kv_heads``).
    """

    num_layers: int
    kv_heads: int
    head_dim: int
    encoder_decoder: bool  # True: peft's layout for two transformer submodules (see block_of)

    @property
    def token_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def row_size(self) -> int:
        """Width of one stored prefix row: keys and values of every layer."""
        return self.num_layers * 2 * self.token_dim

    def blocks_of(self, layer: int) -> tuple[int, int]:
        """Which ``token_dim`` blocks of a row are layer ``layer``'s key and value.

        A row is ``[k_0, v_0, k_1, v_1, …]``. For encoder-decoder models peft reads the row twice in a
        row (``[row; row]``, for self- and cross-attention) in groups of four blocks and keeps only the
        self-attention pair of each group, so decoder layer ``l`` reads blocks ``4l`` and ``4l + 1``
        modulo ``2L``. We follow that layout so peft loads our adapters with equal logits.
        """
        if self.encoder_decoder:
            return (4 * layer) % (2 * self.num_layers), (4 * layer + 1) % (2 * self.num_layers)
        return 2 * layer, 2 * layer + 1


def text_config(config):
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def prefix_geometry(config, task: str) -> PrefixGeometry:
    cfg = text_config(config)
    try:
        heads = cfg.num_attention_heads
        layers = (
            getattr(cfg, "num_decoder_layers", None) if task == "seq2seq" else None
        ) or cfg.num_hidden_layers
    except AttributeError as err:
        raise RecipeError(
            "method.name",
            f"cannot read the attention layout of {type(config).__name__} ({err})",
            "use prompt_tuning or p_tuning, which only need the input embeddings",
        ) from None
    kv_heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_kv_heads", None) or heads
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        kv_heads = 1  # Falcon-7B (and GPT-BigCode) share one key/value head among all query heads
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or cfg.hidden_size // heads
    return PrefixGeometry(layers, kv_heads, head_dim, encoder_decoder=task == "seq2seq")


def rows_to_key_values(
    rows: torch.Tensor, geometry: PrefixGeometry, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stored rows (n, L·2·token_dim) -> per layer (key, value), each (B, kv_heads, n, head_dim)."""
    n = rows.shape[0]
    blocks = rows.view(n, 2 * geometry.num_layers, geometry.kv_heads, geometry.head_dim)  # (n, 2L, H, d)
    blocks = blocks.permute(1, 2, 0, 3)  # (2L, H, n, d)
    out = []
    for layer in range(geometry.num_layers):
        k, v = geometry.blocks_of(layer)
        out.append(
            (
                blocks[k].unsqueeze(0).expand(batch_size, -1, -1, -1),
                blocks[v].unsqueeze(0).expand(batch_size, -1, -1, -1),
            )
        )
    return out


def prefix_cache(key_values: list[tuple[torch.Tensor, torch.Tensor]], config, encoder_decoder: bool):
    """A fresh transformers cache prefilled with the prefixes (decoder self-attention for seq2seq)."""
    from transformers import DynamicCache, EncoderDecoderCache

    cache = DynamicCache(ddp_cache_data=key_values, config=text_config(config))
    if encoder_decoder:  # cross-attention is computed from the encoder output, as without prefixes
        return EncoderDecoderCache(cache, DynamicCache())
    return cache


# --------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------


class PromptedModel(nn.Module):
    """A frozen transformers model fed by an input prompt and/or key/value prefixes.

    ``input_prompt()`` returns ``(n_in, hidden)``; ``prefix.key_values(batch_size)`` returns one
    ``(key, value)`` pair per layer, each ``(B, kv_heads, n_prefix, head_dim)`` (see ``PrefixEncoder``).
    """

    def __init__(
        self,
        base_model: nn.Module,
        task: str,
        input_prompt: nn.Module | None = None,
        prefix: nn.Module | None = None,
    ):
        super().__init__()
        self.base_model = base_model
        self.task = task
        self.input_prompt = input_prompt
        self.prefix = prefix

    # The spine and transformers read these from "the model".
    @property
    def config(self):
        return self.base_model.config

    @property
    def generation_config(self):
        return getattr(self.base_model, "generation_config", None)

    @property
    def name_or_path(self) -> str:
        return getattr(self.base_model, "name_or_path", "")

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    @property
    def n_input(self) -> int:
        return self.input_prompt.num_virtual_tokens if self.input_prompt is not None else 0

    @property
    def n_prefix(self) -> int:
        return self.prefix.num_virtual_tokens if self.prefix is not None else 0

    def _prompt_embeds(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None,
        task_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds = (
            inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids)
        )  # (B, T, h)
        # (n, h), or (B, n, h) from a prompt per example (multitask prompt tuning reads task_ids)
        prompt = self.input_prompt() if task_ids is None else self.input_prompt(task_ids)
        prompt = prompt.to(embeds.dtype)
        if prompt.ndim == 2:
            prompt = prompt.unsqueeze(0).expand(embeds.shape[0], -1, -1)
        return torch.cat([prompt, embeds], dim=1)  # (B, n + T, h)

    def _prefix_cache(self, batch_size: int, dtype: torch.dtype):
        key_values = [(k.to(dtype), v.to(dtype)) for k, v in self.prefix.key_values(batch_size)]
        return prefix_cache(key_values, self.config, self.task == "seq2seq")

    def _dtype(self) -> torch.dtype:
        return self.get_input_embeddings().weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds=None,
        **kwargs,
    ):
        cache = pop_cache(kwargs)
        task_ids = kwargs.pop("task_ids", None)  # data.task_id_column's, for a prompt per task
        virtual_logits = kwargs.pop("virtual_logits", False)  # CPT's loss also scores the prompt's positions
        if self.task == "seq2seq":
            return self._forward_seq2seq(input_ids, attention_mask, inputs_embeds, cache, **kwargs)
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        device = reference.device
        if attention_mask is None:  # covers every real token, cached ones included
            past = 0 if cache is None else cache.get_seq_length() - self.n_prefix - self.n_input
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=device)
        first = cache is None or cache.get_seq_length() == 0
        n_virtual = self.n_prefix + self.n_input
        full_mask = torch.cat([attention_mask.new_ones(batch, n_virtual), attention_mask], dim=1)
        args: dict[str, Any] = dict(attention_mask=full_mask, **kwargs)
        if self.task == "causal_lm":
            if position_ids is None:  # position among the unpadded tokens, as greedy_generate computes it
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -length:]
            position_ids = position_ids + n_virtual  # (B, T)
        if first and self.input_prompt is not None:
            args["inputs_embeds"] = self._prompt_embeds(input_ids, inputs_embeds, task_ids)
            if position_ids is not None:
                virtual = torch.arange(self.n_prefix, n_virtual, device=device).expand(batch, -1)
                position_ids = torch.cat([virtual, position_ids], dim=1)  # (B, n + T)
            if "token_type_ids" in kwargs and kwargs["token_type_ids"] is not None:
                tt = kwargs["token_type_ids"]
                args["token_type_ids"] = torch.cat([tt.new_zeros(batch, self.n_input), tt], dim=1)
        elif inputs_embeds is not None:
            args["inputs_embeds"] = inputs_embeds
        else:
            args["input_ids"] = input_ids
        if first and self.prefix is not None:
            cache = self._prefix_cache(batch, self._dtype())
        if position_ids is not None:
            args["position_ids"] = position_ids
        if cache is not None:
            args[cache_argument()] = cache
        out = self.base_model(**args)
        if self.task == "causal_lm" and not virtual_logits:
            out["logits"] = out.logits[:, -length:, :]  # (B, T, V): the real positions only
        return out

    def _forward_seq2seq(self, input_ids, attention_mask, inputs_embeds, cache, **kwargs):
        reference = input_ids if input_ids is not None else inputs_embeds
        batch = reference.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
        args: dict[str, Any] = dict(kwargs)
        if kwargs.get("encoder_outputs") is None and self.input_prompt is not None:
            args["inputs_embeds"] = self._prompt_embeds(input_ids, inputs_embeds)
            attention_mask = torch.cat([attention_mask.new_ones(batch, self.n_input), attention_mask], dim=1)
        elif kwargs.get("encoder_outputs") is None:
            args["input_ids" if inputs_embeds is None else "inputs_embeds"] = (
                input_ids if inputs_embeds is None else inputs_embeds
            )
        elif self.input_prompt is not None:  # the encoder already ran on [P; x]
            attention_mask = torch.cat([attention_mask.new_ones(batch, self.n_input), attention_mask], dim=1)
        args["attention_mask"] = attention_mask
        if self.prefix is not None and (cache is None or cache.get_seq_length() == 0):
            cache = self._prefix_cache(batch, self._dtype())
            mask = kwargs.get("decoder_attention_mask")
            if mask is not None:
                args["decoder_attention_mask"] = torch.cat([mask.new_ones(batch, self.n_prefix), mask], dim=1)
        if cache is not None:
            args[cache_argument()] = cache
        return self.base_model(**args)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        pad_token_id: int | None = None,
        **_: Any,
    ) -> torch.Tensor:
        """Greedy decoding for encoder-decoder models (``evaluate`` calls ``model.generate``): the encoder
        runs once on ``[P; x]``, the decoder extends one KV cache that starts with the prefixes.

        Returns ``(B, 1 + N)`` ids starting with the decoder start token, like ``transformers``.
        """
        if self.task != "seq2seq":
            raise RecipeError(
                "generate",
                "PromptedModel.generate is for seq2seq models",
                "use peftcli.evaluate.greedy_generate for causal LMs",
            )
        config = self.config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        encoder_mask = attention_mask
        if self.input_prompt is not None:
            embeds = self._prompt_embeds(input_ids, None)
            encoder_mask = torch.cat(
                [attention_mask.new_ones(input_ids.shape[0], self.n_input), attention_mask], 1
            )
            encoder_outputs = self.base_model.get_encoder()(inputs_embeds=embeds, attention_mask=encoder_mask)
        else:
            encoder_outputs = self.base_model.get_encoder()(
                input_ids=input_ids, attention_mask=attention_mask
            )
        batch = input_ids.shape[0]
        start = config.decoder_start_token_id
        pad = config.pad_token_id if pad_token_id is None else pad_token_id
        eos = config.eos_token_id
        tokens = torch.full((batch, 1), start, dtype=torch.long, device=input_ids.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        past = self._prefix_cache(batch, self._dtype()) if self.prefix is not None else None
        for _ in range(max_new_tokens):
            out = self.base_model(
                encoder_outputs=encoder_outputs,
                attention_mask=encoder_mask,
                decoder_input_ids=tokens[:, -1:],
                use_cache=True,
                **{cache_argument(): past},
            )
            past = output_cache(out)
            next_token = out.logits[:, -1, :].argmax(-1)
            next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            finished |= next_token == eos
            if bool(finished.all()):
                break
        return tokens


# --------------------------------------------------------------------------------------------
# The shared method: wrapping, saving, loading, prompt transfer
# --------------------------------------------------------------------------------------------


class SoftPromptMethod(Method):
    """Base of the four soft-prompt methods. Subclasses build the prompt module and say how it is
    stored; wrapping, peft-format export, reload and SPoT live here once.

    Every adapter stores one tensor, ``prompt_embeddings``: what the model *consumes* (input prompt
    rows, or flattened prefixes), never a reparameterisation network. Reloading therefore rebuilds a
    fixed prompt; resuming training needs the checkpoint, which holds the full trainable state.
    """

    identity_at_init = False  # prompts change the outputs from the first step
    supports_packing = False  # one prompt per row, not per example
    config_cls: ClassVar[type[SoftPromptConfig]] = SoftPromptConfig
    prompt_kind: ClassVar[str] = "input"  # "input" or "prefix"

    cfg: SoftPromptConfig

    # -- subclass hooks ------------------------------------------------------------------
    def build_prompt(self, model: nn.Module) -> nn.Module:
        """The trainable prompt module for the frozen ``model`` (initialised)."""
        raise NotImplementedError

    def fixed_prompt(self, rows: torch.Tensor, model: PromptedModel) -> nn.Module:
        """A prompt module that replays stored rows (what a reloaded adapter uses)."""
        raise NotImplementedError

    def method_adapter_config(self, model: PromptedModel) -> dict[str, Any]:
        return {}

    # -- building ------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> PromptedModel:
        checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        if checkpointed and self.prompt_kind == "prefix":
            raise RecipeError(
                "model.gradient_checkpointing",
                f"{self.name} passes its prefixes as a KV cache, which "
                "transformers drops inside checkpointed layers",
                "set model.gradient_checkpointing: false, or use prompt_tuning / p_tuning",
            )
        # A classifier head is new and random: it trains with the prompt and is saved whole (peft does the same).
        # (saved_modules are named inside the base model, PromptedModel.base_model)
        self.saved_modules = make_trainable_copies(model, classifier_heads(model, self.task))
        prompt = self.build_prompt(model)
        wrapped = PromptedModel(model, self.task)
        self.set_prompt_module(wrapped, prompt)
        if self.cfg.init_from:
            self.transfer_prompt(wrapped, self.cfg.init_from)
        return wrapped

    def prompt_module(self, model: PromptedModel) -> nn.Module:
        return model.prefix if self.prompt_kind == "prefix" else model.input_prompt

    def set_prompt_module(self, model: PromptedModel, module: nn.Module) -> None:
        setattr(model, "prefix" if self.prompt_kind == "prefix" else "input_prompt", module)

    def prompt_parameter_count(self, model: PromptedModel) -> int:
        """The subclass's formula for the prompt module's trainable parameters."""
        raise NotImplementedError

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        return self.prompt_parameter_count(model) + self.saved_modules_count(model.base_model)

    # -- saving --------------------------------------------------------------------------
    @property
    def num_transformer_submodules(self) -> int:
        """peft's count: 2 for encoder-decoder models (it stores 2n prompt rows), else 1."""
        return 2 if self.task == "seq2seq" else 1

    def stored_rows(self, model: PromptedModel) -> torch.Tensor:
        """What the model consumes, as rows: (n, hidden) input prompts or (n, L·2·token_dim) prefixes."""
        module = self.prompt_module(model)
        was_training = module.training
        module.eval()  # no encoder dropout in what we store
        with torch.no_grad():
            rows = module().detach().float()
        module.train(was_training)
        return rows

    def adapter_state_dict(self, model: PromptedModel) -> dict[str, torch.Tensor]:
        rows = self.stored_rows(model)
        if self.prompt_kind == "input" and self.num_transformer_submodules == 2:
            # peft keeps 2n rows for encoder-decoder models and feeds the first n to the encoder;
            # the second half (unused by its prompt-tuning forward) repeats the first.
            rows = torch.cat([rows, rows], dim=0)
        # peft's key for a saved head of a prompt-learning model: base_model.<module>.<param>
        return {
            "prompt_embeddings": rows,
            **modules_to_save_state(model.base_model, self.saved_modules, "base_model."),
        }

    def load_adapter_state_dict(self, model: PromptedModel, state: dict[str, torch.Tensor]) -> None:
        heads = modules_to_save_state(model.base_model, self.saved_modules, "base_model.")
        if set(state) != {"prompt_embeddings", *heads}:
            raise RecipeError(
                "adapter",
                f"a {self.name} adapter holds prompt_embeddings{' and the head' if heads else ''}"
                f"; got {sorted(state)[:4]}",
                "load it with the method and task that wrote it",
            )
        with torch.no_grad():
            for key, target in heads.items():
                target.copy_(state[key].to(target.dtype))
        rows = self.check_rows(state["prompt_embeddings"], model, "adapter")
        module = self.fixed_prompt(rows.to(self.stored_rows(model).dtype), model)
        device = next(self.prompt_module(model).parameters()).device
        self.set_prompt_module(model, module.to(device))

    def check_rows(self, rows: torch.Tensor, model: PromptedModel, key: str) -> torch.Tensor:
        """``rows`` cut to what this model consumes, or a RecipeError naming both shapes."""
        expected = tuple(self.stored_rows(model).shape)
        n = expected[0]
        if self.prompt_kind == "input" and rows.ndim == 2 and rows.shape[0] == 2 * n:
            rows = rows[:n]  # an encoder-decoder prompt (2n rows): the encoder's half
        if tuple(rows.shape) != expected:
            what = (
                "virtual tokens × hidden size"
                if self.prompt_kind == "input"
                else "virtual tokens × (layers·2·kv dim)"
            )
            raise RecipeError(
                key,
                f"the prompt there is {tuple(rows.shape)} but this model needs {expected} ({what})",
                f"use the same base model family and method.num_virtual_tokens: {rows.shape[0] if rows.ndim else '?'}",
            )
        return rows

    def adapter_config(self, model: PromptedModel) -> dict[str, Any]:
        geometry = prefix_geometry(model.config, self.task)
        hidden = model.get_input_embeddings().weight.shape[1]
        prefix = self.prompt_kind == "prefix"
        return {
            "num_virtual_tokens": self.cfg.num_virtual_tokens,
            "token_dim": geometry.token_dim if prefix else hidden,
            "num_transformer_submodules": self.num_transformer_submodules,
            "num_attention_heads": geometry.kv_heads
            if prefix
            else text_config(model.config).num_attention_heads,
            "num_layers": geometry.num_layers,
            "modules_to_save": list(self.saved_modules) or None,
            **self.method_adapter_config(model),
        }

    def on_save(self, model: nn.Module) -> None:
        # The saved prompt replaces any initialisation: a reload must not need the SPoT source.
        if self.cfg.init_from:
            self.cfg = replace(self.cfg, init_from=None)

    # -- prompt transfer (SPoT, Vu et al., arXiv 2110.07904) -------------------------------
    def transfer_prompt(self, model: PromptedModel, source: str) -> None:
        """Start from the prompt another run saved: step 0 consumes exactly the source's rows."""
        state = self.transfer_source(source)
        rows = self.check_rows(state["prompt_embeddings"], model, "method.init_from")
        self.load_transferred_rows(model, rows)

    def transfer_source(self, source: str) -> dict[str, torch.Tensor]:
        """The tensors of the soft-prompt adapter directory ``source`` (``method.init_from``), checked to
        hold a prompt (``prompt_embeddings``)."""
        key = "method.init_from"
        path = Path(source).expanduser()
        if not (path / "adapter_model.safetensors").is_file():
            raise RecipeError(
                key,
                f"{source} is not an adapter directory (no adapter_model.safetensors)",
                "point at RUN/adapter of a prompt_tuning, p_tuning or prefix run",
            )
        state = read_adapter_state(path)
        if "prompt_embeddings" not in state:
            raise RecipeError(
                key,
                f"{source} holds no soft prompt (keys {sorted(state)[:3]})",
                "transfer between soft-prompt adapters only",
            )
        return state

    def load_transferred_rows(self, model: PromptedModel, rows: torch.Tensor) -> None:
        raise RecipeError(
            "method.init_from",
            f"{self.name} cannot start from stored prompt rows",
            "use prompt_tuning, p_tuning_v2 or prefix_tuning with prefix_projection: false",
        )


def sample_init_ids(count: int, vocab_size: int, top_k: int, special_ids: set[int]) -> torch.Tensor:
    """``count`` token ids drawn uniformly from the first ``top_k`` non-special ids of the vocabulary."""
    pool = [i for i in range(min(top_k, vocab_size)) if i not in special_ids] or list(range(vocab_size))
    pick = torch.randint(0, len(pool), (count,))
    return torch.tensor(pool)[pick]


def repeat_to(ids: list[int], count: int) -> list[int]:
    """Repeat or cut ``ids`` to exactly ``count`` (as Lester et al. and peft do with init text)."""
    if not ids:
        return []
    return (ids * math.ceil(count / len(ids)))[:count]


def load_base_tokenizer(model: nn.Module, key: str):
    """The tokenizer saved beside the base model (text inits need it; Method.apply gets no tokenizer)."""
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise RecipeError(
            key,
            f"cannot load the tokenizer of {path!r} to embed the init text ({str(err)[:80]})",
            "use init: random or sample_vocab",
        ) from None


def special_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])
