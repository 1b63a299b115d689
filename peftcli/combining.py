r"""Adapter arithmetic: LoRA adapters of one base model combined into one (``peftcli combine``).

At every adapted module, adapter ``i`` holds the update ``ΔW_i = s_i · B_i A_i`` (``s_i = α_i / r_i``,
or ``α_i / √r_i`` with rsLoRA), and the user gives it a weight ``w_i``. The result is a plain LoRA
adapter in peft's format whose ``lora_alpha`` equals its ``r`` (scale 1), so the file holds exactly what
a mode computes. Every mode equals peft's ``PeftModel.add_weighted_adapter`` for the same inputs
(tests/test_combine.py); the ``--how`` choices are its ``combination_type`` names:

- ``cat``: ``A = [w_1 s_1 A_1; w_2 s_2 A_2; …]``, ``B = [B_1 | B_2 | …]``, so ``B A = Σ w_i ΔW_i``
  exactly, at rank ``Σ r_i``.
- ``svd``: the top-``k`` singular part of ``Σ w_i ΔW_i`` (``k``: ``--rank``, else the largest input
  rank), ``B = U_k S_k``, ``A = V_kᵀ``: the best rank-``k`` approximation (Eckart–Young).
- ``linear``: ``A = Σ a_i A_i`` and ``B = Σ b_i B_i`` with ``a_i = sign(w_i s_i) √|w_i s_i|`` and
  ``b_i = √|w_i s_i|`` (peft's split of the weight over the two factors). Same rank and cheap, but
  ``B A`` then also holds the cross terms ``b_i a_j B_i A_j`` (i ≠ j): an approximation.
- ``ties`` (TIES-merging, Yadav et al., 2023, arXiv 2306.01708): each of the ``A_i`` (and, apart, the
  ``B_i``) keeps its ``density`` fraction of largest-magnitude entries; each entry's sign is elected
  (the sign of the sum of the trimmed tensors, or of their signs); the weighted entries that agree with
  it are averaged.
- ``magnitude_prune``: the same trim, then the weighted sum of ``linear``.
- ``dare_linear`` / ``dare_ties`` (DARE, Yu et al., 2023, arXiv 2311.03099): each entry is dropped with
  probability ``1 − density`` and the kept ones are divided by ``density``, so every entry keeps its
  expected value; then ``linear``'s sum or ``ties``' election.

As in peft, the pruning modes act on the factors ``A`` and ``B``, not on ``ΔW``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from peftcli.checkpoint import ADAPTER_WEIGHTS, AtomicDir, read_adapter_state
from peftcli.export import ADAPTER_CONFIG, SIDECAR
from peftcli.inject import PREFIX
from peftcli.methods.lora import LoRA
from peftcli.recipe import RecipeError, to_dict

HOWS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # these read --density
EQUAL_RANKS = ("linear", *PRUNING)  # these add A's (and B's) entry by entry: the ranks must agree
SIGN_METHODS = ("total", "frequency")  # TIES' sign election: by the sum of values, or of signs
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


@dataclass
class Factors:
    """One module of one adapter: ``ΔW = scaling · b @ a``."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class SourceAdapter:
    path: Path
    config: dict[str, Any]  # adapter_config.json: what peft sees, and so the truth for ranks and scales
    sidecar: dict[str, Any] | None  # peftcli_adapter.json, where peftcli wrote the adapter
    modules: dict[str, Factors]  # module path in the transformers model -> its factors (in float32)
    dtype: torch.dtype  # the dtype of its tensors on disk, which the combined adapter keeps


# -- reading ---------------------------------------------------------------------------------------


