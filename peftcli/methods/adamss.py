"""AdaMSS: adaptive multi-subspaces fine-tuning (peft's ADAMSS; Zheng et al., NeurIPS 2025).

A layer's weight, with its bias as one more column, ``W̃ = [W | b]`` (out × in+1), is factored by a
rank-R SVD, ``W̃ ≈ U Σ Vᵀ`` (R = min(r, out, in+1)). The rows of U (one per output) are clustered
by k-means into K groups: outputs whose singular-vector rows are alike share a subspace. Subspace k
(rows S_k) gets its own low-rank update in the R-dim space of Vᵀ::

    y[S_k] = W̃[S_k] x̃ + B_k A_k Vᵀ x̃          x̃ = [x; 1] (the 1 only with a bias)

A_k (r_k × R) starts as the orthonormal basis of U[S_k]ᵀ times the top-r_k eigenvectors of
U[S_k] U[S_k]ᵀ (a QR), B_k (|S_k| × r_k) at zero, so step 0 is the base. Vᵀ (peft's
``adamss_newB``) is frozen and saved with the adapter. r_k = min(|S_k|, subspace_rank), or with
``use_dynamic_rank`` the number of eigenvalues of U[S_k] U[S_k]ᵀ above ``svd_threshold`` times the
largest (capped by subspace_rank).

The decomposition is reproducible so that loading can rebuild it: the SVD is ``torch.svd_lowrank``
(two subspace iterations) under a forked RNG seeded by ``random_seed``, and the clustering is k-means
as peft runs it (scikit-learn's Lloyd with init "random", one run, 10 iterations, seed 123456789),
written out here (:func:`kmeans_labels`). Which output rows form which subspace is not saved (peft
does not save it either), so an adapter only loads on the base it was made on. Where two points tie
exactly (equal output rows of W̃, so equal rows of U), scikit-learn's fp32 rounding decides and we may
cluster differently; a load whose subspace sizes then differ from the file's is refused in one line.

ASA (adaptive subspace allocation, ``use_asa``) prunes subspaces during training: every step between
``init_warmup`` and ``final_warmup`` the importance of each A_k, B_k entry, I = |w · ∂L/∂w|, is
smoothed with its uncertainty (as AdaLoRA's); every ``mask_interval`` steps the subspaces are
ranked over all layers by mean(Ī·Ū) of A_k plus that of B_k, and all but the best
``target(t) = T + (N − T)(1 − progress)^e`` are frozen (requires_grad off; they keep their values
and still act in the forward). The importance restarts after each masking. As in peft, a subspace
is kept when its score is strictly above the target-th best, so target − 1 stay (ties fewer).

Saved as peft names it: ``<module>.adamss_A.<k>``, ``.adamss_B.<k>`` and ``.adamss_newB``,
``peft_type`` ``ADAMSS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from peftcli.methods.kit import AdapterLayer, LayerMethod, write_weight
from peftcli.methods.lora_options import in_layers
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc

KMEANS_SEED = 123456789  # peft's KMeans(random_state=...)
KMEANS_ITERATIONS = 10  # peft's max_iter
KMEANS_TOLERANCE = 1e-4  # scikit-learn's default tol, times the mean per-feature variance
SVD_NITER = 2  # torch.svd_lowrank's subspace iterations, as peft calls it
B_RANDOM_SCALE = 0.01  # peft's B draw when init_weights is off (a testing init)


@dataclass
class AdamssConfig(MethodConfig):
    """peft's ``AdamssConfig`` fields."""

    r: int = field(
        default=100,
        metadata=doc("rank R of the SVD of [W | b]; clamped to min(out, in + 1); must stay below out", min=1),
    )
    num_subspaces: int = field(
        default=5, metadata=doc("k-means clusters K of the output rows, one update each", min=1)
    )
    subspace_rank: int = field(default=1, metadata=doc("rank r_k of each subspace's update B_k A_k", min=1))
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata=doc(
            "module names (list), a regex on full names, or all-linear (every nn.Linear but the head)"
        ),
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=doc("modules trained in full and saved whole; seq_cls heads are added"),
    )
    init_weights: Literal["orthogonal"] = field(
        default="orthogonal",
        metadata=doc("A_k from the subspace's QR basis, B_k zero (peft's only init; step 0 is the base)"),
    )
    layers_to_transform: int | list[int] | None = field(
        default=None,
        metadata=doc("adapt only the blocks with these indices (0-based), e.g. [0, 1]", min=0),
    )
    layers_pattern: str | list[str] | None = field(
        default=None,
        metadata=doc(
            "the block list layers_to_transform counts in (layers, h, layer); default: the first "
            "numbered name part"
        ),
    )
    use_asa: bool = field(
        default=False, metadata=doc("adaptive subspace allocation: freeze the least important subspaces")
    )
    asa_target_subspaces: int = field(
        default=50, metadata=doc("ASA: subspaces left trainable over all layers at final_warmup", min=1)
    )
    init_warmup: int = field(default=50, metadata=doc("ASA: first step that scores and masks", min=0))
    final_warmup: int = field(
        default=1000, metadata=doc("ASA: last step that scores and masks (the target is reached)", min=1)
    )
    mask_interval: int = field(default=100, metadata=doc("ASA: steps between two maskings", min=1))
    asa_importance_beta: float = field(
        default=0.85, metadata=doc("ASA: EMA factor of the importance |w·g|", min=0.0, max=1.0)
    )
    asa_uncertainty_beta: float = field(
        default=0.85, metadata=doc("ASA: EMA factor of the importance's uncertainty", min=0.0, max=1.0)
    )
    asa_schedule_exponent: float = field(
        default=3.0,
        metadata=doc("ASA: exponent e of target(t) = T + (N − T)(1 − progress)^e", min_exclusive=0.0),
    )
    use_dynamic_rank: bool = field(
        default=False,
        metadata=doc(
            "r_k from the subspace's eigenvalues above svd_threshold × the largest (≤ subspace_rank)"
        ),
    )
    svd_threshold: float = field(
        default=0.1, metadata=doc("use_dynamic_rank: the eigenvalue ratio that counts", min=0.0)
    )
    random_seed: int = field(default=0, metadata=doc("seed of the randomized SVD (the decomposition)"))


