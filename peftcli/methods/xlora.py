r"""X-LoRA: a trained classifier mixes frozen LoRA experts per token and per layer (Buehler & Buehler,
2024, arXiv 2402.07148).

N LoRA adapters trained apart (the experts: ``adapters``, directories written by peftcli or peft) sit on
the same layers. Every forward runs the model twice:

1. the *scaling pass*, without gradients: every expert scaled by the constant ``scaling_pass_value``
   (0 by default: the base model alone); its last hidden state h (B, T, d) feeds
2. the classifier, an MLP of ``xlora_depth`` linear layers (``xlora_size`` wide, ReLU, dropout
   ``xlora_dropout_p`` between them), giving logits for N experts (× L adapted layers with
   ``layerwise_scalings``, else one set broadcast to every layer): the scalings
   λ = softmax(logits / ``softmax_temperature``) over the experts (``enable_softmax``), (B, T, L, N);
3. the real pass, where adapted layer l computes

       y = W0 x + g · Σ_n s_n · B_n A_n (λ_l,n ⊙ x)      (λ kept to the ``top_k_lora`` largest, then
                                                          renormalised by ``enable_softmax_topk``)

   with s_n = α_n / r_n (α_n / √r_n for rsLoRA) the expert's own scale and g = ``global_scaling_weight``.

Only the classifier trains (and the experts too with ``use_trainable_adapters``). The mix depends on
each token, so X-LoRA does not merge; the scaling pass doubles the forward's cost. A token's scalings come
from the scaling pass over the whole sequence, so X-LoRA cannot decode over a KV cache: it sets
``decodes_with_cache`` False and generation re-runs the whole sequence at every step (as peft's
``generate``, which turns the cache off).

On disk, as peft: ``adapter_config.json`` (peft's ``XLoraConfig``; ``adapters`` maps "0", "1", ... to
the experts' directories, which peft's loader reads, and ``hidden_size``),
``adapter_model.safetensors`` with the classifier as ``base_model.internal_xlora_classifier.layers.<i>.*``
and each expert again in a subdirectory named by its position ("0", "1", ...), a LoRA adapter in peft's
format, so the X-LoRA adapter reloads without the original directories (our loader prefers them; peft
reads ``adapters``, which names them).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftcli.checkpoint import ADAPTER_WEIGHTS, read_adapter_state
from peftcli.compat import pop_cache
from peftcli.inject import PREFIX, is_linear
from peftcli.methods.kit import SHARED_ATTR, AdapterLayer, LayerMethod, SharedState
from peftcli.methods.lora import LoRA
from peftcli.methods.registry import Method, register
from peftcli.recipe import MethodConfig, Recipe, RecipeError, doc

ADAPTER_CONFIG = "adapter_config.json"
SIDECAR = "peftcli_adapter.json"
CLASSIFIER = "internal_xlora_classifier"  # peft's attribute: saved as base_model.internal_xlora_classifier.*
FACTORS = (".lora_A.weight", ".lora_B.weight")
# LoRA options an expert may not carry: each changes the layer beyond y = W0 x + s·B A x
NOT_PLAIN = {
    "use_dora": "DoRA",
    "target_parameters": "LoRA on parameters",
    "lora_bias": "LoRA biases",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication",
}


@dataclass
class XLoraConfig(MethodConfig):
    """peft's ``XLoraConfig`` fields; ``hidden_size`` is read from the model (written for peft)."""

    adapters: dict[str, str] = field(
        default_factory=dict,
        metadata=doc("the LoRA experts, name → adapter directory (peftcli's or peft's), mixed frozen"),
    )
    enable_softmax: bool = field(default=True, metadata=doc("softmax over the experts' logits"))
    enable_softmax_topk: bool = field(
        default=False, metadata=doc("softmax over the top_k_lora kept scalings (needs top_k_lora)")
    )
    softmax_temperature: float = field(
        default=1.0, metadata=doc("T in softmax(logits / T); lower is sharper", min_exclusive=0.0)
    )
    layerwise_scalings: bool = field(
        default=False, metadata=doc("one set of scalings per adapted layer, else one for every layer")
    )
    top_k_lora: int | None = field(
        default=None, metadata=doc("keep each token's k largest scalings per layer (null: all)", min=1)
    )
    xlora_depth: int = field(default=1, metadata=doc("linear layers in the classifier", min=1))
    xlora_size: int = field(
        default=2048, metadata=doc("hidden width of the classifier (xlora_depth > 1)", min=1)
    )
    xlora_dropout_p: float = field(
        default=0.2, metadata=doc("dropout between the classifier's layers (xlora_depth > 1)", min=0.0)
    )
    use_trainable_adapters: bool = field(
        default=False, metadata=doc("train the experts too (saved in the adapter's subdirectories)")
    )
    scaling_pass_value: float = field(
        default=0.0, metadata=doc("every expert's scaling in the first (classifier's input) pass")
    )
    global_scaling_weight: float = field(
        default=1.0, metadata=doc("g: every expert's output times g in the real pass")
    )