def parse_weights(text: str | None, count: int) -> list[float]:
    """``"0.7,0.3"`` -> ``[0.7, 0.3]``: one weight per adapter, any sign (a negative one subtracts)."""
    if text is None:
        raise RecipeError(
            "--weights",
            "is required",
            f"give one weight per adapter, e.g. --weights {','.join(['1'] * count)}",
        )
    parts = [p.strip() for p in text.split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not _is_number(p))
        raise RecipeError("--weights", f"{bad!r} is not a number", "e.g. --weights 0.7,0.3") from None
    if len(weights) != count or not all(math.isfinite(w) for w in weights):
        raise RecipeError(
            "--weights",
            f"{len(weights)} weight(s) for {count} adapter(s)" if len(weights) != count else "must be finite",
            "give one finite weight per adapter, in the adapters' order",
        )
    return weights


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_lora_adapter(path: str | Path) -> SourceAdapter:
    """The factors and scale of every module of a LoRA adapter directory (peftcli's or peft's)."""
    path = Path(path)
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise RecipeError("adapter", f"{path} has no {ADAPTER_CONFIG}", "point at an adapter directory")
    config = json.loads(config_path.read_text())
    sidecar_path = path / SIDECAR
    sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else None
    _check_plain_lora(path, config)
    lora = LoRA(LoRA.config_from_adapter(config))
    state = read_adapter_state(path)
    modules: dict[str, Factors] = {}
    for key in sorted(state):
        module = _module_of(path, key)
        if key.endswith(B_SUFFIX):
            continue
        if PREFIX + module + B_SUFFIX not in state:
            raise RecipeError("adapter", f"{path} has {key} but no lora_B for it", "write the adapter again")
        r, alpha = lora.rank_and_alpha(module)
        a, b = state[key], state[PREFIX + module + B_SUFFIX]
        if a.shape[0] != r or b.shape[1] != r:
            raise RecipeError(
                "adapter",
                f"{path}: {module} holds rank {a.shape[0]} tensors, its adapter_config.json says r={r}",
                "write the adapter again",
            )
        scaling = alpha / math.sqrt(r) if lora.cfg.use_rslora else alpha / r
        modules[module] = Factors(a.float(), b.float(), scaling)
    if not modules:
        raise RecipeError("adapter", f"{path} holds no LoRA tensors", "point at a trained LoRA adapter")
    dtype = next(iter(state.values())).dtype
    return SourceAdapter(path, config, sidecar, modules, dtype)


def _check_plain_lora(path: Path, config: dict[str, Any]) -> None:
    """LoRA's A and B on linear layers only: DoRA's magnitudes, tensors on parameters and other methods
    have no meaning under these sums (peft refuses parameter targets too)."""
    kind = config.get("peft_type") or config.get("peftcli_method") or "unknown"
    if kind != "LORA":
        raise RecipeError(
            "adapter",
            f"{path} is a {kind} adapter; combine takes LoRA adapters",
            "combine LoRA adapters only",
        )
    for key, what in (("use_dora", "DoRA"), ("target_parameters", "LoRA on parameters")):
        if config.get(key):
            raise RecipeError(
                "adapter",
                f"{path} is a {what} adapter; combine adds plain LoRA updates B·A",
                "combine plain LoRA adapters (merge a DoRA adapter with peftcli merge instead)",
            )
    if config.get("init_lora_weights") == "loftq":  # Q depends on each adapter's r and loftq_iter
        raise RecipeError(
            "adapter",
            f"{path} is a LoftQ adapter: it pairs with its own quantized base, not the original one",
            "merge it with peftcli merge instead; combine adapters trained on one base",
        )


def _module_of(path: Path, key: str) -> str:
    for suffix in (A_SUFFIX, B_SUFFIX):
        if key.startswith(PREFIX) and key.endswith(suffix):
            return key[len(PREFIX) : -len(suffix)]
    raise RecipeError(
        "adapter",
        f"{path} holds {key}, which is not a LoRA factor (modules_to_save, biases or embeddings)",
        "combine adapters that hold only lora_A and lora_B tensors",
    )


# -- checking --------------------------------------------------------------------------------------


