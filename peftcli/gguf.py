"""GGUF export for llama.cpp and Ollama: the merged model, the LoRA adapter alone, and a Modelfile.

Written with llama.cpp's own ``gguf`` package (PyPI ``gguf``), offline: nothing is cloned or built.
What llama.cpp needs, and where it silently goes wrong when it is missed (references: llama.cpp's
``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, ``src/llama-vocab.cpp``, ``src/models/*.cpp``):

- tensors under llama.cpp's names (``gguf.get_tensor_name_map``), the llama architecture's q/k rows
  permuted from transformers' half-split rotary layout to llama.cpp's interleaved one, Gemma's norm
  weights stored as ``1 + w`` (transformers computes ``x · (1 + w)``, llama.cpp ``x · w``);
- the hyperparameters llama.cpp reads per architecture (head dims, rope bases, soft-capping, windows);
- the tokenizer: a byte-level BPE vocabulary with its merges and the name of the pre-tokenizer whose
  regex equals ours (llama.cpp implements each named regex in C++; an unnamed one cannot be carried),
  the special token ids, whether BOS/EOS are added, and the chat template with its end-of-turn token,
  so llama.cpp tokenizes as transformers does and stops where the model was taught to stop.

The tests (tests/test_gguf.py) load every exported file in llama.cpp (llama-cpp-python) and compare its
tokens with the transformers tokenizer's and its logits with the transformers model's.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from peftcli.recipe import RecipeError

QUANTS = ("f32", "f16", "bf16", "q8_0")
INSTALL_HINT = "pip install 'peftcli[gguf]'"
Progress = Callable[[int, int, str], None]  # (done, total, what)


@dataclass(frozen=True)
class Family:
    """How one transformers ``model_type`` becomes a llama.cpp architecture."""

    arch: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)
    interleaved_rope: bool = False  # llama.cpp's "normal" rope pairs (2i, 2i+1): permute q/k rows
    norm_offset: float = 0.0  # transformers' norm multiplies by (offset + w): store offset + w


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", interleaved_rope=True),
    "mistral": Family("llama", interleaved_rope=True),  # llama.cpp runs Mistral as llama
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"),
    "gemma": Family("gemma", norm_offset=1.0),
    "gemma2": Family("gemma2", norm_offset=1.0),
    "gemma3_text": Family("gemma3", norm_offset=1.0),
    "phi3": Family("phi3"),
}

# The BPE pre-tokenizers llama.cpp implements, keyed on what transformers' tokenizer.json says: the
# Split regex (None: ByteLevel's own GPT-2 regex) and the BPE model's ignore_merges, which llama.cpp
# turns on for some names. Values: the ``tokenizer.ggml.pre`` name whose C++ regex equals it.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[tuple[str | None, bool], str] = {
    (_LLAMA3_REGEX, True): "llama-bpe",  # Llama 3
    (_LLAMA3_REGEX, False): "smaug-bpe",  # the same regex, merges always applied
    (_QWEN2_REGEX, False): "qwen2",  # Qwen 2 / 2.5 / 3
    (None, False): "gpt-2",  # ByteLevel(use_regex=True)
}


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise RecipeError("--format", "GGUF export needs the gguf package", INSTALL_HINT) from None
    return gguf


# ------------------------------------------------------------------------------------------------
# what to export


@dataclass
class Source:
    """A model ready to export: fp32 weights (merged if an adapter was given) and its tokenizer."""

    model: nn.Module
    tokenizer: Any
    name: str
    adapter: Any = None  # LoadedAdapter, unmerged, for gguf-lora
    recipe_dir: Path | None = None


def load_source(target: str | Path, base: str | None = None, merge: bool = True) -> Source:
    """An adapter directory (merged in memory unless ``merge=False``), a model directory or a model name.

    The family is checked on the config before any weights are read, so a refusal is instant."""
    from transformers import AutoConfig

    from peftcli.export import is_adapter_dir, load_adapter, read_adapter_info, resolve_base
    from peftcli.models import load_model, load_tokenizer, resolve_model_name
    from peftcli.recipe import ModelConfig

    path = Path(target)
    adapter = is_adapter_dir(path)
    name = resolve_base(read_adapter_info(path), base) if adapter else resolve_model_name(str(target))
    family_of(AutoConfig.from_pretrained(name))
    if adapter:
        loaded = load_adapter(path, base=base, dtype=torch.float32, quantized=False)
        if loaded.task != "causal_lm":
            raise RecipeError(
                "export", f"{path} is a {loaded.task} adapter", "GGUF holds causal language models only"
            )
        model = loaded.method.merge(loaded.model) if merge else loaded.model
        return Source(model, loaded.tokenizer, path.name, None if merge else loaded, path.parent)
    cfg = ModelConfig(name=name, task="causal_lm", dtype="float32")
    tokenizer = load_tokenizer(name, cfg)
    model = load_model(
        name, cfg, torch.device("cpu"), pad_token_id=tokenizer.pad_token_id, dtype=torch.float32
    )
    model.eval()
    return Source(model, tokenizer, Path(name).name or str(target))


def family_of(config) -> Family:
    family = FAMILIES.get(config.model_type)
    if family is None:
        names = ", ".join(sorted(FAMILIES))
        raise RecipeError(
            "export",
            f"model type {config.model_type!r} has no GGUF export here",
            f"supported families: {names}",
        )
    return family


# ------------------------------------------------------------------------------------------------
# hyperparameters


def _rope(config, kind: str = "full_attention") -> dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    if kind in params and isinstance(params[kind], dict):  # Gemma 3: one set per layer type
        return params[kind]
    return params


def write_hyperparameters(writer, config, family: Family) -> list[str]:
    """The keys llama.cpp reads for ``family``; returns notes on what llama.cpp will do differently."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _write_rope(writer, config, family, head_dim)
    _write_family_keys(writer, config, family, head_dim)
    notes: list[str] = []
    window = getattr(config, "sliding_window", None)
    if family.arch in ("llama", "phi3") and window and window < config.max_position_embeddings:
        notes.append(
            f"llama.cpp's {family.arch} has no sliding window: beyond {window} tokens its outputs differ"
        )
    return notes


