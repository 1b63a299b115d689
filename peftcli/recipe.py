"""The recipe: schema, YAML reading, overrides and validation of every section but the method's.

A recipe is YAML with five sections (``model``, ``data``, ``method``, ``train``, ``eval``) and
``output_dir``. Every section is a dataclass below; every field carries a one-line ``help`` in its
metadata, which feeds ``peftcli validate`` errors and the README's recipe reference
(``peftcli.docs``). The method section is declared by the method itself (``Method.config_cls``)
and picked by ``method.name``; :mod:`peftcli.recipe_loader` resolves it, so that this module, the
bottom of the import stack, imports no other peftcli module.

Every user mistake raises :class:`RecipeError` with the dotted key, what is wrong and what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml


class RecipeError(Exception):
    """A mistake in a recipe or on the command line. The CLI prints it as one line, exit code 2."""

    def __init__(self, key: str, message: str, hint: str | None = None):
        # One line whatever the user typed: a key or value with a line break is shown escaped.
        self.key, self.message = _one_line(key), _one_line(message)
        self.hint = _one_line(hint) if hint else hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.key}: {self.message}" if self.key else self.message
        return f"{text}; {self.hint}" if self.hint else text


class RecipeWarning(UserWarning):
    """Something the user asked for that is allowed but risky (remote code, pickle weights): the CLI
    prints it as one yellow line."""


def _one_line(text: str) -> str:
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


def key_name(key: Any) -> str:
    """A recipe key as the user can read it in an error: odd ones (empty, not text) in quotes."""
    return key if isinstance(key, str) and key.strip() and key.isprintable() else repr(key)


def doc(help: str, **extra: Any) -> dict[str, Any]:
    """Field metadata: a one-line help text plus optional checks (``min``, ``max``, ``min_exclusive``)."""
    return {"help": help, **extra}


# Names other tools (peft, HF Trainer, axolotl, torchtune) use for our keys: a user coming from them
# gets pointed at ours even where the spelling is far off.
SYNONYMS = {
    "rank": "r",
    "lora_r": "r",
    "lora_rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "micro_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "gradient_accumulation": "grad_accum",
    "lr_scheduler": "scheduler",
    "lr_scheduler_type": "scheduler",
    "warmup": "warmup_steps",
    "optim": "optimizer",
    "max_seq_length": "max_length",
    "sequence_len": "max_length",
    "max_seq_len": "max_length",
    "torch_dtype": "dtype",
    "base_model": "name",
    "model_name": "name",
    "lora_target_modules": "target_modules",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "logging_steps": "log_every",
    "output": "output_dir",
}


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str | None:
    choices = [str(c) for c in choices]
    synonym = SYNONYMS.get(str(word).lower())
    if synonym in choices:
        return f"did you mean '{synonym}'?"
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class QuantizationConfig:
    bits: Literal[4, 8] = field(default=4, metadata=doc("store the base's linear layers in 4 or 8 bits"))
    quant_type: Literal["nf4", "fp4"] = field(
        default="nf4", metadata=doc("4-bit data type: nf4 (QLoRA's NormalFloat) or fp4")
    )
    double_quant: bool = field(
        default=True, metadata=doc("quantize the quantization constants too (saves ~0.37 bit/param)")
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="bfloat16", metadata=doc("dtype the 4-bit weights are dequantized to for matmuls")
    )
    skip_modules: list[str] = field(
        default_factory=list,
        metadata=doc("extra module names kept in full precision (the LM/classifier head always is)"),
    )


@dataclass
class ModelConfig:
    name: str = field(
        default="",
        metadata=doc(
            "hub id, local model directory, or tiny:<family> (llama, qwen3, mixtral, gpt2, bert, t5, ...)"
        ),
    )
    task: Literal["causal_lm", "seq_cls", "seq2seq"] = field(
        default="causal_lm", metadata=doc("head to load: causal_lm, seq_cls (classification) or seq2seq")
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata=doc("dtype of the frozen base weights; auto = float32 on CPU, bfloat16 on GPU"),
    )
    revision: str | None = field(default=None, metadata=doc("hub revision (branch, tag or commit)"))
    num_labels: int | None = field(
        default=None,
        metadata=doc("seq_cls: number of classes; default: counted from the training labels", min=2),
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=doc("recompute activations in backward to save memory (~30% slower)")
    )
    trust_remote_code: bool = field(
        default=False, metadata=doc("run model code shipped with a hub repo; only for repos you trust")
    )
    allow_pickle: bool = field(
        default=False,
        metadata=doc("load .bin (pickle) weights when a model has no safetensors; pickle can run code"),
    )
    quantization: QuantizationConfig | None = field(
        default=None,
        metadata=doc("load the base in 4/8 bits with bitsandbytes (QLoRA); see model.quantization.*"),
    )
    adapter: str | None = field(
        default=None,
        metadata=doc(
            "continue from a trained adapter directory (RUN/adapter): the run starts from its weights; "
            "method must be the adapter's"
        ),
    )
    chat_template: str | None = field(
        default=None,
        metadata=doc(
            "chat template for chat/sharegpt data: a built-in name (chatml, llama3) or a Jinja string; "
            "default: the tokenizer's own"
        ),
    )


DataFormat = Literal[
    "text",
    "completion",
    "instruction",
    "chat",
    "sharegpt",
    "classification",
    "preference",
    "unpaired_preference",
    "prompt",
]


@dataclass
class SourceConfig:
    """One entry of a list-valued ``data.train`` (a mixture); unset fields inherit from ``data``."""

    path: str = field(
        default="",
        metadata=doc("required: a .jsonl/.json/.csv/.parquet file, a saved datasets dir, or a hub id"),
    )
    split: str | None = field(default=None, metadata=doc("hub/saved split; default: data.train_split"))
    format: DataFormat | None = field(
        default=None, metadata=doc("this source's format; default: data.format")
    )
    columns: dict[str, str] | None = field(
        default=None, metadata=doc("this source's column mapping; default: data.columns")
    )
    weight: float | None = field(
        default=None,
        metadata=doc("sampling share per epoch (weights are normalised); default: concatenate", min=0.0),
    )


@dataclass
class DataConfig:
    train: str | list[SourceConfig] = field(
        default="",
        metadata=doc(
            "training data: a .jsonl/.json/.csv/.parquet file, a saved datasets dir, a hub dataset id, "
            "or a list of sources {path, format, columns, weight} (a mixture)"
        ),
    )
    train_split: str = field(default="train", metadata=doc("split to read when data.train is a hub dataset"))
    eval: str | None = field(default=None, metadata=doc("evaluation data, same forms as data.train"))
    eval_split: str = field(
        default="validation", metadata=doc("split to read when data.eval is a hub dataset")
    )
    eval_fraction: float = field(
        default=0.0,
        metadata=doc("hold out this fraction of train for eval when data.eval is not set", min=0.0, max=0.5),
    )
    format: DataFormat = field(
        default="text",
        metadata=doc(
            "text | completion (prompt/completion) | instruction (alpaca) | chat (messages) "
            "| sharegpt (conversations) | classification | preference (prompt/chosen/rejected) "
            "| unpaired_preference (prompt/completion/label, for kto) "
            "| prompt (prompt and reference columns, for grpo)"
        ),
    )
    columns: dict[str, str] = field(
        default_factory=dict,
        metadata=doc("rename columns: {our_name: your_column}, e.g. {prompt: question, completion: answer}"),
    )
    max_length: int = field(
        default=512, metadata=doc("tokens per example; longer ones are truncated and counted", min=8)
    )
    train_on_prompt: bool = field(
        default=False, metadata=doc("also compute the loss on prompt tokens (default: only on the answer)")
    )
    add_eos: bool = field(
        default=True, metadata=doc("append the EOS token to every target so generation stops")
    )
    max_train_examples: int | None = field(
        default=None, metadata=doc("use only the first N training examples", min=1)
    )
    max_eval_examples: int | None = field(
        default=None, metadata=doc("use only the first N eval examples", min=1)
    )
    shuffle_seed: int = field(default=0, metadata=doc("seed of the eval_fraction split"))
    roles: dict[str, str] = field(
        default_factory=dict,
        metadata=doc(
            "sharegpt: map `from` values to chat roles, e.g. {bot: assistant} (adds to the defaults)"
        ),
    )
    num_proc: int = field(
        default=1, metadata=doc("processes that tokenize in parallel (datasets.map)", min=1)
    )
    cache_dir: str | None = field(
        default=None,
        metadata=doc("tokenized-data cache; default $PEFTCLI_CACHE/data, else ~/.cache/peftcli/data"),
    )
    on_bad_row: Literal["error", "skip"] = field(
        default="error", metadata=doc("a malformed row: error stops with its file and line; skip counts it")
    )
    task_id_column: str | None = field(
        default=None,
        metadata=doc(
            "the column holding each example's task index (0, 1, ...), batched as task_ids: "
            "multitask_prompt_tuning and poly need it; every source must have it"
        ),
    )

    def sources(self) -> list[SourceConfig]:
        """data.train as a list of sources with every field resolved (a plain path is one source)."""
        entries = [SourceConfig(path=self.train)] if isinstance(self.train, str) else self.train
        return [
            SourceConfig(
                path=entry.path,
                split=entry.split or self.train_split,
                format=entry.format or self.format,
                columns=self.columns if entry.columns is None else entry.columns,
                weight=entry.weight,
            )
            for entry in entries
        ]


@dataclass
class MethodConfig:
    """Base of every method's section: ``name`` picks the registry entry."""

    name: str = field(default="lora", metadata=doc("PEFT method; `peftcli methods` lists them"))


