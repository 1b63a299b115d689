"""CPT, context-aware prompt tuning (Blau, Kimhi, Belinkov, Bronstein & Baskin, 2024, "Context-aware
Prompt Tuning: Advancing In-Context Learning with Adversarial Methods", arXiv 2410.17222).

In-context learning puts a few solved examples before the query; CPT keeps that context and tunes it.
The ``n`` context tokens ``c`` (each example as input template, input, output template, label) become
the prompt: their frozen embeddings plus a trained offset per token (the paper's Sec. 3)::

    y = f([E(c) + Δ; E(x)])                      only Δ ∈ R^{n×h} trains

with three rules from the context's structure, read from each token's type ``t`` (example ``k``, from 0,
gives its tokens ``4k + 1`` input template, ``4k + 2`` input, ``4k + 3`` output template, ``4k + 4``
label; separators are 0; peft's ``cpt_tokens_type_mask``):

- **labels stay.** Δ's gradient is zero on label and separator tokens (t mod 4 = 0): the user's
  labels are kept as given;
- **projection.** after every optimizer step each row of Δ is projected back onto its ε-ball,
  ``Δ_i ← Δ_i · ε_i / max(‖Δ_i‖, ε_i)`` (projected gradient descent, the paper's Eq. 4), with
  ``ε_i = ε · √(h / 2048)`` for input tokens and ``ε_format · √(h / 2048)`` for template tokens (peft's
  normalisation); labels and separators get 1e-10;
- **the loss reads the context too.** The training loss is cross-entropy over the context's label
  tokens *and* the training example's (the paper's Sec. 3.3: the context's labels act as extra training
  examples), weighted per example by ``γ^j`` where ``j`` counts the examples after it (``decay``: the
  query example weighs 1, the last context example ``γ``, ...), averaged over every scored token.

The context comes from ``method.context`` (a JSON Lines file of ``{"input", "output"}`` examples laid
out with ``input_template`` / ``output_template`` and the separators) or from peft's own lists
(``cpt_token_ids`` and ``cpt_tokens_type_mask``, what an adapter stores). Training rows come from any
SFT format: the tokens that carry loss (a completion's answer) are the example's label, which is all
CPT's loss reads of a training row's types.

Saved as peft's CPT: ``prompt_embeddings`` (n, h) = ``E(c) + Δ``; ``adapter_config.json`` keeps the
context's ids and types and the loss and projection options under peft's names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.methods.registry import register
from peftcli.methods.soft_prompt import PromptedModel, SoftPromptMethod, load_base_tokenizer, text_config
from peftcli.recipe import MethodConfig, RecipeError, doc

IGNORE_INDEX = -100
TINY_EPSILON = 1e-10  # peft's ε for label and separator rows: they never move
REFERENCE_WIDTH = 2048  # ε is normalised by √(hidden / 2048), as peft does
# an example's token types, before the example's offset 4k (0: separator, never offset)
INPUT_TEMPLATE, INPUT, OUTPUT_TEMPLATE, LABEL = 1, 2, 3, 4


@dataclass
class CPTConfig(MethodConfig):
    """peft's ``CPTConfig`` fields, and the context file they can be built from."""

    context: str | None = field(
        default=None,
        metadata=doc(
            "a JSON Lines file of context examples, one {input, output} object a line, laid out with the "
            "templates below into the prompt (or give cpt_token_ids and cpt_tokens_type_mask)"
        ),
    )
    input_template: str = field(
        default="input: {}", metadata=doc("context: how an example's input is written ({} is the input)")
    )
    output_template: str = field(
        default="output: {}", metadata=doc("context: how an example's output is written ({} is the output)")
    )
    intra_separator: str = field(
        default=" ", metadata=doc("context: text between an example's input and output parts")
    )
    inter_separator: str = field(default="\n", metadata=doc("context: text after each example"))
    cpt_token_ids: list[int] | None = field(
        default=None, metadata=doc("the context's token ids (peft's key; built from context when unset)")
    )
    cpt_mask: list[int] | None = field(
        default=None,
        metadata=doc(
            "the context's attention mask (peft's key, stored as given; peft's forward does not read it either)"
        ),
    )
    cpt_tokens_type_mask: list[int] | None = field(
        default=None,
        metadata=doc(
            "each context token's type: 4k+1 input template, 4k+2 input, 4k+3 output template, 4k+4 "
            "label of example k, 0 separator (peft's key; built from context when unset)"
        ),
    )
    opt_weighted_loss_type: Literal["none", "decay"] = field(
        default="none",
        metadata=doc("none: every label token weighs 1; decay: an example weighs γ^(examples after it)"),
    )
    opt_loss_decay_factor: float = field(
        default=1.0, metadata=doc("γ of opt_weighted_loss_type: decay (the paper: 0.95)", min_exclusive=0.0)
    )
    opt_projection_epsilon: float = field(
        default=0.1, metadata=doc("ε of the input tokens' projection ball (× √(hidden/2048))", min=0.0)
    )
    opt_projection_format_epsilon: float = field(
        default=0.1, metadata=doc("ε of the template tokens' projection ball (× √(hidden/2048))", min=0.0)
    )


