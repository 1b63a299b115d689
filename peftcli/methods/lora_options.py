"""LoRA's structural options, each with peft's meaning and on-disk names (peft 0.21's ``LoraConfig``):

- which layers: ``exclude_modules`` and ``layers_to_transform`` / ``layers_pattern`` narrow the matched
  targets, with peft's matching rules (:func:`select_targets`);
- ``layer_replication``: the block list rebuilt from ranges of the original blocks, copies sharing the
  base weights, each copy with its own adapter (:func:`replicate_layers`);
- ``trainable_token_indices``: a few rows of an embedding (or LM head) trained, the rest frozen
  (:class:`TrainableTokens`, saved as peft saves its ``TrainableTokensLayer``);
- ``ensure_weight_tying``: a trained copy of a tied embedding shared with the modules tied to it
  (:func:`tied_module_names`).

They live here rather than in :mod:`peftcli.methods.lora` because they shape the model and the targets,
not the low-rank update; LoRA calls them from ``apply`` and ``resolve_targets``.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.inject import name_matches
from peftcli.methods.kit import Foldable, write_weight
from peftcli.recipe import RecipeError, did_you_mean

log = logging.getLogger("peftcli")

# peft spots a tied embedding in modules_to_save by these last names (its EMBEDDING_LAYER_NAMES)
EMBEDDING_NAMES = ("embed_tokens", "lm_head")
# peft's fallback for the layer index: the first ``.<name>.<digits>.`` in the full name (lazy, so an
# expert index deeper down never counts)
_ANY_BLOCK = r".*?\.[^.]*\.(?P<idx>\d+)\."


# -- which layers --------------------------------------------------------------------------------
def is_excluded(name: str, exclude: str | list[str] | None) -> bool:
    """peft's ``exclude_modules``: a string is a regex on the full name (fullmatch), a list holds full
    names or suffixes after a dot."""
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return any(name_matches(name, key) for key in exclude)


def layer_index(name: str, patterns: str | list[str] | None) -> int | None:
    """The block index in a full module name, as peft reads it for ``layers_to_transform``: the number
    after ``<pattern>.`` (the first pattern that matches), else after the first ``.<name>.``."""
    if not patterns:
        match = re.match(_ANY_BLOCK, name)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match["idx"]) if match else None


def in_layers(name: str, cfg: Any) -> bool:
    """Whether ``layers_to_transform`` keeps module ``name`` (every module when it is unset)."""
    wanted = cfg.layers_to_transform
    if wanted is None or wanted == []:
        return True
    index = layer_index(name, cfg.layers_pattern)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def select_targets(model: nn.Module, targets: list[str], cfg: Any) -> list[str]:
    """The matched ``targets`` less ``exclude_modules`` and the blocks ``layers_to_transform`` leaves
    out. A target named in full in ``target_modules`` keeps its place whatever the block filter says
    (peft's rule: an exact name is an exact choice)."""
    check_excludes_exist(model, cfg.exclude_modules)
    named = set(cfg.target_modules) if isinstance(cfg.target_modules, list) else set()
    kept = [
        n for n in targets if not is_excluded(n, cfg.exclude_modules) and (n in named or in_layers(n, cfg))
    ]
    if targets and not kept:
        why = (
            "exclude_modules and layers_to_transform leave"
            if cfg.exclude_modules
            else "layers_to_transform leaves"
        )
        indices = sorted({i for i in (layer_index(n, cfg.layers_pattern) for n in targets) if i is not None})
        raise RecipeError(
            "method.layers_to_transform" if cfg.layers_to_transform is not None else "method.exclude_modules",
            f"{why} none of the {len(targets)} matched modules",
            f"the matched modules sit in blocks {indices}" if indices else "check layers_pattern",
        )
    return kept


def check_excludes_exist(model: nn.Module, exclude: str | list[str] | None) -> None:
    """A name in ``exclude_modules`` that names no module is a typo (peft only warns; the module the
    user meant would then train)."""
    if not exclude:
        return
    names = [n for n, _ in model.named_modules() if n]
    entries = [exclude] if isinstance(exclude, str) else list(exclude)
    for entry in entries:
        found = (
            any(re.fullmatch(entry, n) for n in names)
            if isinstance(exclude, str)
            else any(name_matches(n, entry) for n in names)
        )
        if not found:
            short = dict.fromkeys(n.split(".")[-1] for n in names)
            raise RecipeError(
                "method.exclude_modules",
                f"{entry!r} matches no module in {type(model).__name__}",
                did_you_mean(entry, short) or "name modules by their last name (o_proj) or full name",
            )


# -- layer_replication ---------------------------------------------------------------------------
def block_list(model: nn.Module) -> tuple[nn.Module, str]:
    """(owner, attribute) of the model's block list, where peft looks for it: ``layers`` under the
    innermost ``.model``, BERT's ``encoder.layer``, or GPT/Falcon's ``h``."""
    owner = model
    while hasattr(owner, "model") and isinstance(owner.model, nn.Module):
        owner = owner.model
    owner = getattr(owner, "bert", owner)
    for holder, attribute in ((owner, "layers"), (getattr(owner, "encoder", None), "layer"), (owner, "h")):
        if holder is not None and isinstance(getattr(holder, attribute, None), nn.ModuleList):
            return holder, attribute
    raise RecipeError(
        "method.layer_replication",
        f"{type(model).__name__} has no block list where peft looks (layers, encoder.layer or h)",
        "use it with Llama-, BERT- or Falcon-like models, or remove it",
    )


def check_ranges(ranges: list[list[int]], count: int) -> None:
    for i, pair in enumerate(ranges):
        if len(pair) != 2 or not 0 <= pair[0] < pair[1] <= count:
            raise RecipeError(
                f"method.layer_replication[{i}]",
                f"{pair} is not a range [start, end) of the model's {count} blocks",
                f"e.g. [[0, {count}], [{max(count - 1, 0)}, {count}]] repeats the last block",
            )


def share_clone(block: nn.Module) -> nn.Module:
    """A deep copy of ``block`` whose parameters are the original's (buffers are copied)."""
    clone = copy.deepcopy(block)
    for name, module in block.named_modules():
        target = clone.get_submodule(name)
        for pname, param in module.named_parameters(recurse=False):
            target.register_parameter(pname, param)
    return clone


def replicate_layers(model: nn.Module, ranges: list[list[int]]) -> int:
    """Rebuild the block list as the concatenation of ``range(start, end)`` for each pair, copies sharing
    the base weights (peft's ``replicate_layers``); returns the new block count. Every copy's
    ``layer_idx`` (the KV-cache slot) becomes its new position, and the config says the new depth."""
    holder, attribute = block_list(model)
    blocks = getattr(holder, attribute)
    check_ranges(ranges, len(blocks))
    new_blocks = []
    for start, end in ranges:
        for index in range(start, end):
            clone = share_clone(blocks[index])
            for module in clone.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = len(new_blocks)
            new_blocks.append(clone)
    setattr(holder, attribute, nn.ModuleList(new_blocks))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(new_blocks)
    return len(new_blocks)


# -- tied embeddings -----------------------------------------------------------------------------
def input_embedding_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return next((n for n, m in model.named_modules() if embedding is not None and m is embedding), None)


def tied_module_names(model: nn.Module) -> list[str]:
    """Modules whose weight *is* the input embedding's (the LM head of a model with
    ``tie_word_embeddings``), as peft finds them; none when the config unties them."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", None) is False:
        return []
    embedding_name = input_embedding_name(model)
    if embedding_name is None:
        return []
    weight = model.get_submodule(embedding_name).weight
    return [
        n
        for n, m in model.named_modules()
        if n and n != embedding_name and getattr(m, "weight", None) is weight and not list(m.children())
    ]


# -- trainable_token_indices ---------------------------------------------------------------------
class TokenAdapter(nn.Module):
    """The trained rows: ``trainable_tokens_delta`` (peft's name; it holds the rows' new values, not a
    difference) and, for unmerge, the original rows (a buffer, not saved)."""

    def __init__(self, weight: torch.Tensor, indices: list[int]):
        super().__init__()
        self.indices = list(indices)
        rows = weight.detach()[torch.tensor(self.indices, device=weight.device)]
        self.trainable_tokens_delta = nn.Parameter(rows.clone(), requires_grad=True)
        self.register_buffer("trainable_tokens_original", rows.clone(), persistent=False)


class TrainableTokens(Foldable, nn.Module):
    """An embedding (or a linear LM head) whose rows ``indices`` come from :class:`TokenAdapter`: the
    base weight with those rows replaced, as peft's ``TrainableTokensWrapper``. A module tied to the
    embedding gets a second wrapper that reads the same adapter (``tied``: not a submodule, so the rows
    are saved once, under the embedding's name)."""

    def __init__(self, base_layer: nn.Module, indices: list[int], tied: TokenAdapter | None = None):
        super().__init__()
        self.base_layer = base_layer
        if tied is None:
            self.token_adapter = TokenAdapter(base_layer.weight, indices)
        self._tied = [tied] if tied is not None else []

    @property
    def adapter(self) -> TokenAdapter:
        return self._tied[0] if self._tied else self.token_adapter

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def rows(self) -> torch.Tensor:
        return torch.tensor(self.adapter.indices, device=self.base_layer.weight.device)

    def current_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        return weight.index_copy(0, self.rows(), self.adapter.trainable_tokens_delta.to(weight.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            out = F.embedding(
                x,
                self.current_weight(),
                base.padding_idx,
                base.max_norm,
                base.norm_type,
                base.scale_grad_by_freq,
                base.sparse,
            )
            scale = getattr(base, "embed_scale", None)  # Gemma's scaled embeddings scale in forward
            return out * scale.to(out.dtype) if scale is not None else out
        if isinstance(base, nn.Linear):
            return F.linear(x, self.current_weight(), base.bias)
        raise RecipeError(
            "method.trainable_token_indices",
            f"{type(base).__name__} is neither an embedding nor a linear head",
            "name the input embedding (e.g. embed_tokens) or the LM head",
        )

    def merge(self) -> None:
        if not self._tied:  # a tied wrapper's rows are its embedding's, merged there
            write_weight(self.base_layer.weight, self.current_weight().detach().float())

    def unmerge(self) -> None:
        if not self._tied:
            weight = self.base_layer.weight
            original = self.adapter.trainable_tokens_original.to(weight.dtype)
            write_weight(weight, weight.detach().index_copy(0, self.rows(), original).float())


def token_targets(model: nn.Module, indices: list[int] | dict[str, list[int]]) -> dict[str, list[int]]:
    """{full module name: row indices}: a list goes to the input embedding, a mapping names modules by
    full name or suffix (peft's ``trainable_token_indices``)."""
    if isinstance(indices, list):
        name = input_embedding_name(model)
        if name is None:
            raise RecipeError(
                "method.trainable_token_indices",
                f"{type(model).__name__} has no input embedding to train rows of",
                "name the module: {embed_tokens: [ids]}",
            )
        return {name: list(indices)}
    resolved = {}
    names = [n for n, _ in model.named_modules() if n]
    for key, rows in indices.items():
        hits = [n for n in names if name_matches(n, key)]
        if len(hits) != 1:
            raise RecipeError(
                f"method.trainable_token_indices.{key}",
                f"matches {len(hits) or 'no'} modules" + (f" ({', '.join(hits[:3])})" if hits else ""),
                did_you_mean(key, dict.fromkeys(n.split(".")[-1] for n in names))
                or "name one embedding or head, e.g. embed_tokens",
            )
        resolved[hits[0]] = list(rows)
    return resolved


def check_rows(name: str, key: str, module: nn.Module, rows: list[int]) -> None:
    count = module.weight.shape[0]
    bad = [i for i in rows if not 0 <= i < count]
    if bad or not rows or len(set(rows)) != len(rows):
        what = (
            f"index {bad[0]} is outside the {count} rows of {name}" if bad else "needs distinct row indices"
        )
        raise RecipeError(key, what, f"token ids 0 … {count - 1}, each once")


def add_trainable_tokens(
    model: nn.Module, indices: list[int] | dict[str, list[int]], ensure_weight_tying: bool
) -> list[str]:
    """Wrap each module of :func:`token_targets` in :class:`TrainableTokens`; a module tied to the
    input embedding reads the embedding's rows when its own indices are the same (or none), as peft
    does (peft refuses unequal indices on tied modules with ``ensure_weight_tying``). Returns the names
    of the wrappers that own rows."""
    from peftcli.inject import set_module

    targets = token_targets(model, indices)
    tied = tied_module_names(model)
    embedding = input_embedding_name(model)
    tied_targets = [n for n in targets if n in tied]
    mismatch = embedding in targets and any(targets[n] != targets[embedding] for n in tied_targets)
    if mismatch and ensure_weight_tying:
        raise RecipeError(
            "method.trainable_token_indices",
            "tied modules get different rows, so their weights cannot stay tied",
            "give the embedding and the head the same rows, or set ensure_weight_tying: false",
        )
    owners = []
    for name, rows in targets.items():
        if name in tied_targets and not mismatch:
            continue  # follows the embedding's adapter below
        module = model.get_submodule(name)
        check_rows(name, "method.trainable_token_indices", module, rows)
        set_module(model, name, TrainableTokens(module, rows))
        owners.append(name)
    source = model.get_submodule(embedding) if embedding else None
    if isinstance(source, TrainableTokens) and not mismatch:
        for name in tied:
            set_module(model, name, TrainableTokens(model.get_submodule(name), [], tied=source.token_adapter))
    return owners


def modules_to_tie(model: nn.Module, modules_to_save: list[str]) -> tuple[list[str], list[str]]:
    """peft's ``ensure_weight_tying`` for ``modules_to_save``: when the model ties its LM head to the
    input embedding and an entry is an embedding by peft's rule, the embedding is trained once and every
    tied module reads that copy. Returns (modules to train, modules tied to the first).

    peft's rule is the entry's last name (embed_tokens or lm_head); it also reads back the embedding's
    full name, which it writes in place of a tied head's (GPT-2: ``[lm_head]`` is saved as
    ``[transformer.wte]``). Any other entry is trained alone, as peft does, so a file loads the same
    both ways (``[wte]`` on GPT-2 leaves the head on the base weight, and a warning says so)."""
    tied = tied_module_names(model)
    embedding = input_embedding_name(model)
    if not tied or embedding is None:
        return modules_to_save, []
    if not any(m.split(".")[-1] in EMBEDDING_NAMES or m == embedding for m in modules_to_save):
        log.warning(
            "note: ensure_weight_tying: peft ties a trained embedding to its head only when modules_to_save "
            "names embed_tokens, lm_head or %s; %s trained without tying",
            embedding,
            ", ".join(modules_to_save),
        )
        return modules_to_save, []
    kept = [m for m in modules_to_save if not any(name_matches(t, m) for t in tied)]
    if not any(name_matches(embedding, m) for m in kept):
        kept.append(embedding)
    return kept, tied


def tie_to(model: nn.Module, source: str, tied: list[str]) -> None:
    """Point each tied module's weight at the (trained copy of the) source module's weight."""
    weight = model.get_submodule(source).weight
    for name in tied:
        model.get_submodule(name).weight = weight


def tied_state(model: nn.Module, tied: list[str], prefix: str) -> dict[str, Any]:
    """The tied modules' weights under their own keys (peft writes them too, equal to the source's). A
    copy: safetensors refuses one tensor under two keys, and loading fills the source, which they share."""
    return {f"{prefix}{name}.weight": model.get_submodule(name).weight.detach().clone() for name in tied}


__all__ = [
    "TokenAdapter",
    "TrainableTokens",
    "add_trainable_tokens",
    "block_list",
    "in_layers",
    "is_excluded",
    "layer_index",
    "modules_to_tie",
    "replicate_layers",
    "select_targets",
    "tie_to",
    "tied_module_names",
    "tied_state",
    "token_targets",
]
