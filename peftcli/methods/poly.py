"""Poly: Polytropon's multi-task routing over a shared inventory of LoRA skills (Ponti et al., 2023,
arXiv 2202.13914), with Multi-Head Routing (MHR, Caccia et al., 2023, arXiv 2211.03831) as ``n_splits``.

Each adapted linear layer holds S LoRA "skills" (A_s: in × r, B_s: r × out) shared by all tasks, and
one router per layer: a logit matrix Z (tasks × S). An example of task t mixes the skills by weights

    w_t = σ(Z_t) / Σ_s σ(Z_t,s)                      (eval: the Bernoulli probabilities, normalised)
    w_t = u / Σ_s u_s,  u ~ RelaxedBernoulli(τ=1, Z_t)  (training: Gumbel-sigmoid, the paper's §3.2)

and adds   y = W0 x + (1/r) · x (Σ_s w_t,s A_s)(Σ_s w_t,s B_s).

With MHR (``n_splits`` = h > 1) the input dimension is cut into h blocks (and B's output into h
blocks); each block has its own routing row, so Z is tasks × (h·S) and block q of the mixed A is
Σ_s w_t,q,s A_s[q]. The skills are stored as peft stores them: ``poly_lora_A`` (h, S, in/h, r),
``poly_lora_B`` (h, S, r, out/h) and ``poly_router.module_logits`` (tasks, h·S). A starts
Kaiming-uniform per (split, skill), B at zero (step 0 is the base), Z uniform in ±1e-3.

The update depends on each example's task, so it cannot be merged into W0: Poly does not merge. Each
example needs its task index: ``data.task_id_column`` names the column, the data stage keeps it and
collation batches it as ``task_ids``; the model's forward takes ``task_ids=`` (a pre-hook hands them to
the layers, as peft's ``PolyModel.forward`` does). With ``n_tasks: 1`` every example is task 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from peftcli.methods.kit import AdapterLayer, LayerMethod
from peftcli.methods.registry import Method, register
from peftcli.recipe import MethodConfig, RecipeError, doc

EPS = 1e-12  # peft's (and mttl's) guard in the weights' normalisation


@dataclass
class PolyConfig(MethodConfig):
    """peft's ``PolyConfig`` fields (``exclude_modules`` left out: narrow ``target_modules`` instead)."""

    r: int = field(default=8, metadata=doc("rank of every LoRA skill", min=1))
    target_modules: str | list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata=doc("module names (list), a regex on full names, or all-linear (nn.Linear layers only)"),
    )
    n_tasks: int = field(
        default=1,
        metadata=doc("number of tasks (rows of each router); > 1 needs data.task_id_column", min=1),
    )
    n_skills: int = field(default=4, metadata=doc("LoRA skills in each layer's inventory", min=1))
    n_splits: int = field(
        default=1,
        metadata=doc("routing heads: > 1 is Multi-Head Routing (MHR); must divide in and out", min=1),
    )
    poly_type: Literal["poly"] = field(default="poly", metadata=doc("router type (peft has only poly)"))
    init_weights: bool = field(
        default=True,
        metadata=doc("B at zero (step 0 is the base); false: B Kaiming-uniform too (tests only)"),
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=doc("modules trained in full and saved whole; seq_cls heads are added"),
    )


class TaskIds:
    """The task ids of the forward in progress, set by the model's pre-hook and read by every layer."""

    def __init__(self, n_tasks: int):
        self.n_tasks = n_tasks
        self.current: torch.Tensor | None = None
        self.owner: nn.Module | None = None  # the module whose forward took them

    def get(self, batch_size: int, device: torch.device) -> torch.Tensor:
        ids = self.current
        if ids is None and self.n_tasks == 1:  # one task: every example is task 0
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        if ids is None:
            raise RecipeError(
                "data.task_id_column",
                f"poly with n_tasks {self.n_tasks} needs each example's task id, and this forward has none",
                "train and evaluate with data.task_id_column; generation and chat do not carry task ids",
            )
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < self.n_tasks:
            raise RecipeError(
                "data.task_id_column",
                f"a task id is {int(ids.max())} but method.n_tasks is {self.n_tasks}",
                "give ids 0 … n_tasks-1, or raise method.n_tasks",
            )
        return ids.to(device)


