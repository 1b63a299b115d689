"""Target matching, module surgery and the bookkeeping every method shares: written once.

Used by the methods and by quantization (which needs the head names), so it lives outside
``peftcli.methods`` and imports nothing of peftcli but the recipe's error type.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from peftcli.recipe import RecipeError

# Every adapter key on disk starts with this (peft's naming: PeftModel.base_model.model is the base).
PREFIX = "base_model.model."

# Class names of layers that compute x @ W^T (+ b), including bitsandbytes' 4/8-bit layers and
# GPT-2's transposed Conv1D, checked by name so that bitsandbytes is never imported here.
LINEAR_CLASS_NAMES = {"Linear", "Conv1D", "Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4"}

# Heads a seq_cls model adds on top of its body: new and random, so every method trains them whole.
CLASSIFIER_HEAD_NAMES = ("classifier", "score")
# Heads that produce the output: `all-linear` never adapts them (peft does the same).
HEAD_NAMES = {"lm_head", "qa_outputs", "cls", "pooler", *CLASSIFIER_HEAD_NAMES}

_REGEX_CHARS = set("^$*+?()[]{}|\\")


def is_regex_target(targets: str | list[str]) -> bool:
    """Whether ``target_modules`` is one regex on full names (not a name, a list, or ``all-linear``)."""
    return isinstance(targets, str) and bool(_REGEX_CHARS & set(targets))


def has_module(model: nn.Module, name: str) -> bool:
    """Whether some module's full name is ``name`` or ends with ``.name``."""
    return any(n == name or n.endswith("." + name) for n, _ in model.named_modules())


def classifier_heads(model: nn.Module, task: str) -> list[str]:
    """The new classification head of a seq_cls model, which must train (as peft's modules_to_save)."""
    if task != "seq_cls":
        return []
    return [h for h in CLASSIFIER_HEAD_NAMES if has_module(model, h)]


def is_linear(module: nn.Module) -> bool:
    """A layer computing x @ W^T (+ b): nn.Linear and its subclasses (Falcon's FalconLinear, bitsandbytes'
    layers), or one of :data:`LINEAR_CLASS_NAMES` (GPT-2's Conv1D), as peft's ``all-linear`` admits them."""
    named = isinstance(module, nn.Linear) or type(module).__name__ in LINEAR_CLASS_NAMES
    return named and hasattr(module, "weight")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D, which stores W as (in, out): peft's ``fan_in_fan_out``."""
    return type(module).__name__ == "Conv1D"


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape  # Conv1D stores W as (in, out)
        return in_features, out_features
    return module.in_features, module.out_features


class WrappedLayer(nn.Module):
    """The base of every layer a method puts around a frozen linear-like layer (LoRA and its variants,
    AdaLoRA, (IA)3, UniPELT's gated LoRA): it looks like the layer it wraps, as peft's layers do, because
    model code reads attributes of its own layers (T5 casts to ``self.wo.weight.dtype``).

    A subclass stores the wrapped layer as ``self.base_layer`` (peft's name, so base weights keep peft's
    keys) or overrides :meth:`get_base_layer`; ``weight``, ``bias``, ``in_features``, ``out_features``
    and ``fan_in_fan_out`` then read through to it.
    """

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.get_base_layer(), "bias", None)

    @property
    def in_features(self) -> int:
        return linear_dims(self.get_base_layer())[0]

    @property
    def out_features(self) -> int:
        return linear_dims(self.get_base_layer())[1]

    @property
    def fan_in_fan_out(self) -> bool:
        return is_conv1d(self.get_base_layer())