# -- the decomposition: SVD, k-means, per-subspace init ------------------------------------------------
def augmented_weight(base: nn.Linear) -> torch.Tensor:
    """[W | b] (out, in + 1) in fp32, or W alone without a bias."""
    weight = base.weight.detach().float()
    if base.bias is None:
        return weight
    return torch.cat([weight, base.bias.detach().float().unsqueeze(1)], dim=1)


def seeded_svd(matrix: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (out, R), Vᵀ (R, in)) of ``torch.svd_lowrank`` with its random projection drawn from ``seed``
    in a forked RNG (the global stream is left as it was)."""
    devices = [] if matrix.device.type == "cpu" else [matrix.device]
    kwargs = {} if matrix.device.type == "cpu" else {"device_type": matrix.device.type}
    with torch.random.fork_rng(devices=devices, **kwargs):
        torch.manual_seed(seed)
        u, _, v = torch.svd_lowrank(matrix, q=rank, niter=SVD_NITER, M=None)
    return u[:, :rank], v[:, :rank].T


def nearest_centers(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """The index of each point's nearest center (squared distance less ‖x‖², which every center shares;
    the first on a tie)."""
    return ((centers * centers).sum(1) - 2 * points @ centers.T).argmin(dim=1)


def cluster_means(
    points: torch.Tensor, labels: torch.Tensor, old_centers: torch.Tensor, k: int
) -> torch.Tensor:
    """Each cluster's mean, with scikit-learn's two rules for an empty cluster: it takes the point
    farthest from its own center (which leaves its cluster's sum but keeps its label), unless every
    point sits on its center; one still empty takes the center of the largest cluster, as that row
    stands when the loop over clusters reaches it."""
    sums = torch.zeros(k, points.shape[1], dtype=points.dtype).index_add_(0, labels, points)
    counts = torch.bincount(labels, minlength=k).to(points.dtype)
    empty = (counts == 0).nonzero().flatten().tolist()
    distances = ((points - old_centers[labels]) ** 2).sum(1).numpy()
    if empty and distances.max() > 0:
        farthest = np.argpartition(distances, -len(empty))[: -len(empty) - 1 : -1]
        for cluster, point in zip(empty, farthest.tolist(), strict=True):
            sums[labels[point]] -= points[point]
            counts[labels[point]] -= 1
            sums[cluster], counts[cluster] = points[point], 1
    largest = int(counts.argmax())
    for j in range(k):
        sums[j] = sums[j] / counts[j] if counts[j] > 0 else sums[largest]
    return sums


def kmeans_labels(points: torch.Tensor, k: int) -> torch.Tensor:
    """Lloyd's k-means as peft runs it (scikit-learn, init "random", one run, 10 iterations, seed
    123456789), in fp64: centred points; the first centers drawn by NumPy's legacy generator as
    scikit-learn draws them; stop when no label changes or the centers move less than 1e-4 times the
    mean variance; labels from the last centers."""
    x = points.double()
    x = x - x.mean(dim=0)
    n = x.shape[0]
    tolerance = x.var(dim=0, unbiased=False).mean().item() * KMEANS_TOLERANCE
    weights = np.ones(n, dtype=np.float32)
    seeds = np.random.RandomState(KMEANS_SEED).choice(n, size=k, replace=False, p=weights / weights.sum())
    centers = x[torch.from_numpy(seeds)]
    previous = torch.full((n,), -1, dtype=torch.long)
    for _ in range(KMEANS_ITERATIONS):
        labels = nearest_centers(x, centers)
        moved = cluster_means(x, labels, centers, k)
        shift = ((moved - centers) ** 2).sum().item()
        centers = moved
        if torch.equal(labels, previous):
            return labels
        if shift <= tolerance:
            break
        previous = labels
    return nearest_centers(x, centers)


def subspace_rank(rows: torch.Tensor, cfg: AdamssConfig) -> int:
    """r_k: min(|S_k|, subspace_rank), or with use_dynamic_rank the eigenvalues of U_k U_kᵀ above
    svd_threshold × the largest (at most subspace_rank); at least 1."""
    if not cfg.use_dynamic_rank:
        return max(1, min(rows.shape[0], cfg.subspace_rank))
    gram = rows @ rows.T
    _, values, _ = torch.svd_lowrank(gram, q=min(gram.shape), niter=SVD_NITER)
    return max(1, min(int((values > cfg.svd_threshold * values[0]).sum()), cfg.subspace_rank))


def initial_a(rows: torch.Tensor, rank: int) -> torch.Tensor:
    """A_k (r_k, R): Qᵀ of the QR of U_kᵀ E, E the top-r_k eigenvectors of U_k U_kᵀ (randomized, as peft)."""
    gram = rows @ rows.T
    eigenvectors, _, _ = torch.svd_lowrank(gram, q=min(gram.shape[0], rank), niter=SVD_NITER)
    q, _ = torch.linalg.qr(rows.T @ eigenvectors[:, :rank], mode="reduced")
    return q.T.contiguous()


class AdamssLinear(AdapterLayer):
    """``base_layer(x) + P (⊕_k B_k A_k) Vᵀ x̃``, P putting each subspace's outputs back in their rows,
    around a frozen ``nn.Linear``."""

    def __init__(self, base_layer: nn.Linear, cfg: AdamssConfig):
        super().__init__()
        self.base_layer = base_layer
        device, dtype = base_layer.weight.device, base_layer.weight.dtype
        weight = augmented_weight(base_layer)
        rank = min(cfg.r, *weight.shape)
        u, vt = seeded_svd(weight, rank, cfg.random_seed)
        k = min(cfg.num_subspaces, weight.shape[0])
        labels = kmeans_labels(u.cpu(), k).to(device)
        subspaces = [(labels == c).nonzero().flatten() for c in range(k)]  # S_k, ascending
        if any(len(rows) == 0 for rows in subspaces):  # only where output rows repeat (peft fails there too)
            raise RecipeError(
                "method.num_subspaces",
                f"k-means left a subspace of a {tuple(weight.shape)} layer empty (its output rows repeat)",
                f"lower method.num_subspaces below {k}",
            )
        self.register_buffer("adamss_newB", vt.to(dtype))
        a_init, b_init = [], []
        for rows in subspaces:
            r_k = subspace_rank(u[rows], cfg)
            a_init.append(initial_a(u[rows], r_k))
            b_init.append(torch.zeros(len(rows), r_k, device=device))
        self.adamss_A = nn.ParameterList([nn.Parameter(a.to(dtype)) for a in a_init])
        self.adamss_B = nn.ParameterList([nn.Parameter(b.to(dtype)) for b in b_init])
        # the update's rows come out subspace by subspace; this puts row j of the output at its place
        order = torch.cat(subspaces)
        self.register_buffer("inverse_order", torch.argsort(order), persistent=False)

    @property
    def ranks(self) -> list[int]:
        return [a.shape[0] for a in self.adamss_A]

    def augmented(self, x: torch.Tensor) -> torch.Tensor:
        if self.base_layer.bias is None:
            return x
        return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        result = self.base_layer(x)
        if self.merged:
            return result
        projected = F.linear(self.augmented(x.to(self.adamss_newB.dtype)), self.adamss_newB)  # (..., R)
        parts = [
            F.linear(F.linear(projected, a), b) for a, b in zip(self.adamss_A, self.adamss_B, strict=True)
        ]
        update = torch.cat(parts, dim=-1).index_select(-1, self.inverse_order)
        return (result + update).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Δ[W | b] (out, in (+1)) in fp32: the rows of each subspace, B_k A_k Vᵀ."""
        vt = self.adamss_newB.float()
        blocks = [b.float() @ a.float() @ vt for a, b in zip(self.adamss_A, self.adamss_B, strict=True)]
        return torch.cat(blocks).index_select(0, self.inverse_order)

    def fold(self, sign: float) -> None:
        delta = sign * self.delta_weight().detach()
        weight, bias = self.base_layer.weight, self.base_layer.bias
        write_weight(weight, weight.float() + delta[:, : weight.shape[1]])
        if bias is not None:
            write_weight(bias, bias.float() + delta[:, -1])

    def merge(self) -> None:
        self.fold(1.0)

    def unmerge(self) -> None:
        self.fold(-1.0)