def _write_rope(writer, config, family: Family, head_dim: int) -> None:
    """Rotary dimensions, base frequency and scaling: default, linear, or llama3 (as a tensor)."""
    rope = _rope(config)
    rotary = int(head_dim * rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    writer.add_rope_dimension_count(rotary)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        gguf = import_gguf()
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "llama3" and family.arch == "llama":
        pass  # per-frequency factors, written as the rope_freqs tensor (rope_frequency_factors)
    elif rope_type != "default":
        raise RecipeError(
            "export",
            f"rope_type {rope_type!r} ({config.model_type}) is not written by this exporter yet",
            "export a model with default or linear rope",
        )


def _write_family_keys(writer, config, family: Family, head_dim: int) -> None:
    """What gemma2, gemma3 and phi3 add: attention scale checks, sliding windows, soft-capping."""
    if family.arch in ("gemma2", "gemma3"):
        # llama.cpp scales attention by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B sizes only)
        scalar = getattr(config, "query_pre_attn_scalar", head_dim)
        heads = config.num_attention_heads
        if scalar != head_dim and not (
            scalar == config.hidden_size // heads and config.num_hidden_layers in (46, 62)
        ):
            raise RecipeError(
                "export",
                f"query_pre_attn_scalar {scalar} differs from head_dim {head_dim}",
                "llama.cpp cannot express this attention scale",
            )
        writer.add_sliding_window(config.sliding_window)
        _check_layer_pattern(config, 2 if family.arch == "gemma2" else 6)
    if family.arch == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
        if config.attn_logit_softcapping is None:
            raise RecipeError(
                "export", "gemma2 without attention soft-capping", "llama.cpp always caps gemma2"
            )
    if family.arch == "gemma3":
        writer.add_rope_freq_base_swa(float(_rope(config, "sliding_attention").get("rope_theta", 10000.0)))
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if family.arch == "phi3":
        writer.add_rope_scaling_orig_ctx_len(
            getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
        )
        writer.add_sliding_window(0)  # llama.cpp runs Phi-3 without a window


def rope_frequency_factors(config) -> torch.Tensor | None:
    """Llama 3.1's rope: llama.cpp divides each rotary frequency by a factor it reads from a
    ``rope_freqs`` tensor. The factors are transformers' own frequencies against the plain ones, so they
    are exactly what transformers computes."""
    rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return (plain / scaled).float()  # (head_dim / 2,)


def _check_layer_pattern(config, period: int) -> None:
    """llama.cpp places Gemma's global layers every ``period``-th layer; refuse any other placement."""
    expected = [
        "full_attention" if (i + 1) % period == 0 else "sliding_attention"
        for i in range(config.num_hidden_layers)
    ]
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and list(layer_types) != expected:
        raise RecipeError(
            "export",
            f"layer_types {layer_types} differ from {config.model_type}'s every-{period}th global layer",
            "llama.cpp cannot express another placement",
        )


# ------------------------------------------------------------------------------------------------
# tensors


def permute_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotary halves (x[:d/2], x[d/2:]) per head -> llama.cpp's interleaved pairs."""
    # weight: (heads·d, ...) with rows per head [first half, second half] -> [(h0, h1), (h0, h1), ...]
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_tensor_name(name_map, hf_name: str) -> str:
    mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise RecipeError("export", f"tensor {hf_name} has no llama.cpp name", "this layout is not supported")
    return mapped


def transform(hf_name: str, tensor: torch.Tensor, config, family: Family) -> torch.Tensor:
    """The per-family changes between transformers' and llama.cpp's conventions for one tensor."""
    if family.interleaved_rope:
        if re.search(r"\.q_proj\.(weight|bias)$", hf_name):
            tensor = permute_rope_rows(tensor, config.num_attention_heads)
        elif re.search(r"\.k_proj\.(weight|bias)$", hf_name):
            tensor = permute_rope_rows(tensor, config.num_key_value_heads or config.num_attention_heads)
    if family.norm_offset and hf_name.endswith("norm.weight"):
        tensor = tensor + family.norm_offset
    return tensor


def tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str):
    """llama.cpp's rule: vectors and norms stay f32; q8_0 needs rows that are whole 32-blocks."""
    gguf = import_gguf()
    kinds = gguf.GGMLQuantizationType
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or quant == "f32":
        return kinds.F32
    if quant == "q8_0":
        return kinds.Q8_0 if shape[-1] % 32 == 0 else kinds.F16
    return {"f16": kinds.F16, "bf16": kinds.BF16}[quant]


