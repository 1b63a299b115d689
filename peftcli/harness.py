"""EleutherAI's lm-evaluation-harness on the model as peftcli loaded it (``peftcli eval --tasks``,
``eval.tasks`` in a recipe).

The harness gets our model object, not a path: the base with our method attached, unmerged, so methods
that cannot merge (soft prompts, prefixes, side networks) are scored through their own forward. It is
wrapped in lm-eval's ``HFLM`` through :class:`HarnessModel`, which gives HFLM the few attributes it
reads (``device``, ``config``, ``tie_weights``); generation tasks decode with peftcli's own loop
(:mod:`peftcli.decoding`), since ``transformers``' ``generate`` does not know our wrappers.

lm-eval is an optional extra (``pip install 'peftcli[eval]'``), imported only here and only when tasks
are asked for. Task YAML files from ``include_path`` may name Python functions (``!function``) that
lm-eval imports and runs; peftcli refuses those unless the caller allows task code by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftcli.recipe import EvalConfig, RecipeError, did_you_mean

INSTALL_HINT = "pip install 'peftcli[eval]'"


@dataclass(frozen=True)
class TaskOptions:
    tasks: list[str]
    include_path: str | None = None  # a directory of task YAML files
    num_fewshot: int | None = None  # None: each task's own default
    limit: int | None = None  # at most this many documents per task
    batch_size: int = 16
    allow_code: bool = False  # allow ``!function`` in the YAML files of include_path
    key: str = "--tasks"  # how errors name the setting (eval.tasks in a recipe)


def require_lm_eval(key: str = "--tasks") -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise RecipeError(
            key, "lm-evaluation-harness is not installed", f"{INSTALL_HINT} (lm-eval 0.4.13)"
        ) from None


def check_include_path(options: TaskOptions) -> Path | None:
    """The include directory, checked: it exists, and no YAML there runs code unless allowed."""
    if options.include_path is None:
        return None
    key = "--include-path" if options.key == "--tasks" else "eval.task_include_path"
    path = Path(options.include_path).expanduser()
    if not path.is_dir():
        raise RecipeError(key, f"{path} is not a directory", "point at the directory holding the task YAML")
    if not options.allow_code:
        for yaml_file in sorted([*path.rglob("*.yaml"), *path.rglob("*.yml")]):
            for number, line in enumerate(yaml_file.read_text(errors="replace").splitlines(), start=1):
                if "!function" in line.split("#")[0]:
                    raise RecipeError(
                        key,
                        f"{yaml_file} line {number} names Python code (!function), which lm-eval would run",
                        "pass --allow-task-code (eval.task_allow_code: true) if you trust that directory",
                    )
    return path


def check_tasks(options: TaskOptions, names: bool = False) -> None:
    """What can be checked before a model is loaded; ``names`` also looks the tasks up in lm-eval's
    index (seconds: done before training, where a typo would otherwise surface after it)."""
    require_lm_eval(options.key)
    if not options.tasks:
        raise RecipeError(options.key, "names no task", "e.g. --tasks hellaswag,arc_easy")
    include = check_include_path(options)
    if names:
        _task_manager(options, include)


def recipe_task_options(cfg: EvalConfig) -> TaskOptions:
    """The lm-eval settings of a recipe's ``eval`` section."""
    return TaskOptions(
        list(cfg.tasks),
        cfg.task_include_path,
        cfg.task_num_fewshot,
        cfg.task_limit,
        cfg.batch_size,
        cfg.task_allow_code,
        key="eval.tasks",
    )


