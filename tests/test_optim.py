"""bitsandbytes optimizers on the CPU: they step, and their state survives our checkpoint format.

Reference: an uninterrupted run of the same optimizer. Stepping twice, writing the state through
``checkpoint.save_tree`` (safetensors + JSON, no pickle), loading it into a fresh optimizer and
stepping twice more must give bit-identical parameters (tolerance 0) to four uninterrupted steps.
The 4096×4 weight is large enough (≥ bitsandbytes' min_8bit_size of 4096) for the 8-bit optimizers
to keep genuinely 8-bit (uint8) state, which the test checks, so the quantized state is what is
serialized.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from peftcli.checkpoint import load_tree, save_tree
from peftcli.recipe import RecipeError, TrainConfig
from peftcli.training.optim import BNB_OPTIMIZERS, build_optimizer

warnings.filterwarnings("ignore", module="bitsandbytes")


def make_params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(4096, 4, generator=gen) * 0.1),
        torch.nn.Parameter(torch.randn(16, generator=gen) * 0.1),
    ]


def set_grads(params, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def run(optimizer, params, steps: range) -> None:
    for step in steps:
        set_grads(params, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", sorted(BNB_OPTIMIZERS))
def test_bnb_optimizer_steps_and_resumes_exactly(name, tmp_path):
    cfg = TrainConfig(optimizer=name, lr=1e-2, weight_decay=0.01)

    straight = make_params()
    before = [p.detach().clone() for p in straight]
    opt = build_optimizer([{"params": straight, "lr": cfg.lr, "weight_decay": cfg.weight_decay}], cfg)
    run(opt, straight, range(4))
    assert all(not torch.equal(a, b) for a, b in zip(before, straight, strict=False))  # it really stepped

    resumed = make_params()
    opt = build_optimizer([{"params": resumed, "lr": cfg.lr, "weight_decay": cfg.weight_decay}], cfg)
    run(opt, resumed, range(2))
    state = opt.state_dict()
    big = state["state"][0]
    big = big.get("__bnb_optimizer_quant_state__", big)  # bitsandbytes nests its state (for FSDP)
    if "8bit" in name:
        assert big["state1"].dtype == torch.uint8  # genuinely 8-bit state goes through the checkpoint
    save_tree(state, tmp_path, "optimizer")
    saved = [p.detach().clone() for p in resumed]

    fresh = [torch.nn.Parameter(p.clone()) for p in saved]
    opt = build_optimizer([{"params": fresh, "lr": cfg.lr, "weight_decay": cfg.weight_decay}], cfg)
    opt.load_state_dict(load_tree(tmp_path, "optimizer"))
    run(opt, fresh, range(2, 4))
    for a, b in zip(straight, fresh, strict=False):
        assert torch.equal(a, b)


def test_bnb_optimizer_without_bitsandbytes_is_a_recipe_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(RecipeError) as err:
        build_optimizer([{"params": make_params()}], TrainConfig(optimizer="paged_adamw_8bit"))
    assert err.value.key == "train.optimizer"