def encode_tensor(data: torch.Tensor, kind):
    """The bytes of ``data`` as ``kind`` (numpy, as the writer wants them)."""
    gguf = import_gguf()
    array = data.detach().to(torch.float32).contiguous().numpy()
    return gguf.quants.quantize(array, kind)


@dataclass
class PlannedTensor:
    name: str
    kind: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def write_gguf_file(
    path: Path,
    arch: str,
    metadata: Callable[[Any], None],
    tensors: list[PlannedTensor],
    progress: Progress | None,
) -> int:
    """Stream a GGUF file through a temporary name: header, metadata, tensor table, then one tensor at a
    time (only one converted tensor is in memory), renamed into place when complete. Returns its size."""
    gguf = import_gguf()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        metadata(writer)
        for item in tensors:
            plain = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
            if item.kind in plain:
                dtype = np.dtype(plain[item.kind])
                writer.add_tensor_info(item.name, item.shape, dtype, math.prod(item.shape) * dtype.itemsize)
            else:  # block types are written as bytes: (rows, bytes per row)
                byte_shape = gguf.quant_shape_to_byte_shape(item.shape, item.kind)
                writer.add_tensor_info(
                    item.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), item.kind
                )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, item in enumerate(tensors):
            writer.write_tensor_data(encode_tensor(item.load(), item.kind))
            if progress:
                progress(done + 1, len(tensors), item.name)
        writer.close()
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


# ------------------------------------------------------------------------------------------------
# chat template: the per-message pieces it renders, found by rendering it


MARKERS = ("PEFTCLI0x", "PEFTCLI1x", "PEFTCLI2x", "PEFTCLI3x")  # contents no template rewrites


@dataclass
class ChatFormat:
    """A chat template as Ollama's TEMPLATE can hold it: ``header``, then per message
    ``prefix[role] + content + suffix[role]``, then ``generation`` when a reply is asked for."""

    header: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        text = self.header + "".join(
            self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in messages
        )
        return text + (self.generation if add_generation_prompt else "")


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _between(text: str, markers: list[str]) -> list[str]:
    """The pieces of ``text`` around ``markers``, which must each occur once, in order."""
    pieces, rest = [], text
    for marker in markers:
        if rest.count(marker) != 1:
            raise ValueError(marker)
        head, rest = rest.split(marker)
        pieces.append(head)
    return [*pieces, rest]


def _strip_start(text: str, start: str) -> str:
    if not text.startswith(start):
        raise ValueError(start)
    return text[len(start) :]


def _strip_end(text: str, end: str) -> str:
    if not text.endswith(end):
        raise ValueError(end)
    return text[: len(text) - len(end)]


