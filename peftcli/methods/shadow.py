"""ShadowPEFT (Li et al., "ShadowPEFT: Shadow Network for Parameter-Efficient Fine-Tuning", arXiv
2604.19254; peft's SHADOW): a small trainable shadow network run beside the frozen decoder, its state
injected into every adapted block.

A **shadow backbone** gives the initial shadow state ``s⁰ = P(backbone(x))``: with ``shadow_model:
mirror`` the base's own decoder class rebuilt with ``shadow_num_hidden_layers`` fresh blocks, fed the
frozen base embeddings; or a pretrained model (``shadow_model: <id or directory>``), its embeddings
frozen. P projects to the base width where the backbone's differs (trained; loaded with a "projected"
checkpoint). The state then rides the base's decoder loop. At each adapted block l, with base hidden states h::

    δ = h − s^(l−1)                                   (Eq. 2)
    δ̃ = Dropout(δ) W_downᵀ W_upᵀ                      (Eq. 3, rank r, W_up = 0 at init)
    h^(l) = h + α δ̃                                  (Eq. 4) → the frozen block → h_out^(l)
    s^(l) = (1 − σ(G(h_out))) ⊙ s^(l−1) + σ(G(h_out)) ⊙ T(h_out)   (Eq. 5–7)

T and G are two-layer GELU MLPs of width ``update_hidden_size`` (default r). Training adds
``auxiliary_loss_weight`` × the shadow path's own loss (Eq. 8–9): the task loss of the base's head (a
copy of the classifier for seq_cls) applied to s⁰, so the shadow network also works on its own.

What is not a weight delta cannot merge: the correction depends on the input through s. The state
after the last adapted block is read by nothing, so that block's update (T, G) never receives a
gradient: peft builds, saves and never changes it; we save it and keep it frozen (so DDP sees no
unused trainable parameter).

Saved as peft's SHADOW: ``base_model.model.<block>.shadow_{down,up,update_transform,update_gate}
.default.*`` and ``base_model.shadow_backbone.default.*`` (``shadow_projection`` / ``shadow_head``
likewise); peft keeps the adapter name in these keys, so do we.
"""

from __future__ import annotations

import contextlib
import copy
import json
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.compat import cache_argument
from peftcli.inject import PREFIX, classifier_heads, make_trainable_copies, match_targets, set_module
from peftcli.methods.lora_options import is_excluded, layer_index
from peftcli.methods.registry import Method, register
from peftcli.recipe import MethodConfig, RecipeError, doc

ADAPTER = "default"  # the adapter name peft keeps inside Shadow's keys
MODEL_PREFIX = "base_model."  # peft's prefix for modules its tuner holds (the shadow backbone)
STACK_ATTRS = ("layers", "h")  # the decoder block list's name inside the stack
MIRROR_ONLY = (
    "shadow_num_hidden_layers",
    "shadow_hidden_size",
    "shadow_num_attention_heads",
    "shadow_intermediate_size",
)
PROJECTED = "causal_lm_with_hidden_projection"  # a shadow checkpoint with its projection to a base
OWNER_ATTRS = ("model", "transformer", "base_model", "decoder")  # where peft looks for the stack


