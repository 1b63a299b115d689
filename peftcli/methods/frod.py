"""FRoD: Full-Rank Efficient Fine-Tuning with Rotational Degrees (Wan et al., AAAI 2026,
arXiv 2512.23485, doi 10.1609/aaai.v40i31.39813).

Layers that play the same role in every block (all ``q_proj``, all ``down_proj``: a *category*) share
one full-rank basis V_c (in × in), found by a hierarchical joint decomposition of their weights (a
regularised higher-order GSVD): stack the category's weights W_1 … W_n (each out × in), take the thin QR
``[W_1; …; W_n] = Q R``, average the regularised inverses ``T = (1/n) Σ_i (Q_iᵀ Q_i + α I)⁻¹`` over the
row blocks Q_i, and set ``V_c = Rᵀ Z`` with Z the eigenvectors of T (when the stack has fewer rows than
columns, V_c is its right singular vectors instead). Every layer of the category then factors exactly
as ``W_i = U_i Λ_i V_cᵀ``: ``B_i = W_i V_c⁻ᵀ``, Λ_i the column norms of B_i and U_i its unit columns
(computed in fp64). FRoD trains all of Λ_i and a sparse matrix S_i on fixed off-diagonal positions (the
"rotational degrees": ⌊in² · sparse_rate⌋ of them, at least 1, drawn once per category with
``projection_prng_key``), so the adapted weight is full rank::

    W_i' = U_i (Λ_i + S_i) V_cᵀ,   S_i = 0 and Λ_i = Λ_i⁰ at the start

We run it as ``y = W0 x + b0 + U (Λ − Λ⁰ + S) Vᵀ x``: the same map, but step 0 is the base exactly (Λ⁰,
the initial Λ, is kept beside U; peft computes ``U (Λ + S) Vᵀ x``, which equals W0 x up to rounding).
U_i (out × in) and Λ⁰ are frozen buffers of the layer, not saved: they are rebuilt from W0 and V_c, and
rebuilt again when a loaded file brings its own V_c. As in peft, the blocks are ordered by the number
after ``layers`` in a module's name (else its first number, else its rank among the targets), and a
category has one weight per block: where two targets share block and category (T5's encoder and decoder
``SelfAttention.q``) the later one in model order stands for both in V_c. Categories are named as peft
names them (the last two name components, ``self_attn_q_proj``; BERT's ``attention.output.dense`` is
``attention_output``). Merging adds ``U (Λ − Λ⁰ + S) Vᵀ`` to W (transposed for GPT-2's Conv1D);
unmerging subtracts it. Saved as peft saves it: ``frod_lambda_l`` and ``frod_lambda_s_values`` under each
module, and once per category ``base_model.frod_V.<c>``, ``base_model.frod_s_indices.<c>`` and
``base_model.frod_s_size.<c>`` (the kit's shared state, containers by category), unless
``save_projection: false`` (then the base and the seed rebuild them on loading).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.inject import is_conv1d, is_linear, linear_dims
from peftcli.methods.kit import DeltaLayer, LayerMethod, SharedState
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc

NORM_FLOOR = 1e-12  # a column of B below this norm gets a zero U column and Λ⁰ = its norm (peft's rule)


@dataclass
class FrodConfig(MethodConfig):
    """peft's ``FrodConfig`` fields."""

    sparse_rate: float = field(
        default=0.01,
        metadata=doc(
            "fraction of the in² off-diagonal positions of S that train (at least one; peft's 0.01)",
            min=0.0,
            max=1.0,
        ),
    )
    regularization_alpha: float = field(
        default=1e-3,
        metadata=doc(
            "α of the shared basis: (QᵢᵀQᵢ + α I)⁻¹ stays stable for correlated layers", min_exclusive=0.0
        ),
    )
    projection_prng_key: int = field(
        default=0, metadata=doc("seed of the generator that draws each category's sparse positions", min=0)
    )
    save_projection: bool = field(
        default=True,
        metadata=doc("store V and the sparse positions in the adapter; false: rebuilt from the base and key"),
    )
    init_weights: bool = field(
        default=True,
        metadata=doc("true: S = 0, Λ = Λ⁰ (step 0 is the base); false: S ~ N(0, 0.1²), Λ⁰ + N(0, 0.1²)"),
    )
    frod_dropout: float = field(
        default=0.0, metadata=doc("dropout on the input of the update path", min=0.0, max=0.99)
    )
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata=doc(
            "module names (list), a regex on full names, or all-linear (every linear layer but the head)"
        ),
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=doc("modules trained in full and saved whole; seq_cls heads are added"),
    )