@dataclass
class TrainConfig:
    epochs: float = field(
        default=1.0,
        metadata=doc("passes over the training data (ignored when max_steps is set)", min_exclusive=0.0),
    )
    max_steps: int | None = field(
        default=None, metadata=doc("optimizer steps to run; overrides epochs", min=1)
    )
    batch_size: int = field(default=8, metadata=doc("examples per micro-batch", min=1))
    grad_accum: int = field(default=1, metadata=doc("micro-batches per optimizer step", min=1))
    lr: float = field(default=2e-4, metadata=doc("peak learning rate", min_exclusive=0.0))
    scheduler: Literal["constant", "linear", "cosine"] = field(
        default="linear", metadata=doc("learning-rate decay after warmup: constant, linear or cosine (to 0)")
    )
    warmup_steps: int = field(
        default=0, metadata=doc("linear warmup steps (overrides warmup_ratio when > 0)", min=0)
    )
    warmup_ratio: float = field(
        default=0.0, metadata=doc("warmup as a fraction of all steps", min=0.0, max=1.0)
    )
    weight_decay: float = field(
        default=0.0, metadata=doc("decoupled weight decay of AdamW / L2 of SGD", min=0.0)
    )
    max_grad_norm: float = field(
        default=1.0, metadata=doc("clip the gradient norm to this; 0 turns clipping off", min=0.0)
    )
    optimizer: Literal[
        "adamw", "sgd", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "paged_lion_8bit"
    ] = field(
        default="adamw",
        metadata=doc(
            "adamw | sgd | bitsandbytes: adamw_8bit, paged_adamw_8bit, paged_adamw_32bit, paged_lion_8bit"
        ),
    )
    adam_beta1: float = field(default=0.9, metadata=doc("Adam/Lion beta1", min=0.0, max=1.0))
    adam_beta2: float = field(default=0.999, metadata=doc("Adam/Lion beta2", min=0.0, max=1.0))
    adam_eps: float = field(default=1e-8, metadata=doc("Adam epsilon", min_exclusive=0.0))
    momentum: float = field(default=0.0, metadata=doc("SGD momentum", min=0.0, max=1.0))
    seed: int = field(default=42, metadata=doc("seed for init, dropout and data order"))
    log_every: int = field(default=10, metadata=doc("optimizer steps between train log lines", min=1))
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(
        default_factory=list,
        metadata=doc("trackers that also get metrics.jsonl's events: tensorboard, wandb, mlflow (extras)"),
    )
    eval_every: int = field(
        default=0, metadata=doc("steps between evals; 0 = only before and after training", min=0)
    )
    save_every: int = field(default=0, metadata=doc("steps between checkpoints; 0 = only at the end", min=0))
    keep_checkpoints: int = field(
        default=2, metadata=doc("newest checkpoints kept; older ones are deleted", min=1)
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(
        default="auto", metadata=doc("autocast on GPU: auto = bf16 where supported; always off on CPU")
    )
    device: str = field(default="auto", metadata=doc("auto, cpu, cuda or cuda:N"))
    distributed: Literal["auto", "ddp", "fsdp"] = field(
        default="auto",
        metadata=doc(
            "under torchrun / --nproc-per-node: auto = ddp when there are several processes; "
            "ddp (adapter gradients all-reduced) or fsdp (FSDP2: base and adapter sharded per layer)"
        ),
    )
    on_nan: Literal["stop", "skip"] = field(
        default="stop",
        metadata=doc("a NaN/inf loss or gradient norm: stop (keep the last checkpoint) or skip the update"),
    )
    max_skipped_steps: int = field(
        default=10, metadata=doc("with on_nan: skip, stop once more than this many steps were skipped", min=0)
    )
    loss: Literal["auto", "plain", "chunked"] = field(
        default="auto",
        metadata=doc(
            "causal-LM loss: chunked = head + cross-entropy per chunk of hidden states, fused with its "
            "gradients for a linear head (no tokens × vocab logits); auto = Liger's fused kernel on CUDA if "
            "installed, else chunked where the model allows"
        ),
    )
    packing: bool = field(
        default=False,
        metadata=doc(
            "pack whole examples into rows of max_length (no padding); position_ids restart per example"
        ),
    )
    batch_tokens: int | None = field(
        default=None,
        metadata=doc("with packing: tokens per micro-batch (default batch_size × data.max_length)", min=1),
    )
    group_by_length: bool = field(
        default=False,
        metadata=doc("without packing: batch examples of similar length (less padding; order still seeded)"),
    )
    compile: bool = field(default=False, metadata=doc("torch.compile the model (slow first steps)"))


ObjectiveName = Literal["sft", "dpo", "ipo", "kto", "orpo", "simpo", "reward", "grpo"]


@dataclass
class RewardConfig:
    """One reward of ``objective.rewards`` (grpo): exactly one kind, and its weight
    (docs/objectives.md defines each)."""

    exact_match: str | None = field(
        default=None, metadata=doc("a reference column: 1 when the stripped completion equals it, else 0")
    )
    contains: str | None = field(
        default=None, metadata=doc("a reference column: 1 when the completion contains it, else 0")
    )
    regex: str | None = field(
        default=None, metadata=doc("a Python regular expression: 1 when re.search finds it, else 0")
    )
    length: int | None = field(
        default=None, metadata=doc("a target length N in tokens: −|n − N| / N for n completion tokens", min=1)
    )
    python: str | None = field(
        default=None,
        metadata=doc(
            "module:function called as TRL calls reward functions; needs peftcli train --allow-code"
        ),
    )
    weight: float = field(default=1.0, metadata=doc("its weight in the summed reward"))
    name: str | None = field(default=None, metadata=doc("its name in metrics.jsonl; default: its kind"))

    KINDS: ClassVar[tuple[str, ...]] = ("exact_match", "contains", "regex", "length", "python")

    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) is not None)