def output_head_names(model: nn.Module) -> set[str]:
    """Full names of the modules that produce the model's output (LM head, classifier)."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
        if name.split(".")[0] in HEAD_NAMES:
            names.add(name)
    return names


# Last name components of attention projections across the transformers families: separate key/value
# ((IA)3) or query/value (LoRA's classic pair) projections, else one fused query-key-value layer.
KEY_VALUE_NAMES = ("k_proj", "v_proj", "key", "value", "k", "v", "key_proj", "value_proj")
QUERY_VALUE_NAMES = ("q_proj", "v_proj", "query", "value", "q", "v", "query_proj", "value_proj")
FUSED_QKV_NAMES = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack", "in_proj")


def hidden_size(model: nn.Module) -> int | None:
    """The width of the residual stream: the text config's hidden size, else the input embeddings'."""
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    text = get_text(decoder=True) if callable(get_text) else config
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(text, key, None), int):
            return getattr(text, key)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embeddings, "embedding_dim", None)


def _body_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    heads = output_head_names(model)
    return [
        (n, m)
        for n, m in model.named_modules()
        if n and is_linear(m) and not any(n == h or n.startswith(h + ".") for h in heads)
    ]


def attention_projections(model: nn.Module, names: tuple[str, ...] = KEY_VALUE_NAMES) -> list[str]:
    """Full names of attention projections, found from the module structure: linear layers inside an
    attention module (a path component containing "att") whose last name is one of ``names`` (the key
    and value projections by default), else the fused query-key-value layers. Cross-attention counts."""
    in_attention = [
        (n, n.split(".")[-1])
        for n, _ in _body_linears(model)
        if any("att" in part.lower() for part in n.split(".")[:-1])
    ]
    for wanted in (names, FUSED_QKV_NAMES):
        found = [n for n, last in in_attention if last in wanted]
        if found:
            return found
    return []


def down_projections(model: nn.Module) -> list[str]:
    """Full names of the feed-forward output ("down") projections, found from the layer shapes: the
    linear layers that map a wider input back to the hidden size (``in > hidden = out``). Experts held
    as 3-D parameters (MoE models in transformers 5) are not layers, so they are not listed."""
    hidden = hidden_size(model)
    found = []
    for name, module in _body_linears(model):
        in_features, out_features = linear_dims(module)
        if out_features == hidden and in_features > hidden:
            found.append(name)
    return found


def name_matches(name: str, target: str) -> bool:
    """peft's rule for a list entry: the full name, or a suffix after a dot."""
    return name == target or name.endswith("." + target)


def match_targets(
    model: nn.Module,
    targets: str | list[str],
    key: str = "method.target_modules",
    accept=is_linear,
    what: str = "linear layer",
) -> list[str]:
    """Resolve ``targets`` (names, a regex, or ``all-linear``) to full module names, or explain why not."""
    heads = output_head_names(model)
    candidates = [(n, m) for n, m in model.named_modules() if n]
    if targets == "all-linear" or targets == ["all-linear"]:
        found = [
            n for n, m in candidates if accept(m) and not any(n == h or n.startswith(h + ".") for h in heads)
        ]
    elif is_regex_target(targets):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise RecipeError(
                key, f"{targets!r} is not a valid regular expression ({err})", "fix the pattern"
            ) from None
        found = [n for n, m in candidates if pattern.fullmatch(n) and accept(m)]
    else:
        names = [targets] if isinstance(targets, str) else list(targets)
        found = []
        for target in names:
            hits = [n for n, m in candidates if name_matches(n, target)]
            if not hits:
                raise RecipeError(
                    key,
                    f"{target!r} matches no module in {type(model).__name__}",
                    f"names of its {what}s: {', '.join(available_names(model, accept)) or 'none'}",
                )
            wrong = [n for n in hits if not accept(model.get_submodule(n))]
            if wrong:
                raise RecipeError(
                    key,
                    f"{target!r} matches {wrong[0]} ({type(model.get_submodule(wrong[0])).__name__}), not a {what}",
                    f"pick among: {', '.join(available_names(model, accept))}",
                )
            found.extend(hits)
        found = sorted(set(found), key=[n for n, _ in candidates].index)
    if not found:
        raise RecipeError(
            key,
            f"{targets!r} matches no {what} in {type(model).__name__}",
            f"names of its {what}s: {', '.join(available_names(model, accept)) or 'none'}",
        )
    return found