def check_request(count: int, how: str, density: float | None, rank: int | None, majority_sign: str) -> None:
    if how not in HOWS:
        raise RecipeError("--how", f"{how!r} is not a way to combine", f"use one of {', '.join(HOWS)}")
    if count < 2 and how != "linear":
        raise RecipeError(
            "adapters", f"--how {how} needs two or more adapters", "scale one adapter with --how linear"
        )
    if how in PRUNING and density is None:
        raise RecipeError(
            "--density", f"--how {how} needs the fraction of entries to keep", "e.g. --density 0.5"
        )
    if how not in PRUNING and density is not None:
        raise RecipeError(
            "--density", f"--how {how} does not prune", f"drop --density, or use {', '.join(PRUNING)}"
        )
    if density is not None and not 0.0 < density <= 1.0:
        raise RecipeError(
            "--density", f"must be in (0, 1], got {density}", "the fraction of entries kept, e.g. 0.5"
        )
    if rank is not None and (how != "svd" or rank < 1):
        raise RecipeError(
            "--rank", "is the rank of --how svd's result, an integer >= 1", "drop --rank or use --how svd"
        )
    if majority_sign not in SIGN_METHODS:
        raise RecipeError("--majority-sign", f"{majority_sign!r} is not a method", "use total or frequency")


def base_of(adapter: SourceAdapter) -> tuple:
    """What must agree for two adapters to act on the same weights: base, revision, task, quantization."""
    config, sidecar = adapter.config, adapter.sidecar or {}
    return (
        config.get("base_model_name_or_path"),
        config.get("revision"),
        config.get("task_type"),
        json.dumps(sidecar.get("quantization"), sort_keys=True),
    )


def check_combinable(adapters: list[SourceAdapter], how: str) -> None:
    first = adapters[0]
    for other in adapters[1:]:
        if base_of(other) != base_of(first):
            raise RecipeError(
                "adapters",
                f"{first.path} and {other.path} were trained on different bases "
                f"({_describe_base(first)} vs {_describe_base(other)})",
                "combine adapters of one base model",
            )
        differ = sorted(set(first.modules) ^ set(other.modules))
        if differ:
            raise RecipeError(
                "adapters",
                f"{first.path} and {other.path} adapt different modules ({differ[0]} is in one only)",
                "combine adapters trained with the same target_modules",
            )
    if how in EQUAL_RANKS:
        for module in sorted(first.modules):
            ranks = [a.modules[module].rank for a in adapters]
            if len(set(ranks)) > 1:
                raise RecipeError(
                    "--how",
                    f"{how} adds the factors entry by entry and needs equal ranks; {module} has ranks "
                    + ", ".join(map(str, ranks)),
                    "use --how cat or --how svd for adapters of different ranks",
                )


def _describe_base(adapter: SourceAdapter) -> str:
    base, revision, task, quantization = base_of(adapter)
    extra = [f"revision {revision}"] if revision else []
    extra += [task or "no task"] + (["quantized"] if quantization != "null" else [])
    return f"{base} ({', '.join(extra)})"


# -- the arithmetic --------------------------------------------------------------------------------