# -- the experts -----------------------------------------------------------------------------------


@dataclass
class Expert:
    """One LoRA expert read from disk: per adapted module its factors and scale s = α/r (α/√r)."""

    key: str  # method.adapters.<name>: where a refusal points
    path: Path
    config: dict[str, Any]  # its adapter_config.json, written again beside the X-LoRA adapter
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (r, in), B (out, r))
    scaling: dict[str, float]
    dropout: float


def read_experts(cfg: XLoraConfig) -> list[Expert]:
    return [read_expert(path, f"method.adapters.{name}") for name, path in cfg.adapters.items()]


def read_expert(path: str | Path, key: str) -> Expert:
    """A plain LoRA adapter directory (peftcli's or peft's): A and B on linear layers, nothing else."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        raise RecipeError(
            key,
            f"{path} is not an adapter directory (no {ADAPTER_CONFIG})",
            "point at RUN/adapter of a LoRA run",
        )
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    kind = config.get("peft_type") or config.get("peftcli_method") or "unknown"
    if kind != "LORA":
        raise RecipeError(key, f"{path} is a {kind} adapter; X-LoRA mixes LoRA experts", "give LoRA adapters")
    for option, what in NOT_PLAIN.items():
        if config.get(option):
            raise RecipeError(
                key,
                f"{path} uses {what}; X-LoRA mixes plain LoRA experts (B·A only)",
                "give plain LoRA adapters",
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init != "gaussian":  # peft's unconverted PiSSA/OLoRA, LoftQ: another base
        raise RecipeError(
            key,
            f"{path} was saved with init {init!r}: it pairs with a changed base",
            "give plain LoRA adapters",
        )
    lora = LoRA(LoRA.config_from_adapter(config))
    state = read_adapter_state(path)
    factors, scaling = {}, {}
    for name in sorted(state):
        if not (name.startswith(PREFIX) and name.endswith(FACTORS)):
            raise RecipeError(key, f"{path} holds {name}, not a LoRA factor", "give plain LoRA adapters")
        module = name[len(PREFIX) : -len(FACTORS[0])]
        if name.endswith(FACTORS[0]):
            r, alpha = lora.rank_and_alpha(module)
            b = state.get(PREFIX + module + FACTORS[1])
            if b is None:
                raise RecipeError(key, f"{path} has {name} but no lora_B for it", "write the adapter again")
            factors[module] = (state[name].float(), b.float())
            scaling[module] = alpha / math.sqrt(r) if lora.cfg.use_rslora else alpha / r
    if not factors:
        raise RecipeError(key, f"{path} holds no LoRA tensors", "point at a trained LoRA adapter")
    return Expert(key, path, config, factors, scaling, float(config.get("lora_dropout") or 0.0))


def check_same_targets(experts: list[Expert]) -> None:
    """Every expert must adapt the same modules: the classifier gives each layer one scaling per expert."""
    first = experts[0]
    for other in experts[1:]:
        differ = sorted(set(first.factors) ^ set(other.factors))
        if differ:
            raise RecipeError(
                other.key,
                f"{other.path} and {first.path} adapt different modules ({differ[0]} is in one only)",
                "mix experts trained with the same target_modules",
            )


# -- the scalings ----------------------------------------------------------------------------------


class Scalings:
    """The scalings (B, T, L, N) of the forward in progress, set by the model's pre-hook and read by
    every layer (its own slice ``[:, :, layer]``)."""

    def __init__(self, cfg: XLoraConfig):
        self.cfg = cfg
        self.current: torch.Tensor | None = None

    def of_layer(self, layer: int) -> torch.Tensor:
        """(B, T, N): the layer's scalings, the top-k kept and (enable_softmax_topk) renormalised."""
        if self.current is None:
            raise RecipeError(
                "method.name",
                "an X-LoRA layer ran outside the model's forward, which computes its scalings",
                "call the model, not one of its layers",
            )
        scalings = self.current[:, :, layer, :]
        if self.cfg.top_k_lora is not None:
            keep = torch.zeros_like(scalings, dtype=torch.bool)
            keep.scatter_(-1, scalings.topk(self.cfg.top_k_lora, dim=-1).indices, True)
            scalings = scalings * keep.to(scalings.dtype)
        if self.cfg.enable_softmax_topk:
            kept = scalings != 0
            scalings = scalings.masked_fill(~kept, float("-inf")).softmax(dim=-1).masked_fill(~kept, 0.0)
        return scalings