class HarnessModel(torch.nn.Module):
    """The face HFLM sees: peftcli's model with ``device``, ``config`` and a no-op ``tie_weights``
    (the loaded weights are the ones to score; re-tying could undo a trained head)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        super().__init__()
        self.inner = model
        self._device = torch.device(device)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def config(self):
        return self.inner.config

    @property
    def name_or_path(self) -> str:
        return str(getattr(self.inner, "name_or_path", "") or getattr(self.config, "_name_or_path", ""))

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        pass

    def generate(self, *args: Any, **kwargs: Any):  # seq2seq generation tasks (causal ones use decode)
        return self.inner.generate(*args, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask=None, labels=None):
        if labels is not None:  # seq2seq: HFLM scores the decoder's logits for the labels
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return self.inner(input_ids=input_ids)  # causal: right-padded, the padding comes after what is scored


def _virtual_tokens(model: torch.nn.Module) -> int:
    """Positions a soft prompt or prefix takes before the real tokens (0 for other methods)."""
    return int(getattr(model, "n_prefix", 0) or 0) + int(getattr(model, "n_input", 0) or 0)


def make_lm(
    model: torch.nn.Module,
    tokenizer,
    task: str,
    device: torch.device,
    batch_size: int,
    use_cache: bool = True,
):
    """lm-eval's ``HFLM`` around ``model``; generation decodes with :func:`peftcli.decoding.decode`
    (without a KV cache when ``use_cache`` is False: the method's ``decodes_with_cache``)."""
    from lm_eval.models.huggingface import HFLM

    from peftcli.data.collate import pad_token_id
    from peftcli.decoding import Sampling, decode, eos_token_ids

    class PeftcliLM(HFLM):
        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if self.backend != "causal":
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            mask = generation_kwargs.get("attention_mask")
            rows = (
                context.tolist()
                if mask is None
                else [
                    [t for t, keep in zip(ids, kept, strict=True) if keep]
                    for ids, kept in zip(context.tolist(), mask.tolist(), strict=True)
                ]
            )
            temperature = float(generation_kwargs.get("temperature") or 0.0)
            sampling = (
                Sampling(temperature, float(generation_kwargs.get("top_p") or 1.0))
                if generation_kwargs.get("do_sample") and temperature > 0
                else Sampling()
            )
            pad = pad_token_id(self.tokenizer)
            new = decode(
                model,
                rows,
                max(max_length - context.shape[1], 1),
                eos_token_ids(model, self.tokenizer),
                pad,
                self.device,
                sampling,
                use_cache=use_cache,
            )
            # HFLM drops the first context.shape[1] columns and cuts at the stop strings itself.
            width = max(len(row) for row in new)
            tails = [row + [pad] * (width - len(row)) for row in new]
            return torch.cat([context, torch.tensor(tails, dtype=context.dtype, device=context.device)], 1)

    length = getattr(model.config, "max_position_embeddings", None)
    virtual = _virtual_tokens(model)
    max_length = length - virtual if length and virtual else None  # virtual tokens take positions too
    return PeftcliLM(
        pretrained=HarnessModel(model, device),
        tokenizer=tokenizer,
        backend="seq2seq" if task == "seq2seq" else "causal",
        batch_size=batch_size,
        max_length=max_length,
    )


def _task_manager(options: TaskOptions, include: Path | None):
    """lm-eval's index of tasks: only the include directory when it holds every task asked for (the
    built-in index reads thousands of YAML files), else both."""
    from lm_eval.tasks import TaskManager

    if include is not None:
        local = TaskManager(include_path=str(include), include_defaults=False)
        if all(local.match_tasks([name]) for name in options.tasks):
            return local
    manager = TaskManager(include_path=str(include) if include else None)
    for name in options.tasks:
        if not manager.match_tasks([name]):
            hint = did_you_mean(name, manager.all_tasks) or (
                "list them with `lm_eval ls tasks`; a local task: its YAML's directory as --include-path"
            )
            raise RecipeError(options.key, f"unknown lm-eval task {name!r}", hint)
    return manager


def quiet_lm_eval() -> None:
    """lm-eval logs every step at INFO and warns that it got a model object (which is the point)."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def run_tasks(
    model: torch.nn.Module,
    tokenizer,
    task: str,
    device: torch.device,
    options: TaskOptions,
    use_cache: bool = True,
) -> dict[str, Any]:
    """Score ``model`` on ``options.tasks``; returns ``{"tasks": {name: {metric: value, ...}}, ...}``.
    ``use_cache``: the method's ``decodes_with_cache`` (generation tasks decode without a cache if False)."""
    check_tasks(options)
    if task == "seq_cls":
        raise RecipeError(
            options.key,
            "lm-eval scores language models; this is a sequence classifier",
            "use peftcli eval's accuracy on your data instead",
        )
    quiet_lm_eval()
    from lm_eval import __version__ as lm_eval_version
    from lm_eval import simple_evaluate

    manager = _task_manager(options, check_include_path(options))
    was_training = model.training
    model.eval()
    try:
        output = simple_evaluate(
            model=make_lm(model, tokenizer, task, device, options.batch_size, use_cache),
            tasks=list(options.tasks),
            num_fewshot=options.num_fewshot,
            limit=options.limit,
            task_manager=manager,
            log_samples=False,
        )
    finally:
        model.train(was_training)
    return {
        "tasks": task_results(output),
        "num_fewshot": options.num_fewshot,
        "limit": options.limit,
        "lm_eval_version": lm_eval_version,
    }


def task_results(output: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval's ``results`` as ``{task: {metric: value, metric_stderr: value, samples: n}}``; a metric
    under a filter other than ``none`` is named ``metric/filter``."""
    tasks: dict[str, dict[str, Any]] = {}
    for name, metrics in output["results"].items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            if "," not in key:
                continue  # alias, sample counts
            metric, _, filter_name = key.partition(",")
            label = metric if filter_name == "none" else f"{metric}/{filter_name}"
            row[label] = None if value == "N/A" else value
        counts = output.get("n-samples", {}).get(name)
        if counts:
            row["samples"] = counts.get("effective")
        tasks[name] = row
    return tasks