PREFERENCE_OBJECTIVES = ("dpo", "ipo", "kto", "orpo", "simpo", "reward")  # trained on preference data
REFERENCE_OBJECTIVES = ("dpo", "ipo", "kto")  # compare the policy with a frozen reference
# The data format each preference objective trains on (the others: data.format preference).
OBJECTIVE_FORMATS = {"kto": "unpaired_preference"}


@dataclass
class ObjectiveConfig:
    """What the loop minimises (docs/objectives.md writes each loss out)."""

    name: ObjectiveName = field(
        default="sft",
        metadata=doc(
            "sft (next-token cross-entropy) | dpo | ipo | orpo | simpo (preference data) | kto "
            "(unpaired_preference data) | reward (a seq_cls reward model on preference data) | grpo "
            "(sampled completions of prompt data, rewarded)"
        ),
    )
    beta: float = field(
        default=0.1,
        metadata=doc(
            "dpo/ipo/kto: strength of the tie to the reference; simpo: reward scale; orpo: odds-ratio weight",
            min_exclusive=0.0,
        ),
    )
    label_smoothing: float = field(
        default=0.0, metadata=doc("dpo: the share of pairs assumed mislabelled (cDPO)", min=0.0, max=0.5)
    )
    gamma: float | None = field(
        default=None, metadata=doc("simpo: the target reward margin γ; default gamma_beta_ratio × beta")
    )
    gamma_beta_ratio: float = field(
        default=0.5, metadata=doc("simpo: γ / β when gamma is not set (SimPO's default 0.5)")
    )
    desirable_weight: float = field(
        default=1.0, metadata=doc("kto: the weight of the desirable (label true) examples' losses", min=0.0)
    )
    undesirable_weight: float = field(
        default=1.0,
        metadata=doc("kto: the weight of the undesirable (label false) examples' losses", min=0.0),
    )
    reference: Literal["base", "start"] = field(
        default="base",
        metadata=doc(
            "dpo/ipo/kto (grpo with kl_coef): base (the same weights with the adapter switched off) "
            "or start (the adapter the run started from, frozen: model.adapter's, else the fresh one)"
        ),
    )
    precompute_reference: bool = field(
        default=False,
        metadata=doc(
            "dpo/ipo: compute the reference log-probs once before training and cache them beside the "
            "tokenized data (no reference forward per step)"
        ),
    )

    group_size: int = field(
        default=8, metadata=doc("grpo: completions sampled per prompt, G (TRL's num_generations)", min=2)
    )
    temperature: float = field(
        default=1.0,
        metadata=doc("grpo: sampling temperature (the loss scores logits / T too)", min_exclusive=0.0),
    )
    max_new_tokens: int = field(
        default=64, metadata=doc("grpo: the longest completion sampled (TRL's max_completion_length)", min=1)
    )
    rewards: list[RewardConfig] = field(
        default_factory=list,
        metadata=doc(
            "grpo: the rewards summed with their weights, e.g. [{exact_match: answer}, {regex: '^\\d+$', weight: 0.5}]"
        ),
    )
    scale_rewards: Literal["group", "batch", "none"] = field(
        default="group",
        metadata=doc(
            "grpo: divide the advantage by the std of its group (TRL's default), the batch, or none"
        ),
    )
    loss_type: Literal["dapo", "grpo", "bnpo", "dr_grpo"] = field(
        default="dapo",
        metadata=doc(
            "grpo: how token losses are averaged: dapo (over the window's tokens, TRL's default), grpo "
            "(per sequence), bnpo (per micro-batch's tokens), dr_grpo (over rows × max_new_tokens)"
        ),
    )
    epsilon: float = field(
        default=0.2, metadata=doc("grpo: the clip range of the probability ratio, 1 ± ε", min=0.0)
    )
    epsilon_high: float | None = field(
        default=None, metadata=doc("grpo: the upper clip 1 + ε_high (DAPO's clip-higher); default epsilon")
    )
    kl_coef: float = field(
        default=0.0,
        metadata=doc(
            "grpo: weight of the KL to the reference (TRL's beta, k3 estimator); 0 needs no reference",
            min=0.0,
        ),
    )

    def simpo_gamma(self) -> float:
        return self.gamma if self.gamma is not None else self.gamma_beta_ratio * self.beta


