"""Evaluation: token-weighted loss and perplexity, accuracy, and exact match by greedy generation.

``eval_loss`` is the sum of per-token negative log-likelihoods over the whole eval set divided by
the number of label tokens, computed here from the logits. Averaging per-batch means instead would
weight a short batch as much as a long one and make the number depend on the batch size.

Generation for causal LMs is the greedy loop of :mod:`peftcli.decoding` over a KV cache on
left-padded prompts. Owning the loop keeps it working for models whose wrappers ``generate`` does not
know; ``test_evaluate`` checks it gives the same tokens as ``model.generate(do_sample=False)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from peftcli.compat import cache_argument, output_cache, pop_cache
from peftcli.data.collate import collate, model_extras, pad_token_id
from peftcli.data.formats import IGNORE_INDEX, encode_prompt
from peftcli.data.pipeline import DataBundle
from peftcli.decoding import decode, eos_token_ids
from peftcli.recipe import EvalConfig

GenerateFn = Callable[[torch.nn.Module, list[list[int]], int], list[list[int]]]


class EnsembleModel(torch.nn.Module):
    """Several adapters over the same base evaluated as one model (Lester et al., 2021, Sec. 6):
    the logits are averaged, or with ``vote`` (classification) each member votes for its argmax.

    Vote logits are ``log`` of the vote shares, plus 1e-3 × the mean probability to break ties, so the
    argmax is the majority class and eval_loss is the NLL of the vote distribution. KV caches are kept
    per member (the cache argument is the list of the members' caches), so ``greedy_generate`` decodes
    from the averaged next-token logits.
    """

    def __init__(self, members: list[torch.nn.Module], vote: bool = False):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.vote = vote

    @property
    def config(self):
        return self.members[0].config

    @property
    def generation_config(self):
        return getattr(self.members[0], "generation_config", None)

    def forward(self, **kwargs):
        cache = pop_cache(kwargs)
        pasts = cache if cache is not None else [None] * len(self.members)
        outs = [
            member(**kwargs, **({cache_argument(): past} if past is not None else {}))
            for member, past in zip(self.members, pasts, strict=False)
        ]
        logits = torch.stack([out.logits.float() for out in outs])  # (K, B, ..., V)
        mean = logits.mean(dim=0)
        if self.vote:
            votes = F.one_hot(logits.argmax(-1), logits.shape[-1]).sum(0).float()  # (B, C)
            share = votes + 1e-3 * mean.softmax(-1)
            mean = (share / share.sum(-1, keepdim=True)).log()
        out = outs[0]
        out["logits"] = mean
        if kwargs.get("use_cache"):
            out[cache_argument()] = [output_cache(o) for o in outs]
        return out

    def generate(self, *args, **kwargs):
        from peftcli.recipe import RecipeError

        raise RecipeError(
            "--ensemble",
            "ensembles generate for causal LMs only (seq2seq: loss and perplexity)",
            "set eval.generate: false in the recipe, or evaluate the adapters one by one",
        )


def greedy_generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int,
    device: torch.device,
    use_cache: bool = True,
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (new tokens only, cut before the first EOS): the shared
    loop of :mod:`peftcli.decoding`, the one ``peftcli generate`` and ``chat`` use; ``use_cache`` is
    the method's ``decodes_with_cache``."""
    return decode(model, prompts, max_new_tokens, eos_ids, pad_id, device, use_cache=use_cache)


def _seq2seq_generate(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, device: torch.device
) -> list[list[int]]:
    pad_id = pad_token_id(tokenizer)
    batch = collate([{"input_ids": p, "labels": [0]} for p in prompts], tokenizer, "seq2seq")
    output = model.generate(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
    )
    return output.tolist()


def _loss_sums(
    model, tokenizer, examples: list[dict], task: str, batch_size: int, device: torch.device
) -> tuple[float, int, int]:
    """(summed NLL, label-token count, correct predictions) over ``examples``."""
    total_loss, total_tokens, correct = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = {
            k: v.to(device) for k, v in collate(examples[start : start + batch_size], tokenizer, task).items()
        }
        labels = batch["labels"]
        if task == "seq_cls":
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **model_extras(batch)
            ).logits  # (B, C)
            logits = logits.float()
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            total_tokens += labels.numel()
            correct += int((logits.argmax(dim=-1) == labels).sum())
            continue
        if task == "seq2seq":
            # labels let the model build its decoder inputs (labels shifted right); logits align with labels.
            logits = model(**batch).logits.float()  # (B, T', V)
            targets = labels
        else:
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **model_extras(batch)
            ).logits.float()
            logits, targets = logits[:, :-1, :], labels[:, 1:]  # position t predicts token t + 1
        total_loss += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
    return total_loss, total_tokens, correct


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    bundle: DataBundle,
    task: str,
    cfg: EvalConfig,
    device: torch.device,
    generate_fn: GenerateFn | None = None,
    use_cache: bool = True,
) -> dict[str, float]:
    """Metrics on ``bundle.eval``: eval_loss, perplexity, eval_examples, plus accuracy (seq_cls) or
    exact_match and generated_examples (causal_lm / seq2seq with answers, when ``cfg.generate``).

    ``generate_fn(model, prompt_ids_list, max_new_tokens) -> new token ids`` replaces the built-in
    greedy decoding; ``use_cache`` False (the model's method's ``decodes_with_cache``) decodes causal
    LMs without a KV cache. With no eval data the result is ``{"eval_examples": 0}``.
    """
    if not bundle.eval:
        return {"eval_examples": 0}
    was_training = model.training
    model.eval()
    try:
        total_loss, total_tokens, correct = _loss_sums(
            model, tokenizer, bundle.eval, task, cfg.batch_size, device
        )
        eval_loss = total_loss / max(total_tokens, 1)
        metrics: dict[str, float] = {
            "eval_loss": eval_loss,
            "perplexity": math.exp(min(eval_loss, 700.0)),  # exp overflows a float past ~709
            "eval_examples": len(bundle.eval),
        }
        if task == "seq_cls":
            metrics["accuracy"] = correct / len(bundle.eval)
        elif cfg.generate and bundle.eval_examples:
            metrics.update(_exact_match(model, tokenizer, bundle, task, cfg, device, generate_fn, use_cache))
    finally:
        model.train(was_training)
    return metrics


def _exact_match(
    model,
    tokenizer,
    bundle: DataBundle,
    task: str,
    cfg: EvalConfig,
    device: torch.device,
    generate_fn: GenerateFn | None,
    use_cache: bool = True,
) -> dict[str, float]:
    examples = bundle.eval_examples[: cfg.max_generate_examples]
    max_length = bundle.stats.get("max_length")
    prompts = [encode_prompt(tokenizer, example["prompt"], task, max_length) for example in examples]
    eos_ids, pad_id = eos_token_ids(model, tokenizer), pad_token_id(tokenizer)
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        if generate_fn is not None:
            outputs += generate_fn(model, chunk, cfg.max_new_tokens)
        elif task == "seq2seq":
            outputs += _seq2seq_generate(model, tokenizer, chunk, cfg.max_new_tokens, device)
        else:
            outputs += greedy_generate(model, chunk, cfg.max_new_tokens, eos_ids, pad_id, device, use_cache)
    matches = sum(
        tokenizer.decode(tokens, skip_special_tokens=True).strip() == example["answer"].strip()
        for tokens, example in zip(outputs, examples, strict=False)
    )
    return {"exact_match": matches / len(examples), "generated_examples": len(examples)}
