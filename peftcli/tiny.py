"""Deterministic tiny models and tokenizers: ``tiny:<arch>`` in a recipe.

A tiny model is randomly initialised from a small transformers config with a fixed seed, and written
(with its tokenizer) to a cache directory the first time it is asked for, so the real loading code
runs and other tools (transformers, peft) can load it by path. For smoke runs, CI and tests only.

The tokenizer is byte-level (256 byte tokens + specials): it round-trips any text, needs no training
and is identical on every machine.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from peftcli.recipe import RecipeError, did_you_mean

TINY_VERSION = 2  # bump when a config below changes, so stale caches are rebuilt

# The shape every tiny decoder shares: 64 wide, 2 layers, 4 query heads over 2 key/value heads (so
# grouped-query attention is exercised wherever the family has it).
_DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
_ENCODER = dict(  # BERT-style encoders: full multi-head attention
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_labels=2
)


def _decoder(**changes) -> dict:
    config = {**_DECODER, **changes}
    return {k: v for k, v in config.items() if v is not None}


# name -> model_type, config overrides, default task and tokenizer specials ("causal", "bert", "t5").
# One entry per model family the architecture-matrix test trains (tests/test_model_families.py).
TINY_ARCHS: dict[str, dict] = {
    "llama": dict(model_type="llama", task="causal_lm", config=_decoder(rms_norm_eps=1e-6)),
    # q/k/v carry biases: the tiny model for BitFit
    "qwen2": dict(model_type="qwen2", task="causal_lm", config=_decoder()),
    "mistral": dict(model_type="mistral", task="causal_lm", config=_decoder(head_dim=16)),
    "qwen3": dict(model_type="qwen3", task="causal_lm", config=_decoder(head_dim=16)),  # q/k RMSNorm
    "gemma": dict(model_type="gemma", task="causal_lm", config=_decoder(head_dim=16)),
    "gemma2": dict(  # alternating sliding/global layers, soft-capped logits
        model_type="gemma2", task="causal_lm", config=_decoder(head_dim=16, sliding_window=16)
    ),
    "gemma3": dict(  # the text-only Gemma 3 (Gemma3ForCausalLM)
        model_type="gemma3_text", task="causal_lm", config=_decoder(head_dim=16, sliding_window=16)
    ),
    "phi": dict(model_type="phi", task="causal_lm", config=_decoder()),  # partial rotary, dense/fc1/fc2
    "phi3": dict(model_type="phi3", task="causal_lm", config=_decoder()),  # fused qkv_proj, gate_up_proj
    "olmo2": dict(model_type="olmo2", task="causal_lm", config=_decoder()),
    "granite": dict(model_type="granite", task="causal_lm", config=_decoder()),
    "starcoder2": dict(model_type="starcoder2", task="causal_lm", config=_decoder()),  # c_fc/c_proj MLP
    "mixtral": dict(  # experts held as fused 3-D parameters (transformers 5)
        model_type="mixtral",
        task="causal_lm",
        config=_decoder(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        task="causal_lm",
        config=_decoder(
            head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1
        ),
    ),
    "gpt2": dict(  # Conv1D layers (fan_in_fan_out) and biases everywhere
        model_type="gpt2",
        task="causal_lm",
        config=dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, n_inner=128),
    ),
    "gpt_neox": dict(  # fused query_key_value, parallel residual
        model_type="gpt_neox", task="causal_lm", config=_decoder(num_key_value_heads=None)
    ),
    "falcon": dict(  # FalconLinear (a subclass of nn.Linear), multi-query attention as falcon-7b
        model_type="falcon",
        task="causal_lm",
        config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=False),
    ),
    "opt": dict(
        model_type="opt",
        task="causal_lm",
        config=dict(
            hidden_size=64,
            ffn_dim=128,
            word_embed_proj_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
    ),
    "bloom": dict(  # ALiBi, fused query_key_value
        model_type="bloom",
        task="causal_lm",
        config=dict(hidden_size=64, n_layer=2, n_head=4, tie_word_embeddings=False),
    ),
    "bert": dict(
        model_type="bert",
        task="seq_cls",
        tokenizer="bert",
        config=dict(_ENCODER, max_position_embeddings=512),
    ),
    "roberta": dict(  # positions start after the pad id, so the table is a little longer than 512
        model_type="roberta",
        task="seq_cls",
        tokenizer="bert",
        config=dict(_ENCODER, max_position_embeddings=520),
    ),
    "deberta-v2": dict(  # DeBERTa-v3's disentangled relative attention
        model_type="deberta-v2",
        task="seq_cls",
        tokenizer="bert",
        config=dict(
            _ENCODER,
            max_position_embeddings=512,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
            max_relative_positions=-1,
            position_buckets=32,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            type_vocab_size=0,
        ),
    ),
    "modernbert": dict(  # fused Wqkv, alternating local/global attention
        model_type="modernbert",
        task="seq_cls",
        tokenizer="bert",
        config=dict(_ENCODER, max_position_embeddings=512, global_attn_every_n_layers=2, local_attention=16),
    ),
    "t5": dict(
        model_type="t5",
        task="seq2seq",
        tokenizer="t5",
        config=dict(
            d_model=64,
            d_ff=128,
            d_kv=16,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="relu",
            tie_word_embeddings=False,
        ),
    ),
    "bart": dict(
        model_type="bart",
        task="seq2seq",
        tokenizer="t5",
        config=dict(
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
    ),
}

# Special tokens come first, then the 256 bytes as ByteLevel's printable characters.
_SPECIALS = {
    "causal": ["<pad>", "<s>", "</s>", "<unk>"],
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "t5": ["<pad>", "</s>", "<unk>"],
}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def cache_root() -> Path:
    root = os.environ.get("PEFTCLI_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "peftcli"
    )
    return Path(root) / "tiny"


def tiny_path(arch: str) -> Path:
    return cache_root() / f"{arch}-v{TINY_VERSION}"


def parse_tiny(name: str) -> str | None:
    if not name.startswith("tiny:"):
        return None
    arch = name[len("tiny:") :]
    if arch not in TINY_ARCHS:
        hint = (
            did_you_mean(name, [f"tiny:{a}" for a in TINY_ARCHS])
            or f"choose one of: {', '.join('tiny:' + a for a in TINY_ARCHS)}"
        )
        raise RecipeError("model.name", f"unknown tiny model {name!r}", hint)
    return arch


def _byte_tokenizer(arch: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    family = TINY_ARCHS[arch].get("tokenizer", "causal")
    specials = _SPECIALS[family]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab, merges=[], unk_token=specials[specials.index("<unk>") if "<unk>" in specials else 1]
        )
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if family == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    elif family == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok, vocab, family


def quiet_transformers() -> None:
    """Silence transformers' progress bars and info logs: our own progress display is the one users read."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def build_tiny(arch: str, path: Path) -> None:
    """Build ``tiny:<arch>`` into ``path`` (deterministic: fixed seed, fixed configs)."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    quiet_transformers()
    spec = TINY_ARCHS[arch]
    backend, vocab, family = _byte_tokenizer(arch)
    ids, tok_kwargs = _special_tokens(family, spec["model_type"], vocab)
    config = AutoConfig.for_model(spec["model_type"], vocab_size=len(vocab), **spec["config"], **ids)
    torch.manual_seed(0)
    auto = {
        "causal_lm": AutoModelForCausalLM,
        "seq_cls": AutoModelForSequenceClassification,
        "seq2seq": AutoModelForSeq2SeqLM,
    }[spec["task"]]
    model = auto.from_config(config)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=512, **tok_kwargs)
    if family == "causal":
        tokenizer.chat_template = CHAT_TEMPLATE
    if family == "t5":
        tokenizer.padding_side = "right"
    _save_tiny(model, tokenizer, arch, path)


def _special_tokens(family: str, model_type: str, vocab: dict[str, int]) -> tuple[dict, dict]:
    """The config's special token ids and the tokenizer's special tokens, by tokenizer family."""
    if family == "bert":
        ids = dict(pad_token_id=vocab["[PAD]"])
        if model_type == "modernbert":  # its config names every special (defaults: a 50k vocab)
            ids.update(
                bos_token_id=vocab["[CLS]"],
                eos_token_id=vocab["[SEP]"],
                cls_token_id=vocab["[CLS]"],
                sep_token_id=vocab["[SEP]"],
            )
        tok_kwargs = dict(
            pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
        )
    elif family == "t5":
        ids = dict(
            pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"], decoder_start_token_id=vocab["<pad>"]
        )
        if model_type == "bart":  # BART starts decoding from </s> and has no separate bos here
            ids.update(
                bos_token_id=vocab["</s>"], decoder_start_token_id=vocab["</s>"], forced_eos_token_id=None
            )
        tok_kwargs = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    else:
        ids = dict(pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"])
        tok_kwargs = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return ids, tok_kwargs


def _save_tiny(model, tokenizer, arch: str, path: Path) -> None:
    """Save into a temporary sibling, then rename: a racing process finds ``path`` whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "peftcli_tiny.json").write_text(json.dumps({"arch": arch, "version": TINY_VERSION}))
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "peftcli_tiny.json").exists():  # another process did not finish it either
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_tiny(arch: str) -> Path:
    """Return the directory of ``tiny:<arch>``, building it on first use."""
    path = tiny_path(arch)
    if not (path / "peftcli_tiny.json").exists():
        build_tiny(arch, path)
    return path


def default_task(arch: str) -> str:
    return TINY_ARCHS[arch]["task"]