@dataclass
class EvalConfig:
    batch_size: int = field(default=16, metadata=doc("examples per eval batch", min=1))
    generate: bool = field(
        default=True, metadata=doc("for causal LMs with answers: greedy-generate and score exact match")
    )
    max_new_tokens: int = field(default=32, metadata=doc("generation budget per example", min=1))
    max_generate_examples: int = field(
        default=200, metadata=doc("generate for at most this many eval examples", min=1)
    )
    tasks: list[str] = field(
        default_factory=list,
        metadata=doc(
            "lm-evaluation-harness tasks scored after training, into results.json (needs peftcli[eval])"
        ),
    )
    task_include_path: str | None = field(
        default=None, metadata=doc("a directory of lm-eval task YAML files (local tasks, offline)")
    )
    task_num_fewshot: int | None = field(
        default=None, metadata=doc("few-shot examples per lm-eval prompt; default: each task's own", min=0)
    )
    task_limit: int | None = field(
        default=None, metadata=doc("score at most this many documents per lm-eval task", min=1)
    )
    task_allow_code: bool = field(
        default=False, metadata=doc("let task YAML in task_include_path run Python (!function)")
    )


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig, metadata=doc("the base model"))
    data: DataConfig = field(default_factory=DataConfig, metadata=doc("training and eval data"))
    method: MethodConfig = field(
        default_factory=MethodConfig, metadata=doc("the PEFT method and its options")
    )
    objective: ObjectiveConfig = field(
        default_factory=ObjectiveConfig, metadata=doc("what training minimises: sft, or a preference loss")
    )
    train: TrainConfig = field(default_factory=TrainConfig, metadata=doc("the training loop"))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=doc("evaluation"))
    output_dir: str = field(default="", metadata=doc("run directory; default runs/<recipe file name>"))


