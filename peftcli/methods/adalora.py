"""AdaLoRA: adaptive budget allocation for LoRA (Zhang et al., 2023, arXiv 2303.10512).

Each adapted layer gets an update in SVD form::

    h = W0 x + (α / r0) · P Λ Q x          P ∈ R^{out×r0} (lora_B), Λ = diag(λ) (lora_E, r0×1),
                                            Q ∈ R^{r0×in} (lora_A), r0 = init_r

and ranks are pruned during training by zeroing the least important singular values λ_i:

- importance of each entry w of P, λ, Q: the sensitivity I = |w · ∂L/∂w|, smoothed
  Ī_t = β1 Ī_{t−1} + (1−β1) I_t, with uncertainty Ū_t = β2 Ū_{t−1} + (1−β2) |I_t − Ī_t|, and
  score s = Ī · Ū;
- the score of triplet i is S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji);
- the total budget b(t) (kept triplets over all layers) is init_r·n until step ``tinit``, then falls
  as a cubic ``b(t) = (b0 − bT)(1 − (t − tinit)/(T − tfinal − tinit))³ + bT`` to
  ``bT = target_r·n`` at step ``T − tfinal``; every ``deltaT`` steps the λ of all triplets whose
  score is at most the (b0 − b(t))-th smallest are set to 0. From ``T − tfinal`` on the final pattern
  is fixed and re-applied after every step;
- the orthogonality of P and Q is encouraged by a penalty added to the loss. The paper writes
  ``R = ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F``; we follow peft (the reference our adapters must match), which
  adds ``orth_reg_weight · mean over all P and Q matrices of ‖·‖_F`` (not squared).

The schedule needs the run's total step count ``T``: the loop passes it to :meth:`on_train_start`.
Allocation runs in :meth:`after_step`, after the optimizer step and before zero_grad, as peft's
``update_and_allocate`` is meant to be called; ``step`` is 0-based. One deviation from peft: a
masking step whose budget is still the full budget is skipped (peft's ``kthvalue(k=0)`` raises).

Saving writes peft's format: ``lora_A`` [r′, in], ``lora_E`` [r′, 1], ``lora_B`` [out, r′] (no
``.weight`` suffix), with only the r′ kept triplets of each layer, and ``rank_pattern`` mapping
``<module>.lora_E`` to the ``init_r`` keep-flags, so ``peft.PeftModel.from_pretrained`` rebuilds the
pruned layers. The scale stays α / init_r after pruning (peft's ``ranknum``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftcli.inject import PREFIX
from peftcli.methods.kit import AdapterLayer, LayerMethod, write_weight
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc


@dataclass
class AdaLoraConfig(MethodConfig):
    init_r: int = field(default=12, metadata=doc("starting rank of every adapted layer (r0)", min=1))
    target_r: int = field(
        default=8, metadata=doc("average rank per layer left at the end of the schedule", min=1)
    )
    alpha: float = field(
        default=8.0,
        metadata=doc("scale numerator: the update is multiplied by alpha/init_r", min_exclusive=0.0),
    )
    dropout: float = field(default=0.0, metadata=doc("dropout on the adapter input path", min=0.0, max=0.99))
    target_modules: str | list[str] = field(
        default="all-linear", metadata=doc("module names (list), a regex on full names, or all-linear")
    )
    modules_to_save: list[str] = field(
        default_factory=list, metadata=doc("modules trained in full and saved whole; seq_cls heads are added")
    )
    tinit: int = field(
        default=0, metadata=doc("steps of warmup at the full budget before pruning starts", min=0)
    )
    tfinal: int = field(
        default=0, metadata=doc("last steps trained with the final, fixed rank pattern", min=0)
    )
    deltaT: int = field(default=1, metadata=doc("steps between two budget allocations (maskings)", min=1))
    beta1: float = field(
        default=0.85,
        metadata=doc("EMA factor of the sensitivity (importance smoothing)", min_exclusive=0.0, max=0.999999),
    )
    beta2: float = field(
        default=0.85, metadata=doc("EMA factor of the uncertainty", min_exclusive=0.0, max=0.999999)
    )
    orth_reg_weight: float = field(
        default=0.5, metadata=doc("weight of the orthogonality penalty on P and Q", min=0.0)
    )
    total_step: int | None = field(
        default=None,
        metadata=doc("steps of the budget schedule; leave unset: the run's step count is used", min=1),
    )


class SVDLinear(AdapterLayer):
    """``base_layer(x) + (α/r0) · ((dropout(x) Qᵀ ⊙ λ) Pᵀ)`` around a frozen linear-like layer."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.ranknum = float(r)  # peft keeps the scale at α / r0 after pruning
        self.scaling = alpha
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base_layer.weight
        kwargs = {"device": weight.device, "dtype": torch.float32}
        # λ = 0 so step 0 equals the base; P and Q small Gaussians (the paper's and peft's init).
        self.lora_A = nn.Parameter(torch.randn(r, self.in_features, **kwargs) * 0.02)  # Q (r0, in)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kwargs))  # λ (r0, 1)
        self.lora_B = nn.Parameter(torch.randn(self.out_features, r, **kwargs) * 0.02)  # P (out, r0)

    def resize(self, r: int) -> None:
        """Shrink to ``r`` triplets (when loading a pruned adapter); the scale keeps its r0."""
        kwargs = {"device": self.lora_A.device, "dtype": self.lora_A.dtype}
        self.r = r
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, **kwargs))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kwargs))

    def delta_weight(self) -> torch.Tensor:
        delta = self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def merge(self) -> None:
        write_weight(self.base_layer.weight, self.base_layer.weight.float() + self.delta_weight().float())

    def unmerge(self) -> None:
        write_weight(self.base_layer.weight, self.base_layer.weight.float() - self.delta_weight().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        result_dtype = result.dtype
        x = x.to(self.lora_A.dtype)
        update = self.lora_dropout(x) @ (self.lora_A * self.lora_E).T @ self.lora_B.T  # (B, T, out)
        return (result + update * self.scaling / (self.ranknum + 1e-5)).to(result_dtype)


@register
class AdaLoRA(LayerMethod):
    name = "adalora"
    description = (
        "AdaLoRA: SVD-form LoRA whose ranks are pruned by importance on a cubic budget (arXiv 2303.10512)"
    )
    config_cls = AdaLoraConfig
    mergeable = True
    peft_type = "ADALORA"
    trainable_formula = "sum over adapted layers of init_r·(in + out + 1), plus modules_to_save"
    parameter_prefix = "lora_"  # P, λ, Q saved as <module>.lora_B / lora_E / lora_A, peft's keys
    layer_types = (SVDLinear,)
    adapter_renames: ClassVar[dict[str, str]] = {"alpha": "lora_alpha", "dropout": "lora_dropout"}

    cfg: AdaLoraConfig

    def __init__(self, cfg: AdaLoraConfig, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.total_step: int | None = cfg.total_step
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}  # Ī per trainable tensor, by parameter name
        self.exp_avg_unc: dict[str, torch.Tensor] = {}  # Ū
        self.rank_pattern: dict[str, list[bool]] | None = None  # "<module>.lora_E" -> keep flags

    # -- recipe --------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, cfg: AdaLoraConfig, recipe) -> None:
        if cfg.target_r > cfg.init_r:
            raise RecipeError(
                "method.target_r",
                f"{cfg.target_r} is above init_r {cfg.init_r}",
                "AdaLoRA only prunes: set target_r <= init_r",
            )
        steps = recipe.train.max_steps
        if cfg.total_step is not None and steps is not None and cfg.total_step != steps:
            raise RecipeError(
                "method.total_step",
                f"{cfg.total_step} differs from train.max_steps {steps}",
                "leave method.total_step unset; the run's step count is used",
            )
        if cfg.total_step is not None or steps is not None:
            cls._check_schedule(cfg, cfg.total_step or steps)

    @staticmethod
    def _check_schedule(cfg: AdaLoraConfig, total: int) -> None:
        if cfg.tinit >= total - cfg.tfinal:
            raise RecipeError(
                "method.tinit",
                f"tinit {cfg.tinit} + tfinal {cfg.tfinal} leave no pruning phase in {total} steps",
                "lower method.tinit / method.tfinal or train longer",
            )

    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        if self.cfg.total_step is not None and self.cfg.total_step != total_steps:
            raise RecipeError(
                "method.total_step",
                f"{self.cfg.total_step} differs from the run's {total_steps} steps",
                "leave method.total_step unset",
            )
        self._check_schedule(self.cfg, total_steps)
        self.total_step = total_steps

    # -- building ------------------------------------------------------------------------
    def create_layer(self, name: str, base: nn.Module) -> SVDLinear:
        return SVDLinear(base, self.cfg.init_r, self.cfg.alpha, self.cfg.dropout)

    def svd_layers(self, model: nn.Module) -> list[tuple[str, SVDLinear]]:
        return self.layers(model)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(m.r * (m.in_features + m.out_features + 1) for _, m in self.svd_layers(model))
        return count + self.saved_modules_count(model)

    # -- training hooks ------------------------------------------------------------------
    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.cfg.orth_reg_weight == 0:
            return None
        penalties = []
        for _, layer in self.svd_layers(model):
            for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):  # QQᵀ, PᵀP: (r0, r0)
                eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
                penalties.append(torch.linalg.matrix_norm(gram - eye))  # Frobenius
        return self.cfg.orth_reg_weight * torch.stack(penalties).mean()

    def after_step(self, model: nn.Module, step: int) -> None:
        total, cfg = self.total_step, self.cfg
        if total is None:  # not driven by the loop (no schedule known): no allocation
            return
        final_step = total - cfg.tfinal
        if step < final_step:
            self._update_importance(model)
            budget, mask = self._budget(step)
            if mask:
                self.rank_pattern = self._mask_to_budget(model, budget) or self.rank_pattern
        elif step == final_step:  # fix the final pattern from the scores so far
            self.rank_pattern = self._mask_to_budget(model, self._budget(step)[0]) or self.rank_pattern
            self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        elif self.rank_pattern is not None:
            self._apply_pattern(model)

    def _importance_tensors(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {
            n: p
            for n, p in model.named_parameters()
            if p.requires_grad and n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_E")
        }

    def _update_importance(self, model: nn.Module) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        with torch.no_grad():
            for name, p in self._importance_tensors(model).items():
                if p.grad is None:
                    continue
                sensitivity = (p * p.grad).abs()
                avg = self.exp_avg_ipt.get(name, torch.zeros_like(p))
                unc = self.exp_avg_unc.get(name, torch.zeros_like(p))
                avg = b1 * avg + (1 - b1) * sensitivity
                self.exp_avg_ipt[name] = avg
                self.exp_avg_unc[name] = b2 * unc + (1 - b2) * (sensitivity - avg).abs()

    def _budgets(self) -> tuple[int, int]:
        n = len(self.targets)
        return self.cfg.init_r * n, self.cfg.target_r * n

    def _budget(self, step: int) -> tuple[int, bool]:
        """(triplets to keep over all layers, whether to mask at this step): the cubic schedule."""
        cfg, total = self.cfg, self.total_step
        initial, target = self._budgets()
        if step <= cfg.tinit:
            return initial, False
        if step > total - cfg.tfinal:
            return target, True
        progress = 1 - (step - cfg.tinit) / (total - cfg.tfinal - cfg.tinit)
        return int((initial - target) * progress**3 + target), step % cfg.deltaT == 0

    def _mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]] | None:
        initial, _ = self._budgets()
        if budget >= initial or not self.exp_avg_ipt:
            return None
        scores: dict[str, torch.Tensor] = {}
        for name, _ in self.svd_layers(model):
            s_a, s_e, s_b = (
                self.exp_avg_ipt[f"{name}.{p}"] * self.exp_avg_unc[f"{name}.{p}"]
                for p in ("lora_A", "lora_E", "lora_B")
            )
            # S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji): (r0,)
            scores[f"{name}.lora_E"] = s_e.view(-1) + (
                s_a.mean(dim=1) + s_b.mean(dim=0)
            )  # peft's summation order
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=initial - budget)[0].item()
        pattern = {key: (value > threshold).tolist() for key, value in scores.items()}
        self.rank_pattern = pattern
        self._apply_pattern(model)
        return pattern

    def _apply_pattern(self, model: nn.Module) -> None:
        """Zero the λ of pruned triplets (P and Q stay, so a triplet can come back at the next allocation)."""
        with torch.no_grad():
            for name, layer in self.svd_layers(model):
                keep = self.rank_pattern.get(f"{name}.lora_E")
                if keep is not None and len(keep) == layer.r:
                    keep_t = torch.tensor(keep, device=layer.lora_E.device).view(-1, 1)
                    layer.lora_E.masked_fill_(~keep_t, 0.0)

    def on_save(self, model: nn.Module) -> None:
        if self.rank_pattern is not None:  # what is saved is exactly what the model computes
            self._apply_pattern(model)

    def method_state(self) -> dict[str, Any]:
        return {
            "exp_avg_ipt": dict(self.exp_avg_ipt),
            "exp_avg_unc": dict(self.exp_avg_unc),
            "rank_pattern": self.rank_pattern,
            "total_step": self.total_step,
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.exp_avg_ipt = dict(state.get("exp_avg_ipt") or {})
        self.exp_avg_unc = dict(state.get("exp_avg_unc") or {})
        self.rank_pattern = state.get("rank_pattern")
        self.total_step = state.get("total_step") or self.total_step

    # -- saving --------------------------------------------------------------------------
    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().adapter_state_dict(model)
        if self.rank_pattern is None:
            return state
        for name, layer in self.svd_layers(model):
            keep = self.rank_pattern[f"{name}.lora_E"]
            if layer.r == len(keep):  # still full size: keep the unpruned triplets only
                keep_t = torch.tensor(keep, device=layer.lora_E.device)
                for param, rows in (("lora_A", keep_t), ("lora_E", keep_t)):
                    state[f"{PREFIX}{name}.{param}"] = state[f"{PREFIX}{name}.{param}"][rows]
                state[f"{PREFIX}{name}.lora_B"] = state[f"{PREFIX}{name}.lora_B"][:, keep_t]
        return state

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        pattern = {}
        for name, layer in self.svd_layers(model):
            saved = state.get(f"{PREFIX}{name}.lora_E")
            if saved is not None and saved.shape[0] != layer.r:  # a pruned adapter: r′ < init_r rows
                if saved.shape[0] > self.cfg.init_r:
                    raise RecipeError(
                        "adapter",
                        f"{name} has rank {saved.shape[0]} > init_r {self.cfg.init_r}",
                        "load it with the init_r it was trained with",
                    )
                layer.resize(saved.shape[0])
            pattern[f"{name}.lora_E"] = [True] * layer.r + [False] * (self.cfg.init_r - layer.r)
        if any(not all(keep) for keep in pattern.values()):
            self.rank_pattern = pattern  # positions do not matter for the forward, only the counts
        super().load_adapter_state_dict(model, state)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        # peft refuses to load without a valid schedule: without a run, write the shortest valid one
        cfg = self.cfg
        return {
            **super().adapter_config(model),
            "total_step": self.total_step or (cfg.tinit + cfg.tfinal + 1),
            "rank_pattern": self.rank_pattern,
            "bias": "none",
            "init_lora_weights": True,
            "fan_in_fan_out": self.fan_in_fan_out(model),
        }