def derive_chat_format(tokenizer) -> ChatFormat | None:
    """Render the template for marker conversations and read off each role's prefix and suffix.

    The result is checked by rendering test conversations both ways; a template that is not a
    concatenation of per-message pieces (Llama 2 folding the system prompt into the first user turn,
    Gemma refusing system turns) gets no system branch, and one that fails even without system
    messages gets ``None`` (no TEMPLATE can express it; the caller says so)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    u0, a1, u2, a3 = MARKERS
    user = lambda c: {"role": "user", "content": c}  # noqa: E731
    assistant = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    try:
        full = _between(
            _render(tokenizer, [user(u0), assistant(a1), user(u2), assistant(a3)], False), list(MARKERS)
        )
        asked = _between(_render(tokenizer, [user(u0), assistant(a1), user(u2)], True), [u0, a1, u2])
        one = _between(_render(tokenizer, [user(u0)], False), [u0])
        user_suffix = one[1]
        assistant_suffix = full[4]
        assistant_prefix = _strip_start(full[1], user_suffix)
        user_prefix = _strip_start(full[2], assistant_suffix)
        header = _strip_end(full[0], user_prefix)
        generation = _strip_start(asked[3], user_suffix)
    except Exception:
        return None
    fmt = ChatFormat(
        header,
        {"user": user_prefix, "assistant": assistant_prefix},
        {"user": user_suffix, "assistant": assistant_suffix},
        generation,
    )
    try:  # a system turn: its pieces sit between the header and the first user prefix
        s, u, a = "PEFTCLIsx", u0, a1
        pieces = _between(
            _render(tokenizer, [{"role": "system", "content": s}, user(u), assistant(a)], False), [s, u, a]
        )
        fmt.prefix["system"] = _strip_start(pieces[0], header)
        fmt.suffix["system"] = _strip_end(pieces[1], user_prefix)
    except Exception:
        pass
    for messages, ask in _probe_conversations(tuple(fmt.prefix)):
        try:
            same = fmt.render(messages, ask) == _render(tokenizer, messages, ask)
        except Exception:
            same = False
        if not same:
            if "system" in fmt.prefix and messages[0]["role"] == "system":
                del fmt.prefix["system"], fmt.suffix["system"]
                continue
            return None
    return fmt


def _probe_conversations(roles: tuple[str, ...]) -> Iterator[tuple[list[dict[str, str]], bool]]:
    turns = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Reverse 'abc'."},
    ]
    yield turns, True
    yield [*turns, {"role": "assistant", "content": "cba"}], False
    if "system" in roles:
        yield [{"role": "system", "content": "Be brief."}, *turns], True


def leading_special(text: str, specials: list[str]) -> str | None:
    """The special token ``text`` starts with, if any (the longest)."""
    found = [s for s in specials if s and text.startswith(s)]
    return max(found, key=len) if found else None


# ------------------------------------------------------------------------------------------------
# tokenizer


@dataclass
class Vocabulary:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style, scored)
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None
    space_prefix: bool  # "llama" only: a ▁ before the text (and after each special token)
    special_ids: dict[str, int]  # bos, eos, unk, pad, eot
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    chat: ChatFormat | None
    stops: list[str] = field(default_factory=list)  # EOS and end-of-turn texts


def _refuse_tokenizer(
    why: str, hint: str = "GGUF export writes byte-level BPE tokenizers (as Llama 3, Qwen)"
):
    raise RecipeError("tokenizer", why, hint)


def _pre_tokenizer_name(spec: dict[str, Any], merges: list[str]) -> str:
    """The llama.cpp pre-tokenizer that splits text as ``spec`` (tokenizer.json) does, or a refusal."""
    model = spec["model"]
    if spec.get("normalizer") and spec["normalizer"].get("type") != "NFC":
        # NFC: Qwen's; llama.cpp does not normalize, which only matters for unnormalized input
        _refuse_tokenizer(f"its normalizer {spec['normalizer'].get('type')} has no llama.cpp counterpart")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    splits = [s for s in steps if s.get("type") == "Split"]
    others = [s.get("type") for s in steps if s.get("type") not in ("ByteLevel", "Split")]
    if not byte_level or others or len(splits) > 1:
        _refuse_tokenizer(
            f"its pre-tokenizer ({pre.get('type')}: {others or 'no ByteLevel'}) is not byte-level BPE"
        )
    if byte_level[0].get("add_prefix_space"):
        _refuse_tokenizer("it adds a space before the text, which llama.cpp's BPE never does")
    regex = None
    if splits:
        split = splits[0]
        if (
            split.get("behavior") != "Isolated"
            or split.get("invert")
            or "Regex" not in split.get("pattern", {})
        ):
            _refuse_tokenizer("its Split pre-tokenizer is not an isolating regex")
        regex = split["pattern"]["Regex"]
    elif not byte_level[0].get("use_regex", True):
        if merges:
            _refuse_tokenizer("it does not split text before merging, and llama.cpp always splits")
        regex = None  # no merges: every byte is a token whatever the split, so any regex is exact
        return "gpt-2"
    name = PRE_TOKENIZERS.get((regex, bool(model.get("ignore_merges", False))))
    if name is None:
        known = ", ".join(sorted(set(PRE_TOKENIZERS.values())))
        _refuse_tokenizer(
            f"its pre-tokenizer regex {regex!r} (ignore_merges {bool(model.get('ignore_merges'))}) is none of "
            f"llama.cpp's named ones ({known})",
            "llama.cpp implements each pre-tokenizer regex in C++ and picks it by name",
        )
    return name


def _sentencepiece_space_prefix(spec: dict[str, Any]) -> bool:
    """A SentencePiece-style tokenizer writes spaces as ▁ and may put one before the text; llama.cpp's
    "llama" vocabulary does the same (add_space_prefix: before the text and after each special token)."""
    steps = []
    for part in (spec.get("normalizer"), spec.get("pre_tokenizer")):
        part = part or {}
        steps += (
            part.get("normalizers", part.get("pretokenizers", [part]))
            if part.get("type") == "Sequence"
            else [part]
        )
    kinds = [s.get("type") for s in steps if s]
    metaspace = [s for s in steps if s and s.get("type") == "Metaspace"]
    if metaspace and not metaspace[0].get("split", True) and len(kinds) == 1:
        return metaspace[0].get("prepend_scheme", "always") != "never"
    replaces_space = any(
        s.get("type") == "Replace" and s.get("pattern", {}).get("String") == " " and s.get("content") == "▁"
        for s in steps
        if s
    )
    prepend = [s for s in steps if s and s.get("type") == "Prepend"]
    if (
        replaces_space
        and set(kinds) <= {"Replace", "Prepend"}
        and all(p.get("prepend") == "▁" for p in prepend)
    ):
        return bool(prepend)
    _refuse_tokenizer(
        f"its byte-fallback BPE splits or normalizes text ({', '.join(map(str, kinds)) or 'nothing'}) in a way "
        "llama.cpp's SentencePiece tokenizer does not (it only writes spaces as ▁)",
        "llama.cpp tokenizes such vocabularies as SentencePiece does",
    )


def _sentencepiece_scores(vocab: dict[str, int], merges: list[str], added, size: int) -> list[float]:
    """Scores that make llama.cpp's SentencePiece merging (the best-scored adjacent pair whose text is a
    token, left first) pick what transformers' BPE (the lowest-ranked merge) picks: a token scores minus
    the rank of its first merge. That is the same only when every way of cutting a token into two tokens
    is a merge, as in tokenizers converted from SentencePiece; anything else is refused."""
    scores = [-1e9] * size
    first_rank: dict[str, int] = {}
    pairs = set()
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ")
        pairs.add((left, right))
        first_rank.setdefault(left + right, rank)
    for text, token_id in vocab.items():
        if token_id in added or len(text) == 1 or re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            scores[token_id] = 0.0
            continue
        if text not in first_rank:
            _refuse_tokenizer(
                f"its token {text!r} is made by no merge, which llama.cpp's SentencePiece merging cannot honour"
            )
        missing = [
            (text[:i], text[i:]) for i in range(1, len(text)) if text[:i] in vocab and text[i:] in vocab
        ]
        missing = [pair for pair in missing if pair not in pairs]
        if missing:
            _refuse_tokenizer(
                f"its token {text!r} can be cut into {missing[0]} with no merge for it, so llama.cpp's "
                "SentencePiece merging would make it where transformers' BPE does not"
            )
        scores[token_id] = -float(first_rank[text])
    return scores


def read_vocabulary(tokenizer, vocab_size: int) -> Vocabulary:
    """Everything llama.cpp needs to tokenize as ``tokenizer`` does, or a one-line refusal saying why."""
    import_gguf()  # a missing gguf package is refused before the tokenizer is
    if not getattr(tokenizer, "is_fast", False):
        _refuse_tokenizer("it is a slow (Python) tokenizer without tokenizer.json", "save a fast tokenizer")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        _refuse_tokenizer(f"its model is {model.get('type')}, not BPE")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):
        kind, pre, space_prefix = "llama", "default", _sentencepiece_space_prefix(spec)
    else:
        if '"ByteLevel"' not in json.dumps(spec.get("decoder") or {}):
            _refuse_tokenizer("its decoder is not ByteLevel")
        kind, pre, space_prefix = "gpt2", _pre_tokenizer_name(spec, merges), False
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    if size > vocab_size:
        _refuse_tokenizer(
            f"it has {size} tokens but the model's embedding only {vocab_size} rows", "resize it"
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = _token_table(tokenizer, vocab, added, kind, vocab_size)
    scores = _sentencepiece_scores(vocab, merges, added, vocab_size) if kind == "llama" else None
    add_bos, add_eos = _added_bos_eos(tokenizer)
    special_ids, chat, stops = _special_tokens(tokenizer, vocab, added)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return Vocabulary(
        kind, pre, tokens, types, [] if kind == "llama" else merges, scores, space_prefix,
        special_ids, add_bos, add_eos, template, chat, stops,
    )  # fmt: skip


def _token_table(tokenizer, vocab: dict[str, int], added, kind: str, vocab_size: int) -> tuple[list, list]:
    """Every embedding row's token text and llama.cpp token type (control, user-defined, byte, unknown,
    normal); rows no token uses are padded as llama.cpp's converter pads them."""
    gguf = import_gguf()
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, token_id in vocab.items():
        tokens[token_id] = text
        if token_id in added:
            types[token_id] = int(
                gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED
            )
        elif kind == "llama" and re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            types[token_id] = int(gguf.TokenType.BYTE)
        elif text == tokenizer.unk_token:
            types[token_id] = int(gguf.TokenType.UNKNOWN)
        else:
            types[token_id] = int(gguf.TokenType.NORMAL)
    return tokens, types