# -- categories and blocks (peft's naming, so the saved keys and the shared bases agree) ---------------


def category_of(name: str) -> str:
    """The role a module plays in its block: its last two name components joined (``self_attn_q_proj``),
    its last one after a block number, and ``attention_output`` for BERT's attention output dense (which
    would otherwise share ``output_dense`` with the MLP's)."""
    parts = name.split(".")
    if len(parts) == 1 or parts[-2].isdigit():
        return parts[-1]
    if parts[-2:] == ["output", "dense"] and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return f"{parts[-2]}_{parts[-1]}"


def block_of(name: str, fallback: int) -> int:
    """The block a module sits in: the number after ``layers``, else the first number in its name,
    else ``fallback`` (its rank among the targets, so the order stays deterministic)."""
    parts = name.split(".")
    if "layers" in parts:
        try:
            return int(parts[parts.index("layers") + 1])
        except (ValueError, IndexError):  # ``layers`` not followed by a number: look further
            pass
    return next((int(part) for part in parts if part.isdigit()), fallback)


def out_in_weight(module: nn.Module) -> torch.Tensor:
    """W as (out, in), whatever the layer stores (GPT-2's Conv1D keeps (in, out))."""
    weight = module.weight.detach()
    return weight.T if is_conv1d(module) else weight


def category_weights(model: nn.Module, targets: list[str]) -> dict[str, list[torch.Tensor]]:
    """Each category's weights in block order, one per block: the later target in model order wins a
    (block, category) both claim, as in peft."""
    by_block: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for rank, name in enumerate(targets):
        by_block[block_of(name, rank)][category_of(name)] = out_in_weight(model.get_submodule(name))
    found: dict[str, list[torch.Tensor]] = defaultdict(list)
    for _, weights in sorted(by_block.items()):
        for category, weight in weights.items():
            found[category].append(weight)
    return dict(found)


# -- the shared basis, the sparse pattern and a layer's factors ----------------------------------------