class Classifier(nn.Module):
    """h (B, T, d) → scalings (B, T, L, N): ``xlora_depth`` linear layers, peft's indices in ``layers``
    (Linear, ReLU[, Dropout] per hidden layer, then the last Linear)."""

    def __init__(self, hidden_size: int, n_experts: int, n_layers: int, cfg: XLoraConfig):
        super().__init__()
        self.cfg, self.n_experts, self.n_layers = cfg, n_experts, n_layers
        blocks: list[nn.Module] = []
        width = hidden_size
        for _ in range(cfg.xlora_depth - 1):
            blocks += [nn.Linear(width, cfg.xlora_size), nn.ReLU()]
            blocks += [nn.Dropout(cfg.xlora_dropout_p)] if cfg.xlora_dropout_p > 0 else []
            width = cfg.xlora_size
        outputs = n_experts * (n_layers if cfg.layerwise_scalings else 1)
        self.layers = nn.Sequential(*blocks, nn.Linear(width, outputs))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.layers(hidden.to(self.layers[0].weight.dtype))
        b, t = hidden.shape[:2]
        if self.cfg.layerwise_scalings:
            logits = logits.reshape(b, t, self.n_layers, self.n_experts)
        else:
            logits = logits.unsqueeze(2).expand(b, t, self.n_layers, self.n_experts)
        if self.cfg.enable_softmax:
            logits = (logits / self.cfg.softmax_temperature).softmax(dim=-1)
        return logits

    def parameter_count(self, hidden_size: int) -> int:
        """The formula: (d+1)·w + (depth-2)·(w+1)·w + (w+1)·N·(L or 1), w = xlora_size (depth 1: w = d)."""
        cfg, out = self.cfg, self.n_experts * (self.n_layers if self.cfg.layerwise_scalings else 1)
        if cfg.xlora_depth == 1:
            return (hidden_size + 1) * out
        w = cfg.xlora_size
        return (hidden_size + 1) * w + (cfg.xlora_depth - 2) * (w + 1) * w + (w + 1) * out