# --------------------------------------------------------------------------------------------
# The context: token ids and types
# --------------------------------------------------------------------------------------------


def read_context(path_text: str) -> list[tuple[str, str]]:
    """(input, output) of every example of the context file, in file order."""
    key = "method.context"
    path = Path(path_text).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(
            key, f"cannot read {path} ({type(err).__name__})", "point at a JSON Lines file"
        ) from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("input", "output")):
            raise RecipeError(
                key,
                f"{path} line {number} is not an object with string input and output",
                'write {"input": …, "output": …}',
            )
        if not row["output"]:
            raise RecipeError(
                key, f"{path} line {number} has an empty output", "every context example needs its label"
            )
        examples.append((row["input"], row["output"]))
    if not examples:
        raise RecipeError(key, f"{path} holds no example", "add one {input, output} object per line")
    return examples


def template_parts(template: str, key: str) -> tuple[str, str]:
    """The text before and after the template's one ``{}``."""
    if template.count("{}") != 1:
        raise RecipeError(key, f"{template!r} must hold exactly one {{}}", 'e.g. "input: {}"')
    before, after = template.split("{}")
    return before, after


def context_layout(tokenizer, examples: list[tuple[str, str]], cfg: CPTConfig) -> tuple[list[int], list[int]]:
    """The context's token ids and types (peft's ``cpt_token_ids`` and ``cpt_tokens_type_mask``): each
    part tokenized on its own, so a type boundary never falls inside a token; example ``k``'s types are
    offset by ``4k``, separators stay 0."""
    in_before, in_after = template_parts(cfg.input_template, "method.input_template")
    out_before, out_after = template_parts(cfg.output_template, "method.output_template")
    ids: list[int] = []
    types: list[int] = []
    for k, (text, label) in enumerate(examples):
        parts = [
            (in_before, INPUT_TEMPLATE),
            (text, INPUT),
            (in_after, INPUT_TEMPLATE),
            (cfg.intra_separator, 0),
            (out_before, OUTPUT_TEMPLATE),
            (label, LABEL),
            (out_after, OUTPUT_TEMPLATE),
            (cfg.inter_separator, 0),
        ]
        for part, kind in parts:
            part_ids = tokenizer(part, add_special_tokens=False)["input_ids"] if part else []
            ids += [int(i) for i in part_ids]
            types += [kind + 4 * k if kind else 0] * len(part_ids)
    return ids, types


def label_rows(types: torch.Tensor) -> torch.Tensor:
    """Where a type marks a label (a positive multiple of 4)."""
    return (types > 0) & (types % 4 == 0)


def projection_radii(types: list[int], hidden: int, eps_input: float, eps_format: float) -> torch.Tensor:
    """ε_i of every context row (n,): input rows ε · √(h/2048), template rows ε_format · √(h/2048), others
    1e-10 (computed in fp32 as peft computes them, so the projections agree bit for bit)."""
    kinds = torch.tensor(types, dtype=torch.long)
    scale = torch.sqrt(torch.tensor([hidden / REFERENCE_WIDTH], dtype=torch.float32))
    radii = torch.full((len(types),), TINY_EPSILON, dtype=torch.float32)
    template = (kinds > 0) & ((kinds % 4 == INPUT_TEMPLATE) | (kinds % 4 == OUTPUT_TEMPLATE))
    radii[template] = (eps_format * scale).item()
    radii[(kinds > 0) & (kinds % 4 == INPUT)] = (eps_input * scale).item()
    return radii