def _added_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS and EOS around a text; anything else it adds is refused."""
    with_specials = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = len(with_specials) > len(bare) and with_specials[0] == tokenizer.bos_token_id
    add_eos = len(with_specials) > len(bare) and with_specials[-1] == tokenizer.eos_token_id
    if len(with_specials) - len(bare) != int(add_bos) + int(add_eos):
        _refuse_tokenizer("its post-processor adds tokens other than BOS/EOS, which llama.cpp cannot add")
    return add_bos, add_eos


def _special_tokens(tokenizer, vocab: dict[str, int], added) -> tuple[dict[str, int], Any, list[str]]:
    """The special token ids (bos, eos, unk, pad, and eot: the chat template's end of turn), the chat
    format derived from the template, and the stop strings."""
    special_ids = {
        kind: getattr(tokenizer, f"{kind}_token_id")
        for kind in ("bos", "eos", "unk", "pad")
        if getattr(tokenizer, f"{kind}_token_id", None) is not None
    }
    chat = derive_chat_format(tokenizer)
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if chat is not None:
        specials = [t.content for t in added.values() if t.special]
        end_of_turn = leading_special(chat.suffix["assistant"], specials)
        if end_of_turn is not None:
            special_ids["eot"] = vocab[end_of_turn]
            stops += [end_of_turn] if end_of_turn not in stops else []
    return special_ids, chat, stops


def gguf_model_name(name: str, tokenizer) -> str:
    """``general.name``, which llama.cpp reads as more than a label: when it contains "phi3" or "phi-3",
    llama.cpp makes special tokens swallow the whitespace after them (llama-vocab.cpp), as Phi-3's
    tokenizer does. Name the model so that llama.cpp does that exactly when ours does."""
    specials = [t for t in tokenizer.added_tokens_decoder.values() if t.special]
    rstrip = bool(specials) and all(
        t.rstrip for t in specials if t.content not in ("<unk>", "<s>", "<|endoftext|>")
    )
    named = re.search(r"phi-?3", name, re.IGNORECASE) is not None
    vocab = tokenizer.get_vocab()
    if named and not rstrip:
        return re.sub(r"(phi)(-?)(3)", r"\1_\3", name, flags=re.IGNORECASE)
    if rstrip and not named and all(t in vocab for t in ("</s>", "<unk>", "<s>", "<|endoftext|>")):
        return f"{name} (phi3 special tokens)"
    return name


def write_vocabulary(writer, vocabulary: Vocabulary) -> None:
    writer.add_tokenizer_model(vocabulary.model)
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.types)
    if vocabulary.scores is not None:
        writer.add_token_scores(vocabulary.scores)
        writer.add_add_space_prefix(vocabulary.space_prefix)
    if vocabulary.merges:
        writer.add_token_merges(vocabulary.merges)
    ids = vocabulary.special_ids
    for kind, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
        ("eot", writer.add_eot_token_id),
    ):
        if kind in ids:
            add(ids[kind])
    writer.add_add_bos_token(vocabulary.add_bos)
    writer.add_add_eos_token(vocabulary.add_eos)
    if vocabulary.chat_template:
        writer.add_chat_template(vocabulary.chat_template)


# ------------------------------------------------------------------------------------------------
# the three exports


def _file_type(quant: str):
    gguf = import_gguf()
    kinds = gguf.LlamaFileType
    return {
        "f32": kinds.ALL_F32,
        "f16": kinds.MOSTLY_F16,
        "bf16": kinds.MOSTLY_BF16,
        "q8_0": kinds.MOSTLY_Q8_0,
    }[quant]


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        from peftcli.recipe import did_you_mean

        raise RecipeError(
            "--quant",
            f"{quant!r} is not a GGUF type here",
            did_you_mean(quant, QUANTS) or f"use one of {', '.join(QUANTS)}",
        )


def model_tensors(model: nn.Module, config, family: Family, quant: str) -> list[PlannedTensor]:
    gguf = import_gguf()
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.arch.upper()], config.num_hidden_layers)
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    planned = []
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reads the output projection from token_embd when there is none
        name = gguf_tensor_name(name_map, hf_name)
        shape = tuple(tensor.shape)
        load = lambda n=hf_name, t=tensor: transform(n, t, config, family)  # noqa: E731
        planned.append(PlannedTensor(name, tensor_type(name, shape, quant), shape, load))
    factors = rope_frequency_factors(config)
    if factors is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        planned.append(
            PlannedTensor(name, tensor_type(name, (len(factors),), quant), (len(factors),), lambda: factors)
        )
    return planned


def export_gguf(
    target: str | Path,
    output: str | Path,
    quant: str = "f16",
    base: str | None = None,
    progress: Progress | None = None,
    source: Source | None = None,
) -> dict[str, Any]:
    """Write ``target`` (an adapter, merged first, or a model) as one GGUF file for llama.cpp."""
    check_quant(quant)
    gguf = import_gguf()
    source = source or load_source(target, base)
    config = source.model.config
    family = family_of(config)
    vocabulary = read_vocabulary(source.tokenizer, config.vocab_size)
    tensors = model_tensors(source.model, config, family, quant)
    notes: list[str] = []

    def metadata(writer) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(gguf_model_name(source.name, source.tokenizer))
        writer.add_file_type(_file_type(quant))
        notes.extend(write_hyperparameters(writer, config, family))
        write_vocabulary(writer, vocabulary)

    size = write_gguf_file(Path(output), family.arch, metadata, tensors, progress)
    return {
        "format": "gguf",
        "output": str(output),
        "bytes": size,
        "quant": quant,
        "arch": family.arch,
        "tensors": len(tensors),
        "tokenizer_pre": vocabulary.pre,
        "add_bos": vocabulary.add_bos,
        "stops": vocabulary.stops,
        "chat_template": vocabulary.chat_template is not None,
        "notes": notes,
    }


def export_gguf_lora(
    adapter_dir: str | Path,
    output: str | Path,
    quant: str = "f32",
    base: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write a LoRA adapter alone as a GGUF adapter for llama.cpp's ``--lora`` (on the base's GGUF).

    llama.cpp adds ``scale · B·A`` to each named base tensor with ``scale = alpha / rank`` (or 1 when
    alpha is 0). One scaling shared by every layer is written as that alpha; per-layer scalings
    (rank_pattern, alpha_pattern) are folded into B and alpha is written as 0."""
    from peftcli.export import is_adapter_dir

    check_quant(quant)
    gguf = import_gguf()
    if not is_adapter_dir(adapter_dir):
        raise RecipeError(
            "export",
            f"{adapter_dir} is not an adapter directory",
            "--format gguf-lora exports an adapter (RUN/adapter)",
        )
    source = load_source(adapter_dir, base, merge=False)
    method = source.adapter.method
    layers = _lora_layers(method, source.model)
    config = source.model.config
    family = family_of(config)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.arch.upper()], config.num_hidden_layers)
    shared, alpha = _lora_alpha(layers)
    planned = _plan_lora_tensors(layers, name_map, config, family, shared, quant)

    def metadata(writer) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(gguf_model_name(source.name, source.tokenizer))

    size = write_gguf_file(Path(output), family.arch, metadata, planned, progress)
    return {
        "format": "gguf-lora",
        "output": str(output),
        "bytes": size,
        "quant": quant,
        "arch": family.arch,
        "layers": len(layers),
        "alpha": alpha,
        "scaling_folded_into_b": not shared,
        "base": source.adapter.base_path,
        "notes": ["apply it to a GGUF of the same base: llama-cli -m base.gguf --lora " + str(output)],
    }