def entry_points(model: nn.Module) -> list[nn.Module]:
    """The modules a forward with ``task_ids=`` starts at: the model, and its transformer body (the
    loss's chunked path calls ``model.<base_model_prefix>`` directly, then the head)."""
    body = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    return [model] + ([body] if isinstance(body, nn.Module) and body is not model else [])


class PolyRouter(nn.Module):
    """Z (tasks, splits·skills) → each example's mixing weights (B, splits, skills)."""

    def __init__(self, n_tasks: int, n_splits: int, n_skills: int, device=None):
        super().__init__()
        self.n_splits, self.n_skills = n_splits, n_skills
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills, device=device))
        nn.init.uniform_(self.module_logits, -1e-3, 1e-3)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        logits = self.module_logits[task_ids].view(-1, self.n_splits, self.n_skills)
        if self.training:  # Gumbel-sigmoid: a relaxed Bernoulli draw at temperature 1
            u = torch.rand_like(logits).clamp(EPS, 1 - EPS)
            gates = torch.sigmoid(logits + torch.log(u) - torch.log1p(-u))
        else:
            gates = torch.sigmoid(logits)
        return gates / (gates.sum(dim=-1, keepdim=True) + EPS)


def kaiming_blocks(n_splits: int, n_skills: int, rows: int, cols: int, device=None) -> torch.Tensor:
    """(splits, skills, rows, cols), each block the transpose of an nn.Linear-style Kaiming-uniform
    (cols, rows) matrix (fan_in = rows): A's blocks as mttl initialises them."""
    out = torch.empty(n_splits, n_skills, rows, cols, device=device)
    for skill in range(n_skills):
        for split in range(n_splits):
            block = torch.empty(cols, rows, device=device)
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
            out[split, skill] = block.T
    return out