def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: the ``int(density · numel)`` entries of largest magnitude, the rest set to 0."""
    if density >= 1.0:
        return tensor
    flat = tensor.reshape(-1)
    kept = torch.zeros_like(flat)
    top = torch.topk(flat.abs(), k=int(density * flat.numel())).indices
    kept[top] = flat[top]
    return kept.reshape(tensor.shape)


def drop_and_rescale(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and divide the kept ones by it, so
    ``E[result] = tensor``."""
    if density >= 1.0:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def agreeing(stacked: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """TIES' sign election over dim 0: which entries carry the elected sign (a tie elects +)."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if majority_sign == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    return signs == elected


def merge_factor(
    how: str,
    tensors: list[torch.Tensor],
    weights: list[float],
    density: float | None,
    majority_sign: str,
    generators: list[torch.Generator] | None,
) -> torch.Tensor:
    """One factor (all A's or all B's of a module) of the entry-wise modes."""
    if how in ("ties", "magnitude_prune"):
        tensors = [keep_largest(t, density) for t in tensors]
    elif how in ("dare_linear", "dare_ties"):
        tensors = [drop_and_rescale(t, density, g) for t, g in zip(tensors, generators, strict=True)]
    stacked = torch.stack(tensors)  # (n, rows, cols)
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype).view(-1, 1, 1)
    if how in ("ties", "dare_ties"):  # the disjoint mean: the weighted entries that agree, averaged
        agree = agreeing(stacked, majority_sign)
        return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    return weighted.sum(dim=0)


def split_weights(parts: list[Factors], weights: list[float]) -> tuple[list[float], list[float]]:
    """The weight of each A and each B for the entry-wise modes: ``w s = a · b`` with
    ``a = sign(w s) √|w s|`` and ``b = √|w s|`` (the sign on A alone, or it would cancel), as peft."""
    total = [w * p.scaling for w, p in zip(weights, parts, strict=True)]
    return [math.copysign(math.sqrt(abs(t)), t) for t in total], [math.sqrt(abs(t)) for t in total]


def concatenated(parts: list[Factors], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``cat``: ``[w_1 s_1 A_1; …]`` (Σr, in) and ``[B_1 | …]`` (out, Σr), whose product is Σ w_i ΔW_i."""
    a = torch.cat([p.a * w * p.scaling for p, w in zip(parts, weights, strict=True)], dim=0)
    return a, torch.cat([p.b for p in parts], dim=1)


def top_singular(parts: list[Factors], weights: list[float], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``svd``: the top-``rank`` singular part of ``Σ w_i ΔW_i``, from the factors (never the dense
    (out, in) matrix): with ``B_cat = Q_b R_b`` and ``A_catᵀ = Q_a R_a``, ``ΔW = Q_b (R_b R_aᵀ) Q_aᵀ``,
    so the SVD of the small core gives ΔW's. Each singular pair's sign is free; we make the largest
    entry of each column of B positive. In float64, cast back by the caller."""
    a_cat, b_cat = concatenated(parts, weights)
    q_b, r_b = torch.linalg.qr(b_cat.double())  # (out, p), (p, k)
    q_a, r_a = torch.linalg.qr(a_cat.double().T)  # (in, q), (q, k)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # the core (p, q)
    left, right = q_b @ u, vh @ q_a.T  # (out, m), (m, in)
    flip = torch.sign(left.gather(0, left.abs().argmax(dim=0, keepdim=True)))[0]
    left, right = left * flip, right * flip[:, None]
    kept = min(rank, s.numel())
    b = torch.zeros(left.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, right.shape[1], dtype=torch.float64)
    b[:, :kept] = left[:, :kept] * s[:kept]
    a[:kept] = right[:kept]
    return a, b


def combine_module(
    how: str,
    parts: list[Factors],
    weights: list[float],
    density: float | None,
    majority_sign: str,
    rank: int,
    generators: Callable[[str], list[torch.Generator]] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined (A, B) of one module, at scale 1."""
    if how == "cat":
        return concatenated(parts, weights)
    if how == "svd":
        return top_singular(parts, weights, rank)
    weights_a, weights_b = split_weights(parts, weights)
    draws = generators or (lambda _factor: None)
    a = merge_factor(how, [p.a for p in parts], weights_a, density, majority_sign, draws("A"))
    b = merge_factor(how, [p.b for p in parts], weights_b, density, majority_sign, draws("B"))
    return a, b


def dare_generators(seed: int, module: str, count: int) -> Callable[[str], list[torch.Generator]]:
    """One generator per (module, factor, adapter), seeded from ``seed`` and those names, so a tensor's
    mask depends on ``--seed`` alone: not on the order modules are visited, nor on anything else
    drawn before (peft draws from torch's global generator, after its own layer inits)."""

    def generators(factor: str) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(dare_seed(seed, module, factor, i)) for i in range(count)]

    return generators


def dare_seed(seed: int, module: str, factor: str, index: int) -> int:
    """The seed of one mask: the first 8 bytes of sha256("<seed>/<module>/<A|B>/<adapter index>")."""
    digest = hashlib.sha256(f"{seed}/{module}/{factor}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# -- writing ---------------------------------------------------------------------------------------


def combined_config(first: SourceAdapter, ranks: dict[str, int]) -> dict[str, Any]:
    """The first adapter's config as a plain LoRA at scale 1: ``lora_alpha = r`` everywhere (modules
    whose rank differs from the most common one get a ``rank_pattern`` / ``alpha_pattern`` entry on
    their escaped full name), no rsLoRA, DoRA or residual init."""
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {re.escape(m): rank for m, rank in sorted(ranks.items()) if rank != r}
    return {
        **first.config,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }


def combined_sidecar(adapters: list[SourceAdapter], config: dict[str, Any], record: dict) -> dict:
    """peftcli's record: the LoRA options the combined adapter loads with, and how it was made."""
    first = adapters[0].sidecar or {}
    return {
        "method": "lora",
        "method_config": to_dict(LoRA.config_from_adapter(config)),
        "task": first.get("task") or _task_of(config),
        "model_name": first.get("model_name") or config.get("base_model_name_or_path"),
        "quantization": first.get("quantization"),
        "label_names": first.get("label_names"),
        "seed": 0,  # the adapter holds every tensor it needs: no init draw survives loading it
        "combined": record,
    }


def _task_of(config: dict[str, Any]) -> str:
    from peftcli.models import TASK_FROM_PEFT

    return TASK_FROM_PEFT.get(config.get("task_type") or "CAUSAL_LM", "causal_lm")


def write_combined(
    output: Path, source: Path, config: dict, sidecar: dict, state: dict[str, torch.Tensor]
) -> None:
    """One adapter directory, atomically; the tokenizer files come from the first adapter."""
    own = {ADAPTER_CONFIG, SIDECAR, ADAPTER_WEIGHTS, "README.md"}
    with AtomicDir(output) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in own:
                shutil.copy2(path, tmp / path.name)


def combine_adapters(
    paths: list[str | Path],
    weights: list[float],
    how: str,
    output: str | Path,
    density: float | None = None,
    seed: int = 0,
    rank: int | None = None,
    majority_sign: str = "total",
) -> dict[str, Any]:
    """Combine LoRA adapters of one base into one adapter at ``output`` (see the module docstring)."""
    check_request(len(paths), how, density, rank, majority_sign)
    if len(weights) != len(paths):
        raise RecipeError(
            "--weights", f"{len(weights)} weight(s) for {len(paths)} adapter(s)", "one per adapter"
        )
    adapters = [read_lora_adapter(p) for p in paths]
    check_combinable(adapters, how)
    svd_rank = rank or max(f.rank for a in adapters for f in a.modules.values())
    dtype = adapters[0].dtype
    state, ranks = {}, {}
    for module in sorted(adapters[0].modules):
        parts = [a.modules[module] for a in adapters]
        generators = dare_generators(seed, module, len(parts)) if how.startswith("dare") else None
        a, b = combine_module(how, parts, weights, density, majority_sign, svd_rank, generators)
        state[PREFIX + module + A_SUFFIX] = a.to(dtype).contiguous()
        state[PREFIX + module + B_SUFFIX] = b.to(dtype).contiguous()
        ranks[module] = a.shape[0]
    config = combined_config(adapters[0], ranks)
    record = {
        "adapters": [str(a.path) for a in adapters],
        "weights": weights,
        "how": how,
        "density": density,
        "seed": seed if how.startswith("dare") else None,
        "majority_sign": majority_sign if how in ("ties", "dare_ties") else None,
    }
    write_combined(Path(output), adapters[0].path, config, combined_sidecar(adapters, config, record), state)
    return {**record, "output": str(output), "modules": len(ranks), "rank": config["r"]}
