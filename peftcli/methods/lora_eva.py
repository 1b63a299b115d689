r"""EVA's data pass (Paischer et al., 2024, "One Initialization to Rule them All", arXiv 2410.07170).

LoRA's ``init: eva`` starts every adapted layer's ``A`` on the principal directions of that layer's
inputs on training data (``B = 0``, so step 0 is the base), and moves rank between layers: each layer
computes ``round(ρ·r)`` components, and the ``Σ r`` components with the largest explained-variance ratio
over all layers are kept, so a layer ends with between 0 and ``ρ·r`` ranks. The components come from an
incremental PCA (Ross et al., 2008, as scikit-learn's ``IncrementalPCA``) updated batch after batch, the
examples cycled until the components a layer keeps stop turning (cosine similarity ≥ τ between two
updates). As peft's ``initialize_lora_eva_weights`` (its defaults: ρ = 2, τ = 0.99, label-masked
positions, no whitening): the same steps in the same order, so the same batches give peft's result.

This module knows nothing of LoRA: it maps layer names to components; ``peftcli.methods.lora`` resizes
the layers.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn

from peftcli.recipe import RecipeError

LOWRANK_SEED = 42  # peft seeds each randomized SVD alike (its IncrementalPCA's lowrank_seed)


class IncrementalPCA:
    """Principal components of rows seen batch by batch (centred), by a randomized SVD of the stacked
    ``[S·V (the components so far); the centred batch; the mean's correction]`` at each batch."""

    def __init__(self, components: int):
        self.components = components
        self.seen = 0
        self.mean: torch.Tensor | None = None  # float64 (in,)
        self.variance: torch.Tensor | None = None  # float64 (in,)
        self.vectors: torch.Tensor | None = None  # (components, in)
        self.singular_values: torch.Tensor | None = None
        self.explained_variance_ratio: torch.Tensor | None = None

    def update_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Chan et al.'s pairwise update of the column mean and variance (in float64 sums)."""
        n, total = x.shape[0], self.seen + x.shape[0]
        last_sum = (
            torch.zeros(x.shape[1], dtype=torch.float64) if self.mean is None else self.mean * self.seen
        )
        new_sum = x.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / total
        centred = x - new_sum / n
        correction = centred.sum(dim=0, dtype=torch.float64).square()
        new_scatter = centred.square().sum(dim=0, dtype=torch.float64) - correction / n
        if self.variance is None:
            return mean, new_scatter / total, total
        ratio = self.seen / n
        scatter = (
            self.variance * self.seen + new_scatter + ratio / total * (last_sum / ratio - new_sum).square()
        )
        return mean, scatter / total, total

    def partial_fit(self, x: torch.Tensor) -> None:
        x = x.clone()  # (n, in), float32
        mean, variance, total = self.update_moments(x)
        if self.vectors is None:
            x -= mean
        else:
            batch_mean = x.mean(dim=0)
            x -= batch_mean
            shift = torch.sqrt(torch.tensor(self.seen / total, dtype=torch.float64) * x.shape[0])
            x = torch.vstack(
                (self.singular_values.view(-1, 1) * self.vectors, x, shift * (self.mean - batch_mean))
            )
        with torch.random.fork_rng():  # the same sketch every time, whatever was drawn before
            torch.manual_seed(LOWRANK_SEED)
            _, s, v = torch.svd_lowrank(x, q=2 * self.components, niter=4)
        vt = v.mH
        # each component's sign: its largest entry positive (scikit-learn's svd_flip on V)
        vt = vt * torch.sign(vt.gather(1, vt.abs().argmax(dim=1, keepdim=True)))
        self.seen, self.mean, self.variance = total, mean, variance
        self.vectors, self.singular_values = vt[: self.components], s[: self.components]
        self.explained_variance_ratio = (s**2 / torch.sum(variance * total))[: self.components]


class LayerPCA:
    """One layer's running PCA and which of its components have settled."""

    def __init__(self, components: int, tau: float):
        self.pca = IncrementalPCA(components)
        self.tau = tau
        self.settled = torch.zeros(components, dtype=torch.bool)

    def observe(self, rows: torch.Tensor) -> None:
        if rows.shape[0] < self.pca.components:  # too few positions in this batch for the components
            return
        previous = None if self.pca.vectors is None else self.pca.vectors.clone()
        self.pca.partial_fit(rows.float())
        if previous is not None:
            self.settled = nn.functional.cosine_similarity(self.pca.vectors, previous) >= self.tau


def used_rows(inputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The layer inputs (B, T, in) at real positions that carry a label, in row-major order: (n, in)."""
    keep = batch["attention_mask"].bool()
    if "labels" in batch:
        keep = keep & (batch["labels"] != -100)
    return inputs[keep]


def same_inputs(layers: dict[str, nn.Module], run, first: dict[str, torch.Tensor]) -> dict[str, str]:
    """Layers fed the same tensor (q, k and v read one input) -> the first of their group in model order:
    one PCA serves the group."""
    digests: dict[str, str] = {}

    def record(name: str):
        def hook(_module, args, _output) -> None:
            rows = used_rows(args[0].detach(), first).float().cpu().contiguous()
            digests[name] = hashlib.sha256(
                rows.numpy().tobytes() + str(tuple(rows.shape)).encode()
            ).hexdigest()

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in layers.items()]
    try:
        run(first)
    finally:
        for handle in handles:
            handle.remove()
    leaders: dict[str, str] = {}  # digest -> the first layer (in model order) that saw it
    followers = {}
    for name in layers:
        leader = leaders.setdefault(digests[name], name)
        if leader != name:
            followers[name] = leader
    return followers


def distribute(pcas, layer_to_pca, followers, budget: int, limits) -> dict[str, int]:
    """The ``budget`` components of largest explained-variance ratio over every layer, counted per layer;
    a group leader takes the larger count of a group (peft's order of ties, argsort over the same stack)."""
    keys, values = [], []
    for name, leader in layer_to_pca.items():
        for value in pcas[leader].pca.explained_variance_ratio[: limits[name]]:
            keys.append(name)
            values.append(value)
    order = torch.stack(values).argsort(descending=True)
    counted = Counter(keys[i] for i in order[:budget])
    counts = {name: counted.get(name, 0) for name in layer_to_pca}
    for follower, leader in followers.items():
        if counts[leader] < counts[follower]:
            counts[leader], counts[follower] = counts[follower], counts[leader]
    return counts


def component_limits(
    layers: dict[str, nn.Module], ranks: dict[str, int], rho: float, followers: dict[str, str]
) -> dict[str, int]:
    """How many components each layer may keep: ρ·r, shared within a group of layers that read the same
    inputs (one PCA per group, as many components as its largest member needs)."""
    limits = {name: round(ranks[name] * rho) for name in layers}
    groups: dict[str, list[str]] = {}
    for follower, leader in followers.items():
        groups.setdefault(leader, [leader]).append(follower)
    for members in groups.values():
        shared = max(limits[member] for member in members)
        limits.update(dict.fromkeys(members, shared))
    return limits


def eva_components(
    model: nn.Module,
    layers: dict[str, nn.Module],
    ranks: dict[str, int],
    batches: list[dict[str, torch.Tensor]],
    rho: float,
    tau: float,
    max_cycles: int = 100,
) -> dict[str, torch.Tensor]:
    """Each layer's kept components (rank_i, in), rank_i ≥ 0 and Σ rank_i = Σ ranks, from ``batches``
    cycled until every kept component has settled. ``layers``: name -> module, in model order."""

    def run(batch: dict[str, torch.Tensor]) -> None:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    followers = same_inputs(layers, run, batches[0])
    limits = component_limits(layers, ranks, rho, followers)
    pcas = {name: LayerPCA(limits[name], tau) for name in layers if name not in followers}
    layer_to_pca = {**{name: name for name in pcas}, **followers}
    current: dict[str, dict] = {}

    def observe(name: str):
        return lambda _module, args, _output: pcas[name].observe(
            used_rows(args[0].detach(), current["batch"])
        )

    handles = {name: layers[name].register_forward_hook(observe(name)) for name in pcas}
    settled = dict.fromkeys(pcas, False)
    counts = dict(limits)
    try:
        for step in range(max_cycles * len(batches)):
            for name, layer_pca in pcas.items():
                done = bool(torch.all(layer_pca.settled[: counts[name]]))
                if done and not settled[name]:
                    handles.pop(name).remove()
                    settled[name] = True
                elif settled[name] and not done:
                    handles[name] = layers[name].register_forward_hook(observe(name))
                    settled[name] = False
            if all(settled.values()):
                break
            current["batch"] = batches[step % len(batches)]
            run(current["batch"])
            if all(p.pca.vectors is not None for p in pcas.values()):
                counts = distribute(pcas, layer_to_pca, followers, sum(ranks.values()), limits)
        else:
            raise RecipeError(
                "method.eva_tau",
                f"EVA's components did not settle (cosine ≥ {tau}) in {max_cycles} passes over the examples",
                "raise method.init_examples or lower method.eva_tau",
            )
    finally:
        for handle in handles.values():
            handle.remove()
    return {name: pcas[layer_to_pca[name]].pca.vectors[: counts[name]] for name in layers}


def all_batches(batches: Iterable[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """EVA cycles over its examples, so it keeps them (``init_examples`` of them) for the whole pass."""
    return list(batches)
