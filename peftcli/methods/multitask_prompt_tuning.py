"""Multitask prompt tuning (Wang et al., 2023, "Multitask Prompt Tuning Enables Parameter-Efficient
Transfer Learning", arXiv 2303.02861).

One prompt ``P* ∈ R^{n×h}`` is shared by every task; task ``k`` rescales it element-wise by a rank-r
matrix of its own, ``u_k v_kᵀ`` (peft's ``prefix_task_cols`` (n, r) and ``prefix_task_rows`` (r, h))::

    P_k = P* ⊙ (u_k v_kᵀ),     y = f([P_k; E(x)])      for an example of task k

so each example needs its task index: ``data.task_id_column`` names the column, the data stage keeps it
and collation batches it as ``task_ids`` (with ``num_tasks: 1`` every example is task 0 and no column
is needed, so generation works too). The paper trains ``P*`` and the task factors on source tasks,
then starts a target task from them: ``init: average_source_tasks`` (the factors' mean over the source
tasks), ``exact_source_task`` (source task ``init_task``'s factors) or ``only_source_shared`` (``P*``
alone, fresh factors), each read from ``init_from`` (a multitask prompt tuning adapter directory). The
factors start at N(0, 0.02²), as peft draws them, so step 0 is not the base.

Saved as peft's ``MULTITASK_PROMPT_TUNING``: ``prompt_embeddings`` (n, h), ``prefix_task_cols``
(tasks, n, r) and ``prefix_task_rows`` (tasks, r, h).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from peftcli.inject import modules_to_save_state
from peftcli.methods.prompt_tuning import init_rows
from peftcli.methods.registry import register
from peftcli.methods.soft_prompt import PromptedModel, SoftPromptConfig, SoftPromptMethod
from peftcli.recipe import RecipeError, doc

SOURCE_INITS = ("average_source_tasks", "exact_source_task", "only_source_shared")
TENSORS = ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")  # peft's keys


@dataclass
class MultitaskPromptTuningConfig(SoftPromptConfig):
    """peft's ``MultitaskPromptTuningConfig`` fields (``prompt_tuning_init*`` as our init keys)."""

    num_tasks: int = field(default=1, metadata=doc("tasks in the data: task ids 0 … num_tasks-1", min=1))
    num_ranks: int = field(default=1, metadata=doc("rank r of each task's u_k v_kᵀ (the paper: 1)", min=1))
    init: Literal[
        "random", "sample_vocab", "text", "average_source_tasks", "exact_source_task", "only_source_shared"
    ] = field(
        default="random",
        metadata=doc(
            "shared prompt init: random (N(0,1), peft's default), sample_vocab, text; or from the "
            "multitask adapter in init_from: average_source_tasks, exact_source_task, only_source_shared"
        ),
    )
    init_text: str = field(default="", metadata=doc("init: text — the text whose embeddings start P*"))
    sample_vocab_top_k: int = field(
        default=5000, metadata=doc("init: sample_vocab — draw from the first K token ids", min=1)
    )
    init_task: int = field(
        default=0, metadata=doc("init: exact_source_task — the source task whose factors start", min=0)
    )