class PolyLinear(AdapterLayer):
    """``base_layer(x) + (1/r) · x A_t B_t`` with A_t, B_t the task's mix of the layer's skills."""

    def __init__(self, base_layer: nn.Linear, cfg: PolyConfig, task_ids: TaskIds):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "task_ids", task_ids)  # shared by every layer, not a submodule
        self.r, h, s = cfg.r, cfg.n_splits, cfg.n_skills
        device = base_layer.weight.device
        self.poly_lora_A = nn.Parameter(kaiming_blocks(h, s, self.in_features // h, self.r, device))
        if cfg.init_weights:
            b = torch.zeros(h, s, self.r, self.out_features // h, device=device)  # step 0 = base
        else:
            b = kaiming_blocks(h, s, self.r, self.out_features // h, device)
        self.poly_lora_B = nn.Parameter(b)
        self.poly_router = PolyRouter(cfg.n_tasks, h, s, device)

    def mixed(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's A (B, in, r) and B (B, r, out) from its weights (B, splits, skills)."""
        n = weights.shape[0]
        a = torch.einsum("bqs,qsdr->bqdr", weights, self.poly_lora_A).reshape(n, self.in_features, self.r)
        b = torch.einsum("bqs,qsrd->brqd", weights, self.poly_lora_B).reshape(n, self.r, self.out_features)
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        ids = self.task_ids.get(x.shape[0], self.poly_lora_A.device)
        a, b = self.mixed(self.poly_router(ids))
        update = x.to(a.dtype).bmm(a).bmm(b) / self.r
        return (result + update).to(result.dtype)

    def parameter_count(self) -> int:
        return self.poly_lora_A.numel() + self.poly_lora_B.numel() + self.poly_router.module_logits.numel()


@register
class Poly(LayerMethod):
    name = "poly"
    description = "Poly: per-task routing over a shared inventory of LoRA skills (arXiv 2202.13914)"
    config_cls = PolyConfig
    peft_type = "POLY"
    mergeable = False  # the update depends on each example's task
    merge = Method.merge
    supports_packing = False
    packing_refusal = "routes each row by one task id, and a packed row holds examples of several tasks"
    trainable_formula = (
        "n_skills·r·(in + out) + n_tasks·n_splits·n_skills per adapted layer, plus modules_to_save"
    )
    parameter_prefix = "poly_"  # base_model.model.<module>.poly_lora_A / poly_lora_B / poly_router...
    layer_types = (PolyLinear,)
    target_kind = "nn.Linear layers"
    target_hint = "peft's Poly wraps nn.Linear only: target the model's linear layers"

    cfg: PolyConfig

    @staticmethod
    def accepts_target(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    @classmethod
    def validate_config(cls, cfg: PolyConfig, recipe) -> None:
        """What cannot carry task ids, refused at start: no id column, objectives whose forwards (pairs,
        rollouts) do not batch them, and generation during eval."""
        routed = cfg.n_tasks > 1
        checks = [
            (
                routed and recipe.data.task_id_column is None,
                "data.task_id_column",
                f"poly with n_tasks {cfg.n_tasks} routes each example by its task id, and none is read",
                "name the column holding it, e.g. data.task_id_column: task_id (values 0 … n_tasks-1)",
            ),
            (
                routed and recipe.objective.name != "sft",
                "objective.name",
                f"poly with n_tasks {cfg.n_tasks} trains with sft only, not {recipe.objective.name}",
                "use objective.name: sft, or method.n_tasks: 1",
            ),
            (
                routed
                and recipe.eval.generate
                and recipe.model.task != "seq_cls"
                and bool(recipe.data.eval or recipe.data.eval_fraction),
                "eval.generate",
                "generation carries no task ids, which poly with n_tasks > 1 needs",
                "set eval.generate: false (eval loss and perplexity still run), or train one task",
            ),
        ]
        for bad, key, what, hint in checks:
            if bad:
                raise RecipeError(key, what, hint)

    def apply(self, model: nn.Module) -> nn.Module:
        self.task_state = TaskIds(self.cfg.n_tasks)
        model = super().apply(model)
        for entry in entry_points(model):
            entry.register_forward_pre_hook(self._take_task_ids, with_kwargs=True)
            entry.register_forward_hook(self._drop_task_ids, always_call=True)
        return model

    def _take_task_ids(self, module, args, kwargs):
        """Take ``task_ids`` out of the keyword arguments (transformers does not know it); the module
        that took them clears them when its forward ends."""
        if "task_ids" in kwargs:
            self.task_state.current = kwargs.pop("task_ids")
            self.task_state.owner = module
        return args, kwargs

    def _drop_task_ids(self, module, _args, _output):
        if self.task_state.owner is module:
            self.task_state.current = self.task_state.owner = None

    def create_layer(self, name: str, base: nn.Module) -> PolyLinear:
        for what, size in (("in", base.in_features), ("out", base.out_features)):
            if size % self.cfg.n_splits:
                raise RecipeError(
                    "method.n_splits",
                    f"{name} has {what}_features {size}, not divisible by n_splits {self.cfg.n_splits}",
                    "pick an n_splits that divides every adapted layer's in and out features",
                )
        return PolyLinear(base, self.cfg, self.task_state)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        s, h, t, r = self.cfg.n_skills, self.cfg.n_splits, self.cfg.n_tasks, self.cfg.r
        count = sum(s * r * (m.in_features + m.out_features) + t * h * s for _, m in self.layers(model))
        return count + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {**super().adapter_config(model), "exclude_modules": None}


__all__ = ["Poly", "PolyConfig", "PolyLinear", "PolyRouter"]