def _lora_alpha(layers: list[tuple[str, Any]]) -> tuple[bool, float]:
    """(one scaling shared by every layer, the alpha to write): ``scaling · rank`` when shared, else 0
    (each layer's scaling is then folded into its B)."""
    scalings = {(layer.r, layer.scaling) for _, layer in layers}
    shared = len({s for _, s in scalings}) == 1 and len(scalings) == 1
    rank, scaling = next(iter(scalings))
    return shared, scaling * rank if shared else 0.0


def _plan_lora_tensors(
    layers: list[tuple[str, Any]], name_map, config, family, shared: bool, quant: str
) -> list[PlannedTensor]:
    """Each layer's A and B as ``<base tensor>.lora_a`` / ``.lora_b``; a tied lm_head is refused."""
    tied = getattr(config, "tie_word_embeddings", False)
    planned = []
    for path, layer in layers:
        if path.endswith("lm_head") and tied:
            raise RecipeError(
                "export",
                "the adapter trains lm_head, which this model ties to its embeddings",
                "llama.cpp has no separate output tensor to adapt; use --format gguf",
            )
        name = gguf_tensor_name(name_map, path + ".weight")
        fold = 1.0 if shared else layer.scaling
        a = layer.lora_A.weight.detach().float()  # (r, in)
        b = layer.lora_B.weight.detach().float() * fold  # (out, r)
        # q/k rows are permuted in the base GGUF, so B's rows (the update's outputs) must be too
        load_b = lambda p=path, t=b: transform(p + ".weight", t, config, family)  # noqa: E731
        planned.append(
            PlannedTensor(
                name + ".lora_a",
                tensor_type(name + ".lora_a", tuple(a.shape), quant),
                tuple(a.shape),
                lambda t=a: t,
            )
        )
        planned.append(
            PlannedTensor(
                name + ".lora_b", tensor_type(name + ".lora_b", tuple(b.shape), quant), tuple(b.shape), load_b
            )
        )
    return planned