class XLoraLinear(AdapterLayer):
    """``W0 x + g · Σ_n s_n B_n A_n dropout_n(λ_n ⊙ x)``, λ this layer's per-token scalings."""

    def __init__(
        self, base_layer: nn.Module, module: str, experts: list[Expert], index: int, state: Scalings
    ):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "scalings", state)  # shared by every layer, not a submodule
        self.layer_number = index
        device = base_layer.weight.device
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.scaling: list[float] = []
        for n, expert in enumerate(experts):
            a, b = expert.factors[module]
            if a.shape[1] != self.in_features or b.shape[0] != self.out_features:
                raise RecipeError(
                    expert.key,
                    f"{expert.path}: {module} is {b.shape[0]}×{a.shape[1]} there, {self.out_features}×"
                    f"{self.in_features} in this model",
                    "mix experts trained on this base model",
                )
            self.lora_A[str(n)] = linear_of(a, device)
            self.lora_B[str(n)] = linear_of(b, device)
            self.lora_dropout[str(n)] = nn.Dropout(expert.dropout) if expert.dropout > 0 else nn.Identity()
            self.scaling.append(expert.scaling[module])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        lam = self.scalings.of_layer(self.layer_number)
        weight = self.scalings.cfg.global_scaling_weight
        for n, scale in enumerate(self.scaling):
            a, b = self.lora_A[str(n)], self.lora_B[str(n)]
            xn = x.to(a.weight.dtype) * lam[..., n : n + 1].to(a.weight.dtype)
            result = result + b(a(self.lora_dropout[str(n)](xn))) * (scale * weight)
        return result.to(x.dtype)

    def expert_state(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[str(n)].weight, self.lora_B[str(n)].weight


def linear_of(weight: torch.Tensor, device) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=device)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


# -- the method ------------------------------------------------------------------------------------