REQUIRED = {"model.name", "data.train"}


# --------------------------------------------------------------------------------------------
# Validation: dicts -> dataclasses, with dotted-path errors
# --------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {int: "integer", float: "number", bool: "true/false", str: "string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert what people write (``3e-4``, ``"8"``)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is Literal:
        return _coerce_literal(value, typing.get_args(tp), key)
    if origin is list:
        return _coerce_list(value, tp, key)
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise RecipeError(key, f"expected a mapping, got {show(value)}")
        return {coerce(k, key_tp, key): coerce(v, val_tp, f"{key}.{key_name(k)}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is Any:
        return value
    scalar = _SCALARS.get(tp)
    if scalar is None:
        raise TypeError(f"unsupported annotation {tp!r} at {key}")  # a schema bug, not a user mistake
    return scalar(value, key)


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    """The first member of the union that takes ``value``; else the error that says the most."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return coerce(value, arg, key)
        except RecipeError as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    if isinstance(value, list) and any(typing.get_origin(a) is list for a in args):
        raise errors[[typing.get_origin(a) is list for a in args if a is not type(None)].index(True)]
    raise RecipeError(key, f"expected {_type_name(tp)}, got {show(value)}")


def _coerce_literal(value: Any, choices: tuple, key: str) -> Any:
    for choice in choices:
        if value == choice or (
            isinstance(choice, int) and isinstance(value, str) and value.strip() == str(choice)
        ):
            return choice
    hint = did_you_mean(value, choices) or "choose one of: " + ", ".join(str(c) for c in choices)
    raise RecipeError(key, f"{show(value)} is not one of {', '.join(str(c) for c in choices)}", hint)


def _coerce_list(value: Any, tp: Any, key: str) -> list:
    (item_tp,) = typing.get_args(tp)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item_tp in (str,):
        value = [value]  # a single name is a list of one
    if not isinstance(value, (list, tuple)):
        raise RecipeError(key, f"expected {_type_name(tp)}, got {show(value)}")
    return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]


def _coerce_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        return value.lower() in ("true", "yes", "on")
    raise RecipeError(key, f"expected true or false, got {show(value)}")


def _coerce_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise RecipeError(key, f"expected an integer, got {show(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _NUMBER.match(value.strip()) and float(value).is_integer():
        return int(float(value))
    raise RecipeError(key, f"expected an integer, got {show(value)}")


def _coerce_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise RecipeError(key, f"expected a number, got {show(value)}")
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value)  # PyYAML reads 3e-4 as a string (YAML 1.1 wants 3.0e-4)
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise RecipeError(key, f"expected a finite number, got {show(value)}")
        return float(value)
    raise RecipeError(key, f"expected a number, got {show(value)}")


def _coerce_str(value: Any, key: str) -> str:
    if isinstance(value, (dict, list)) or value is None:
        raise RecipeError(key, f"expected a string, got {show(value)}")
    return str(value)


_SCALARS = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}


def _check_range(value: Any, meta: dict, key: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if "min" in meta and value < meta["min"]:
        raise RecipeError(key, f"must be >= {meta['min']}, got {value}")
    if "max" in meta and value > meta["max"]:
        raise RecipeError(key, f"must be <= {meta['max']}, got {value}")
    if "min_exclusive" in meta and value <= meta["min_exclusive"]:
        raise RecipeError(key, f"must be > {meta['min_exclusive']}, got {value}")


def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with a did-you-mean."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(path, f"expected a mapping of keys, got {show(data)}")
    known = fields_of(cls)
    hints = resolved_types(cls)
    for k in data:
        if k not in known:
            full = f"{path}.{key_name(k)}" if path else key_name(k)
            hint = did_you_mean(k, known) or f"known keys: {', '.join(known)}"
            raise RecipeError(full, "unknown key", hint)
    kwargs = {}
    for name, f in known.items():
        full = f"{path}.{name}" if path else name
        if name in data:
            value = coerce(data[name], hints[name], full)
            _check_range(value, f.metadata, full)
            if isinstance(value, list):
                for v in value:
                    _check_range(v, f.metadata, full)
            kwargs[name] = value
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise RecipeError(
                key_name(item), "an override must look like key.path=value", "e.g. train.lr=1e-4"
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise RecipeError(
                key_name(item), "an override must look like key.path=value", "e.g. train.lr=1e-4"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for parts, value in parse_overrides(overrides):
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(".".join(parts[: i + 1]), "is not a section, so it has no sub-keys")
            node = child
        node[parts[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise RecipeError("recipe", f"file not found: {path}", "check the path")
    if path.is_dir():
        raise RecipeError("recipe", f"{path} is a directory, not a recipe file", "pass a .yaml file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise RecipeError(
            "recipe", f"{path} is not valid YAML{where}: {problem}", "fix the YAML syntax"
        ) from None
    if raw is None:
        raise RecipeError("recipe", f"{path} is empty", "a recipe needs at least model.name and data.train")
    if not isinstance(raw, dict):
        raise RecipeError(
            "recipe",
            f"{path} must be a mapping of sections, got {type(raw).__name__}",
            "start with `model:`, `data:`, `method:`, `train:`",
        )
    return raw


def cross_checks(recipe: Recipe) -> None:
    if isinstance(recipe.data.train, list):
        if not recipe.data.train:
            raise RecipeError("data.train", "is an empty list", "name at least one source: [{path: FILE}]")
        for i, source in enumerate(recipe.data.train):
            if not source.path:
                raise RecipeError(f"data.train[{i}].path", "is required", "each source needs a path")
    if recipe.data.format == "classification" and recipe.model.task != "seq_cls":
        raise RecipeError(
            "data.format",
            "classification data needs model.task: seq_cls",
            "set model.task: seq_cls or pick another data.format",
        )
    reward = recipe.objective.name == "reward"
    if recipe.model.task == "seq_cls" and recipe.data.format != "classification" and not reward:
        raise RecipeError(
            "model.task",
            "seq_cls trains on classification data",
            "set data.format: classification (columns text and label)",
        )
    if recipe.data.eval and recipe.data.eval_fraction:
        raise RecipeError(
            "data.eval_fraction", "set either data.eval or data.eval_fraction, not both", "remove one of them"
        )
    train = recipe.train
    if train.packing and recipe.model.task != "causal_lm":
        raise RecipeError(
            "train.packing", f"packing is for causal_lm, not {recipe.model.task}", "set train.packing: false"
        )
    if train.packing and train.group_by_length:
        raise RecipeError(
            "train.group_by_length",
            "packing already removes padding",
            "set only one of packing, group_by_length",
        )
    if train.batch_tokens is not None and not train.packing:
        raise RecipeError(
            "train.batch_tokens", "only used with train.packing: true", "set train.packing: true"
        )
    if train.batch_tokens is not None and train.batch_tokens < recipe.data.max_length:
        raise RecipeError(
            "train.batch_tokens",
            f"{train.batch_tokens} is less than data.max_length ({recipe.data.max_length}): a long example fits no batch",
            f"set train.batch_tokens >= {recipe.data.max_length}",
        )
    objective_checks(recipe)
    q = recipe.model.quantization
    if q is not None and q.bits == 8 and recipe.model.dtype not in ("auto", "float16", "bfloat16", "float32"):
        raise RecipeError("model.dtype", "not supported with 8-bit quantization")


def objective_checks(recipe: Recipe) -> None:
    """A preference objective trains on preference data, and preference data needs one (both ways);
    options that the chosen objective ignores are refused rather than silently unused."""
    objective, formats = recipe.objective, {s.format for s in recipe.data.sources()}
    preference = objective.name in PREFERENCE_OBJECTIVES
    reward_checks(recipe)
    if preference and objective.name != "reward" and recipe.model.task != "causal_lm":
        raise RecipeError(
            "objective.name",
            f"{objective.name} trains causal LMs, not {recipe.model.task}",
            "set model.task: causal_lm",
        )
    wanted = OBJECTIVE_FORMATS.get(objective.name, "preference")
    if preference and formats != {wanted}:
        other = ", ".join(sorted(formats - {wanted}))
        rows = (
            "{prompt, completion, label}" if wanted == "unpaired_preference" else "{prompt, chosen, rejected}"
        )
        raise RecipeError(
            "data.format",
            f"objective {objective.name} trains on {wanted.replace('_', ' ')} data, not {other}",
            f"set data.format: {wanted} (rows {rows})",
        )
    grpo_checks(recipe, formats)
    if not preference and formats & {"preference", "unpaired_preference"}:
        raise RecipeError(
            "objective.name",
            f"preference data needs a preference objective, not {objective.name}",
            f"set objective.name: one of {', '.join(PREFERENCE_OBJECTIVES)}",
        )
    if recipe.train.packing and preference:
        raise RecipeError("train.packing", "preference pairs are not packed", "set train.packing: false")
    if objective.label_smoothing and objective.name != "dpo":
        raise RecipeError("objective.label_smoothing", f"only dpo uses it, not {objective.name}", "remove it")
    if objective.gamma is not None and objective.name != "simpo":
        raise RecipeError("objective.gamma", f"only simpo uses it, not {objective.name}", "remove it")
    for key in ("desirable_weight", "undesirable_weight"):
        if getattr(objective, key) != 1.0 and objective.name != "kto":
            raise RecipeError(f"objective.{key}", f"only kto uses it, not {objective.name}", "remove it")
    if objective.precompute_reference and objective.name not in ("dpo", "ipo"):
        why = (
            "its KL rows pair each prompt with another row's completion of the same batch, so their "
            "reference changes with the batch"
            if objective.name == "kto"
            else "it has no reference"
        )
        raise RecipeError(
            "objective.precompute_reference", f"{objective.name} cannot precompute: {why}", "remove it"
        )


GRPO_OPTIONS = (
    "group_size", "temperature", "max_new_tokens", "rewards", "scale_rewards", "loss_type", "epsilon",
    "epsilon_high", "kl_coef",
)  # fmt: skip


def grpo_checks(recipe: Recipe, formats: set[str]) -> None:
    """grpo trains a causal LM on prompt data (and prompt data is grpo's alone), with at least one reward,
    each of exactly one kind; grpo's options on another objective are refused, as is dpo's beta on grpo."""
    objective, grpo = recipe.objective, recipe.objective.name == "grpo"
    if not grpo:
        defaults = ObjectiveConfig()
        for name in GRPO_OPTIONS:
            if getattr(objective, name) != getattr(defaults, name):
                raise RecipeError(
                    f"objective.{name}", f"only grpo uses it, not {objective.name}", "remove it"
                )
        if "prompt" in formats:
            raise RecipeError(
                "data.format",
                "prompt data is for objective grpo",
                "set objective.name: grpo, or another format",
            )
        return
    if formats != {"prompt"}:
        other = ", ".join(sorted(formats - {"prompt"}))
        raise RecipeError(
            "data.format",
            f"objective grpo samples completions of prompts, not {other} data",
            "set data.format: prompt (rows {prompt, reference columns...})",
        )
    if recipe.model.task != "causal_lm":
        raise RecipeError(
            "objective.name", f"grpo trains causal LMs, not {recipe.model.task}", "set model.task: causal_lm"
        )
    if recipe.train.packing:
        raise RecipeError(
            "train.packing", "grpo's sampled completions are not packed", "set train.packing: false"
        )
    if objective.beta != ObjectiveConfig.beta:
        raise RecipeError(
            "objective.beta", "grpo's KL coefficient is objective.kl_coef", "set kl_coef instead"
        )
    if not objective.rewards:
        raise RecipeError(
            "objective.rewards", "grpo needs at least one reward", "e.g. rewards: [{exact_match: answer}]"
        )
    for i, reward in enumerate(objective.rewards):
        check_reward(reward, f"objective.rewards[{i}]")


def check_reward(reward: RewardConfig, key: str) -> None:
    kinds = [k for k in RewardConfig.KINDS if getattr(reward, k) is not None]
    if len(kinds) != 1:
        what = "names no reward" if not kinds else f"names {len(kinds)} rewards ({', '.join(kinds)})"
        raise RecipeError(key, what, f"give exactly one of: {', '.join(RewardConfig.KINDS)}")
    if reward.regex is not None:
        try:
            re.compile(reward.regex)
        except re.error as err:
            raise RecipeError(
                f"{key}.regex", f"{reward.regex!r} is not a regular expression: {err}"
            ) from None
    if reward.python is not None and not re.fullmatch(r"[\w.]+:\w+", reward.python):
        raise RecipeError(
            f"{key}.python", f"{reward.python!r} is not module:function", "e.g. my_rewards:is_correct"
        )


def reward_checks(recipe: Recipe) -> None:
    """A reward model is a seq_cls model with one output (the reward); nothing else is one."""
    if recipe.objective.name != "reward":
        return
    if recipe.model.task != "seq_cls":
        raise RecipeError(
            "model.task",
            f"objective reward trains a one-output seq_cls head, not {recipe.model.task}",
            "set model.task: seq_cls",
        )
    if recipe.model.num_labels is not None:
        raise RecipeError(
            "model.num_labels",
            f"a reward model has one output, not {recipe.model.num_labels}",
            "remove model.num_labels",
        )


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def expand_path(value: str) -> str:
    return os.path.expanduser(os.path.expandvars(value))


def looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or Path(value).suffix.lower() in (
        ".jsonl",
        ".json",
        ".csv",
        ".parquet",
    )