def _lora_layers(method, model: nn.Module) -> list[tuple[str, Any]]:
    """The adapter's LoRA layers by module path (``model.layers.0.self_attn.q_proj``), or a refusal
    naming what llama.cpp's LoRA cannot carry."""
    from peftcli.methods.lora import LoRALinear

    if method.name != "lora":
        raise RecipeError(
            "export",
            f"method {method.name} is not LoRA",
            "llama.cpp adapters are LoRA only; use --format gguf to export the merged model",
        )
    cfg = method.cfg
    if getattr(cfg, "bias", "none") != "none" or getattr(cfg, "modules_to_save", None):
        raise RecipeError(
            "export",
            "the adapter also trains biases or whole modules",
            "llama.cpp adapters hold B·A only; use --format gguf",
        )
    extras = [
        k for k in ("lora_bias", "trainable_token_indices", "layer_replication") if getattr(cfg, k, None)
    ]
    if extras:
        raise RecipeError(
            "export",
            f"the adapter uses {extras[0]}, which llama.cpp's LoRA cannot carry",
            "llama.cpp adapters hold B·A only; use --format gguf (the merged model)",
        )
    layers = []
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            if module.variants:
                raise RecipeError(
                    "export",
                    f"{path} uses {type(module.variants[0]).__name__}, not plain LoRA",
                    "use --format gguf (the merged model)",
                )
            if module.fan_in_fan_out:
                raise RecipeError("export", f"{path} is a Conv1D layer", "use --format gguf")
            layers.append((path.removeprefix("base_model.model."), module))
    if not layers:
        raise RecipeError("export", "the adapter has no LoRA layers", "use --format gguf")
    return layers


