"""Load the base model and its tokenizer: hub id, local directory or ``tiny:<arch>``."""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftcli.chat_templates import resolve_chat_template
from peftcli.recipe import ModelConfig, RecipeError, RecipeWarning
from peftcli.tiny import ensure_tiny, parse_tiny, quiet_transformers

TASK_AUTO = {
    "causal_lm": "AutoModelForCausalLM",
    "seq_cls": "AutoModelForSequenceClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
}
PEFT_TASK_TYPE = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}
TASK_FROM_PEFT = {v: k for k, v in PEFT_TASK_TYPE.items()}


def resolve_model_name(name: str) -> str:
    """A path or hub id transformers can load; ``tiny:<arch>`` is materialised on disk first."""
    arch = parse_tiny(name)
    if arch is not None:
        return str(ensure_tiny(arch))
    expanded = os.path.expanduser(name)
    looks_local = expanded.startswith((".", "/", "~")) or (
        os.sep in expanded and not _looks_like_hub_id(expanded)
    )
    if os.path.isdir(expanded):
        if not (Path(expanded) / "config.json").exists():
            raise RecipeError(
                "model.name",
                f"{name} is a directory without config.json",
                "point it at a saved transformers model directory",
            )
        return expanded
    if looks_local or os.path.isfile(expanded):
        raise RecipeError(
            "model.name",
            f"model directory not found: {name}",
            "check the path, or use a hub id such as Qwen/Qwen2.5-0.5B or tiny:llama",
        )
    return name


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/"))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise RecipeError(
            "train.device", f"{spec!r} is not a device", "use auto, cpu, cuda or cuda:0"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(
            "train.device", "cuda was asked for but no GPU is visible", "use train.device: auto or cpu"
        )
    return device


def _hub_error(name: str, err: Exception) -> RecipeError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return RecipeError(
        "model.name",
        f"could not load {name!r}: {first[:200]}",
        "check the hub id and your network (or HF_HUB_OFFLINE), or pass a local directory",
    )


def hub_kwargs(path: str, cfg: ModelConfig) -> dict[str, Any]:
    """from_pretrained kwargs for a hub id when the hub cannot be reached: cached files only, or a
    one-line error. Without this, huggingface_hub retries each file for ~45 s and logs every retry."""
    from huggingface_hub import constants, try_to_load_from_cache

    if os.path.isdir(path) or constants.HF_HUB_OFFLINE or _hub_reachable(constants.ENDPOINT):
        return {}
    cached = try_to_load_from_cache(path, "config.json", revision=cfg.revision)
    if isinstance(cached, str):
        return {"local_files_only": True}
    raise RecipeError(
        "model.name",
        f"cannot reach the Hugging Face Hub to download {cfg.name!r}, and no copy of it is cached",
        "connect to the network, or pass a local model directory",
    )


@cache
def _hub_reachable(endpoint: str, timeout_s: float = 3.0) -> bool:
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


# Weight files that are pickles: loading one can run arbitrary code.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def weights_policy(path: str, cfg: ModelConfig) -> dict[str, Any]:
    """from_pretrained kwargs that load safetensors only, unless ``model.allow_pickle`` says otherwise.

    A local directory with only pickle weights is refused here with a clear error (transformers' own
    message talks about missing files); with ``allow_pickle`` it loads after a warning naming it."""
    if cfg.trust_remote_code:
        warnings.warn(
            f"model.trust_remote_code is set: {cfg.name} may run code from its repository",
            RecipeWarning,
            stacklevel=2,
        )
    directory = Path(path)
    if directory.is_dir():
        has_safetensors = any(directory.glob("*.safetensors"))
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in directory.glob(pattern))
        if not has_safetensors and pickles:
            if not cfg.allow_pickle:
                raise RecipeError(
                    "model.name",
                    f"{cfg.name} has only pickle weights ({pickles[0]}), which can run code when loaded",
                    "convert them to safetensors (save_pretrained(..., safe_serialization=True)), or set "
                    "model.allow_pickle: true if you trust where they came from",
                )
            warnings.warn(
                f"model.allow_pickle is set: loading pickle weights {pickles[0]} of {cfg.name}",
                RecipeWarning,
                stacklevel=2,
            )
            return {"use_safetensors": False}
    return {} if cfg.allow_pickle else {"use_safetensors": True}


def load_tokenizer(path: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **hub_kwargs(path, cfg)
        )
    except (OSError, ValueError) as err:
        raise _hub_error(cfg.name, err) from None
    if tokenizer.pad_token_id is None:
        # Decoder-only models often ship no pad token; EOS is safe because padded labels are -100.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    if cfg.chat_template:
        # Set on the tokenizer, so the adapter directory saves it and eval renders prompts the same way.
        tokenizer.chat_template = resolve_chat_template(cfg.chat_template)
    return tokenizer


def load_model(
    path: str,
    cfg: ModelConfig,
    device: torch.device,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    pad_token_id: int | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load the base model for ``cfg.task`` in ``dtype`` (quantized where ``cfg.quantization`` asks)."""
    import transformers

    quiet_transformers()
    auto = getattr(transformers, TASK_AUTO[cfg.task])
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    kwargs: dict[str, Any] = dict(dtype=dtype, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    kwargs.update(weights_policy(path, cfg))
    kwargs.update(hub_kwargs(path, cfg))
    if cfg.task == "seq_cls":
        labels = label_names or [str(i) for i in range(num_labels or 2)]
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
    if cfg.quantization is not None:
        from peftcli.quantize import quantization_kwargs

        kwargs.update(quantization_kwargs(cfg, device))
    try:
        model = auto.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        if "Unrecognized configuration class" in str(err) or "not supported" in str(err):
            raise RecipeError(
                "model.task",
                f"{cfg.name} has no {cfg.task} head in transformers ({str(err)[:120]})",
                "pick the task the model was built for",
            ) from None
        raise _hub_error(cfg.name, err) from None
    if cfg.task == "seq_cls" and pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id  # decoder classifiers find the last token through it
    if cfg.quantization is None:
        model.to(device)
    else:
        from peftcli.quantize import prepare_for_kbit_training

        prepare_for_kbit_training(model, cfg)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model


def build_model(
    path: str,
    cfg: ModelConfig,
    method: Any,
    device: torch.device,
    *,
    seed: int,
    label_names: list[str] | None = None,
    pad_token_id: int | None = None,
    dtype: torch.dtype | None = None,
    trainable_fp32: bool = True,
    before_attach: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """The tuned model, built one way for training, loading an adapter, benchmarks and tests.

    Loads the base (:func:`load_model`), lets ``before_attach`` adjust it (an adapter peft wrote), then
    ``method.attach``es the method (a ``peftcli.methods.registry.Method``; passed in, since models sit
    below methods) with the adapter's random init seeded by ``seed`` alone, so the same recipe seed
    gives the same initial adapter wherever it is built. ``trainable_fp32`` keeps what trains in fp32
    (adapters train in full precision); a loaded adapter keeps the base's dtype instead.
    """
    model = load_model(path, cfg, device, label_names=label_names, pad_token_id=pad_token_id, dtype=dtype)
    if before_attach is not None:
        before_attach(model)
    torch.manual_seed(seed)
    model = method.attach(model)
    if trainable_fp32:
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    return model.to(device)


def task_of_model_dir(path: str) -> str:
    """Guess the task of a saved transformers model from its architecture name."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    arch = (config.architectures or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        return "seq_cls"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    return "causal_lm"