@register
class XLora(LayerMethod):
    name = "xlora"
    description = "X-LoRA: a classifier mixes frozen LoRA experts per token and layer (arXiv 2402.07148)"
    config_cls = XLoraConfig
    peft_type = "XLORA"
    identity_at_init = False  # the experts act from step 0
    mergeable = False  # the mix depends on each token
    decodes_with_cache = False  # each token's scalings need the scaling pass over the whole sequence
    merge = Method.merge
    trainable_formula = (
        "classifier: (d+1)·N·(L if layerwise_scalings else 1) at depth 1; at depth D > 1 with width w: "
        "(d+1)·w + (D-2)·(w+1)·w + (w+1)·N·(L or 1); plus the experts' A and B with use_trainable_adapters"
    )
    layer_types = (XLoraLinear,)

    cfg: XLoraConfig

    def __init__(self, cfg: XLoraConfig, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.experts: list[Expert] = []

    # -- recipe ------------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, cfg: XLoraConfig, recipe: Recipe) -> None:
        if not cfg.adapters:
            raise RecipeError(
                "method.adapters",
                "names no LoRA experts",
                "map names to LoRA adapter dirs, e.g. {a: runs/a/adapter}",
            )
        checks = [
            (
                recipe.model.task != "causal_lm",
                "model.task",
                f"xlora mixes experts on causal_lm models, not {recipe.model.task} (peft's X-LoRA reads "
                "the causal LM's hidden states)",
                "use model.task: causal_lm",
            ),
            (
                cfg.top_k_lora is not None and cfg.top_k_lora > len(cfg.adapters),
                "method.top_k_lora",
                f"keeps {cfg.top_k_lora} of {len(cfg.adapters)} experts",
                "set top_k_lora at most the number of adapters",
            ),
            (
                cfg.enable_softmax_topk and cfg.top_k_lora is None,
                "method.enable_softmax_topk",
                "renormalises the top_k_lora kept scalings, and top_k_lora is not set",
                "set method.top_k_lora, or enable_softmax_topk: false",
            ),
            (
                recipe.model.gradient_checkpointing,
                "model.gradient_checkpointing",
                "would recompute xlora's layers in the backward pass, after the forward's scalings are gone",
                "set model.gradient_checkpointing: false",
            ),
        ]
        for bad, key, what, hint in checks:
            if bad:
                raise RecipeError(key, what, hint)
        experts = read_experts(cfg)
        check_same_targets(experts)
        check_same_base(experts, recipe.model.name)

    @classmethod
    def config_at(cls, cfg: XLoraConfig, adapter_dir: Path) -> XLoraConfig:
        """The experts peftcli saved beside the X-LoRA adapter (subdirectories "0", "1", ...) replace the
        paths it was trained with, which may be gone or relative to another directory. (peft 0.21 writes
        such subdirectories too, but with base weights and only part of each expert: an adapter peft
        wrote is read, as peft reads it, from the paths in its ``adapters``.)"""
        beside = {
            name: str(adapter_dir / str(i)) if (adapter_dir / str(i) / ADAPTER_CONFIG).is_file() else path
            for i, (name, path) in enumerate(cfg.adapters.items())
        }
        return dataclasses.replace(cfg, adapters=beside)

    # -- building ----------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Wrap the experts' layers (numbered in model order, as peft numbers them), put the classifier
        in the model's shared state, and run the scaling pass before every forward of the body."""
        self.experts = read_experts(self.cfg)
        check_same_targets(self.experts)
        self.state = Scalings(self.cfg)
        self.targets = self.resolve_targets(model)
        self.wrap(model)
        layers = self.layers(model)
        for index, (_, layer) in enumerate(layers):
            layer.layer_number = index
            for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]:
                p.requires_grad_(self.cfg.use_trainable_adapters)
        self.shared_state = SharedState()
        self.shared_state.add(
            CLASSIFIER, Classifier(model.config.hidden_size, len(self.experts), len(layers), self.cfg)
        )
        model.add_module(SHARED_ATTR, self.shared_state.to(next(model.parameters()).device))
        body = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
        entry = body if isinstance(body, nn.Module) else model
        entry.register_forward_pre_hook(self._scaling_pass, with_kwargs=True)
        entry.register_forward_hook(self._forget, always_call=True)
        return model

    def resolve_targets(self, model: nn.Module) -> list[str]:
        """The modules the experts adapt, in model order; each must be a linear layer here."""
        wanted = self.experts[0].factors
        names = dict(model.named_modules())
        body = f"{getattr(model, 'base_model_prefix', '')}."
        for module in wanted:
            if module not in names or not is_linear(names[module]):
                raise RecipeError(
                    self.experts[0].key,
                    f"{self.experts[0].path} adapts {module}, which is no linear layer of this model",
                    "mix LoRA experts on linear layers, trained on this base model",
                )
            if not module.startswith(body):  # the scalings live while the body runs (the loss's
                raise RecipeError(  # chunked path runs the head after it)
                    self.experts[0].key,
                    f"{self.experts[0].path} adapts {module}, outside the transformer body ({body[:-1]})",
                    "mix experts on the body's layers (attention and MLP projections), not the output head",
                )
        return [n for n in names if n in wanted]

    def create_layer(self, name: str, base: nn.Module) -> XLoraLinear:
        return XLoraLinear(base, name, self.experts, 0, self.state)

    def _scaling_pass(self, module: nn.Module, args, kwargs):
        """The first pass, without gradients, every expert at ``scaling_pass_value``; its last hidden state
        gives the classifier's scalings for the real pass (the forward that follows). A forward that
        continues a KV cache (transformers' ``generate`` with its default cache) stops: the new tokens'
        scalings would come from a pass that never saw the tokens before them."""
        first = {**kwargs, "output_hidden_states": True, "return_dict": True, "use_cache": False}
        past = pop_cache(first)  # the first pass runs without a cache (either spelling)
        if past is not None and past.get_seq_length() > 0:
            raise RecipeError(
                "use_cache",
                "xlora cannot decode with a KV cache: each token's scalings need the whole sequence's pass",
                "decode with use_cache=False (peftcli's generate, chat, eval and grpo do)",
            )
        tokens = (
            kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        )
        if tokens is None and args:
            tokens = args[0]
        classifier = self.classifier()
        b, t = tokens.shape[:2]
        shape = (b, t, classifier.n_layers, classifier.n_experts)
        dtype = classifier.layers[0].weight.dtype
        self.state.current = torch.full(shape, self.cfg.scaling_pass_value, dtype=dtype, device=tokens.device)
        with torch.no_grad():
            hidden = module.forward(*args, **first).hidden_states[-1]
        self.state.current = classifier(hidden)
        return args, kwargs

    def _forget(self, _module, _args, _output):
        self.state.current = None

    def classifier(self) -> Classifier:
        return getattr(self.shared_state, CLASSIFIER)

    # -- counting and saving -----------------------------------------------------------------
    def expected_trainable_parameters(self, model: nn.Module) -> int:
        count = self.classifier().parameter_count(model.config.hidden_size)
        if self.cfg.use_trainable_adapters:
            count += sum(
                p.numel()
                for _, m in self.layers(model)
                for p in [*m.lora_A.parameters(), *m.lora_B.parameters()]
            )
        return count

    def shared_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The classifier, as peft saves it (``base_model.internal_xlora_classifier.layers.<i>.*``)."""
        return {f"base_model.{CLASSIFIER}.{n}": p for n, p in self.classifier().named_parameters()}

    def adapter_file_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The classifier's tensors, every one of them: peft 0.21's ``save_pretrained`` leaves out those
        whose names hold an expert's name (``.0.``, ``.1.``: its experts are named by position), so its
        files lack ``layers.0`` (at depth 1 everything), and a classifier cannot be rebuilt from them."""
        stride = 3 if self.cfg.xlora_dropout_p > 0 else 2  # Linear, ReLU[, Dropout] per hidden layer
        linears = [k * stride for k in range(self.cfg.xlora_depth)]
        wanted = [f"base_model.{CLASSIFIER}.layers.{i}.{p}" for i in linears for p in ("weight", "bias")]
        missing = [k for k in wanted if k not in state]
        if missing:
            raise RecipeError(
                "adapter",
                f"the X-LoRA classifier tensor {missing[0]} is missing ({len(missing)} of {len(wanted)}); "
                "peft 0.21 leaves out those named like an expert (.0., .1.) when it saves",
                "save the X-LoRA model with peftcli, or add the classifier's tensors from the peft model",
            )
        return state

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        config = Method.adapter_config(self, model)
        config.pop("modules_to_save", None)
        config["hidden_size"] = model.config.hidden_size
        return config

    def adapter_parts(self, model: nn.Module, directory: Path, final: Path) -> dict[str, Any]:
        """Each expert (its current tensors: trained ones with ``use_trainable_adapters``) as a LoRA
        adapter in ``directory/<n>``, and ``adapters`` naming those for peft's loader: "0", "1", ...
        (peft names its experts by position and activates the config's names) → ``final/<n>``."""
        from safetensors.torch import save_file

        layers = self.layers(model)
        for n, expert in enumerate(self.experts):
            folder = directory / str(n)
            folder.mkdir()
            (folder / ADAPTER_CONFIG).write_text(json.dumps(expert.config, indent=2, sort_keys=True) + "\n")
            tensors = {}
            for name, layer in layers:
                a, b = layer.expert_state(n)
                tensors[PREFIX + name + FACTORS[0]] = a.detach().contiguous().cpu()
                tensors[PREFIX + name + FACTORS[1]] = b.detach().contiguous().cpu()
            save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        return {"adapters": {str(n): str(final.resolve() / str(n)) for n in range(len(self.experts))}}


def check_same_base(experts: list[Expert], model_name: str) -> None:
    """Experts peftcli wrote record the base they were trained on; it must be this recipe's."""
    for expert in experts:
        sidecar = expert.path / SIDECAR
        if not sidecar.is_file():
            continue  # peft's: its shapes are checked when the model is built
        trained_on = json.loads(sidecar.read_text()).get("model_name")
        if trained_on and trained_on != model_name:
            raise RecipeError(
                expert.key,
                f"{expert.path} was trained on {trained_on!r}, this recipe uses {model_name!r}",
                "mix experts trained on the same base model",
            )


__all__ = ["Classifier", "XLora", "XLoraConfig", "XLoraLinear"]