def go_string(text: str) -> str:
    """A Go string literal (JSON's escapes are Go's) for Ollama's template."""
    return json.dumps(text, ensure_ascii=False)


def ollama_template(chat: ChatFormat, header: str) -> str:
    """Ollama's TEMPLATE (Go text/template) for ``chat``: every piece of text is a quoted Go string, so
    no whitespace of the template itself reaches the prompt."""
    lines = []
    if header:
        lines.append("{{ " + go_string(header) + " }}")
    lines.append("{{- range .Messages }}")
    for i, role in enumerate(r for r in ("system", "user", "assistant") if r in chat.prefix):
        keyword = "if" if i == 0 else "else if"
        lines.append(
            f'{{{{- {keyword} eq .Role "{role}" }}}}{{{{ {go_string(chat.prefix[role])} }}}}{{{{ .Content }}}}'
            f"{{{{ {go_string(chat.suffix[role])} }}}}"
        )
    lines.append("{{- end }}")
    lines.append("{{- end }}{{ " + go_string(chat.generation) + " }}")
    return "\n".join(lines)


def export_ollama(
    target: str | Path,
    output: str | Path,
    quant: str = "q8_0",
    base: str | None = None,
    system: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """A directory Ollama imports with ``ollama create NAME -f OUTPUT/Modelfile``: the GGUF and a
    Modelfile with FROM, TEMPLATE (translated from the chat template), the stop tokens and SYSTEM."""
    from peftcli.checkpoint import AtomicDir

    check_quant(quant)
    source = load_source(target, base)
    config = source.model.config
    family_of(config)
    vocabulary = read_vocabulary(source.tokenizer, config.vocab_size)
    if vocabulary.chat is None:
        why = (
            "has no chat template"
            if not vocabulary.chat_template
            else "renders turns that are not per-message pieces"
        )
        raise RecipeError(
            "tokenizer",
            f"the tokenizer {why}, so there is no TEMPLATE to write",
            "set model.chat_template in the recipe (chatml, llama3) and train again, or use --format gguf",
        )
    if system and "system" not in vocabulary.chat.prefix:
        raise RecipeError("--system", "the chat template has no system turn", "drop --system")
    if system and '"""' in system:
        raise RecipeError("--system", 'contains """, which ends a Modelfile string', "rephrase it")
    header = vocabulary.chat.header
    bos = source.tokenizer.bos_token
    if vocabulary.add_bos and bos and header.startswith(bos):
        header = header[len(bos) :]  # llama.cpp adds BOS itself when it tokenizes the prompt
    lines = ["FROM ./model.gguf", f'TEMPLATE """{ollama_template(vocabulary.chat, header)}"""']
    lines += [f"PARAMETER stop {go_string(stop)}" for stop in vocabulary.stops]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    with AtomicDir(output) as tmp:
        result = export_gguf(target, tmp / "model.gguf", quant, base, progress, source=source)
        (tmp / "Modelfile").write_text("\n".join(lines) + "\n")
    result.update(
        format="ollama",
        output=str(output),
        gguf=str(Path(output) / "model.gguf"),
        modelfile=str(Path(output) / "Modelfile"),
        system=system,
    )
    return result