# --------------------------------------------------------------------------------------------
# The prompt
# --------------------------------------------------------------------------------------------


class ContextPrompt(nn.Module):
    """The context's frozen embeddings ``context`` (a buffer, n × h) plus the trained offsets
    ``delta_embedding.weight`` (zero at the start); ``forward()`` is their sum, the rows the model reads.

    ``types`` decide which rows train: a gradient hook zeroes Δ's gradient on label and separator rows
    (as the paper keeps the labels), and :meth:`project_` pulls every row back into its ε-ball."""

    def __init__(self, rows: torch.Tensor, types: list[int], radii: torch.Tensor):
        super().__init__()
        self.num_virtual_tokens = rows.shape[0]
        self.register_buffer("context", rows.detach().clone().float())
        self.delta_embedding = nn.Embedding(*rows.shape, _weight=torch.zeros(rows.shape))
        kinds = torch.tensor(types, dtype=torch.long)
        trains = (kinds % 4 == INPUT_TEMPLATE) | (kinds % 4 == INPUT) | (kinds % 4 == OUTPUT_TEMPLATE)
        self.register_buffer("trains", trains.unsqueeze(1), persistent=False)  # (n, 1)
        self.register_buffer("radii", radii, persistent=False)  # (n,)
        self.delta_embedding.weight.register_hook(lambda grad: grad * self.trains.to(grad.dtype))

    def forward(self) -> torch.Tensor:
        return self.context + self.delta_embedding.weight  # (n, h)

    @torch.no_grad()
    def project_(self) -> None:
        """``Δ_i ← Δ_i · ε_i / max(‖Δ_i‖, ε_i)`` for every row that moved (a zero row stays zero)."""
        delta = self.delta_embedding.weight
        norms = delta.float().norm(p=2, dim=1)  # (n,)
        scale = torch.where(norms > 0, self.radii / torch.maximum(norms, self.radii), torch.ones_like(norms))
        delta.mul_(scale.to(delta.dtype).unsqueeze(1))


# --------------------------------------------------------------------------------------------
# CPT's loss
# --------------------------------------------------------------------------------------------


def sequence_labels(
    prompt_ids: torch.Tensor, prompt_types: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and types of the whole sequence ``[context; row]`` (B, n + T): the context's label tokens
    are targets too; a row's targets (labels ≠ -100) are one more example, typed 4 after the context's
    largest type, as peft shifts a training example's types."""
    batch = labels.shape[0]
    row_types = torch.where(labels != IGNORE_INDEX, LABEL + prompt_types.max(), 0)  # (B, T)
    types = torch.cat([prompt_types.expand(batch, -1), row_types], dim=1)  # (B, n + T)
    targets = torch.cat([prompt_ids.expand(batch, -1), labels], dim=1)
    return torch.where(label_rows(types), targets, IGNORE_INDEX), types


def decay_weights(types: torch.Tensor, decay: float) -> torch.Tensor:
    """Per position (B, L): ``γ^j`` where ``j`` counts the label groups (examples) of the row that come
    after this position's group; positions outside a label group weigh 1."""
    groups = torch.unique(types[label_rows(types)])  # every example's label type, ascending (G,)
    if groups.numel() == 0:
        return torch.ones(types.shape, dtype=torch.float32, device=types.device)
    present = (types.unsqueeze(-1) == groups).any(dim=1)  # (B, G): the row holds that example's labels
    later = present.flip(-1).cumsum(-1).flip(-1) - present.long()  # (B, G): groups of the row after it
    group_weight = decay_powers(decay, groups.numel()).to(types.device)[later]  # (B, G)
    member = types.unsqueeze(-1) == groups  # (B, L, G)
    weights = (member.float() * group_weight.unsqueeze(1)).sum(-1)
    return torch.where(member.any(-1), weights, 1.0)


def decay_powers(decay: float, count: int) -> torch.Tensor:
    """``γ^0 … γ^count`` by repeated multiplication in double precision, then fp32 (as peft forms them)."""
    powers, value = [], 1.0
    for _ in range(count + 1):
        powers.append(value)
        value *= decay
    return torch.tensor(powers, dtype=torch.float64).float()


def cpt_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, types: torch.Tensor, cfg: CPTConfig
) -> tuple[torch.Tensor, int]:
    """(Σ w_t · CE_t, number of scored positions) over the shifted sequence: position t predicts
    token t + 1, as peft's ``calculate_loss``; divided by the count it is peft's loss."""
    shifted_labels, shifted_types = labels[:, 1:], types[:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), shifted_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, L-1)
    scored = shifted_labels != IGNORE_INDEX
    if cfg.opt_weighted_loss_type == "decay":
        losses = losses * decay_weights(shifted_types, cfg.opt_loss_decay_factor)
    return (losses * scored).sum(), int(scored.sum())


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