def shared_basis(weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """V (in × in) with every W_i = B_i Vᵀ, from the fp32 stack of the weights: the regularised
    higher-order GSVD ``V = Rᵀ Z`` (Z: eigenvectors of the mean of (QᵢᵀQᵢ + α I)⁻¹ over the row blocks of
    the stack's QR), or the stack's right singular vectors when it has fewer rows than columns."""
    blocks = [w.detach().to(device="cpu", dtype=torch.float32) for w in weights]
    stack = torch.cat(blocks, dim=0)
    if stack.shape[0] < stack.shape[1]:
        return torch.linalg.svd(stack, full_matrices=True)[2].T
    q, r = torch.linalg.qr(stack)
    dim = r.shape[1]
    mean_inverse = torch.zeros((dim, dim), dtype=r.dtype)
    for q_block in torch.split(q, [b.shape[0] for b in blocks], dim=0):
        mean_inverse += torch.linalg.inv(q_block.T @ q_block + alpha * torch.eye(dim, dtype=r.dtype))
    mean_inverse /= len(blocks)
    return r.T @ torch.linalg.eigh(mean_inverse)[1]


def pattern_size(in_dim: int, sparse_rate: float) -> int:
    """How many off-diagonal positions of S train: ⌊in² · rate⌋, capped at in² − in, at least 1 when
    the rate is positive."""
    off_diagonal = in_dim * in_dim - in_dim
    count = min(int(in_dim * in_dim * sparse_rate), off_diagonal)
    return max(1, count) if sparse_rate > 0 and off_diagonal > 0 else count


def sparse_pattern(in_dim: int, sparse_rate: float, generator: torch.Generator) -> torch.Tensor:
    """(2, nnz) row/column positions of S: the first nnz of a permutation (from ``generator``) of the
    off-diagonal positions listed row by row. Nothing is drawn when nnz is 0."""
    count = pattern_size(in_dim, sparse_rate)
    if count == 0:
        return torch.empty(2, 0, dtype=torch.long)
    rows = torch.arange(in_dim).repeat_interleave(in_dim)
    cols = torch.arange(in_dim).repeat(in_dim)
    off = torch.stack([rows, cols], dim=1)[rows != cols]
    chosen = torch.randperm(off.shape[0], generator=generator)[:count]
    return off[chosen].T.contiguous()


def factors(weight: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, Λ⁰) with W = U diag(Λ⁰) Vᵀ, in fp64 then fp32: B = W V⁻ᵀ (by a solve, a pseudo-inverse when V
    is singular), Λ⁰ its column norms, U its columns over their norms (zero columns stay zero)."""
    w, v = weight.detach().double().cpu(), basis.detach().double().cpu()
    try:
        b = torch.linalg.solve(v, w.T).T
    except RuntimeError:  # singular V: the least-squares B
        b = w @ torch.linalg.pinv(v, rtol=1e-6).T
    norms = torch.linalg.norm(b, dim=0)
    u = torch.zeros_like(b)
    kept = norms > NORM_FLOOR
    u[:, kept] = b[:, kept] / norms[kept]
    return u.float(), norms.float()


def random_init(values: torch.Tensor, lambdas: torch.Tensor) -> None:
    """peft's ``init_weights: false``: S ~ N(0, 0.1²), then Λ moved by N(0, 0.1²), from the global stream."""
    with torch.no_grad():
        nn.init.normal_(values, std=0.1)
        lambdas.add_(torch.randn_like(lambdas) * 0.1)


class FrodLinear(DeltaLayer):
    """``base_layer(x) + U (Λ − Λ⁰ + S) Vᵀ dropout(x)`` around a frozen linear-like layer; V and the
    positions of S come from the model's shared state, by this layer's category."""

    def __init__(
        self, base_layer: nn.Module, shared: SharedState, category: str, init_weights: bool, dropout: float
    ):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "shared", shared)  # a reference, not a submodule: V has one name
        self.category = category
        weight = base_layer.weight
        nnz = self.positions().shape[1]
        self.frod_lambda_s_values = nn.Parameter(torch.zeros(nnz, device=weight.device, dtype=weight.dtype))
        self.frod_lambda_l = nn.Parameter(
            torch.zeros(self.in_features, device=weight.device, dtype=weight.dtype)
        )
        self.refactor()
        with torch.no_grad():
            self.frod_lambda_l.copy_(self.frod_lambda_0)
        if not init_weights:
            random_init(self.frod_lambda_s_values, self.frod_lambda_l)
        self.frod_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def basis(self) -> torch.Tensor:
        return getattr(self.shared.frod_V, self.category)

    def positions(self) -> torch.Tensor:
        return getattr(self.shared.frod_s_indices, self.category)

    def refactor(self) -> None:
        """(Re)build U and Λ⁰ from W0 and the category's V, in W's dtype (frozen, not saved)."""
        weight = self.base_layer.weight
        u, lambdas = factors(out_in_weight(self.base_layer), self.basis())
        self.register_buffer("frod_U", u.to(weight.device, weight.dtype), persistent=False)
        self.register_buffer("frod_lambda_0", lambdas.to(weight.device, weight.dtype), persistent=False)

    def coefficients(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, in) ↦ z (Λ − Λ⁰ + S)ᵀ: the diagonal change, plus each trained S[i, j] times z[:, j]
        added into column i (a scatter over the nnz positions, never a dense in × in S)."""
        rows, cols = self.positions()
        values = self.frod_lambda_s_values.to(z.dtype)
        sparse = z.new_zeros(z.shape).index_add(1, rows, z[:, cols] * values)
        return sparse + z * (self.frod_lambda_l - self.frod_lambda_0).to(z.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        h = self.frod_dropout(x.to(self.frod_U.dtype))
        z = h.reshape(-1, h.shape[-1]) @ self.basis().to(h.dtype)
        update = F.linear(self.coefficients(z), self.frod_U)
        return (result + update.reshape(*h.shape[:-1], -1)).to(result.dtype)

    def stored_delta(self) -> torch.Tensor:
        """U (Λ − Λ⁰ + S) Vᵀ as W stores it: (out, in), or (in, out) for GPT-2's Conv1D, fp32."""
        rows, cols = self.positions()
        middle = torch.diag((self.frod_lambda_l - self.frod_lambda_0).float())
        middle = middle.index_put((rows, cols), self.frod_lambda_s_values.float(), accumulate=True)
        delta = (self.frod_U.float() @ middle @ self.basis().float().T).detach()
        return delta.T if self.fan_in_fan_out else delta


