"""The objectives by name (``objective.name``), and the run's objective built from the recipe."""

from __future__ import annotations

from torch import nn

from peftcli.methods.registry import Method
from peftcli.recipe import ObjectiveConfig
from peftcli.training.distributed import Dist
from peftcli.training.objectives.base import Objective
from peftcli.training.objectives.dpo import Dpo
from peftcli.training.objectives.grpo import Grpo
from peftcli.training.objectives.ipo import Ipo
from peftcli.training.objectives.kto import Kto
from peftcli.training.objectives.orpo import Orpo
from peftcli.training.objectives.reference import reference_context
from peftcli.training.objectives.reward import Reward
from peftcli.training.objectives.sft import Sft
from peftcli.training.objectives.simpo import Simpo

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (Sft, Dpo, Ipo, Kto, Simpo, Orpo, Reward, Grpo)
}

__all__ = ["OBJECTIVES", "build_objective"]


def build_objective(
    cfg: ObjectiveConfig, method: Method, model: nn.Module, dist: Dist | None = None
) -> Objective | None:
    """The run's objective; None for sft (the Stepper's own loss path). Its reference is set up here, so a
    method that cannot switch its adapter off is refused before the first step. ``dist``: the run's
    ranks under torchrun (KTO and GRPO exchange their estimates through it)."""
    cls = OBJECTIVES[cfg.name]
    if cls is Sft:
        return None
    if not cls.wants_reference(cfg):
        objective = cls(cfg)
    else:
        objective = cls(cfg, reference_context(cfg.reference, method, model), model)
    if dist is not None:
        objective.dist = dist
    return objective