@dataclass
class ShadowConfig(MethodConfig):
    """peft's ``ShadowConfig`` fields."""

    r: int = field(default=8, metadata=doc("rank of the injection bottleneck W_down / W_up", min=1))
    shadow_alpha: float = field(
        default=0.1, metadata=doc("strength α of the correction added to each block's input (Eq. 4)")
    )
    shadow_dropout: float = field(
        default=0.2, metadata=doc("dropout on h − s before the bottleneck (Eq. 3)", min=0.0, max=0.99)
    )
    init_weights: bool = field(
        default=True, metadata=doc("W_up starts at zero, so step 0 is the base model (peft's default)")
    )
    shadow_model: str = field(
        default="mirror",
        metadata=doc(
            "the shadow backbone: mirror (the base's decoder class, fewer/smaller blocks, new), or a "
            "pretrained model id / directory (its embeddings frozen)"
        ),
    )
    shadow_num_hidden_layers: int | None = field(
        default=None, metadata=doc("blocks of the mirror backbone (default 1)", min=1)
    )
    shadow_hidden_size: int | None = field(
        default=None,
        metadata=doc("width of the mirror backbone (default the base's; else a projection is added)", min=1),
    )
    shadow_num_attention_heads: int | None = field(
        default=None, metadata=doc("attention heads of the mirror backbone (default the base's)", min=1)
    )
    shadow_intermediate_size: int | None = field(
        default=None, metadata=doc("feed-forward width of the mirror backbone (default the base's)", min=1)
    )
    share_embeddings: bool = field(
        default=True,
        metadata=doc("feed the backbone the frozen base embeddings (when its width is the base's)"),
    )
    update_hidden_size: int | None = field(
        default=None, metadata=doc("hidden width of the update MLPs T and G (default r)", min=1)
    )
    auxiliary_loss_weight: float = field(
        default=0.05,
        metadata=doc(
            "weight λ of the shadow path's own loss on s⁰ added in training (Eq. 9); 0: off", min=0.0
        ),
    )
    target_modules: str | list[str] | None = field(
        default=None,
        metadata=doc("decoder blocks to adapt: names or a regex on full names; default every block"),
    )
    exclude_modules: str | list[str] | None = field(
        default=None, metadata=doc("blocks never adapted: names (list) or a regex")
    )
    layers_to_transform: int | list[int] | None = field(
        default=None, metadata=doc("adapt only the blocks with these indices (0-based)", min=0)
    )
    layers_pattern: str | list[str] | None = field(
        default=None, metadata=doc("the block list layers_to_transform counts in (layers, h)")
    )
    modules_to_save: list[str] = field(
        default_factory=list, metadata=doc("modules trained in full and saved whole; seq_cls heads are added")
    )


class ShadowRun:
    """What one forward shares between the stack's hooks and the blocks: the shadow state as it moves
    through the blocks, s⁰ (for the auxiliary loss), and the shadow backbone's KV caches, each kept
    beside the base cache it goes with (decoding hands the base cache back on the next step)."""

    def __init__(self) -> None:
        self.enabled = True
        self.state: torch.Tensor | None = None  # s^(l) while the blocks run; None: blocks run plain
        self.seed: torch.Tensor | None = None  # s⁰ of the last forward
        self.pending_cache: Any = None
        self.caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def update_mlp(d: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))


class ShadowBlock(nn.Module):
    """A frozen decoder block with the injection (Eq. 2–4) before it and the gated update (Eq. 5–7)
    after it. Attributes the decoder loop reads off its blocks (``attention_type``) read through."""

    def __init__(self, base_layer: nn.Module, d: int, cfg: ShadowConfig, run: ShadowRun, last: bool):
        super().__init__()
        self.base_layer = base_layer
        r, hidden = cfg.r, cfg.update_hidden_size or cfg.r
        self.shadow_alpha = cfg.shadow_alpha
        self.last = last  # the exit block: its new state is read by nothing
        # created in peft's order, so a seed gives peft's draws
        self.shadow_down = nn.Linear(d, r, bias=False)
        self.shadow_up = nn.Linear(r, d, bias=False)
        self.shadow_dropout = nn.Dropout(cfg.shadow_dropout) if cfg.shadow_dropout else nn.Identity()
        if cfg.init_weights:
            nn.init.zeros_(self.shadow_up.weight)
        self.shadow_update_transform = update_mlp(d, hidden)
        self.shadow_update_gate = update_mlp(d, hidden)
        self._run = [run]  # a plain reference: the run is not a module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def inject(self, hidden: torch.Tensor, shadow: torch.Tensor) -> torch.Tensor:
        dtype = self.shadow_down.weight.dtype
        delta = self.shadow_dropout((hidden - shadow).to(dtype))  # Eq. 2
        delta = self.shadow_up(self.shadow_down(delta))  # Eq. 3
        return hidden + (self.shadow_alpha * delta).to(hidden.dtype)  # Eq. 4

    def advance(self, hidden: torch.Tensor, shadow: torch.Tensor) -> torch.Tensor:
        dtype = self.shadow_update_transform[0].weight.dtype
        h = hidden.to(dtype)
        gate = torch.sigmoid(self.shadow_update_gate(h))  # Eq. 6
        new = (1.0 - gate) * shadow.to(dtype) + gate * self.shadow_update_transform(h)  # Eq. 5, 7
        return new.to(shadow.dtype)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        run = self._run[0]
        if run.state is None:  # adapter off, or a call outside the model's forward
            return self.base_layer(hidden_states, *args, **kwargs)
        out = self.base_layer(self.inject(hidden_states, run.state), *args, **kwargs)
        hidden = out if isinstance(out, torch.Tensor) else out[0]
        run.state = None if self.last else self.advance(hidden, run.state)
        return out