class MultitaskPrompt(nn.Module):
    """``P*`` (``embedding.weight``, n × h) and the task factors; ``forward(task_ids)`` gives each
    example's prompt ``P* ⊙ (u_k v_kᵀ)``, (B, n, h)."""

    def __init__(self, rows: torch.Tensor, num_tasks: int, num_ranks: int):
        super().__init__()
        n, hidden = rows.shape
        self.num_virtual_tokens = n
        self.embedding = nn.Embedding(n, hidden, _weight=rows.clone())
        self.prefix_task_cols = nn.Parameter(torch.normal(0.0, 0.02, size=(num_tasks, n, num_ranks)))
        self.prefix_task_rows = nn.Parameter(torch.normal(0.0, 0.02, size=(num_tasks, num_ranks, hidden)))

    def forward(self, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        tasks = self.prefix_task_cols.shape[0]
        if task_ids is None and tasks == 1:  # one task: every example is task 0, ids or not
            return self.embedding.weight * (self.prefix_task_cols[0] @ self.prefix_task_rows[0])  # (n, h)
        if task_ids is None:
            raise RecipeError(
                "data.task_id_column",
                f"multitask_prompt_tuning with {tasks} tasks needs each example's task id and this call has none",
                "train and evaluate with data.task_id_column; generation and chat do not carry task ids",
            )
        if task_ids.numel() and not 0 <= int(task_ids.min()) <= int(task_ids.max()) < tasks:
            raise RecipeError(
                "data.task_id_column",
                f"a task id is {int(task_ids.max())} but method.num_tasks is {tasks}",
                f"number the tasks 0 … {tasks - 1}, or raise method.num_tasks",
            )
        cols = self.prefix_task_cols.index_select(0, task_ids)  # (B, n, r)
        rows = self.prefix_task_rows.index_select(0, task_ids)  # (B, r, h)
        return self.embedding.weight * (cols @ rows)  # (B, n, h)


@register
class MultitaskPromptTuning(SoftPromptMethod):
    name = "multitask_prompt_tuning"
    description = "Multitask prompt tuning: a shared prompt times a rank-r matrix per task (arXiv 2303.02861)"
    config_cls: ClassVar[type[MultitaskPromptTuningConfig]] = MultitaskPromptTuningConfig
    peft_type = "MULTITASK_PROMPT_TUNING"
    trainable_formula = "n · hidden + num_tasks · num_ranks · (n + hidden)"
    prompt_kind = "input"

    cfg: MultitaskPromptTuningConfig

    @classmethod
    def validate_config(cls, cfg: MultitaskPromptTuningConfig, recipe) -> None:
        checks = [
            (
                recipe.model.task == "seq2seq",
                "model.task",
                "multitask_prompt_tuning trains causal_lm and seq_cls models (peft's 2n-row seq2seq prompt is not ported)",
                "use prompt_tuning for seq2seq",
            ),
            (
                recipe.data.task_id_column is None and cfg.num_tasks > 1,
                "data.task_id_column",
                f"multitask_prompt_tuning with num_tasks {cfg.num_tasks} needs each example's task index",
                "name the column holding it, e.g. data.task_id_column: task_id (values 0 … num_tasks-1)",
            ),
            (
                recipe.objective.name != "sft",
                "objective.name",
                f"multitask_prompt_tuning trains with sft only, not {recipe.objective.name}",
                "use objective.name: sft",
            ),
            (
                recipe.eval.generate
                and cfg.num_tasks > 1
                and recipe.model.task == "causal_lm"
                and bool(recipe.data.eval or recipe.data.eval_fraction),
                "eval.generate",
                "generation carries no task ids, which the prompts of num_tasks > 1 need",
                "set eval.generate: false (eval loss and perplexity still run), or train one task",
            ),
        ]
        for bad, key, what, hint in checks:
            if bad:
                raise RecipeError(key, what, hint)
        cls._validate_init(cfg)

    @staticmethod
    def _validate_init(cfg: MultitaskPromptTuningConfig) -> None:
        source = cfg.init in SOURCE_INITS
        if source != bool(cfg.init_from):
            raise RecipeError(
                "method.init_from" if cfg.init_from else "method.init",
                f"init: {cfg.init} {'needs' if source else 'does not read'} init_from",
                "init_from (a multitask_prompt_tuning adapter dir) goes with init: "
                + " / ".join(SOURCE_INITS),
            )
        if cfg.init in ("average_source_tasks", "exact_source_task") and cfg.num_tasks != 1:
            raise RecipeError(
                "method.num_tasks",
                f"init: {cfg.init} starts one target task from the source factors, but num_tasks is {cfg.num_tasks}",
                "set method.num_tasks: 1, or use init: only_source_shared",
            )
        if cfg.init == "text" and not cfg.init_text:
            raise RecipeError("method.init_text", "init: text needs init_text", "set method.init_text")

    # -- building ------------------------------------------------------------------------
    def build_prompt(self, model: nn.Module) -> MultitaskPrompt:
        cfg = self.cfg
        init = cfg.init if cfg.init in ("random", "sample_vocab", "text") else "random"
        rows = init_rows(
            model,
            cfg.num_virtual_tokens,
            init,
            cfg.init_text,
            cfg.sample_vocab_top_k,
            self.task,
            "method.init",
        )
        prompt = MultitaskPrompt(rows, cfg.num_tasks, cfg.num_ranks)
        return prompt.to(model.get_input_embeddings().weight.device)

    def prompt_parameter_count(self, model: PromptedModel) -> int:
        cfg, hidden = self.cfg, model.get_input_embeddings().weight.shape[1]
        return cfg.num_virtual_tokens * hidden + cfg.num_tasks * cfg.num_ranks * (
            cfg.num_virtual_tokens + hidden
        )

    def transfer_prompt(self, model: PromptedModel, source: str) -> None:
        """The paper's transfer: ``P*`` from the source adapter, and (average / exact source task) the
        target task's factors from the source tasks' (peft's three source inits)."""
        state = self.transfer_source(source)
        prompt = model.input_prompt
        with torch.no_grad():
            prompt.embedding.weight.copy_(
                self.check_rows(state["prompt_embeddings"], model, "method.init_from")
            )
            if self.cfg.init == "only_source_shared":
                return
            for name in TENSORS[1:]:
                target = getattr(prompt, name)
                target.copy_(self.source_factor(state, name, source).to(target.dtype))

    def source_factor(self, state: dict[str, torch.Tensor], name: str, source: str) -> torch.Tensor:
        """One task's factor (1, …) from the source's ``name`` (tasks, …): their mean, or task ``init_task``'s."""
        if name not in state:
            raise RecipeError(
                "method.init_from",
                f"{source} holds no {name} (not a multitask_prompt_tuning adapter)",
                "use init: only_source_shared to start from its prompt alone",
            )
        factors = state[name]
        if self.cfg.init == "average_source_tasks":
            return factors.mean(0, keepdim=True)
        if self.cfg.init_task >= factors.shape[0]:
            raise RecipeError(
                "method.init_task",
                f"is {self.cfg.init_task} but {source} has {factors.shape[0]} tasks",
                f"pick 0 … {factors.shape[0] - 1}",
            )
        return factors[self.cfg.init_task].unsqueeze(0)

    # -- saving --------------------------------------------------------------------------
    def stored_rows(self, model: PromptedModel) -> torch.Tensor:
        return model.input_prompt.embedding.weight.detach().float()

    def adapter_state_dict(self, model: PromptedModel) -> dict[str, torch.Tensor]:
        prompt = model.input_prompt
        tensors = (prompt.embedding.weight, prompt.prefix_task_cols, prompt.prefix_task_rows)
        return {
            **{name: t.detach().float() for name, t in zip(TENSORS, tensors, strict=True)},
            **modules_to_save_state(model.base_model, self.saved_modules, "base_model."),
        }

    def load_adapter_state_dict(self, model: PromptedModel, state: dict[str, torch.Tensor]) -> None:
        expected = self.adapter_state_dict(model)
        if set(state) != set(expected):
            raise RecipeError(
                "adapter",
                f"a {self.name} adapter holds {', '.join(TENSORS)}; got {sorted(state)[:4]}",
                "load it with the method and task that wrote it",
            )
        heads = modules_to_save_state(model.base_model, self.saved_modules, "base_model.")
        prompt = model.input_prompt
        targets = {"prompt_embeddings": prompt.embedding.weight, "prefix_task_cols": prompt.prefix_task_cols}
        targets |= {"prefix_task_rows": prompt.prefix_task_rows, **heads}
        with torch.no_grad():
            for key, target in targets.items():
                if state[key].shape != target.shape:
                    raise RecipeError(
                        "adapter",
                        f"{key} is {tuple(state[key].shape)} but this model needs {tuple(target.shape)}",
                        "use the same base model and method.num_virtual_tokens / num_tasks / num_ranks",
                    )
                target.copy_(state[key].to(target.dtype))

    def on_save(self, model: nn.Module) -> None:
        # The saved tensors replace the source init: a reload must not need the source adapter.
        if self.cfg.init_from:
            self.cfg = replace(self.cfg, init_from=None, init="random")

    def method_adapter_config(self, model: PromptedModel) -> dict[str, Any]:
        # The stored tensors replace any init: peft must not redo a source init (it would read the path).
        text = self.cfg.init == "text"
        return {
            "prompt_tuning_init": "TEXT" if text else "RANDOM",
            "prompt_tuning_init_text": self.cfg.init_text if text else None,
            "tokenizer_name_or_path": model.name_or_path or None,
            "prompt_tuning_init_state_dict_path": None,
            "prompt_tuning_init_task": self.cfg.init_task,
            "num_tasks": self.cfg.num_tasks,
            "num_ranks": self.cfg.num_ranks,
        }

    @classmethod
    def config_from_adapter(cls, adapter_config: dict[str, Any]) -> MultitaskPromptTuningConfig:
        # The stored tensors replace the init, so an adapter reloads with the cheapest one.
        return MultitaskPromptTuningConfig(
            name=cls.name,
            num_virtual_tokens=int(adapter_config["num_virtual_tokens"]),
            num_tasks=int(adapter_config.get("num_tasks") or 1),
            num_ranks=int(adapter_config.get("num_ranks") or 1),
        )


__all__ = ["MultitaskPrompt", "MultitaskPromptTuning", "MultitaskPromptTuningConfig"]
