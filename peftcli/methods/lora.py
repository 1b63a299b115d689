r"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv 2106.09685).

A frozen linear layer ``W0 ∈ R^{out×in}`` gets a trainable low-rank update::

    h = W0 x + (α / r) · B A x          A ∈ R^{r×in}, B ∈ R^{out×r}

``A`` starts random and ``B`` at zero, so the tuned model equals the base at step 0. With rsLoRA
(Kalajievo, 2023, arXiv 2312.03732) the scale is ``s = α / √r``, which keeps the update's magnitude
stable as ``r`` grows. Merging folds ``s · B A`` into ``W0``; afterwards the model is a plain
transformers model with no extra latency.

Options (each a recipe key of ``method``):

- ``use_dora`` — DoRA (Liu et al., 2024, arXiv 2402.09353) splits the weight into a magnitude
  ``m ∈ R^{out}`` and a direction, and adapts the direction with LoRA::

      W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_c        (‖·‖_c: L2 norm of each output row)

  ``m`` starts at ``‖W0‖_c`` so step 0 equals the base. As the paper's §4.3 suggests (and peft does),
  the norm is treated as a constant in backward (detached). The bias is not rescaled.
- ``lora_plus_ratio`` — LoRA+ (Hayou et al., 2024, arXiv 2402.12354): ``B`` (and, as peft groups
  them, every 1-D trainable tensor) learns at ``ratio × lr``, ``A`` at ``lr``.
- ``init: pissa`` — PiSSA (Meng et al., 2024, arXiv 2404.02948): with ``W0 = U S Vᵀ``,
  ``B = U_r √(S_r/s)``, ``A = √(S_r/s) V_rᵀ``, and the frozen base becomes the residual
  ``W_res = W0 − s·B A``, so step 0 equals the base up to rounding. The export is converted to a
  plain LoRA on the *original* base (see :class:`Pissa`).
- ``rank_pattern`` / ``alpha_pattern`` — per-module ``r`` and ``α``; a key matches a module whose
  full name matches ``(.*\.)?(key)$`` (peft's rule), keys tried in sorted order.

- ``lora_bias``, ``exclude_modules``, ``layers_to_transform`` / ``layers_pattern``,
  ``trainable_token_indices``, ``layer_replication`` and ``ensure_weight_tying`` — peft's structural
  options, same names and meaning; the targeting and model surgery live in
  :mod:`peftcli.methods.lora_options`.
- ``pissa_niter: N`` — PiSSA from torch's randomized SVD with N subspace iterations (peft's
  ``pissa_niter_N``): seconds instead of minutes on large layers, at a small approximation error.
- ``init: orthogonal`` — A and B both random with ``B A = 0`` (see :class:`Orthogonal`).
- ``init: corda`` / ``init: lora_ga`` — data-driven residual inits (CorDA, arXiv 2406.05223; LoRA-GA,
  arXiv 2407.05000): the loop first reads ``init_examples`` training examples (:meth:`LoRA.init_from_data`);
  see :class:`Corda` and :class:`LoraGa`. Exported as PiSSA's.
- ``init: eva`` — EVA (arXiv 2410.07170): A on the principal directions of each layer's inputs on
  training data, ranks moved between layers (:class:`Eva`, :mod:`peftcli.methods.lora_eva`).
- ``init: loftq`` — LoftQ (arXiv 2310.08659), for quantized bases: the base becomes its 4-bit NF4
  quantization Q, chosen with the adapter so that ``Q + s·B A ≈ W0`` (``loftq_iter`` alternations;
  :class:`Loftq`, :mod:`peftcli.methods.lora_loftq`); Q is written beside the adapter.
- ``init: olora`` — OLoRA (Büyükakyüz, 2024, arXiv 2406.01775): with ``W0 = Q R``, ``B = Q_r`` and
  ``A = R_r``; the base keeps the residual and the export is converted as PiSSA's (see :class:`Olora`).

Each option that changes a layer (DoRA, PiSSA, OLoRA) is a :class:`LoraVariant`: init, forward, merge,
unmerge and export in one small class, as peft's ``LoraVariant``, declared by the option that switches it
on and listed once in :data:`VARIANTS`. A layer runs every enabled one in that order, so they compose
(``init: pissa`` with ``use_dora``). The layers, the matching, merge and unmerge come from the
wrapped-layer kit (:mod:`peftcli.methods.kit`).

Parameter names mirror peft's (``<module>.base_layer``, ``<module>.lora_A``, ``<module>.lora_B``) so
that our state-dict keys, prefixed with ``base_model.model.``, are peft's on-disk keys.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from peftcli.inject import (
    PREFIX,
    classifier_heads,
    is_linear,
    make_trainable_copies,
    match_parameters,
    match_targets,
    set_module,
)
from peftcli.methods.kit import (
    AdapterLayer,
    Foldable,
    LayerMethod,
    check_patterns_match,
    pattern_key,
    validate_patterns,
    write_weight,
)
from peftcli.methods.lora_eva import all_batches, eva_components
from peftcli.methods.lora_options import (
    TrainableTokens,
    add_trainable_tokens,
    input_embedding_name,
    modules_to_tie,
    replicate_layers,
    select_targets,
    tie_to,
    tied_state,
)
from peftcli.methods.registry import register
from peftcli.recipe import MethodConfig, RecipeError, doc


