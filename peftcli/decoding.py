"""Token-by-token decoding over a KV cache: the one loop behind eval's exact match, ``peftcli generate``,
``peftcli chat`` and lm-eval's generation tasks.

Owning the loop (rather than calling ``transformers``' ``generate``) keeps it working for peftcli's
wrappers that ``generate`` does not know (soft prompts and prefixes in ``PromptedModel``, ensembles):
each step is a plain ``forward`` with the cache, so every method's own forward path runs. Prompts are
left-padded so every row's next token sits in the last column; position ids follow the attention mask
(as in ``transformers``' ``generate``), so padding does not shift them.

A method whose forward needs the whole sequence for every token (X-LoRA: each token's expert mix comes
from a first pass over the sequence; ``Method.decodes_with_cache`` False) decodes with ``use_cache=False``:
every step re-runs the whole left-padded sequence so far, with its attention mask and position ids, and
takes the last column's logits (what ``transformers``' ``generate`` does without a cache). It costs one
forward over the whole sequence per new token, but the tokens are those the model gives the sequence.

Greedy decoding takes the argmax. Sampling divides the logits by the temperature, keeps the smallest
set of most likely tokens whose probability reaches ``top_p`` (Holtzman et al., 2020, nucleus
sampling) and draws from it with one ``torch.Generator`` per row, seeded from the run's seed and the
row's index in the input: a row's draws do not depend on which other rows share its batch, so a
resumed ``peftcli generate`` writes what an uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from peftcli.compat import cache_argument, output_cache

# Called after every step with the tokens chosen for each row (pad for finished rows); ``chat``
# streams text from it.
OnStep = Callable[[list[int]], None]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when ``temperature`` is 0."""

    temperature: float = 0.0  # 0: argmax; else logits / temperature before the softmax
    top_p: float = 1.0  # nucleus: keep the most likely tokens up to this probability mass
    seed: int = 0  # with ``row_ids``, seeds one generator per row

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()


def eos_token_ids(model, tokenizer) -> set[int]:
    """Ids that end a continuation: the generation config's (chat models list several) and the tokenizer's."""
    ids = set()
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def row_generator(seed: int, row_id: int, device: torch.device) -> torch.Generator:
    """The generator of one row: a fixed function of (seed, row), never of the batch."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + row_id) % (2**63 - 1))
    return generator


def nucleus_probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """``softmax(logits / T)`` restricted to the top-p nucleus and renormalised. logits: (B, V)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the tokens ranked above
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def choose_next(
    logits: torch.Tensor, sampling: Sampling, generators: list[torch.Generator] | None
) -> torch.Tensor:
    """The next token of every row. logits: (B, V) -> (B,)."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = nucleus_probabilities(logits, sampling.temperature, sampling.top_p)
    assert generators is not None
    picks = [
        torch.multinomial(row, 1, generator=generator)
        for row, generator in zip(probs, generators, strict=True)
    ]
    return torch.cat(picks)


def step_logits(model, inputs: dict[str, torch.Tensor], past, use_cache: bool):
    """The last column's logits (B, V) of one step, and the cache for the next (None without one)."""
    if not use_cache:
        return model(**inputs, use_cache=False).logits[:, -1, :], None
    out = model(**inputs, use_cache=True, **{cache_argument(): past})
    return out.logits[:, -1, :], output_cache(out)


def next_inputs(inputs: dict[str, torch.Tensor], next_token: torch.Tensor, use_cache: bool):
    """The next step's inputs: the mask one column longer; with a cache only the new token (the cache
    holds what came before), else the whole sequence again with the new token appended."""
    mask = inputs["attention_mask"]
    attention_mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
    position = inputs["position_ids"][:, -1:] + 1  # (B, 1)
    if use_cache:
        return {"input_ids": next_token[:, None], "attention_mask": attention_mask, "position_ids": position}
    return {
        "input_ids": torch.cat([inputs["input_ids"], next_token[:, None]], dim=1),  # (B, L + n)
        "attention_mask": attention_mask,
        "position_ids": torch.cat([inputs["position_ids"], position], dim=1),  # (B, L + n)
    }


def left_padded(prompts: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The first step's inputs: prompts left-padded, positions counted from each row's first token."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)  # (B, L)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


@torch.no_grad()
def decode(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int,
    device: torch.device,
    sampling: Sampling = GREEDY,
    row_ids: list[int] | None = None,
    on_step: OnStep | None = None,
    keep_eos: bool = False,
    use_cache: bool = True,
) -> list[list[int]]:
    """Continuations of ``prompts`` (new tokens only, cut before the first EOS; with ``keep_eos``, just
    after it, so a caller can tell a finished continuation from one cut at ``max_new_tokens``).

    ``row_ids`` (default 0..B-1) seed the per-row generators when sampling. ``use_cache`` False (for a
    method whose ``decodes_with_cache`` is False) re-runs the whole sequence at every step.
    """
    inputs = left_padded(prompts, pad_id, device)
    eos = torch.tensor(sorted(eos_ids) or [-1], device=device)
    generators = None
    if not sampling.greedy:
        rows = row_ids if row_ids is not None else list(range(len(prompts)))
        generators = [row_generator(sampling.seed, row, device) for row in rows]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # (B,)
    generated: list[torch.Tensor] = []
    past = None
    for _ in range(max_new_tokens):
        logits, past = step_logits(model, inputs, past, use_cache)
        next_token = choose_next(logits, sampling, generators)  # (B,)
        next_token = torch.where(finished, torch.full_like(next_token, pad_id), next_token)
        generated.append(next_token)
        if on_step is not None:
            on_step(next_token.tolist())
        finished |= torch.isin(next_token, eos)
        if bool(finished.all()):
            break
        inputs = next_inputs(inputs, next_token, use_cache)
    tokens = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in prompts]  # (B, N)
    results = []
    for row in tokens:
        cut = next((i + keep_eos for i, token in enumerate(row) if token in eos_ids), len(row))
        results.append(row[:cut])
    return results