@register
class CPT(SoftPromptMethod):
    name = "cpt"
    description = "CPT: tuned in-context examples as the prompt, labels kept, ε-projected (arXiv 2410.17222)"
    config_cls: ClassVar[type[CPTConfig]] = CPTConfig
    peft_type = "CPT"
    trainable_formula = "n_context_tokens · hidden_size (label and separator rows get no gradient)"
    prompt_kind = "input"
    packing_refusal = "prepends the context per row and reads its labels per row"
    adapter_omits = ("context", "input_template", "output_template", "intra_separator", "inter_separator")

    cfg: CPTConfig

    def __init__(self, cfg: CPTConfig, task: str = "causal_lm"):
        super().__init__(cfg, task)
        self.token_ids: list[int] = list(cfg.cpt_token_ids or [])
        self.types: list[int] = list(cfg.cpt_tokens_type_mask or [])

    @classmethod
    def validate_config(cls, cfg: CPTConfig, recipe) -> None:
        explicit = cfg.cpt_token_ids is not None
        lengths = {
            len(v) for v in (cfg.cpt_token_ids, cfg.cpt_mask, cfg.cpt_tokens_type_mask) if v is not None
        }
        checks = [
            (
                recipe.model.task != "causal_lm",
                "model.task",
                f"cpt trains causal_lm models only (as peft), not {recipe.model.task}",
                "use prompt_tuning for other tasks",
            ),
            (
                recipe.objective.name != "sft",
                "objective.name",
                f"cpt trains with its own context loss (sft data), not {recipe.objective.name}",
                "use objective.name: sft",
            ),
            (
                bool(cfg.context) == explicit,
                "method.context",
                "cpt needs its context: a context file or peft's cpt_token_ids, exactly one",
                "set method.context: FILE.jsonl (one {input, output} per line)",
            ),
            (
                explicit and cfg.cpt_tokens_type_mask is None,
                "method.cpt_tokens_type_mask",
                "cpt_token_ids needs each token's type",
                "give cpt_tokens_type_mask (4k+1..4k+4 per example k, 0 separators)",
            ),
            (
                len(lengths) > 1,
                "method.cpt_tokens_type_mask",
                "cpt_token_ids, cpt_mask and cpt_tokens_type_mask differ in length",
                "give one entry per context token in each",
            ),
            (
                explicit and not cfg.cpt_token_ids,
                "method.cpt_token_ids",
                "is empty",
                "give the context's token ids",
            ),
        ]
        for bad, key, what, hint in checks:
            if bad:
                raise RecipeError(key, what, hint)

    # -- building ------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> PromptedModel:
        """The context as the input prompt: no classifier head (causal LMs only) and no SPoT transfer
        (the prompt *is* the user's examples)."""
        wrapped = PromptedModel(model, self.task)
        self.set_prompt_module(wrapped, self.build_prompt(model))
        return wrapped

    def resolve_context(self, model: nn.Module) -> None:
        """Token ids and types from the context file (once; a loaded adapter brings its own)."""
        if self.token_ids:
            return
        tokenizer = load_base_tokenizer(model, "method.context")
        self.token_ids, self.types = context_layout(tokenizer, read_context(self.cfg.context), self.cfg)

    def build_prompt(self, model: nn.Module) -> ContextPrompt:
        self.resolve_context(model)
        embeddings = model.get_input_embeddings()
        vocab, hidden = embeddings.weight.shape
        if max(self.token_ids) >= vocab or min(self.token_ids) < 0:
            raise RecipeError(
                "method.cpt_token_ids",
                f"holds ids outside the vocabulary (0 … {vocab - 1})",
                "build the context with this model's tokenizer",
            )
        with torch.no_grad():
            rows = embeddings(torch.tensor(self.token_ids, device=embeddings.weight.device)).float().cpu()
        return ContextPrompt(rows, self.types, self.radii(hidden)).to(embeddings.weight.device)

    def fixed_prompt(self, rows: torch.Tensor, model: PromptedModel) -> ContextPrompt:
        """A loaded adapter's rows as the context (its offsets start at zero again)."""
        return ContextPrompt(rows, self.types, self.radii(rows.shape[1]))

    def radii(self, hidden: int) -> torch.Tensor:
        cfg = self.cfg
        return projection_radii(
            self.types, hidden, cfg.opt_projection_epsilon, cfg.opt_projection_format_epsilon
        )

    def prompt_parameter_count(self, model: PromptedModel) -> int:
        return len(self.token_ids) * model.get_input_embeddings().weight.shape[1]

    def summary_lines(self) -> list[str]:
        groups = len({t for t in self.types if t > 0 and t % 4 == 0})
        weighting = (
            f"decay γ={self.cfg.opt_loss_decay_factor}"
            if self.cfg.opt_weighted_loss_type == "decay"
            else "none"
        )
        return [
            f"cpt context: {len(self.token_ids)} tokens, {groups} labelled examples; loss weighting {weighting}"
        ]

    # -- training: CPT's loss and the projection -------------------------------------------
    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """CPT's loss of a micro-batch, summed: the context's labels and the row's, weighted."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], virtual_logits=True)
        if not bool((batch["labels"] != IGNORE_INDEX).any()):  # a torchrun stand-in: counts for nothing
            return out.logits.sum() * 0.0
        labels, types = self.sequence_targets(batch["labels"].to(out.logits.device))
        return cpt_loss_sum(out.logits, labels, types, self.cfg)[0]

    def loss_targets(self, batch: dict[str, torch.Tensor]) -> int:
        """Positions :meth:`loss_sum` scores: the context's label tokens in every row, and the rows'."""
        if not bool((batch["labels"] != IGNORE_INDEX).any()):
            return 0
        labels, _ = self.sequence_targets(batch["labels"])
        return int((labels[:, 1:] != IGNORE_INDEX).sum())

    def sequence_targets(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor(self.token_ids, dtype=torch.long, device=labels.device).unsqueeze(0)
        types = torch.tensor(self.types, dtype=torch.long, device=labels.device).unsqueeze(0)
        return sequence_labels(ids, types, labels)

    def after_step(self, model: nn.Module, step: int) -> None:
        self.prompt_module(model).project_()

    # -- saving --------------------------------------------------------------------------
    def adapter_config(self, model: PromptedModel) -> dict[str, Any]:
        return {
            **self.config_fields(self.cfg),
            "cpt_token_ids": list(self.token_ids),
            "cpt_mask": list(self.cfg.cpt_mask or [1] * len(self.token_ids)),
            "cpt_tokens_type_mask": list(self.types),
            "num_virtual_tokens": len(self.token_ids),
            "token_dim": model.get_input_embeddings().weight.shape[1],
            "num_transformer_submodules": 1,
            "num_attention_heads": text_config(model.config).num_attention_heads,
            "num_layers": text_config(model.config).num_hidden_layers,
            "modules_to_save": None,
            "tokenizer_name_or_path": model.name_or_path or None,
        }

    def on_save(self, model: nn.Module) -> None:
        """Nothing to forget: the stored prompt and the context's ids replace the context file."""


__all__ = ["CPT", "CPTConfig", "ContextPrompt", "context_layout", "cpt_loss_sum", "decay_weights"]