def match_parameters(
    model: nn.Module, targets: list[str], key: str = "method.target_parameters"
) -> list[tuple[str, str]]:
    """Resolve peft's ``target_parameters`` (``<module path>.<parameter>``, full or a suffix after a dot)
    to (module name, parameter name) pairs, in peft's order: modules in model order, and a module's
    parameters in the order the module registered them (that order nests the wrappers, see LoRA)."""
    found: list[tuple[str, str]] = []
    hit: set[str] = set()
    for module_name, module in model.named_modules():
        for parameter_name, parameter in module.named_parameters(recurse=False):
            full = f"{module_name}.{parameter_name}" if module_name else parameter_name
            matched = [t for t in targets if name_matches(full, t)]
            if not matched:
                continue
            if not module_name or parameter.ndim not in (2, 3):
                raise RecipeError(
                    key,
                    f"{matched[0]!r} matches {full} ({parameter.ndim}-D, on the model itself)"
                    if not module_name
                    else f"{matched[0]!r} matches {full}, a {parameter.ndim}-D tensor",
                    "target 2-D weights or 3-D expert stacks held by a submodule",
                )
            found.append((module_name, parameter_name))
            hit.update(matched)
    missing = [t for t in targets if t not in hit]
    if missing:
        stacks = [n for n, p in model.named_parameters() if p.ndim == 3]
        hint = ", ".join(dict.fromkeys(".".join(n.split(".")[-3:]) for n in stacks))
        raise RecipeError(
            key,
            f"{missing[0]!r} matches no parameter in {type(model).__name__}",
            f"its 3-D parameters (MoE experts): {hint}" if hint else "name a parameter as <module>.<name>",
        )
    return found


def available_names(model: nn.Module, accept=is_linear) -> list[str]:
    """Short names (last component) of the modules ``accept`` admits, for error messages."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if name and accept(module):
            seen.setdefault(name.split(".")[-1], None)
    return list(seen)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def make_trainable_copies(
    model: nn.Module, names: list[str], key: str = "method.modules_to_save"
) -> list[str]:
    """Train whole modules (``modules_to_save``). Each parameter is replaced by a trainable clone, so a
    weight tied elsewhere (embeddings ↔ LM head) keeps its original value there, as in peft."""
    resolved = []
    for target in names:
        hits = [n for n, _ in model.named_modules() if n and name_matches(n, target)]
        if not hits:
            short = [
                n.split(".")[-1] for n, m in model.named_modules() if n and list(m.parameters(recurse=False))
            ]
            raise RecipeError(
                key,
                f"{target!r} matches no module in {type(model).__name__}",
                f"modules with weights: {', '.join(dict.fromkeys(short))}",
            )
        for name in hits:
            if name in resolved:  # named twice (peft writes ["embed_tokens", "model.embed_tokens"])
                continue
            module = model.get_submodule(name)
            for pname, param in list(module.named_parameters(recurse=True)):
                owner = module.get_submodule(pname.rpartition(".")[0]) if "." in pname else module
                setattr(
                    owner, pname.rpartition(".")[2], nn.Parameter(param.detach().clone(), requires_grad=True)
                )
            resolved.append(name)
    return resolved


def modules_to_save_state(model: nn.Module, names: list[str], prefix: str = PREFIX) -> dict:
    state = {}
    for name in names:
        for pname, param in model.get_submodule(name).named_parameters():
            state[f"{prefix}{name}.{pname}"] = param.detach()
    return state


def saved_modules_count(model: nn.Module, names: list[str]) -> int:
    """Parameters of the modules trained whole."""
    return sum(p.numel() for name in names for p in model.get_submodule(name).parameters())


def load_prefixed(
    model: nn.Module, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    """Copy ``state`` into the tensors that ``expected`` (our own adapter_state_dict) names.

    Keys must match exactly: a missing or unexpected key is an error, never a silent no-op (peft only
    warns, and the adapter then stays at its init).
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise RecipeError(
            "adapter",
            f"adapter weights do not fit this model ({detail})",
            "load it on the base model it was trained on, with the same method options",
        )
    with torch.no_grad():
        for key, target in expected.items():
            value = state[key]
            if value.shape != target.shape:
                raise RecipeError(
                    "adapter",
                    f"{key} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}",
                    "load it on the base model it was trained on",
                )
            target.copy_(value.to(target.dtype))