class LoraVariant:
    """One departure from plain LoRA behind one small interface, as peft's ``LoraVariant``. A variant is
    declared on the config (:attr:`enabled_by`: the recipe field and value that switch it on) and listed
    once in :data:`VARIANTS`; a layer runs every enabled one, in that order, so they compose (PiSSA or
    OLoRA init, then DoRA's magnitude on top). A new variant is one subclass and one entry there.

    Stateless: the tensors live on the :class:`LoRALinear`. Every hook defaults to plain LoRA.
    """

    enabled_by: ClassVar[tuple[str, Any]]  # (LoraConfig field, value), e.g. ("init", "pissa")
    title: ClassVar[str]  # the name in messages
    help: ClassVar[str] = ""  # an init variant: its choice of the ``init`` option, explained
    replaces_init: ClassVar[bool] = False  # True: :meth:`init` sets A and B itself (no random draw first)
    for_parameters: ClassVar[bool] = True  # can run on target_parameters (no layer input, no layer output)
    for_quantized_base: ClassVar[bool] = True  # can start from a quantized base weight
    # why not, and what to do instead (the refusal's words when for_quantized_base is False)
    quantized_why: ClassVar[str] = "decomposes full-precision weights"
    quantized_hint: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False  # True: reads training examples (LoRA.init_from_data calls observe)
    # what observe receives: "inputs" (each example's inputs to the layer, a forward pass) or "gradient" (the
    # loss's gradient with respect to W0, averaged over the batches, (out, in): a forward and backward pass)
    # ("eva": the whole model's pass of :mod:`peftcli.methods.lora_eva`, which also moves ranks)
    observes: ClassVar[Literal["inputs", "gradient", "eva"]] = "inputs"

    def __init__(self, options: Any = None):
        """``options``: the LoraConfig (or anything with its fields) that enabled the variant."""

    @classmethod
    def enabled(cls, options: Any) -> bool:
        """Whether ``options`` (a LoraConfig, or anything with its fields) switches the variant on."""
        field_name, value = cls.enabled_by
        return getattr(options, field_name, None) == value

    @classmethod
    def validate(cls, cfg: LoraConfig) -> None:
        """Refuse, with a RecipeError, options the variant cannot run with (called by validate_config)."""

    def create(self, layer: LoRALinear) -> None:
        """Add the variant's own tensors to a new layer (before any init)."""

    def observe(self, layer: LoRALinear, inputs: torch.Tensor) -> None:
        """A data-driven init: one training example's inputs to the layer, (T, in), real positions only; or,
        with ``observes = "gradient"``, once, the averaged gradient of the loss with respect to W0."""

    def finish(self, layer: LoRALinear) -> None:
        """A data-driven init: set A, B (and W0) from what :meth:`observe` saw, after the last example."""

    def init(self, layer: LoRALinear) -> None:
        """Runs after A (random) and B (zero) have their plain-LoRA init, and after earlier variants."""

    def forward(
        self, layer: LoRALinear, dropped: torch.Tensor, result: torch.Tensor, update: torch.Tensor
    ) -> torch.Tensor:
        """The update added to the base output ``result``, given the update so far (plain LoRA's is
        ``s · B A dropout(x)``); each variant transforms the one before it."""
        return update

    def merged_weight(self, layer: LoRALinear, weight: torch.Tensor) -> torch.Tensor:
        """The fp32 (out, in) weight after merging, given the weight so far (first ``W0 + s·B A``)."""
        return weight

    def unmerged_weight(self, layer: LoRALinear, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`merged_weight` (unmerge runs the variants in reverse)."""
        return weight

    def parameter_count(self, layer: LoRALinear) -> int:
        """Trainable parameters the variant adds to the layer's r·(in + out)."""
        return 0

    def export_state(self, layer: LoRALinear, a_key: str, b_key: str, state: dict) -> None:
        """Rewrite the layer's saved A and B (in ``state``) into what other tools load."""

    def import_state(self, layer: LoRALinear, a_key: str, b_key: str, state: dict) -> None:
        """Undo :meth:`export_state` on a loaded ``state``."""

    @classmethod
    def export_config(cls, cfg: LoraConfig, config: dict[str, Any]) -> None:
        """Rewrite the fields of ``adapter_config.json`` that :meth:`export_state` changes."""


class Dora(LoraVariant):
    """DoRA: ``W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_c``, the norm detached (the paper's §4.3, as peft)."""

    enabled_by = ("use_dora", True)
    title = "DoRA"
    for_parameters = False  # peft refuses it too: no per-layer output to rescale

    def create(self, layer: LoRALinear) -> None:
        weight = layer.lora_A.weight  # set to ‖W0 + s·B A‖_c by init, once B and A hold their init
        layer.lora_magnitude_vector = nn.Parameter(
            torch.ones(layer.out_features, device=weight.device, dtype=weight.dtype)
        )

    def init(self, layer: LoRALinear) -> None:
        with torch.no_grad():  # m = ‖W0 + s·B A‖_c: the direction has unit rows, so step 0 equals the base
            layer.lora_magnitude_vector.copy_(layer.weight_norm())

    def forward(
        self, layer: LoRALinear, dropped: torch.Tensor, result: torch.Tensor, update: torch.Tensor
    ) -> torch.Tensor:
        # W'x = (m/‖W0+ΔW‖)·(W0 x + update); written as a correction on top of the base output.
        scale = layer.lora_magnitude_vector / layer.weight_norm().to(dropped.dtype)  # (out,)
        if isinstance(layer.lora_dropout, nn.Identity) or not layer.training:
            bias = getattr(layer.base_layer, "bias", None)
            base_no_bias = result.to(dropped.dtype) - (bias.to(dropped.dtype) if bias is not None else 0)
        else:  # the direction must see the same dropped input as the LoRA path (as peft)
            weight = layer.dense_weight().to(dropped.dtype)
            base_no_bias = torch.nn.functional.linear(dropped, weight)
        return (scale - 1) * base_no_bias + scale * update

    def merged_weight(self, layer: LoRALinear, weight: torch.Tensor) -> torch.Tensor:
        factor = layer.lora_magnitude_vector.detach().float() / layer.weight_norm()
        layer.merge_cache["dora_factor"] = factor  # the norm of the unmerged weight, for unmerge
        return factor[:, None] * weight  # row by row

    def unmerged_weight(self, layer: LoRALinear, weight: torch.Tensor) -> torch.Tensor:
        return weight / layer.merge_cache.pop("dora_factor")[:, None]

    def parameter_count(self, layer: LoRALinear) -> int:
        return layer.out_features


class ResidualInit(LoraVariant):
    """An init that moves part of W0 into B A and leaves the residual ``W_res = W0 − s·B0 A0`` as the frozen
    base (PiSSA, OLoRA), so step 0 equals the base up to rounding. Exported as a plain LoRA on the
    *original* W0 (peft's ``path_initial_model_for_weight_conversion``):
    ``W_res + s·B A = W0 + s·(B A − B0 A0) = W0 + s·[B | −B0]·[A ; A0]``, a rank-2r LoRA, same scale.
    A subclass writes :meth:`decompose`."""

    replaces_init = True
    for_parameters = False
    for_quantized_base = False

    def decompose(self, weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(A0 (r, in), B0 (out, r)) from the fp32 (out, in) weight."""
        raise NotImplementedError

    def init(self, layer: LoRALinear) -> None:
        self.check_floating(layer)
        with torch.no_grad():
            weight = layer.dense_weight()  # (out, in), fp32
            a0, b0 = self.decompose(weight, layer.r, layer.scaling)
        self.start_from(layer, a0, b0, weight)

    def check_floating(self, layer: LoRALinear) -> None:
        if not layer.base_layer.weight.is_floating_point():
            raise RecipeError(
                "method.init",
                f"{self.title} needs the base weights in floating point, not quantized",
                "use init: kaiming with a quantized base, or drop model.quantization",
            )

    @staticmethod
    def start_from(layer: LoRALinear, a0: torch.Tensor, b0: torch.Tensor, weight: torch.Tensor) -> None:
        """A = A0, B = B0 and the base ``weight − s·B0 A0`` (``weight``: the original fp32 (out, in) W0)."""
        base = layer.base_layer
        with torch.no_grad():
            layer.lora_A.weight.copy_(a0)
            layer.lora_B.weight.copy_(b0)
            residual = weight - layer.scaling * (layer.lora_B.weight.float() @ layer.lora_A.weight.float())
            base.weight.copy_((residual.T if layer.fan_in_fan_out else residual).to(base.weight.dtype))
        # kept (not saved, not trained) to export ΔW relative to the original W0
        layer.register_buffer("pissa_A0", layer.lora_A.weight.detach().clone(), persistent=False)
        layer.register_buffer("pissa_B0", layer.lora_B.weight.detach().clone(), persistent=False)

    def export_state(self, layer: LoRALinear, a_key: str, b_key: str, state: dict) -> None:
        state[a_key] = torch.cat([state[a_key], layer.pissa_A0], dim=0)  # (2r, in)
        state[b_key] = torch.cat([state[b_key], -layer.pissa_B0], dim=1)  # (out, 2r)

    def import_state(self, layer: LoRALinear, a_key: str, b_key: str, state: dict) -> None:
        if a_key in state and state[a_key].shape[0] == 2 * layer.r:  # the first r rows: the trained A, B
            state[a_key], state[b_key] = state[a_key][: layer.r], state[b_key][:, : layer.r]

    @classmethod
    def export_config(cls, cfg: LoraConfig, config: dict[str, Any]) -> None:
        """The rank-2r export keeps the scale s: α' = grow·α keeps α'/(2r) (or α'/√(2r)) equal to s."""
        grow = math.sqrt(2) if cfg.use_rslora else 2.0
        config["r"], config["lora_alpha"] = 2 * cfg.r, grow * cfg.alpha
        config["rank_pattern"] = {k: 2 * v for k, v in cfg.rank_pattern.items()}
        config["alpha_pattern"] = {k: grow * v for k, v in cfg.alpha_pattern.items()}


class Pissa(ResidualInit):
    """PiSSA: with ``W0 = U S Vᵀ``, ``B0 = U_r √(S_r/s)`` and ``A0 = √(S_r/s) V_rᵀ`` (s·B0 A0 is W0's top-r
    part)."""

    enabled_by = ("init", "pissa")
    title = "PiSSA"
    help = "pissa (top-r SVD of W; fast with pissa_niter)"

    def __init__(self, options: Any = None):
        # pissa_niter: torch.svd_lowrank's subspace iterations (peft's "pissa_niter_N"), None: the exact SVD
        self.niter = getattr(options, "pissa_niter", None)

    def decompose(self, weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.niter is None:
            U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:  # Halko et al.'s randomized SVD: a Gaussian sketch (torch's generator) refined niter times
            U, S, V = torch.svd_lowrank(weight, q=r, niter=self.niter)
            Vh = V.T
        root = torch.sqrt(S / scaling)  # s·B·A = U_r S_r V_rᵀ
        return root[:, None] * Vh, U * root[None, :]


class Olora(ResidualInit):
    """OLoRA (Büyükakyüz, 2024, arXiv 2406.01775): with the QR decomposition ``W0 = Q R``, ``B0 = Q_r``
    (orthonormal columns) and ``A0 = R_r`` (the first r rows of R), as peft's ``init_lora_weights="olora"``."""

    enabled_by = ("init", "olora")
    title = "OLoRA"
    help = "olora (QR of W)"

    def decompose(self, weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        Q, R = torch.linalg.qr(weight)  # (out, k), (k, in)
        return R[:r], Q[:, :r]


class Corda(ResidualInit):
    r"""CorDA (Yang et al., 2024, arXiv 2406.05223): context-oriented decomposition. With ``C`` the
    covariance of the layer's inputs on training examples (each example's ``X`` (T, in) divided by its
    largest value, ``C = mean XᵀX``, damped by ``λ·mean(diag C)·I`` until it inverts cleanly), take the SVD
    ``W0 C = U S Vᵀ``: the directions of W0 that the task's inputs excite most. ``corda_method: ipm``
    (instruction-previewed) starts the adapter on the top r, ``kpm`` (knowledge-preserved) on the bottom r,
    leaving the directions the data uses in the frozen base. ``s·B0 A0 = U_r S_r V_rᵀ C⁻¹`` and the base
    keeps the residual, as PiSSA (exported the same way). As peft's ``preprocess_corda`` +
    ``init_lora_weights="corda"``. Until the data pass the layer is plain LoRA (B = 0), so the inputs it
    observes are the base model's."""

    enabled_by = ("init", "corda")
    title = "CorDA"
    help = "corda (SVD of W·C, C the covariance of the layer's inputs on training data)"
    replaces_init = False
    needs_data = True

    def __init__(self, options: Any = None):
        self.mode = getattr(options, "corda_method", "ipm")

    def init(self, layer: LoRALinear) -> None:
        self.check_floating(layer)
        zeros = torch.zeros_like  # no ΔW to subtract until the data pass sets A0 and B0
        layer.register_buffer("pissa_A0", zeros(layer.lora_A.weight.detach()), persistent=False)
        layer.register_buffer("pissa_B0", zeros(layer.lora_B.weight.detach()), persistent=False)
        layer.corda_covariance, layer.corda_examples = None, 0

    def observe(self, layer: LoRALinear, inputs: torch.Tensor) -> None:
        x = inputs.float()  # (T, in)
        x = x / x.max().abs()  # each example weighs alike, whatever its scale (as peft)
        covariance = x.T @ x  # (in, in)
        layer.corda_covariance = (
            covariance if layer.corda_covariance is None else layer.corda_covariance + covariance
        )
        layer.corda_examples += 1

    def finish(self, layer: LoRALinear) -> None:
        if not layer.corda_examples:
            return
        covariance = layer.corda_covariance / layer.corda_examples
        layer.corda_covariance, layer.corda_examples = None, 0
        with torch.no_grad():
            weight = layer.dense_weight()
            a0, b0 = corda_factors(weight, covariance, layer.r, layer.scaling, self.mode)
        self.start_from(layer, a0, b0, weight)

    def import_state(self, layer: LoRALinear, a_key: str, b_key: str, state: dict) -> None:
        """Loaded without the data pass: the file's second half is [A0 ; −B0], so the residual base is
        rebuilt from it (W0 = the current base + s·B0 A0 held now, zero before any data). A rank-r file
        with no data pass behind it (peft's own save, not converted) trained on a residual base that
        nothing here can rebuild: refused, as peft refuses CorDA's."""
        if a_key not in state:
            return
        if state[a_key].shape[0] == layer.r and not layer.pissa_A0.any():
            raise RecipeError(
                "adapter",
                f"a {self.title} adapter saved unconverted (rank {layer.r}, init {self.enabled_by[1]}) needs "
                "the residual base of its data pass, which the file does not hold",
                "save it from peft with path_initial_model_for_weight_conversion (a plain LoRA on the "
                "original base), as peftcli saves its own",
            )
        if state[a_key].shape[0] != 2 * layer.r:
            return
        r = layer.r
        a0, b0 = state[a_key][r:].float(), -state[b_key][:, r:].float()
        with torch.no_grad():
            held = layer.pissa_B0.float() @ layer.pissa_A0.float()
            original = layer.dense_weight() + layer.scaling * held
        self.start_from(layer, a0, b0, original)
        state[a_key], state[b_key] = state[a_key][:r], state[b_key][:, :r]


def corda_factors(
    weight: torch.Tensor, covariance: torch.Tensor, r: int, scaling: float, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """CorDA's (A0 (r, in), B0 (out, r)) from W0 (out, in) and the input covariance (in, in)."""
    eye = torch.eye(covariance.shape[0], device=covariance.device)
    scale, damp = covariance.diagonal().mean(), 0.01
    for _ in range(40):  # the smallest damping that inverts to within 0.05 (Frobenius), as peft
        damped = covariance + damp * scale * eye
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    else:
        raise RecipeError(
            "method.init", "CorDA: the inputs' covariance does not invert", "read more examples"
        )
    U, S, Vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    V = (Vh @ inverse).T  # (in, k): W0 = U S Vᵀ exactly
    keep = slice(0, r) if mode == "ipm" else slice(S.numel() - r, S.numel())
    root = torch.sqrt(S[keep] / scaling)
    return V[:, keep].T * root[:, None], U[:, keep] * root[None, :]


class LoraGa(ResidualInit):
    r"""LoRA-GA (Wang et al., 2024, arXiv 2407.05000): start the adapter so that its first step moves W like
    full fine-tuning's first step would. With ``G`` the loss's gradient with respect to W0 averaged over
    the first training batches (train mode, as peft's ``preprocess_loraga``) and ``G ≈ U S Vᵀ`` (torch's
    randomized SVD, q = 4r, 4 iterations, as peft), ``A0 = V_{:r}ᵀ`` and ``B0 = U_{r:2r} S_{r:2r}`` times
    peft's "stable" scale ``out^{1/4} / √γ`` (γ = 16): peft's default ``direction="ArB2r"``. The base
    keeps ``W0 − s·B0 A0``, exported as PiSSA is. The singular vectors' signs are free (and the sketch is
    random), so peft's tensors match ours up to the sign of each row of A and column of B."""

    enabled_by = ("init", "lora_ga")
    title = "LoRA-GA"
    help = "lora_ga (SVD of the loss gradient of W on training data)"
    replaces_init = False
    needs_data = True
    observes = "gradient"
    stable_gamma = 16.0  # peft's LoraGAConfig default

    def init(self, layer: LoRALinear) -> None:
        self.check_floating(layer)
        zeros = torch.zeros_like  # no ΔW to subtract until the data pass sets A0 and B0
        layer.register_buffer("pissa_A0", zeros(layer.lora_A.weight.detach()), persistent=False)
        layer.register_buffer("pissa_B0", zeros(layer.lora_B.weight.detach()), persistent=False)

    def observe(self, layer: LoRALinear, inputs: torch.Tensor) -> None:
        layer.lora_ga_gradient = inputs  # (out, in)

    def finish(self, layer: LoRALinear) -> None:
        gradient = getattr(layer, "lora_ga_gradient", None)
        if gradient is None:
            return
        del layer.lora_ga_gradient
        r = layer.r
        with torch.no_grad():
            U, S, V = torch.svd_lowrank(gradient.float(), q=min(4 * r, *gradient.shape), niter=4)
            a0 = V[:, :r].T  # (r, in)
            b0 = U[:, r : 2 * r] * S[r : 2 * r]  # (out, r)
            b0 = b0 * layer.out_features**0.25 / self.stable_gamma**0.5
        self.start_from(layer, a0, b0, layer.dense_weight())

    import_state = Corda.import_state  # the same rebuild of the residual base from the file


class Eva(LoraVariant):
    """EVA (Paischer et al., 2024, arXiv 2410.07170): A on the principal directions of each layer's inputs
    on training data, B = 0 (step 0 is the base), and the ranks moved between layers by explained
    variance (:mod:`peftcli.methods.lora_eva`; :meth:`LoRA.init_from_data` resizes the layers and writes
    the new ranks into ``rank_pattern``, and scales ``alpha`` with them so s stays α/r). Until the data
    pass, and when an adapter is loaded, the layers are plain LoRA at the saved ranks."""

    enabled_by = ("init", "eva")
    title = "EVA"
    help = "eva (A from the principal directions of the layer's inputs on training data; ranks redistributed)"
    needs_data = True
    observes = "eva"
    for_parameters = False


class Loftq(LoraVariant):
    """LoftQ (Li et al., 2023, arXiv 2310.08659): the base becomes ``Q``, its NF4 quantization chosen together
    with the adapter so that ``Q + s·B·A ≈ W0`` at step 0 (:func:`peftcli.methods.lora_loftq.loftq_decompose`:
    ``loftq_iter`` alternations of quantizing ``W0 − L R`` and taking the rank-r SVD of ``W0 − Q``), then
    ``s·B·A = L R``. The run trains on ``Q`` held in full precision, as peft's ``init_lora_weights="loftq"``
    does (peft: "do not pass a quantized model"), and writes ``Q`` beside the adapter
    (``loftq_base.safetensors``): loaded in 4 bits (NF4, no double quantization) it gives the same codes.
    Exported as peft writes it (``init_lora_weights: loftq`` and its ``loftq_config``), so a loader rebuilds
    ``Q`` from the original base, deterministically, as peft's does."""

    enabled_by = ("init", "loftq")
    title = "LoftQ"
    help = "loftq (the base becomes its 4-bit NF4 quantization, B·A the quantization error's top-r part)"
    replaces_init = True
    for_parameters = False
    for_quantized_base = False
    quantized_why = "computes the 4-bit base itself from full-precision weights (as peft's LoftQ)"
    quantized_hint = (
        "drop model.quantization: the run trains on the NF4 values and writes them to "
        "adapter/loftq_base.safetensors"
    )

    def __init__(self, options: Any = None):
        self.iterations = getattr(options, "loftq_iter", 1)

    @classmethod
    def validate(cls, cfg: LoraConfig) -> None:
        if cfg.loftq_bits != 4:
            raise RecipeError(
                "method.loftq_bits",
                f"LoftQ quantizes to 4-bit NF4 here; {cfg.loftq_bits} bits (peft's int8 LoftQ) is not supported",
                "set loftq_bits: 4",
            )

    def init(self, layer: LoRALinear) -> None:
        from peftcli.methods.lora_loftq import loftq_decompose

        if not layer.base_layer.weight.is_floating_point():
            raise RecipeError(
                "method.init", "LoftQ needs the base weights in floating point", "drop model.quantization"
            )
        quantized, left, right = loftq_decompose(layer.dense_weight(), layer.r, self.iterations)
        root = math.sqrt(layer.scaling)  # s·B·A = L R
        base = layer.base_layer
        with torch.no_grad():
            layer.lora_A.weight.copy_(right / root)
            layer.lora_B.weight.copy_(left / root)
            base.weight.copy_((quantized.T if layer.fan_in_fan_out else quantized).to(base.weight.dtype))

    @classmethod
    def export_config(cls, cfg: LoraConfig, config: dict[str, Any]) -> None:
        """peft's own keys: a loader rebuilds Q from the original base with them (peft and peftcli alike)."""
        config["init_lora_weights"] = "loftq"
        config["loftq_config"] = {"loftq_bits": cfg.loftq_bits, "loftq_iter": cfg.loftq_iter}


class Orthogonal(LoraVariant):
    """Orthogonal init (peft's ``init_lora_weights="orthogonal"``, from D. Datta's "Rethinking LoRA
    initialisation"): with ``Q`` the orthogonal factor of an r×r Gaussian, its odd rows ``Q_o`` and even
    rows ``Q_e`` (each (r/2, r), with ``Q_e Q_oᵀ = 0``), ``A = (X Q_o)ᵀ / 10`` and ``B = Yᵀ Q_e / 10`` for
    Gaussian ``X`` (in, r/2) and ``Y`` (r/2, out). Then ``B A = Yᵀ Q_e Q_oᵀ Xᵀ / 100 = 0``: step 0 equals the
    base, as with B = 0, but neither factor is zero, so both get a gradient at the first step. Drawn in
    peft's order from torch's generator, so one seed gives peft's tensors. Needs an even rank."""

    enabled_by = ("init", "orthogonal")
    title = "orthogonal init"
    help = "orthogonal (A and B random, B·A = 0; even r)"
    replaces_init = True
    for_parameters = False

    @classmethod
    def validate(cls, cfg: LoraConfig) -> None:
        odd = sorted(r for r in {cfg.r, *cfg.rank_pattern.values()} if r % 2)
        if odd:
            raise RecipeError(
                "method.r",
                f"init: orthogonal splits the rank in two halves; r={odd[0]} is odd",
                "use an even r",
            )

    def init(self, layer: LoRALinear) -> None:
        r = layer.r
        q, _ = torch.linalg.qr(torch.randn(r, r))
        odd_rows, even_rows = q[0::2], q[1::2]  # (r/2, r) each, orthogonal to each other
        a = (torch.randn(layer.in_features, r // 2) @ odd_rows).T / 10.0  # (r, in)
        b = torch.randn(r // 2, layer.out_features).T @ even_rows / 10.0  # (out, r)
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)


# Every variant, in the order a layer runs them: an init that rewrites A, B and W0 first, then DoRA,
# which measures ‖W0 + s·B A‖ on what the init left.
VARIANTS: tuple[type[LoraVariant], ...] = (Pissa, Olora, Corda, LoraGa, Eva, Loftq, Orthogonal, Dora)
INITS = {v.enabled_by[1]: v for v in VARIANTS if v.enabled_by[0] == "init"}


# LoftQ's quantized base, written beside the adapter (LoRA.adapter_files)
LOFTQ_BASE_FILE = "loftq_base.safetensors"

# The ``init`` option's choices: the two plain draws, then every init variant (a new one adds itself).
INIT_CHOICES = ("kaiming", "gaussian", *INITS)
_INIT_HELPS = ["kaiming (A uniform, B = 0; peft's default)", "gaussian (A ~ N(0, 1/r²))"]
_INIT_HELPS += [v.help for v in INITS.values()]
INIT_HELP = ", ".join(_INIT_HELPS[:-1]) + ", or " + _INIT_HELPS[-1]


@dataclass
class LoraConfig(MethodConfig):
    r: int = field(default=8, metadata=doc("rank of the update B·A (typical 8–64)", min=1))
    alpha: float = field(
        default=16.0, metadata=doc("scale numerator: the update is multiplied by alpha/r", min_exclusive=0.0)
    )
    dropout: float = field(default=0.0, metadata=doc("dropout on the LoRA input path", min=0.0, max=0.99))
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata=doc(
            "module names (list), a regex on full names, or all-linear (every linear layer but the head)"
        ),
    )
    target_parameters: list[str] | None = field(
        default=None,
        metadata=doc(
            "parameters adapted directly (peft's target_parameters), e.g. [mlp.experts.gate_up_proj, "
            "mlp.experts.down_proj]: the 3-D expert stacks of MoE models; set target_modules: [] for "
            "only these"
        ),
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=doc(
            "modules trained in full and saved whole (e.g. [embed_tokens]); seq_cls heads are added"
        ),
    )
    use_rslora: bool = field(
        default=False, metadata=doc("rank-stabilised scale alpha/sqrt(r) instead of alpha/r")
    )
    use_dora: bool = field(
        default=False,
        metadata=doc("DoRA: learn a per-output magnitude and adapt the direction (≈ +out params/layer)"),
    )
    lora_plus_ratio: float | None = field(
        default=None,
        metadata=doc(
            "LoRA+: lr of B (and 1-D params) = ratio × train.lr; the paper suggests 16", min_exclusive=0.0
        ),
    )
    init: Literal[INIT_CHOICES] = field(default="kaiming", metadata=doc(INIT_HELP))
    corda_method: Literal["ipm", "kpm"] = field(
        default="ipm",
        metadata=doc(
            "init: corda: ipm starts the adapter on the directions the data excites most (faster "
            "fine-tuning), kpm on the least (keeps more of the base's knowledge)"
        ),
    )
    init_examples: int = field(
        default=256,
        metadata=doc(
            "init: corda, lora_ga, eva: training examples read to initialise (in training's batches; ~256)",
            min=1,
        ),
    )
    eva_rho: float = field(
        default=2.0,
        metadata=doc(
            "init: eva: a layer may end with up to rho × its r ranks (1: no redistribution)", min=1.0
        ),
    )
    eva_tau: float = field(
        default=0.99,
        metadata=doc(
            "init: eva: a component has settled when its cosine to the last update ≥ tau", min=0.0, max=1.0
        ),
    )
    pissa_niter: int | None = field(
        default=None,
        metadata=doc(
            "init: pissa with a fast randomized SVD of this many subspace iterations (peft's "
            "pissa_niter_N, e.g. 4); unset: the exact SVD",
            min=0,
        ),
    )
    loftq_bits: int = field(
        default=4,
        metadata=doc(
            "init: loftq: bits of the base's quantization (4: NF4; peft's 8-bit int8 is not supported)"
        ),
    )
    loftq_iter: int = field(
        default=1,
        metadata=doc(
            "init: loftq: alternations of quantizing W − B·A and the SVD of W − Q (the paper uses up to 5)",
            min=1,
        ),
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata=doc("per-module r: {regex or name suffix: r}, e.g. {down_proj: 16}", min=1),
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict,
        metadata=doc("per-module alpha: {regex or name suffix: alpha}", min_exclusive=0.0),
    )
    bias: Literal["none", "all", "lora_only"] = field(
        default="none", metadata=doc("also train biases: none, all, or lora_only (those of adapted layers)")
    )
    lora_bias: bool = field(
        default=False,
        metadata=doc(
            "a trainable bias on B (peft's lora_bias), scaled with the update; for adapters extracted from "
            "full fine-tunes; merges only into layers that have a bias"
        ),
    )
    exclude_modules: str | list[str] | None = field(
        default=None,
        metadata=doc("modules never adapted: names (list; full or a suffix such as o_proj) or a regex"),
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
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None,
        metadata=doc(
            "train only these rows of the input embedding (a list of token ids), or of named modules "
            "({embed_tokens: [ids], lm_head: [ids]}); e.g. new chat-template tokens",
        ),
    )
    layer_replication: list[list[int]] | None = field(
        default=None,
        metadata=doc(
            "rebuild the blocks from [start, end) ranges of the original ones, copies sharing base weights "
            "with their own LoRA, e.g. [[0, 2], [1, 2]] (not mergeable)",
        ),
    )
    ensure_weight_tying: bool = field(
        default=False,
        metadata=doc(
            "keep a tied LM head tied to the embedding when one of them is in modules_to_save: both read "
            "one trained copy (trainable_token_indices rows are shared anyway; with this set, unequal rows "
            "on tied modules are an error)"
        ),
    )


def variants_for(options: Any) -> tuple[LoraVariant, ...]:
    """The variants ``options`` (a LoraConfig, or anything with its fields) enables, in run order."""
    return tuple(v(options) for v in VARIANTS if v.enabled(options))


def lora_variants(init: str, use_dora: bool) -> tuple[LoraVariant, ...]:
    """The variants of a layer built from the two switches directly (tests and older callers)."""
    return variants_for(SimpleNamespace(init=init, use_dora=use_dora))


class LoRALinear(AdapterLayer):
    """``base_layer(x) + scaling · lora_B(lora_A(dropout(x)))`` around a frozen linear-like layer, changed
    by its :class:`LoraVariant` s (DoRA, PiSSA, OLoRA), composed in :data:`VARIANTS` order."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        use_dora: bool = False,
        init: str = "kaiming",
        variants: tuple[LoraVariant, ...] | None = None,
        lora_bias: bool = False,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False)
        # lora_bias: B's bias is scaled with the update, s·(B A x + b), and folds into the base bias
        self.lora_B = nn.Linear(r, self.out_features, bias=lora_bias)
        weight = base_layer.weight
        dtype = torch.float32 if not weight.is_floating_point() else weight.dtype
        self.lora_A.to(device=weight.device, dtype=dtype)
        self.lora_B.to(device=weight.device, dtype=dtype)
        self.init = init
        self.variants = lora_variants(init, use_dora) if variants is None else variants
        self.merge_cache: dict[str, torch.Tensor] = {}
        for variant in self.variants:
            variant.create(self)

    def resize(self, r: int, alpha: float, use_rslora: bool) -> None:
        """A new rank (EVA's redistribution): fresh factors at the same place, B = 0."""
        weight = self.lora_A.weight
        self.r = r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(self.lora_B.weight)

    @property
    def use_dora(self) -> bool:
        return any(isinstance(v, Dora) for v in self.variants)

    def reset_parameters(self, init: str | None = None) -> None:
        if not any(v.replaces_init for v in self.variants):
            if (init or self.init) == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
            else:  # kaiming-uniform, as nn.Linear and peft's default
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)  # B = 0: step 0 equals the base
        if self.lora_B.bias is not None:
            nn.init.zeros_(self.lora_B.bias)
        for variant in self.variants:
            variant.init(self)

    def dense_weight(self) -> torch.Tensor:
        """The frozen base weight as an fp32 (out, in) matrix (dequantized for 4-bit layers)."""
        weight = self.base_layer.weight
        if type(self.base_layer).__name__ == "Linear4bit":
            from peftcli.quantize import import_bitsandbytes

            bnb = import_bitsandbytes()
            weight = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        weight = weight.detach().float()
        return weight.T if self.fan_in_fan_out else weight

    def weight_norm(self) -> torch.Tensor:
        """‖W0 + s·B A‖_c, the L2 norm of each output row, detached (DoRA §4.3): shape (out,)."""
        lora_weight = (self.lora_B.weight @ self.lora_A.weight).detach().float()
        return torch.linalg.norm(self.dense_weight() + self.scaling * lora_weight, dim=1)

    def delta_weight(self) -> torch.Tensor:
        """(α/r)·B·A in the layout of ``base_layer.weight`` (transposed for Conv1D)."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def merged_weight(self) -> torch.Tensor:
        """The fp32 weight that replaces ``base_layer.weight`` on merge, in its layout."""
        delta = (self.lora_B.weight @ self.lora_A.weight).detach().float() * self.scaling  # (out, in)
        weight = self.dense_weight() + delta
        for variant in self.variants:
            weight = variant.merged_weight(self, weight)
        return weight.T if self.fan_in_fan_out else weight

    def _check_foldable(self) -> None:
        base = self.base_layer
        if not base.weight.is_floating_point() or type(base).__name__ in ("Linear4bit", "Linear8bitLt"):
            raise RecipeError(
                "merge",
                "cannot fold LoRA into a quantized layer in place",
                "merge reloads the base in full precision; use `peftcli merge`",
            )

    def merge(self) -> None:
        self._check_foldable()
        self._fold_bias(+1)
        write_weight(self.base_layer.weight, self.merged_weight())

    def unmerge(self) -> None:
        weight = self.dense_weight()
        for variant in reversed(self.variants):
            weight = variant.unmerged_weight(self, weight)
        weight = weight - (self.lora_B.weight @ self.lora_A.weight).detach().float() * self.scaling
        write_weight(self.base_layer.weight, weight.T if self.fan_in_fan_out else weight)
        self._fold_bias(-1)

    def _fold_bias(self, sign: int) -> None:
        """lora_bias: add (or take back) ``s · b_B`` to the base bias, which must exist (peft: the same)."""
        if self.lora_B.bias is None:
            return
        base_bias = getattr(self.base_layer, "bias", None)
        if base_bias is None:
            raise RecipeError(
                "merge",
                f"lora_bias: a {type(self.base_layer).__name__} without a bias has nowhere to fold B's bias",
                "adapt only layers with biases, or use the adapter unmerged (peftcli eval)",
            )
        write_weight(base_bias, base_bias.float() + sign * self.scaling * self.lora_B.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.merged:
            return result
        result_dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        dropped = self.lora_dropout(x)
        update = self.lora_B(self.lora_A(dropped)) * self.scaling  # (B, T, out)
        for variant in self.variants:
            update = variant.forward(self, dropped, result, update)
        return (result + update).to(result_dtype)


class LoRAParameter(Foldable, nn.Module):
    """LoRA on one parameter of a module, as peft's ``ParamWrapper``: ``W' = W + s · B_e A_e`` for every
    expert ``e`` of a 3-D stack (MoE experts in transformers 5, laid out (experts, out, in)), or for the
    one matrix of a 2-D weight. The module runs with ``W'`` in place of ``W`` (``torch.func.functional_call``),
    so any forward that reads the parameter (grouped matmuls, per-expert loops) sees the update.

    Stored as peft stores it: ``lora_A`` [r·E, in] (expert ``e``'s A is rows ``e·r … e·r + r − 1``) and
    ``lora_B`` [out, r·E] (expert ``e``'s B is columns ``e, e + E, …``). Two parameters of one module nest
    (the wrapper of the first-registered one innermost), so their keys are peft's:
    ``<module>.base_layer.lora_A.weight`` and ``<module>.lora_A.weight``.
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str, r: int, alpha: float, use_rslora: bool):
        super().__init__()
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        self.r = r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        weight = self.parameter()
        # a module that sets is_transposed stores its stack as (experts, in, out), as peft reads it
        self.transposed = weight.ndim == 3 and bool(getattr(self.innermost(), "is_transposed", False))
        if weight.ndim == 3:
            self.num_experts, out_features, in_features = weight.shape
            if self.transposed:
                in_features, out_features = out_features, in_features
        else:
            self.num_experts, (out_features, in_features) = 1, weight.shape
        self.in_features, self.out_features = in_features, out_features
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.lora_A = nn.Linear(
            in_features, r * self.num_experts, bias=False, device=weight.device, dtype=dtype
        )
        self.lora_B = nn.Linear(
            r * self.num_experts, out_features, bias=False, device=weight.device, dtype=dtype
        )
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default init
        nn.init.zeros_(self.lora_B.weight)  # B = 0: step 0 equals the base

    def innermost(self) -> nn.Module:
        """The module that holds the parameter (under any other parameter's wrapper)."""
        module = self.base_layer
        while isinstance(module, LoRAParameter):
            module = module.base_layer
        return module

    def parameter(self) -> torch.Tensor:
        return getattr(self.innermost(), self.parameter_name)

    def parameter_path(self) -> str:
        """The parameter's dotted name relative to ``base_layer`` (through nested wrappers)."""
        path, module = self.parameter_name, self.base_layer
        while isinstance(module, LoRAParameter):
            path, module = f"base_layer.{path}", module.base_layer
        return path

    def delta_weight(self) -> torch.Tensor:
        """``s · B_e A_e`` for every expert, in the parameter's own layout and shape."""
        experts, r = self.num_experts, self.r
        a = self.lora_A.weight.view(experts, r, self.in_features)  # (E, r, in)
        b = self.lora_B.weight.view(self.out_features, r, experts).permute(2, 0, 1)  # (E, out, r)
        delta = (b @ a) * self.scaling  # (E, out, in)
        if self.transposed:
            delta = delta.transpose(1, 2)  # (E, in, out)
        return delta if self.parameter().ndim == 3 else delta[0]

    def merge(self) -> None:
        weight = self.parameter()
        write_weight(weight, weight.float() + self.delta_weight().detach().float())

    def unmerge(self) -> None:
        weight = self.parameter()
        write_weight(weight, weight.float() - self.delta_weight().detach().float())

    def forward(self, *args, **kwargs):
        if self.merged:
            return self.base_layer(*args, **kwargs)
        weight = self.parameter()
        updated = weight + self.delta_weight().to(weight.dtype)
        return torch.func.functional_call(self.base_layer, {self.parameter_path(): updated}, args, kwargs)


@register
class LoRA(LayerMethod):
    name = "lora"
    description = "LoRA: trainable low-rank updates B·A beside frozen linear layers (arXiv 2106.09685)"
    config_cls = LoraConfig
    mergeable = True
    peft_type = "LORA"
    supports_quantized_base = True
    supports_fsdp = True  # its modules hold plain parameters, which FSDP2 shards like the base
    trainable_formula = (
        "sum over adapted layers of r·(in + out) (+ out with DoRA), plus modules_to_save and trained biases"
    )

    parameter_prefix = "lora_"
    layer_types = (LoRALinear, LoRAParameter, TrainableTokens)
    adapter_renames: ClassVar[dict[str, str]] = {
        "alpha": "lora_alpha",
        "dropout": "lora_dropout",
        "init": "init_lora_weights",
    }
    # lora_plus_ratio: a training option; pissa_niter, corda_method, init_examples, eva_*: how the init was made,
    # and the export is a plain LoRA. peft's LoraConfig has no key for them (corda's is in corda_config).
    # loftq_bits / loftq_iter go into peft's loftq_config (Loftq.export_config)
    adapter_omits = (
        "lora_plus_ratio",
        "pissa_niter",
        "corda_method",
        "init_examples",
        "eva_rho",
        "eva_tau",
        "loftq_bits",
        "loftq_iter",
    )

    cfg: LoraConfig

    def __init__(self, cfg: LoraConfig, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.parameter_targets: list[tuple[str, str]] = []
        self.tied_modules: list[str] = []  # ensure_weight_tying: modules reading the trained embedding

    @classmethod
    def validate_config(cls, cfg: LoraConfig, recipe) -> None:
        if cfg.target_parameters is not None:
            cls._validate_target_parameters(cfg, recipe)
        elif cfg.target_modules == []:
            raise RecipeError(
                "method.target_modules",
                "is empty and no target_parameters are set, so nothing would train",
                "name modules, use all-linear, or set method.target_parameters",
            )
        validate_patterns(cfg)
        cls._validate_options(cfg)
        surgery = [
            k
            for k in ("layer_replication", "trainable_token_indices", "ensure_weight_tying")
            if getattr(cfg, k)
        ]
        if surgery and recipe.train.distributed == "fsdp":
            raise RecipeError(
                "train.distributed",
                f"method.{surgery[0]} shares or wraps base tensors, which is not tested with FSDP",
                f"use train.distributed: ddp, or drop method.{surgery[0]}",
            )
        if cfg.init != "loftq" and (cfg.loftq_bits, cfg.loftq_iter) != (4, 1):
            raise RecipeError(
                "method.loftq_iter" if cfg.loftq_iter != 1 else "method.loftq_bits",
                f"sets LoftQ's quantization, but init is {cfg.init}",
                "set init: loftq or drop it",
            )
        if cfg.pissa_niter is not None and cfg.init != "pissa":
            raise RecipeError(
                "method.pissa_niter",
                f"sets PiSSA's SVD, but init is {cfg.init}",
                "set init: pissa or drop it",
            )
        for variant in variants_for(cfg):
            variant.validate(cfg)
            if variant.needs_data and recipe.model.task == "seq2seq":
                raise RecipeError(
                    "method.init",
                    f"{variant.title} reads the layers' inputs on training data; seq2seq is not supported yet",
                    "use init: pissa or kaiming for seq2seq",
                )
            if not variant.for_quantized_base and recipe.model.quantization is not None:
                key = variant.enabled_by[0]
                raise RecipeError(
                    f"method.{key}",
                    f"{variant.title} {variant.quantized_why}; the base is quantized",
                    variant.quantized_hint
                    or f"drop method.{key} with model.quantization, or drop model.quantization",
                )

    @staticmethod
    def _validate_options(cfg: LoraConfig) -> None:
        """The structural options' own rules (peft's ``LoraConfig.__post_init__`` has the same ones)."""
        if cfg.lora_bias and (cfg.init != "kaiming" or cfg.use_dora):
            key = "method.use_dora" if cfg.use_dora else "method.init"
            raise RecipeError(
                key,
                "lora_bias works with the plain kaiming init and without DoRA only (peft refuses the rest)",
                f"drop {key} or method.lora_bias",
            )
        regex = isinstance(cfg.target_modules, str) and cfg.target_modules != "all-linear"
        for key in ("layers_to_transform", "layers_pattern"):
            if getattr(cfg, key) is not None and regex:
                raise RecipeError(
                    f"method.{key}",
                    "cannot narrow a regex target_modules (peft refuses it too)",
                    "select the blocks in the regex itself, or list module names in target_modules",
                )
        if cfg.layers_pattern is not None and cfg.layers_to_transform is None:
            raise RecipeError(
                "method.layers_pattern",
                "only applies with layers_to_transform",
                "set method.layers_to_transform",
            )
        patterns = [cfg.exclude_modules] if isinstance(cfg.exclude_modules, str) else []
        patterns += (
            [cfg.layers_pattern] if isinstance(cfg.layers_pattern, str) else list(cfg.layers_pattern or [])
        )
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                which = "exclude_modules" if pattern == cfg.exclude_modules else "layers_pattern"
                raise RecipeError(
                    f"method.{which}",
                    f"{pattern!r} is not a valid regular expression ({err})",
                    "fix the pattern",
                ) from None

    @staticmethod
    def _validate_target_parameters(cfg: LoraConfig, recipe) -> None:
        """peft's ``ParamWrapper`` limits: the update is folded into the parameter before the module runs,
        so there is no input to drop out and no per-layer output for DoRA to rescale."""
        if not cfg.target_parameters or any(not isinstance(t, str) or not t for t in cfg.target_parameters):
            raise RecipeError(
                "method.target_parameters",
                "must be a non-empty list of parameter names",
                "e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj], or remove the key",
            )
        if recipe.train.distributed == "fsdp":
            raise RecipeError(
                "train.distributed",
                "LoRA on parameters (method.target_parameters) is not tested with FSDP",
                "use train.distributed: ddp, or adapt linear layers only",
            )
        refused = [
            (v.enabled_by[0], True, f"{v.title} is for linear layers (peft refuses it too)")
            for v in variants_for(cfg)
            if not v.for_parameters
        ]
        for key, bad, why in [
            ("dropout", cfg.dropout > 0, "dropout cannot act on an update folded into the weight"),
            ("lora_bias", cfg.lora_bias, "a bias on B has no layer output to add to (peft refuses it too)"),
            *refused,
        ]:
            if bad:
                raise RecipeError(
                    f"method.{key}",
                    f"{why}, and method.target_parameters is set",
                    f"drop method.{key} or method.target_parameters",
                )

    # -- building ------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        if self.cfg.layer_replication:  # before matching: each copy gets its own adapter
            replicate_layers(model, self.cfg.layer_replication)
        model = super().apply(model)  # targets, layers, parameters, modules_to_save
        self._enable_biases(model)
        if self.cfg.trainable_token_indices is not None:
            self._add_trainable_tokens(model)
        return model

    def train_whole(self, model: nn.Module) -> list[str]:
        """``modules_to_save`` and a seq_cls head; with ``ensure_weight_tying`` a tied embedding / LM head
        pair is trained as one copy that both read (peft's ``modules_to_tie``)."""
        names, tied = list(self.cfg.modules_to_save), []
        if self.cfg.ensure_weight_tying and names:
            names, tied = modules_to_tie(model, names)
        names += [h for h in classifier_heads(model, self.task) if h not in names]
        saved = make_trainable_copies(model, names)
        if tied:
            tie_to(model, input_embedding_name(model), tied)
        self.tied_modules = tied
        return saved

    def _add_trainable_tokens(self, model: nn.Module) -> None:
        cfg = self.cfg
        owners = add_trainable_tokens(model, cfg.trainable_token_indices, cfg.ensure_weight_tying)
        clash = [m for m in self.saved_modules if any(o == m or o.startswith(m + ".") for o in owners)]
        if clash:
            raise RecipeError(
                "method.trainable_token_indices",
                f"{clash[0]} is also in modules_to_save, which trains it whole",
                "keep it in one of the two",
            )

    def resolve_targets(self, model: nn.Module) -> list[str]:
        """The linear layers to wrap; the parameters (``target_parameters``) go to
        :attr:`parameter_targets`, wrapped after the layers."""
        cfg = self.cfg
        only_parameters = cfg.target_modules == [] and bool(cfg.target_parameters)
        targets = [] if only_parameters else match_targets(model, cfg.target_modules)
        targets = select_targets(model, targets, cfg)  # exclude_modules, layers_to_transform
        # (module, parameter) pairs; every pair is also addressed by "<module>.<parameter>" below
        self.parameter_targets = match_parameters(model, cfg.target_parameters or [])
        clash = set(targets) & {m for m, _ in self.parameter_targets}
        if clash:
            raise RecipeError(
                "method.target_parameters",
                f"{sorted(clash)[0]} is adapted through target_modules and target_parameters at once",
                "drop it from one of the two",
            )
        adapted = targets + [f"{m}.{p}" for m, p in self.parameter_targets]
        check_patterns_match(cfg, adapted)
        return targets

    def create_layer(self, name: str, base: nn.Module) -> LoRALinear:
        cfg = self.cfg
        r, alpha = self.rank_and_alpha(name)
        layer = LoRALinear(
            base,
            r,
            alpha,
            cfg.dropout,
            cfg.use_rslora,
            init=cfg.init,
            variants=variants_for(cfg),
            lora_bias=cfg.lora_bias,
        )
        layer.reset_parameters()
        return layer

    def wrap(self, model: nn.Module) -> None:
        super().wrap(model)
        for module_name, parameter_name in self.parameter_targets:  # a second one on a module nests
            r, alpha = self.rank_and_alpha(f"{module_name}.{parameter_name}")
            wrapped = LoRAParameter(
                model.get_submodule(module_name), parameter_name, r, alpha, self.cfg.use_rslora
            )
            set_module(model, module_name, wrapped)

    def data_init_examples(self) -> int:
        return self.cfg.init_examples if any(v.needs_data for v in variants_for(self.cfg)) else 0

    def init_from_data(self, model: nn.Module, batches) -> None:
        """Read the examples for the layers' data-driven init (one init per model: its ``observes``
        says which pass), then let each layer's init finish."""
        layers = [layer for _, layer in self.lora_layers(model) if any(v.needs_data for v in layer.variants)]
        if not layers:
            return
        observes = data_variants(layers[0])[0].observes
        was_training = model.training
        try:
            if observes == "eva":
                self._eva_init(model, batches)
                return
            (input_pass if observes == "inputs" else gradient_pass)(model, layers, batches)
        finally:
            model.train(was_training)
        for layer in layers:
            for variant in data_variants(layer):
                variant.finish(layer)

    def _eva_init(self, model: nn.Module, batches) -> None:
        """EVA: each layer's kept components become its A at their count as its rank (0: the layer is
        unwrapped, as peft removes it); α scales with the rank, and the new ranks, alphas and targets go
        into the config, so the adapter saves and loads as a plain LoRA with a rank_pattern."""
        cfg = self.cfg
        layers = dict(self.lora_layers(model))
        model.eval()
        with torch.no_grad():
            found = eva_components(
                model,
                layers,
                {n: layer.r for n, layer in layers.items()},
                all_batches(batches),
                cfg.eva_rho,
                cfg.eva_tau,
            )
        rank_pattern, alpha_pattern, kept = {}, {}, []
        for name, layer in layers.items():
            components, (r, alpha) = found[name], self.rank_and_alpha(name)
            rank = components.shape[0]
            if rank == 0:
                set_module(model, name, layer.base_layer)
                continue
            if rank != r:
                alpha = alpha * rank / r  # s = α/r stays (peft's adjust_scaling_factors)
                layer.resize(rank, alpha, cfg.use_rslora)
            with torch.no_grad():
                layer.lora_A.weight.copy_(components)
            kept.append(name)
            if rank != cfg.r:
                rank_pattern[name] = rank
            if alpha != cfg.alpha:
                alpha_pattern[name] = alpha
        self.targets = [t for t in self.targets if t in kept]
        targets = cfg.target_modules if len(kept) == len(layers) else kept
        self.cfg = replace(
            cfg, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, target_modules=targets
        )

    def _enable_biases(self, model: nn.Module) -> None:
        if self.cfg.bias == "none":
            return
        for _name, module in model.named_modules():
            if self.cfg.bias == "lora_only" and not isinstance(module, LoRALinear):
                continue
            owner = module.base_layer if isinstance(module, LoRALinear) else module
            bias = getattr(owner, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
        if not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("bias")):
            raise RecipeError(
                "method.bias",
                f"bias: {self.cfg.bias} but the adapted modules have no biases",
                "set method.bias: none",
            )

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        """r and α of module ``name``: the first pattern key (sorted) that matches it, else the defaults."""
        cfg = self.cfg
        r_key = pattern_key(cfg.rank_pattern, name)
        a_key = pattern_key(cfg.alpha_pattern, name)
        return (cfg.rank_pattern[r_key] if r_key else cfg.r), (
            cfg.alpha_pattern[a_key] if a_key else cfg.alpha
        )

    def lora_layers(self, model: nn.Module) -> list[tuple[str, LoRALinear]]:
        return [(n, m) for n, m in self.layers(model) if isinstance(m, LoRALinear)]

    def parameter_layers(self, model: nn.Module) -> list[tuple[str, LoRAParameter]]:
        return [(n, m) for n, m in self.layers(model) if isinstance(m, LoRAParameter)]

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """LoRA+: ``B`` and 1-D tensors (DoRA magnitudes, biases) at ratio × lr, as peft groups them."""
        ratio = self.cfg.lora_plus_ratio
        if ratio is None:
            return super().param_groups(model, lr, weight_decay)
        fast, slow = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (fast if ".lora_B." in name or param.ndim == 1 else slow).append(param)
        return [
            {"params": slow, "lr": lr, "weight_decay": weight_decay},
            {"params": fast, "lr": lr * ratio, "weight_decay": weight_decay},
        ]

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = sum(
            m.r * (m.in_features + m.out_features)
            + sum(v.parameter_count(m) for v in m.variants)
            + (m.out_features if self.cfg.lora_bias else 0)
            for _, m in self.lora_layers(model)
        )
        count += sum(p.numel() for p in self._token_rows(model).values())
        count += sum(
            m.r * m.num_experts * (m.in_features + m.out_features) for _, m in self.parameter_layers(model)
        )
        return count + self.saved_modules_count(model) + sum(p.numel() for n, p in self._bias_params(model))

    def _bias_params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        saved = tuple(f"{m}." for m in self.saved_modules)
        return [
            (n, p)
            for n, p in model.named_parameters()
            if p.requires_grad and n.endswith("bias") and "lora_" not in n and not n.startswith(saved)
        ]

    # -- saving --------------------------------------------------------------------------
    def live_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A, B (and DoRA's ``lora_magnitude_vector``, peft's name, no ".weight"), the trained biases and
        the modules trained whole, keyed as on disk."""
        state = super().live_state_dict(model)
        state.update({PREFIX + n: p for n, p in self._bias_params(model)})
        state.update({PREFIX + n: p for n, p in self._token_rows(model).items()})
        state.update(tied_state(model, self.tied_modules, PREFIX))  # peft writes the tied head's too
        return state

    @staticmethod
    def _token_rows(model: nn.Module) -> dict[str, nn.Parameter]:
        """trainable_token_indices' rows, by peft's key (``<module>.token_adapter.trainable_tokens_delta``)."""
        return {
            n: p for n, p in model.named_parameters() if n.endswith(".token_adapter.trainable_tokens_delta")
        }

    def summary_lines(self) -> list[str]:
        if self.cfg.init != "loftq":
            return []
        return [
            f"LoftQ: the adapted layers' weights are now their 4-bit NF4 quantization ({self.cfg.loftq_iter} "
            f"iteration(s)); the base this adapter pairs with is written to adapter/{LOFTQ_BASE_FILE}"
        ]

    def adapter_files(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """LoftQ: the base it pairs with, each adapted layer's quantized weight under the base's own key."""
        if self.cfg.init != "loftq":
            return {}
        from peftcli.methods.lora_loftq import loftq_base_state

        return {
            LOFTQ_BASE_FILE: loftq_base_state({n: m.base_layer.weight for n, m in self.lora_layers(model)})
        }

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The export, each layer's A and B rewritten by its variants into what peft loads (PiSSA: a plain
        LoRA on the original W0, so ``base_model_name_or_path`` stays the original model)."""
        state = super().adapter_state_dict(model)
        for name, layer in self.lora_layers(model):
            for variant in layer.variants:
                variant.export_state(
                    layer, f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight", state
                )
        return state

    def as_saved(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A rank-r file for a layer whose init rewrote W0 (peft's unconverted PiSSA / OLoRA save, whose
        residual the init rebuilt from the base, as peft's loader does) in our export's rank-2r form."""
        state = dict(state)
        for name, layer in self.lora_layers(model):
            a_key, b_key = f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"
            if a_key in state and state[a_key].shape[0] == layer.r:
                for variant in layer.variants:
                    variant.export_state(layer, a_key, b_key, state)
        return state

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        for name, layer in self.lora_layers(model):
            for variant in layer.variants:
                variant.import_state(
                    layer, f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight", state
                )
        super().load_adapter_state_dict(model, state)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        cfg = self.cfg
        config = {
            **super().adapter_config(model),
            "target_parameters": list(cfg.target_parameters) if cfg.target_parameters else None,
            # an init that rewrites W0 is exported as a plain LoRA on W0: peft must not redo it on load
            "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
            "fan_in_fan_out": self.fan_in_fan_out(model),
        }
        for variant in variants_for(cfg):  # PiSSA, OLoRA: a rank-2r LoRA with the same scale s
            variant.export_config(cfg, config)
        return config

    def merge(self, model: nn.Module) -> nn.Module:
        if self.cfg.layer_replication:
            raise RecipeError(
                "merge",
                "layer_replication's copies share one base weight each, so no weight can take a copy's update",
                "use the adapter unmerged (peftcli eval, peftcli.load); peft refuses this merge too",
            )
        bare = [n for n, m in self.lora_layers(model) if m.lora_B.bias is not None and m.bias is None]
        if bare:  # checked before any layer folds, so a refused merge leaves the model as it was
            raise RecipeError(
                "merge",
                f"lora_bias: {bare[0]} has no bias to fold B's bias into",
                "adapt only layers with biases, or use the adapter unmerged (peftcli eval); peft refuses too",
            )
        return super().merge(model)

    @classmethod
    def config_from_adapter(cls, adapter_config: dict[str, Any]) -> LoraConfig:
        config = dict(adapter_config)
        init = config.get("init_lora_weights", True)
        # peft's own PiSSA / OLoRA save (init "pissa", "pissa_niter_4", "olora"): W_res is recomputed from
        # the base, as peft does; any other non-gaussian init is a plain LoRA
        config["init_lora_weights"] = next(
            (name for name in ("gaussian", *INITS) if isinstance(init, str) and init.startswith(name)),
            "kaiming",
        )
        if config.get("target_parameters") and not config.get("target_modules"):
            config["target_modules"] = []  # peft's way of adapting the parameters alone
        elif not config.get("target_modules"):
            config["target_modules"] = None  # the default, all-linear
        config.setdefault("lora_alpha", 8)  # peft's default, where the file omits it
        cfg = super().config_from_adapter(config)
        if isinstance(init, str) and init.startswith("pissa_niter_"):  # not a peft key: read from the init
            cfg = replace(cfg, pissa_niter=int(init.removeprefix("pissa_niter_")))
        if cfg.init == "loftq":  # peft's loftq_config; Q is rebuilt from the base as peft's loader does
            loftq = config.get("loftq_config") or {}
            cfg = replace(cfg, loftq_bits=loftq.get("loftq_bits", 4), loftq_iter=loftq.get("loftq_iter", 1))
            Loftq.validate(cfg)  # 8 bits: refused here, in one line
        return cfg


def data_variants(layer: LoRALinear) -> list[LoraVariant]:
    return [v for v in layer.variants if v.needs_data]


def input_pass(model: nn.Module, layers: list[LoRALinear], batches) -> None:
    """Forward the examples (eval mode; adapters still at B = 0, so every layer sees the base model's inputs)
    and hand each layer the inputs of every example, its real positions only (as peft's
    one-example-at-a-time calibration)."""
    current: dict[str, torch.Tensor] = {}

    def observe(layer: LoRALinear, args: tuple, _output) -> None:
        inputs = args[0].detach()  # (B, T, in)
        for row, real in zip(inputs, current["mask"].bool(), strict=True):
            for variant in data_variants(layer):
                variant.observe(layer, row[real])

    handles = [layer.register_forward_hook(observe) for layer in layers]
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch["attention_mask"]
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()


def gradient_pass(model: nn.Module, layers: list[LoRALinear], batches) -> None:
    """Forward and backward the examples' loss (train mode, as peft's ``preprocess_loraga``) with only the
    adapted layers' W0 requiring a gradient; hand each layer its gradient averaged over the batches."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    weights = [layer.base_layer.weight for layer in layers]
    for weight in weights:
        weight.requires_grad_(True)
    model.train()
    count = 0
    try:
        with torch.enable_grad():
            for batch in batches:
                keys = ("input_ids", "attention_mask", "labels")
                model(**{k: batch[k] for k in keys if k in batch}).loss.backward()
                count += 1
        for layer, weight in zip(layers, weights, strict=True):
            gradient = weight.grad.detach().float() / count
            for variant in data_variants(layer):
                variant.observe(layer, gradient.T if layer.fan_in_fan_out else gradient)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None


__all__ = [
    "VARIANTS",
    "Dora",
    "LoRA",
    "LoRALinear",
    "LoRAParameter",
    "LoraConfig",
    "LoraVariant",
    "Olora",
    "Pissa",
    "ResidualInit",
    "is_linear",
    "variants_for",
]