def decoder_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(the module running the decoder loop, its block list's full name, the list), found as peft does:
    under ``model`` / ``transformer`` / ``base_model`` / ``decoder``, a ``layers`` or ``h`` list."""
    names = {id(m): n for n, m in model.named_modules()}
    for attr in OWNER_ATTRS:
        owner = getattr(model, attr, None)
        if not isinstance(owner, nn.Module) or owner is model:
            continue
        for stack in (getattr(owner, "decoder", None), owner):
            for list_attr in STACK_ATTRS:
                blocks = getattr(stack, list_attr, None) if isinstance(stack, nn.Module) else None
                if isinstance(blocks, nn.ModuleList):
                    return stack, f"{names[id(stack)]}.{list_attr}", blocks
    raise RecipeError(
        "model.name",
        f"shadow rides a decoder stack (a layers or h block list) and {type(model).__name__} has none",
        "use a decoder-only model (llama, qwen, mistral, gpt2, ...); peft's Shadow is decoder-only too",
    )


def width(config: Any) -> int:
    for attr in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    raise RecipeError("model.name", "shadow cannot read the model's hidden size", "use a decoder-only model")


def set_first(config: Any, names: tuple[str, ...], value: int, key: str) -> None:
    for attr in names:
        if hasattr(config, attr):
            setattr(config, attr, int(value))
            return
    raise RecipeError(key, f"the base config has none of {', '.join(names)} to set", "leave it unset")


def mirror_config(stack: nn.Module, cfg: ShadowConfig) -> Any:
    """The base stack's config with the mirror's depth, width, heads and feed-forward width; per-layer
    lists (``layer_types``) cut or padded to the new depth."""
    config = copy.deepcopy(stack.config)
    depth = cfg.shadow_num_hidden_layers or 1
    set_first(
        config, ("num_hidden_layers", "n_layer", "num_layers"), depth, "method.shadow_num_hidden_layers"
    )
    changes = (
        (cfg.shadow_hidden_size, ("hidden_size", "n_embd", "d_model"), "method.shadow_hidden_size"),
        (
            cfg.shadow_intermediate_size,
            ("intermediate_size", "ffn_dim", "n_inner"),
            "method.shadow_intermediate_size",
        ),
        (
            cfg.shadow_num_attention_heads,
            ("num_attention_heads", "n_head", "num_heads"),
            "method.shadow_num_attention_heads",
        ),
    )
    for value, names, key in changes:
        if value is not None:
            set_first(config, names, value, key)
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        kinds = list(kinds) or ["full_attention"]
        config.layer_types = (kinds + [kinds[-1]] * depth)[:depth]
    if isinstance(getattr(config, "max_window_layers", None), int):
        config.max_window_layers = min(config.max_window_layers, depth)
    return config


def pretrained_backbone(name: str) -> tuple[nn.Module, nn.Linear | None]:
    """A pretrained shadow backbone (a model id or directory), as peft loads it: ``AutoModel``, or a
    "projected" shadow checkpoint (``model_type: causal_lm_with_hidden_projection``: the backbone's
    config inside, its weights under ``shadow_model.`` and a trained ``shadow_hidden_projection``)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel
    from transformers.utils import cached_file

    try:
        with open(cached_file(name, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
        if raw.get("model_type") != PROJECTED:
            return AutoModel.from_pretrained(name), None
        inner = dict(raw["shadow_model_config"])
        backbone = AutoModel.from_config(AutoConfig.for_model(inner.pop("model_type"), **inner))
        weights = load_file(cached_file(name, "model.safetensors"))
    except (OSError, ValueError, KeyError) as err:
        raise RecipeError(
            "method.shadow_model",
            f"cannot load {name!r} as a shadow backbone ({type(err).__name__}: {str(err).splitlines()[0]})",
            "name a local model directory or a cached hub id, or use shadow_model: mirror",
        ) from None
    prefix = "shadow_model."
    backbone.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    if "shadow_hidden_projection.weight" not in weights:
        raise RecipeError(
            "method.shadow_model",
            f"{name!r} is a projected checkpoint without its projection",
            "re-export it",
        )
    out_features, in_features = weights["shadow_hidden_projection.weight"].shape
    projection = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        projection.weight.copy_(weights["shadow_hidden_projection.weight"])
    return backbone, projection


@register
class Shadow(Method):
    name = "shadow"
    description = (
        "ShadowPEFT: a small shadow network beside the frozen decoder, injected into every block "
        "(arXiv 2604.19254)"
    )
    config_cls = ShadowConfig
    peft_type = "SHADOW"
    identity_at_init = True  # W_up = 0: no block input changes at step 0
    supports_quantized_base = False  # the mirror copies the base's decoder class, not 4-bit layers
    supports_packing = True  # the backbone reads packed position ids as the base does; per-token updates
    supports_fsdp = False  # the shadow backbone sits outside the sharded decoder blocks
    trainable_formula = (
        "blocks·(2·d·r + 2·(2·d·u + u + d)) less the exit block's T and G (u = update_hidden_size or r), "
        "+ the mirror backbone (shadow_num_hidden_layers blocks of the base's class at shadow_hidden_size, "
        "+ its final norm, + its own embedding unless shared) + d_s·d projection when d_s ≠ d "
        "+ a seq_cls head copy, + modules_to_save"
    )
    parameter_prefix = "shadow_"

    cfg: ShadowConfig

    def __init__(self, cfg: ShadowConfig, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.run = ShadowRun()
        self.targets: list[str] = []
        self.shared_embeddings = False

    # -- recipe --------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, cfg: ShadowConfig, recipe) -> None:
        mirror_only = [key for key in MIRROR_ONLY if getattr(cfg, key) is not None]
        checks = (
            (
                cfg.shadow_model != "mirror" and bool(mirror_only),
                f"method.{mirror_only[0] if mirror_only else ''}",
                f"sizes a mirror backbone; shadow_model {cfg.shadow_model!r} brings its own architecture",
                "leave the shadow_num_* / shadow_*_size keys unset with a pretrained shadow_model",
            ),
            (
                recipe.model.task == "seq2seq",
                "model.task",
                "shadow rides a decoder-only stack; seq2seq models have two",
                "use causal_lm or seq_cls on a decoder-only model (peft's Shadow is decoder-only too)",
            ),
            (
                cfg.auxiliary_loss_weight > 0 and recipe.objective.name != "sft",
                "method.auxiliary_loss_weight",
                f"the shadow path's loss is the sft task loss on s⁰; objective {recipe.objective.name} has none",
                "set method.auxiliary_loss_weight: 0, or objective.name: sft",
            ),
            (
                cfg.layers_pattern is not None and cfg.layers_to_transform is None,
                "method.layers_pattern",
                "only applies with layers_to_transform",
                "set method.layers_to_transform",
            ),
            (
                isinstance(cfg.target_modules, str) and cfg.layers_to_transform is not None,
                "method.layers_to_transform",
                "cannot narrow a regex target_modules (peft refuses it too)",
                "list the blocks in target_modules, or drop layers_to_transform",
            ),
        )
        for failed, key, what, hint in checks:
            if failed:
                raise RecipeError(key, what, hint)

    # -- building ------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        stack, list_name, blocks = decoder_stack(model)
        self.targets = self.resolve_targets(model, list_name, blocks)
        backbone, projection, head = self.build_shadow(model, stack)
        d = width(model.config)
        for i, name in enumerate(self.targets):
            block = ShadowBlock(
                model.get_submodule(name), d, self.cfg, self.run, last=i == len(self.targets) - 1
            )
            set_module(model, name, block.to(next(block.base_layer.parameters()).device))
            block.shadow_update_transform.requires_grad_(not block.last)
            block.shadow_update_gate.requires_grad_(not block.last)
        model.add_module("shadow_backbone", backbone)
        model.add_module("shadow_projection", projection)
        if head is not None:
            model.add_module("shadow_head", head)
        stack.register_forward_pre_hook(self.seed_hook, with_kwargs=True)
        stack.register_forward_hook(self.cache_hook)
        to_save = list(self.cfg.modules_to_save or [])
        to_save += [h for h in classifier_heads(model, self.task) if h not in to_save]
        self.saved_modules = make_trainable_copies(model, to_save)
        return model

    def resolve_targets(self, model: nn.Module, list_name: str, blocks: nn.ModuleList) -> list[str]:
        """The adapted blocks, in order: every block by default; else ``target_modules`` among them,
        less ``exclude_modules`` and the blocks ``layers_to_transform`` leaves out. They must be
        contiguous: the state rides the loop from the first to the last."""
        names = [f"{list_name}.{i}" for i in range(len(blocks))]
        cfg = self.cfg
        if cfg.target_modules is not None:
            found = match_targets(
                model, cfg.target_modules, accept=lambda m: any(m is b for b in blocks), what="decoder block"
            )
            names = [n for n in names if n in found]
        kept = [n for n in names if not is_excluded(n, cfg.exclude_modules) and self.in_layers(n)]
        if not kept:
            raise RecipeError(
                "method.target_modules",
                "the options leave no decoder block to adapt",
                f"blocks: {names[0]} … {names[-1]}",
            )
        positions = [names.index(n) for n in kept]
        if positions != list(range(positions[0], positions[-1] + 1)):
            raise RecipeError(
                "method.layers_to_transform",
                f"blocks {[n.rsplit('.', 1)[1] for n in kept]} are not contiguous",
                "adapt a run of neighbouring blocks (the shadow state rides the loop from the first to the last)",
            )
        return kept

    def in_layers(self, name: str) -> bool:
        wanted = self.cfg.layers_to_transform
        if wanted is None or wanted == []:
            return True
        index = layer_index(name + ".", self.cfg.layers_pattern)
        return index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)

    def build_shadow(
        self, model: nn.Module, stack: nn.Module
    ) -> tuple[nn.Module, nn.Module, nn.Module | None]:
        """The shadow backbone (a mirror, its embedding dropped when it reads the base's; or a
        pretrained one, its embeddings frozen), the projection to the base width, and (seq_cls) a copy
        of the new classifier: drawn in peft's order."""
        cfg = self.cfg
        mirror = cfg.shadow_model == "mirror"
        if mirror:
            backbone, projection = type(stack)(mirror_config(stack, cfg)), None
        else:
            backbone, projection = pretrained_backbone(cfg.shadow_model)
        d, d_s = width(model.config), width(backbone.config)
        if projection is not None and (projection.in_features, projection.out_features) != (d_s, d):
            raise RecipeError(
                "method.shadow_model",
                f"its projection maps {projection.in_features} → {projection.out_features}, not {d_s} → {d}",
                "use a shadow checkpoint projected to this base's hidden size",
            )
        if projection is None:
            projection = nn.Linear(d_s, d, bias=False) if d_s != d else nn.Identity()
        # peft's rule: the base embeddings feed a mirror when the widths agree; its own table goes
        # where it is called embed_tokens (gpt2's wte stays, unused: saved as peft saves it, frozen)
        self.shared_embeddings = mirror and cfg.share_embeddings and d_s == d
        if self.shared_embeddings and isinstance(getattr(backbone, "embed_tokens", None), nn.Module):
            del backbone.embed_tokens
        head = None
        if self.task == "seq_cls":
            heads = classifier_heads(model, self.task)
            head = copy.deepcopy(model.get_submodule(heads[0])) if heads else None
        weight = next(model.parameters())
        for module in (backbone, projection, head):
            if module is not None:
                module.to(device=weight.device, dtype=weight.dtype).requires_grad_(True)
        if self.shared_embeddings or not mirror:  # unused, or pretrained: not parameter-efficient
            for getter in ("get_input_embeddings", "get_output_embeddings"):
                with contextlib.suppress(AttributeError, NotImplementedError):
                    table = getattr(backbone, getter)()
                    if isinstance(table, nn.Module):
                        table.requires_grad_(False)
        return backbone, projection, head

    def summary_lines(self) -> list[str]:
        cfg = self.cfg
        backbone = "a mirror" if cfg.shadow_model == "mirror" else cfg.shadow_model
        feed = "the base embeddings" if self.shared_embeddings else "its own embeddings"
        return [
            f"Shadow: {len(self.targets)} blocks adapted, shadow backbone {backbone} reading {feed}; "
            f"auxiliary loss weight {cfg.auxiliary_loss_weight}"
        ]

    # -- the forward ---------------------------------------------------------------------
    def seed_hook(self, stack: nn.Module, args: tuple, kwargs: dict) -> None:
        """Before the decoder loop: s⁰ from the raw inputs (2-D mask, position ids), the shadow
        backbone continuing its own cache when decoding continues the base's."""
        run = self.run
        run.state = run.seed = run.pending_cache = None
        if not run.enabled:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        model = self._model[0]
        if embeds is None and ids is None:
            return
        if self.shared_embeddings and embeds is None:
            embeds = model.get_input_embeddings()(ids)
        past = kwargs.get(cache_argument(), kwargs.get("past_key_values"))
        shadow_past = run.caches.get(past) if past is not None else None
        if past is not None and shadow_past is None and past.get_seq_length() > 0:
            raise ValueError(
                "shadow: a KV cache without its shadow half (continue the cache this model returned)"
            )
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(stack.config, "use_cache", False))
        inputs = {"inputs_embeds": embeds} if embeds is not None else {"input_ids": ids}
        if kwargs.get("position_ids") is not None:
            inputs["position_ids"] = kwargs["position_ids"]
        out = model.shadow_backbone(
            **inputs,
            attention_mask=kwargs.get("attention_mask"),
            use_cache=use_cache,
            return_dict=True,
            **{cache_argument(): shadow_past},
        )
        run.seed = run.state = model.shadow_projection(out.last_hidden_state)
        run.pending_cache = getattr(out, cache_argument(), None) if use_cache else None

    def cache_hook(self, stack: nn.Module, args: tuple, output: Any) -> None:
        """After the loop: the shadow cache kept beside the base cache the stack returns."""
        run = self.run
        run.state = None
        base_cache = getattr(output, cache_argument(), None)
        if run.pending_cache is not None and base_cache is not None:
            run.caches[base_cache] = run.pending_cache
        run.pending_cache = None

    def attach(self, model: nn.Module) -> nn.Module:
        self._model = [model]  # the hooks read the base embeddings and the shadow modules from it
        return super().attach(model)

    def auxiliary_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """λ × the shadow path's own loss on s⁰ of the forward just run (Eq. 8–9), summed over the
        batch's scored targets as the task loss is: the base's LM head (next-token cross-entropy), or
        for seq_cls the shadow head on the last real token. Normalised with the task loss, so one
        micro-batch gives peft's ``loss + λ·shadow_loss`` (both means over the same targets)."""
        seed, weight = self.run.seed, self.cfg.auxiliary_loss_weight
        self.run.seed = None  # read once: the next forward sets it again
        if seed is None or weight == 0:
            return None
        labels = batch["labels"].to(seed.device)
        if self.task == "seq_cls":
            mask = batch["attention_mask"].to(seed.device)
            positions = torch.arange(mask.shape[-1], device=mask.device)
            last = (mask.ne(0) * positions).argmax(dim=-1)
            logits = model.shadow_head(seed[torch.arange(seed.shape[0], device=seed.device), last])
            scored = labels != -100  # a distributed stand-in row scores nothing
            return weight * F.cross_entropy(logits[scored].float(), labels[scored], reduction="sum")
        targets = labels[:, 1:]
        scored = targets != -100
        logits = model.get_output_embeddings()(seed[:, :-1][scored])
        return weight * F.cross_entropy(logits.float(), targets[scored], reduction="sum")

    def adapter_disabled(self, model: nn.Module) -> contextlib.AbstractContextManager | None:
        if self.saved_modules:
            return None
        return self._switched_off()

    @contextlib.contextmanager
    def _switched_off(self) -> Iterator[None]:
        self.run.enabled = False
        try:
            yield
        finally:
            self.run.enabled = True

    # -- counting and saving -------------------------------------------------------------
    def blocks(self, model: nn.Module) -> list[ShadowBlock]:
        return [m for m in model.modules() if isinstance(m, ShadowBlock)]

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        d, r = width(model.config), self.cfg.r
        u = self.cfg.update_hidden_size or r
        per_block = 2 * d * r + 2 * (2 * d * u + u + d)
        count = len(self.targets) * per_block - (2 * d * u + u + d) * 2  # the exit block's T and G
        count += self.backbone_parameters(model)
        d_s = width(model.shadow_backbone.config)
        count += d_s * d if d_s != d else 0
        if self.task == "seq_cls" and hasattr(model, "shadow_head"):
            count += sum(p.numel() for p in model.shadow_head.parameters())
        return count + self.saved_modules_count(model)

    def backbone_parameters(self, model: nn.Module) -> int:
        """The mirror's size: a block of the base per shadow block plus the final norm where the mirror
        has the base's shape; otherwise counted on the built backbone."""
        cfg, backbone = self.cfg, model.shadow_backbone
        same_shape = all(
            v is None
            for v in (cfg.shadow_hidden_size, cfg.shadow_intermediate_size, cfg.shadow_num_attention_heads)
        )
        if not same_shape or cfg.shadow_model != "mirror":
            return sum(p.numel() for p in backbone.parameters() if p.requires_grad)
        block = next(m for m in model.modules() if isinstance(m, ShadowBlock)).base_layer
        stack_parameters = (cfg.shadow_num_hidden_layers or 1) * sum(p.numel() for p in block.parameters())
        rest = sum(
            p.numel()
            for n, p in backbone.named_parameters()
            if p.requires_grad and not n.startswith(tuple(f"{a}." for a in STACK_ATTRS))
        )
        return stack_parameters + rest

    def stored_key(self, parameter_name: str) -> str:
        """peft's key: the adapter name after the ``shadow_*`` container; the model-level modules
        (backbone, projection, head) under ``base_model.``, the blocks' under ``base_model.model.``."""
        parts = parameter_name.split(".")
        i = next(i for i, p in enumerate(parts) if p.startswith(self.parameter_prefix))
        key = ".".join([*parts[: i + 1], ADAPTER, *parts[i + 1 :]])
        return (MODEL_PREFIX if i == 0 else PREFIX) + key

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {**super().adapter_config(model), "target_modules": list(self.targets)}


__all__ = ["Shadow", "ShadowBlock", "ShadowConfig", "ShadowRun"]