@register
class Adamss(LayerMethod):
    name = "adamss"
    description = (
        "AdaMSS: the SVD of each weight clustered into subspaces, each with its own low-rank update; "
        "optional ASA pruning of subspaces (NeurIPS 2025)"
    )
    config_cls = AdamssConfig
    mergeable = True
    peft_type = "ADAMSS"
    supports_quantized_base = False  # the SVD and the clustering read W itself; peft wraps nn.Linear only
    supports_packing = True  # a per-token linear update: packed examples never meet
    supports_fsdp = False  # not proven under sharding; ASA flips requires_grad, which FSDP2 cannot follow
    trainable_formula = (
        "per adapted layer Σ_k r_k·(R + n_k), R = min(r, out, in + 1 with a bias), n_k the output rows of "
        "subspace k (Σ n_k = out); with every r_k = subspace_rank: subspace_rank·(K·R + out); plus "
        "modules_to_save"
    )
    parameter_prefix = (
        "adamss_"  # saved as base_model.model.<module>.adamss_A.<k> / adamss_B.<k> / adamss_newB
    )
    layer_types = (AdamssLinear,)
    target_kind = "nn.Linear layers"
    target_hint = "target the model's nn.Linear layers (peft's AdaMSS adapts nn.Linear only too)"
    accepts_target = staticmethod(lambda module: isinstance(module, nn.Linear))

    cfg: AdamssConfig

    def __init__(self, cfg: AdamssConfig, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.importance: dict[str, torch.Tensor] = {}  # Ī per A_k / B_k, by parameter name
        self.uncertainty: dict[str, torch.Tensor] = {}  # Ū
        self.frozen: list[str] = []  # parameter names of the subspaces ASA froze

    # -- recipe --------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, cfg: AdamssConfig, recipe) -> None:
        if cfg.use_asa and cfg.init_warmup >= cfg.final_warmup:
            raise RecipeError(
                "method.init_warmup",
                f"{cfg.init_warmup} is not below final_warmup {cfg.final_warmup}: ASA has no steps to prune in",
                "set init_warmup < final_warmup (peft refuses it too)",
            )
        regex = isinstance(cfg.target_modules, str) and cfg.target_modules != "all-linear"
        for key in ("layers_to_transform", "layers_pattern"):
            if getattr(cfg, key) is not None and regex:
                raise RecipeError(
                    f"method.{key}",
                    "cannot narrow a regex target_modules (peft ignores it there)",
                    "select the blocks in the regex itself, or list module names in target_modules",
                )

    # -- building ------------------------------------------------------------------------
    def resolve_targets(self, model: nn.Module) -> list[str]:
        targets = [n for n in super().resolve_targets(model) if in_layers(n, self.cfg)]
        if not targets:
            raise RecipeError(
                "method.layers_to_transform", "leaves none of the matched modules", "check layers_pattern"
            )
        for name in targets:
            self.check_clusterable(name, model.get_submodule(name))
        return targets

    def check_clusterable(self, name: str, layer: nn.Linear) -> None:
        """With R = out the rows of U are orthonormal, all equally far apart: k-means then clusters by
        rounding noise, and no two machines (nor peft and we) find the same subspaces."""
        out, columns = layer.out_features, layer.in_features + (layer.bias is not None)
        if min(self.cfg.r, columns) >= out:
            raise RecipeError(
                "method.r",
                f"{self.cfg.r} reaches {name}'s {out} outputs: the SVD's rows are then equidistant and "
                "k-means has no clusters to find",
                f"set method.r below {out}, or leave {name.rsplit('.', 1)[-1]} out of target_modules",
            )

    def create_layer(self, name: str, base: nn.Module) -> AdamssLinear:
        return AdamssLinear(base, self.cfg)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = 0
        for _, layer in self.layers(model):
            rank, sizes = layer.adamss_newB.shape[0], [b.shape[0] for b in layer.adamss_B]
            count += sum(r_k * (rank + n_k) for r_k, n_k in zip(layer.ranks, sizes, strict=True))
        return count + self.saved_modules_count(model)

    # -- ASA: adaptive subspace allocation -----------------------------------------------
    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.cfg.use_asa and distributed and torch.distributed.get_world_size() > 1:
            raise RecipeError(
                "method.use_asa",
                "freezes subspaces mid-run, which DDP's gradient reduction cannot follow",
                "train on one process, or set method.use_asa: false",
            )

    def subspaces(self, model: nn.Module) -> list[tuple[str, nn.Parameter, str, nn.Parameter]]:
        """(A_k's name, A_k, B_k's name, B_k) of every subspace, in model order."""
        found = []
        for name, layer in self.layers(model):
            for k, (a, b) in enumerate(zip(layer.adamss_A, layer.adamss_B, strict=True)):
                found.append((f"{name}.adamss_A.{k}", a, f"{name}.adamss_B.{k}", b))
        return found

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Frozen subspaces take no update (after a resume they come back trainable: freeze them again)."""
        if self.frozen:
            parameters = dict(model.named_parameters())
            for name in self.frozen:
                parameters[name].requires_grad_(False)
                parameters[name].grad = None

    def after_step(self, model: nn.Module, step: int) -> None:
        """peft's ``update_and_allocate(step)``: score every step of [init_warmup, final_warmup], mask
        every mask_interval steps in it, then restart the scores."""
        cfg = self.cfg
        if not cfg.use_asa or not cfg.init_warmup <= step <= cfg.final_warmup:
            return
        subspaces = self.subspaces(model)
        with torch.no_grad():
            self.update_importance(subspaces)
            if step % cfg.mask_interval == 0:
                self.mask_to(subspaces, self.target_subspaces(step, len(subspaces)))
                self.importance, self.uncertainty = {}, {}

    def update_importance(self, subspaces: list) -> None:
        """I = |w·g|; Ū ← βu Ū + (1 − βu)|I − Ī| (with the Ī before this step), then Ī ← βi Ī + (1 − βi) I."""
        beta_i, beta_u = self.cfg.asa_importance_beta, self.cfg.asa_uncertainty_beta
        for a_name, a, b_name, b in subspaces:
            for name, param in ((a_name, a), (b_name, b)):
                if param.grad is None:
                    continue
                sensitivity = (param * param.grad).abs()
                average = self.importance.get(name, torch.zeros_like(param))
                uncertainty = self.uncertainty.get(name, torch.zeros_like(param))
                diff = (sensitivity - average).abs()
                self.uncertainty[name] = uncertainty.mul(beta_u).add_(diff, alpha=1 - beta_u)
                self.importance[name] = average.mul(beta_i).add_(sensitivity, alpha=1 - beta_i)

    def target_subspaces(self, step: int, total: int) -> int:
        """target(t) = T + (N − T)(1 − (t − init_warmup)/(final_warmup − init_warmup))^e, truncated."""
        cfg = self.cfg
        remaining = 1.0 - (step - cfg.init_warmup) / (cfg.final_warmup - cfg.init_warmup)
        remaining = max(0.0, min(1.0, remaining))
        target = cfg.asa_target_subspaces
        return int(target + (total - target) * (remaining**cfg.asa_schedule_exponent))

    def mask_to(self, subspaces: list, target: int) -> None:
        """Keep trainable the subspaces scored strictly above the target-th best score (peft's rule);
        freeze the rest. Only subspaces scored since the last masking (the trainable ones) take part."""
        scored = []
        for a_name, a, b_name, b in subspaces:
            if a_name in self.importance and b_name in self.importance:
                score = (self.importance[a_name] * self.uncertainty[a_name]).mean() + (
                    self.importance[b_name] * self.uncertainty[b_name]
                ).mean()
                scored.append(((a_name, a), (b_name, b), score))
        if not scored:
            return
        scores = torch.stack([score for _, _, score in scored])
        threshold = float("-inf")
        if target < len(scored):
            threshold = -torch.kthvalue(-scores, target)[0].item()
        frozen = set(self.frozen)
        for pair_a, pair_b, score in scored:
            active = float(score) > threshold
            for name, param in (pair_a, pair_b):
                param.requires_grad_(active)
                if not active:
                    param.grad = None
                    frozen.add(name)
                else:
                    frozen.discard(name)
        self.frozen = sorted(frozen)

    def method_state(self) -> dict[str, Any]:
        return {
            "importance": dict(self.importance),
            "uncertainty": dict(self.uncertainty),
            "frozen": self.frozen,
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.importance = dict(state.get("importance") or {})
        self.uncertainty = dict(state.get("uncertainty") or {})
        self.frozen = list(state.get("frozen") or [])

    # -- saving --------------------------------------------------------------------------
    def live_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained A_k, B_k, plus each layer's frozen ``adamss_newB`` (Vᵀ; peft saves it too)."""
        state = super().live_state_dict(model)
        bases = {n: b for n, b in model.named_buffers() if n.endswith(".adamss_newB")}
        state.update({self.stored_key(n): b for n, b in bases.items()})
        return state

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """The subspaces' row sets are rebuilt from the base, not read: check they are the file's."""
        for name, layer in self.layers(model):
            ours = [tuple(b.shape) for b in layer.adamss_B]
            saved = [state.get(self.stored_key(f"{name}.adamss_B.{k}")) for k in range(len(ours))]
            saved = [None if b is None else tuple(b.shape) for b in saved]
            if ours != saved:
                raise RecipeError(
                    "adapter",
                    f"{name}'s subspaces are {saved} in the file but {ours} from this base's decomposition",
                    "load the adapter on the base model (and method.r, random_seed) it was made with",
                )
        super().load_adapter_state_dict(model, state)


__all__ = ["Adamss", "AdamssConfig", "AdamssLinear", "kmeans_labels"]