@register
class Frod(LayerMethod):
    name = "frod"
    description = "FRoD: each layer refactored on a basis shared by its role across blocks; trains the scales and sparse rotations between them, full rank (AAAI 2026, arXiv 2512.23485)"
    config_cls = FrodConfig
    mergeable = True
    peft_type = "FROD"
    supports_quantized_base = False  # V and U are decompositions of the dense W0 (peft's FRoD too)
    supports_packing = True  # a per-token linear update: packed examples never meet
    supports_fsdp = False  # V is shared by layers of different blocks: no one FSDP unit owns it
    trainable_formula = (
        "in + nnz per adapted layer, nnz = floor(in² · sparse_rate) (at least 1, at most in² − in; "
        "Λ and S; U, V are frozen), plus modules_to_save"
    )
    parameter_prefix = "frod_"  # frod_lambda_l / frod_lambda_s_values under each module, peft's keys
    layer_types = (FrodLinear,)
    target_kind = "linear layers (nn.Linear, GPT-2's Conv1D)"
    target_hint = "target the model's linear layers"
    accepts_target = staticmethod(is_linear)

    cfg: FrodConfig

    def __init__(self, cfg, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.categories: dict[str, str] = {}  # target name -> its category

    def build_shared(self, model: nn.Module) -> dict[str, nn.Module]:
        """Per category, in sorted order (one generator draws the positions in that order): V in W's
        dtype, the sparse positions and their (in, in) size, as three containers keyed by category."""
        self.targets = self.resolve_targets(model)
        self.categories = {name: category_of(name) for name in self.targets}
        weights = category_weights(model, self.targets)
        self.check_category_sizes(model, weights)
        generator = torch.Generator(device="cpu").manual_seed(self.cfg.projection_prng_key)
        bases, positions, sizes = SharedState(), SharedState(), SharedState()
        for category in sorted(weights):
            basis = shared_basis(weights[category], self.cfg.regularization_alpha)
            in_dim = basis.shape[0]
            bases.add(category, basis.to(weights[category][0].dtype))
            positions.add(category, sparse_pattern(in_dim, self.cfg.sparse_rate, generator))
            sizes.add(category, torch.tensor([in_dim, in_dim], dtype=torch.long))
        return {"frod_V": bases, "frod_s_indices": positions, "frod_s_size": sizes}

    def check_category_sizes(self, model: nn.Module, weights: dict[str, list[torch.Tensor]]) -> None:
        """One basis serves a category, so its layers must share one input size (peft fails in torch)."""
        for name, category in self.categories.items():
            sizes = {w.shape[1] for w in weights[category]}
            in_dim = linear_dims(model.get_submodule(name))[0]
            if sizes != {in_dim}:
                raise RecipeError(
                    "method.target_modules",
                    f"{name} (in {in_dim}) shares FRoD category {category!r} with layers of in "
                    f"{', '.join(str(s) for s in sorted(sizes - {in_dim}) or sorted(sizes))}",
                    "target the layers of one role and size together, and the others in a separate run",
                )

    def create_layer(self, name: str, base: nn.Module) -> FrodLinear:
        cfg = self.cfg
        return FrodLinear(base, self.shared_state, self.categories[name], cfg.init_weights, cfg.frod_dropout)

    def shared_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """V, the positions and their sizes once per category as ``base_model.frod_V.<c>`` etc., or
        nothing when the base and the key rebuild them on loading (``save_projection: false``)."""
        return super().shared_state_dict(model) if self.cfg.save_projection else {}

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load, then rebuild U and Λ⁰ of the layers whose category got another V from the file (one
        computed elsewhere may differ in the last bits): W0 = U Λ⁰ Vᵀ must hold for the V in use."""
        bases = self.shared(model).frod_V
        before = {name: basis.clone() for name, basis in bases.named_buffers()}
        super().load_adapter_state_dict(model, state)
        changed = {name for name, basis in bases.named_buffers() if not torch.equal(basis, before[name])}
        for _, layer in self.layers(model):
            if layer.category in changed:
                layer.refactor()

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        rate = self.cfg.sparse_rate
        count = sum(m.in_features + pattern_size(m.in_features, rate) for _, m in self.layers(model))
        return count + self.saved_modules_count(model)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        return {**super().adapter_config(model), "fan_in_fan_out": self.fan_in_fan_out(model), "bias": "none"}

    @classmethod
    def config_from_adapter(cls, adapter_config: dict[str, Any]) -> FrodConfig:
        """peft's keys; its options that train or pick more than we do are refused in one line."""
        bias = adapter_config.get("bias") or "none"
        if bias != "none":
            raise RecipeError(
                "adapter",
                f"FRoD with bias {bias!r} trains the base biases; peftcli's FRoD keeps them frozen",
                "train it again with bias 'none'",
            )
        if adapter_config.get("layers_to_transform") is not None:
            raise RecipeError(
                "adapter",
                "FRoD with layers_to_transform is not supported",
                "name the layers in target_modules instead",
            )
        return super().config_from_adapter(adapter_config)


__all__ = [
    "Frod",
    "FrodConfig",
    "FrodLinear",
    "block_of",
    "category_of",
    "category_weights",
    "factors",
    "pattern_size",
    "shared_basis",
    "sparse_pattern",
]
